"""`tinygpt eval` and `tinygpt leaderboard`: loss, perplexity and bits per byte of .tinygpt files.

tinygpt eval tiny.tinygpt --corpus heldout.txt                 # loss 1.234 | ppl 3.43 | bpb 1.78
tinygpt eval tiny.tinygpt                                      # last 1% of the built-in Shakespeare
tinygpt leaderboard runs/ --corpus heldout.txt --out report.md # every .tinygpt in runs/, one table + chart
"""

from __future__ import annotations

import argparse


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", default=None, help="text file, directory or .jsonl (default: built-in Shakespeare)")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text")
    p.add_argument(
        "--heldout",
        type=float,
        default=None,
        help="evaluate only the last fraction of the text (default: 0.01 of the built-in corpus, all of a file)",
    )
    p.add_argument("--max-chars", type=int, default=None, help="evaluate only the first N characters")
    p.add_argument("--ctx", type=int, default=None, help="window length in tokens (default: the model's n_ctx)")
    p.add_argument("--stride", type=int, default=None, help="new tokens scored per window (default: ctx)")
    p.add_argument("--batch", type=int, default=8, help="windows per forward pass")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")


def add_parsers(sub) -> None:
    """Register `eval`, `leaderboard` and `memorization` on an argparse subparsers object."""
    p = sub.add_parser("eval", help="loss, perplexity and bits per byte of a .tinygpt model on a text")
    p.add_argument("model", help="the .tinygpt file")
    _common(p)
    p = sub.add_parser("leaderboard", help="score every .tinygpt in a folder on the same held-out text (bpb)")
    p.add_argument("folder", help="folder searched recursively for .tinygpt files (or one file)")
    _common(p)
    p.add_argument("--out", default=None, help="write a markdown report here (and the chart as REPORT.bpb.html)")

    p = sub.add_parser("memorization", help="greedy verbatim-continuation rate on training vs held-out examples")
    p.add_argument("model", help="the .tinygpt file")
    p.add_argument(
        "--train",
        default=None,
        help="training examples: a .jsonl (one example per record) or a text file / directory (random windows); "
        "default: the built-in Shakespeare without its last 1%%",
    )
    p.add_argument("--heldout", default=None, help="held-out examples, as --train (default: last 1%% of Shakespeare)")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text")
    p.add_argument("--prefix", type=int, default=32, help="prompt tokens (default 32)")
    p.add_argument("--continuation", type=int, default=32, help="greedy tokens compared (default 32)")
    p.add_argument("-n", type=int, default=100, help="examples per set (default 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")


def _corpus(a: argparse.Namespace):
    if a.corpus is not None and a.text_field != "text":
        from tinygpt.data import load_corpus

        return load_corpus(a.corpus, text_field=a.text_field)
    if a.corpus is not None:
        from pathlib import Path

        if not Path(a.corpus).exists():
            raise ValueError(f"--corpus {a.corpus} does not exist")
        return Path(a.corpus)
    return None


def cmd_eval(a: argparse.Namespace) -> int:
    from tinygpt.checkpoint import load
    from tinygpt.eval.perplexity import evaluate

    model = load(a.model, device=a.device)
    res = evaluate(
        model,
        _corpus(a),
        a.ctx,
        a.batch,
        a.stride,
        heldout=a.heldout,
        max_chars=a.max_chars,
        progress=not a.no_progress,
    )
    print(res)
    print(
        f"({res.n_tokens:,} tokens, {res.n_bytes:,} bytes, {res.tokenizer} tokenizer, ctx {res.ctx}, "
        f"stride {res.stride}, {res.source})"
    )
    return 0


def cmd_leaderboard(a: argparse.Namespace) -> int:
    from tinygpt.eval.perplexity import leaderboard

    board = leaderboard(
        a.folder,
        _corpus(a),
        ctx=a.ctx,
        stride=a.stride,
        batch_size=a.batch,
        heldout=a.heldout,
        max_chars=a.max_chars,
        device=a.device,
        progress=not a.no_progress,
    )
    print(board.table())
    if a.out:
        path = board.write_report(a.out)
        print(f"wrote {path} and {path.with_name(path.stem + '.bpb.html')}")
    return 0 if board.rows else 2


def _examples(spec: str | None, text_field: str, default):
    if spec is None:
        return default()
    from pathlib import Path

    from tinygpt.data import load_corpus

    if not Path(spec).exists():
        raise ValueError(f"{spec} does not exist")
    c = load_corpus(spec, text_field=text_field)
    return list(c.iter_texts()) if c.kind == "jsonl" else c


def cmd_memorization(a: argparse.Namespace) -> int:
    from tinygpt.checkpoint import load
    from tinygpt.eval.perplexity import Text, corpus_text, heldout_text, memorization_test

    model = load(a.model, device=a.device)

    def shakespeare_train():
        full, held = corpus_text(None), heldout_text(None)
        return Text(full[: len(full) - len(held)])

    res = memorization_test(
        model,
        _examples(a.train, a.text_field, shakespeare_train),
        _examples(a.heldout, a.text_field, lambda: Text(heldout_text(None))),
        prefix_tokens=a.prefix,
        continuation_tokens=a.continuation,
        n=a.n,
        seed=a.seed,
        batch_size=a.batch,
        progress=not a.no_progress,
    )
    print(res.table())
    return 0


COMMANDS = {"eval": cmd_eval, "leaderboard": cmd_leaderboard, "memorization": cmd_memorization}
