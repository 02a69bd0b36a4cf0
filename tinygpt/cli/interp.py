"""`tinygpt tuned-lens`: train a tuned lens for a `.tinygpt` model, save it, print logit vs tuned KL per layer.

    tinygpt tuned-lens tiny.tinygpt --corpus FILE --steps 300 --lr 1e-3 --out tiny.lenses

`add_parsers(sub)` registers the subcommands on the main parser; `COMMANDS` maps them to handlers.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "tuned-lens",
        help="train a tuned lens (Belrose et al. 2023) for a .tinygpt model and report its KL per layer",
        description="Train one affine translator per layer so each layer's residual stream, read through the "
        "final LayerNorm and unembedding, matches the model's output distribution (KL). Saves a .lenses file "
        "pinned to the model and prints the held-out KL per layer for the logit lens and the tuned lens.",
    )
    p.add_argument("model", help="the .tinygpt file")
    p.add_argument("--corpus", default=None, help="text file, directory or .jsonl (default: built-in Shakespeare)")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument(
        "--optimizer",
        default="adam",
        choices=["adam", "sgd"],
        help="adam (default; lr 1e-3, warmup) or sgd (Nesterov, the paper's default; lr 1.0)",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="learning rate (default 1e-3 for adam; 1.0 for sgd, in the paper's convention: "
        "torch's SGD gets lr * (1 - momentum))",
    )
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--ctx", type=int, default=None, help="sequence length (default: the model's n_ctx)")
    p.add_argument("--weight-decay", type=float, default=1e-3)
    p.add_argument("--val-split", type=float, default=0.01, help="held-out fraction for the report")
    p.add_argument("--eval-windows", type=int, default=16, help="held-out windows for the KL table")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="the .lenses file (default: MODEL with suffix .lenses)")
    p.add_argument("--no-progress", action="store_true")


def cmd_tuned_lens(a: argparse.Namespace) -> int:
    from tinygpt.checkpoint import load
    from tinygpt.data import load_corpus
    from tinygpt.interp.lens import lens_report, tuned_lens
    from tinygpt.training.loop import default_device

    model = load(a.model, device=a.device or default_device())
    corpus = a.corpus
    if corpus is not None:
        corpus = load_corpus(corpus, text_field=a.text_field)
    out = Path(a.out) if a.out else Path(a.model).with_suffix(".lenses")
    lens = tuned_lens(
        model,
        corpus,
        steps=a.steps,
        lr=a.lr,
        optimizer=a.optimizer,
        batch_size=a.batch,
        ctx=a.ctx,
        weight_decay=a.weight_decay,
        val_split=a.val_split,
        seed=a.seed,
        progress=not a.no_progress,
    )
    lens.train_settings["corpus"] = a.corpus
    lens.save(out)
    report = lens_report(model, lens, corpus, n_windows=a.eval_windows, ctx=a.ctx, val_split=a.val_split)
    print(report.table())
    print(f"saved {out}")
    return 0


COMMANDS = {"tuned-lens": cmd_tuned_lens}
