"""`tinygpt distill`: knowledge distillation from a .tinygpt or Hugging Face teacher into a student.

    tinygpt distill nano --teacher tiny.tinygpt --steps 200 --temperature 4 --alpha 0.7 --out nano-kd.tinygpt
    tinygpt distill student.tinygpt --teacher hf-dir/ --corpus FILE --tokenizer hf-dir/ --out student-kd.tinygpt
    tinygpt distill nano --out nano-kd.tinygpt --steps 400 --resume      # continue (teacher from the file)

STUDENT is an existing .tinygpt file, or a preset name (nano, tiny, ...) for a fresh student with the
teacher's tokenizer. Options left out keep `TrainConfig`'s defaults (or, with --resume, the saved run's).
"""

from __future__ import annotations

import argparse

from tinygpt.cli._command import CommandError, command, report
from tinygpt.cli._flags import add, add_corpus_flags, add_run_flags, add_training_flags, corpus_arg, given, run_options

# flag dest -> distill() keyword, for the distillation settings (None: not given)
_KD_FLAGS = {"temperature": "temperature", "alpha": "alpha", "reverse_kl": "reverse_kl", "on_policy": "on_policy"}


def _distill_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("student", help="a .tinygpt file, or a preset name (nano, tiny, ...) for a fresh student")
    p.add_argument("--teacher", default=None, help=".tinygpt file or Hugging Face causal-LM directory")
    add_corpus_flags(p)
    add(p, "--tokenizer", help="optional; checked against the teacher's tokenizer")
    add(p, "--temperature", help="softmax temperature T (default 2)")
    add(p, "--alpha", help="weight of the KL term; 1-alpha weighs NLL (default 0.5)")
    p.add_argument("--reverse-kl", action="store_true", default=None, help="KL(student || teacher) (MiniLLM)")
    p.add_argument("--on-policy", type=float, default=None, help="fraction of student-generated batches (GKD)")
    add_training_flags(p, ctx="the shorter model context")
    add_run_flags(p, out="student checkpoint to write (.tinygpt)", resume="continue the distillation saved in --out")


@command("distill", "distil a teacher (.tinygpt or Hugging Face directory) into a student", flags=_distill_flags)
def cmd_distill(a: argparse.Namespace) -> int:
    from tinygpt.training import distill

    if a.teacher is None and not a.resume:
        raise CommandError("--teacher is required (a .tinygpt file or a Hugging Face model directory)")
    res = distill(
        None if a.resume else a.student,
        teacher=a.teacher,
        corpus=corpus_arg(a),
        tokenizer=a.tokenizer,
        **given(a, _KD_FLAGS),
        **run_options(a),
    )
    return report(res, ("loss", "kl", "nll"), (f"saved {res.path}",))
