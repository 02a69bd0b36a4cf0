"""Does distillation beat plain training? A small student on the built-in Shakespeare, same steps and seed.

    python benchmarks/distill_vs_train.py --teacher-steps 600 --steps 300 --threads 2

1. Train a teacher (`tiny` by default) on next-token loss (or reuse --teacher FILE).
2. Train the student preset (`nano`) on next-token loss for --steps.
3. Distil the teacher into the same student preset: same steps, seed (so the same initialisation and the
   same batches), schedule and learning rate; only the objective differs.
Prints both students' validation losses (the plain next-token loss on the same held-out windows).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import tinygpt
from tinygpt.training.distill import distill


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default=None, help="an existing teacher .tinygpt (skips step 1)")
    ap.add_argument("--teacher-preset", default="tiny")
    ap.add_argument("--teacher-steps", type=int, default=600)
    ap.add_argument("--student-preset", default="nano")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--max-lr", type=float, default=3e-3)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/distill_vs_train")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    common = dict(val_every=100, val_batches=16, device="cpu", progress=False)

    t0 = time.perf_counter()
    if a.teacher:
        teacher_path = Path(a.teacher)
    else:
        teacher_path = out / f"teacher-{a.teacher_preset}.tinygpt"
        tr = tinygpt.train(
            preset=a.teacher_preset, steps=a.teacher_steps, batch_size=8, max_lr=2e-3, warmup=30,
            seed=a.seed, out=teacher_path, **common,
        )  # fmt: skip
        print(f"teacher {a.teacher_preset}: {tr} ({time.perf_counter() - t0:.0f}s)")
    teacher_val = tinygpt.read_checkpoint(teacher_path).train_state.get("val_loss")

    student = dict(steps=a.steps, batch_size=a.batch, ctx=a.ctx, max_lr=a.max_lr, warmup=20, seed=a.seed, **common)
    t1 = time.perf_counter()
    plain = tinygpt.train(preset=a.student_preset, out=out / "student-plain.tinygpt", **student)
    t2 = time.perf_counter()
    kd = distill(
        a.student_preset, teacher_path, None, temperature=a.temperature, alpha=a.alpha,
        out=out / "student-distilled.tinygpt", **student,
    )  # fmt: skip
    t3 = time.perf_counter()
    result = {
        "teacher": str(teacher_path),
        "teacher_val_loss": teacher_val,
        "student_preset": a.student_preset,
        "steps": a.steps,
        "batch_size": a.batch,
        "ctx": a.ctx,
        "max_lr": a.max_lr,
        "temperature": a.temperature,
        "alpha": a.alpha,
        "seed": a.seed,
        "plain_val_losses": plain.val_losses,
        "distilled_val_losses": kd.val_losses,
        "plain_seconds": round(t2 - t1, 1),
        "distill_seconds": round(t3 - t2, 1),
    }
    print(json.dumps(result, indent=1))
    print(
        f"student {a.student_preset}, {a.steps} steps: plain val loss {plain.final_val_loss:.4f}, "
        f"distilled val loss {kd.final_val_loss:.4f} (teacher {teacher_val:.4f})"
    )


if __name__ == "__main__":
    main()
