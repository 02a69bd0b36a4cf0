"""`tinygpt tuned-lens`: train a tuned lens for a `.tinygpt` model, save it, print logit vs tuned KL per layer.

tinygpt tuned-lens tiny.tinygpt --corpus FILE --steps 300 --lr 1e-3 --out tiny.lenses
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tinygpt.cli._command import command
from tinygpt.cli._flags import add, add_corpus_flags, add_device_flags, corpus_arg, progress

_DESCRIPTION = (
    "Train one affine translator per layer so each layer's residual stream, read through the final LayerNorm and "
    "unembedding, matches the model's output distribution (KL). Saves a .lenses file pinned to the model and "
    "prints the held-out KL per layer for the logit lens and the tuned lens."
)


def _tuned_lens_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the .tinygpt file")
    add_corpus_flags(p)
    add(p, "--steps", default=300, help="optimizer steps (default 300)")
    p.add_argument(
        "--optimizer",
        default="adam",
        choices=["adam", "sgd"],
        help="adam (default; lr 1e-3, warmup) or sgd (Nesterov, the paper's default; lr 1.0)",
    )
    add(
        p,
        "--lr",
        help="learning rate (default 1e-3 for adam; 1.0 for sgd, in the paper's convention: "
        "torch's SGD gets lr * (1 - momentum))",
    )
    add(p, "--batch", default=8, help="sequences per step (default 8)")
    add(p, "--ctx", help="sequence length (default: the model's n_ctx)")
    add(p, "--weight-decay", default=1e-3, help="weight decay (default 1e-3)")
    add(p, "--val-split", default=0.01, help="held-out fraction for the report (default 0.01)")
    p.add_argument("--eval-windows", type=int, default=16, help="held-out windows for the KL table")
    add(p, "--seed", default=0, help="random seed (default 0)")
    add(p, "--out", required=False, help="the .lenses file (default: MODEL with suffix .lenses)")
    add(p, "--overwrite")
    add_device_flags(p)


@command(
    "tuned-lens",
    "train a tuned lens (Belrose et al. 2023) for a .tinygpt model and report its KL per layer",
    flags=_tuned_lens_flags,
    description=_DESCRIPTION,
)
def cmd_tuned_lens(a: argparse.Namespace) -> int:
    from tinygpt.checkpoint import load
    from tinygpt.interp import lens_report, tuned_lens
    from tinygpt.training import default_device

    model = load(a.model, device=a.device or default_device())
    corpus = corpus_arg(a, load=True)
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
        progress=progress(a),
    )
    lens.train_settings["corpus"] = a.corpus
    lens.save(out)
    report = lens_report(
        model, lens, corpus, n_windows=a.eval_windows, ctx=a.ctx, val_split=a.val_split, progress=progress(a)
    )
    print(report.table())
    print(f"saved {out}")
    return 0
