"""`tinygpt eval`, `tinygpt leaderboard` and `tinygpt memorization`.

tinygpt eval tiny.tinygpt --corpus heldout.txt                 # loss 1.234 | ppl 3.43 | bpb 1.78
tinygpt eval tiny.tinygpt                                      # last 1% of the built-in Shakespeare
tinygpt leaderboard runs/ --corpus heldout.txt --out report.md # every .tinygpt in runs/, one table + chart
tinygpt memorization tiny.tinygpt --train seen.jsonl --heldout unseen.jsonl --prefix 32 --continuation 32
"""

from __future__ import annotations

import argparse

from tinygpt.cli._command import command
from tinygpt.cli._flags import add, add_corpus_flags, add_device_flags, corpus_arg, progress


def _text_flags(p: argparse.ArgumentParser) -> None:
    """The held-out text and the windows of `eval` and `leaderboard`."""
    add_corpus_flags(p)
    p.add_argument(
        "--heldout",
        type=float,
        default=None,
        help="evaluate only the last fraction of the text (default: 0.01 of the built-in corpus, all of a file)",
    )
    p.add_argument("--max-chars", type=int, default=None, help="evaluate only the first N characters")
    add(p, "--ctx", help="window length in tokens (default: the model's n_ctx)")
    p.add_argument("--stride", type=int, default=None, help="new tokens scored per window (default: ctx)")
    add(p, "--batch", default=8, help="windows per forward pass (default 8)")
    add_device_flags(p, device="cpu")


def _options(a: argparse.Namespace) -> dict:
    """The keyword arguments `_text_flags` give `evaluate` and `leaderboard`."""
    return dict(
        ctx=a.ctx,
        stride=a.stride,
        batch_size=a.batch,
        heldout=a.heldout,
        max_chars=a.max_chars,
        progress=progress(a),
    )


def _eval_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the .tinygpt file")
    _text_flags(p)


@command("eval", "loss, perplexity and bits per byte of a .tinygpt model on a text", flags=_eval_flags)
def cmd_eval(a: argparse.Namespace) -> int:
    from tinygpt.checkpoint import load
    from tinygpt.eval import evaluate

    res = evaluate(load(a.model, device=a.device), corpus_arg(a, load=True), **_options(a))
    print(res)
    print(f"({res.details()})")
    return 0


def _leaderboard_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="folder searched recursively for .tinygpt files (or one file)")
    _text_flags(p)
    add(p, "--out", required=False, help="write a markdown report here (and the chart as REPORT.bpb.html)")
    add(p, "--overwrite")


@command("leaderboard", "score every .tinygpt in a folder on the same held-out text (bpb)", flags=_leaderboard_flags)
def cmd_leaderboard(a: argparse.Namespace) -> int:
    from tinygpt.eval import leaderboard

    board = leaderboard(a.folder, corpus_arg(a, load=True), device=a.device, **_options(a))
    print(board.table())
    if a.out:
        path = board.write_report(a.out)
        print(f"wrote {path} and {path.with_name(path.stem + '.bpb.html')}")
    return 0 if board.rows else 2


def _memorization_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the .tinygpt file")
    p.add_argument(
        "--train",
        default=None,
        help="training examples: a .jsonl (one example per record) or a text file / directory (random windows); "
        "default: the built-in Shakespeare without its last 1%%",
    )
    p.add_argument("--heldout", default=None, help="held-out examples, as --train (default: last 1%% of Shakespeare)")
    add(p, "--text-field")
    p.add_argument("--prefix", type=int, default=32, help="prompt tokens (default 32)")
    p.add_argument("--continuation", type=int, default=32, help="greedy tokens compared (default 32)")
    p.add_argument("-n", type=int, default=100, help="examples per set (default 100)")
    add(p, "--seed", default=0, help="random seed (default 0)")
    add(p, "--batch", default=16, help="prompts continued together (default 16)")
    add_device_flags(p, device="cpu")


def _examples(spec: str | None, text_field: str, default):
    """--train / --heldout: the records of a JSONL file (one example each), a text corpus, or `default()`."""
    if spec is None:
        return default()
    from pathlib import Path

    from tinygpt.data import CorpusError, load_corpus

    if not Path(spec).exists():
        raise CorpusError(f"{spec} does not exist")
    c = load_corpus(spec, text_field=text_field)
    return list(c.iter_texts()) if c.kind == "jsonl" else c


@command(
    "memorization",
    "greedy verbatim-continuation rate on training vs held-out examples",
    flags=_memorization_flags,
)
def cmd_memorization(a: argparse.Namespace) -> int:
    from tinygpt.checkpoint import load
    from tinygpt.eval import Text, corpus_text, heldout_text, memorization_test

    def shakespeare_train():
        full, held = corpus_text(None), heldout_text(None)
        return Text(full[: len(full) - len(held)])

    res = memorization_test(
        load(a.model, device=a.device),
        _examples(a.train, a.text_field, shakespeare_train),
        _examples(a.heldout, a.text_field, lambda: Text(heldout_text(None))),
        prefix_tokens=a.prefix,
        continuation_tokens=a.continuation,
        n=a.n,
        seed=a.seed,
        batch_size=a.batch,
        progress=progress(a),
    )
    print(res.table())
    return 0
