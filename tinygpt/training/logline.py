"""Plain progress lines for runs without a terminal (a log file, `nohup`, a scheduler), as nanoGPT prints them.

    step 50/500 | loss 5.9589 | val loss 6.0199 | lr 1.00e-03 | 2,134 tok/s | 24.5s elapsed | eta 3m41s

With a terminal (or a Jupyter kernel) the tqdm bar shows progress and no lines are printed unless `log_every`
is given; without one the bar is off and a line is printed every `log_every` steps (default: every 10% of the
run, at most every 50 steps), at the first and the last step and whenever the validation loss is measured.
Every training function built on `fit` (`train`, `finetune`, `sft`, `distill`, `lora_finetune`) and `es` uses it.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["LogLines", "default_log_every", "interactive"]


def interactive() -> bool:
    """True when progress bars can be seen: stderr is a terminal, or this runs in a Jupyter kernel."""
    try:
        if sys.stderr is not None and sys.stderr.isatty():
            return True
    except (AttributeError, ValueError):  # a closed or replaced stream
        pass
    return "ipykernel" in sys.modules


def default_log_every(steps: int) -> int:
    """Every 10% of the run, at most every 50 steps, at least every step."""
    return max(1, min(50, steps // 10))


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class LogLines:
    """Decides whether a run prints plain lines, and prints them.

    Args:
        log_every: print every N steps; None: the default when there is no terminal (see the module docstring),
            0: never. A number given prints lines with a terminal too.
        steps: the run's total steps.
        progress: whether the run shows progress at all (`progress=False` and no `log_every`: silent).
        main: this process prints (rank 0 under torchrun).
        rate: the record key of the throughput and its unit, e.g. ("tokens_per_sec", "tok/s").
    Attributes:
        on: lines are printed.
        bar: the tqdm bar should be shown (progress on and a terminal to show it).
    """

    def __init__(
        self,
        log_every: int | None,
        steps: int,
        *,
        progress: bool,
        main: bool = True,
        rate: tuple[str, str] = ("tokens_per_sec", "tok/s"),
        start_step: int = 0,
    ):
        tty = interactive()
        self.bar = progress and tty and main
        if log_every is None:
            every = default_log_every(steps) if progress and not tty else 0
        else:
            every = int(log_every)
        self.every = every
        self.on = every > 0 and main
        self.steps, self.rate = steps, rate
        self.start_step = start_step
        self._acc_time = 0.0
        self._acc_units = 0.0

    def due(self, step: int, rec: dict[str, Any]) -> bool:
        return self.on and (
            step % self.every == 0 or step == self.start_step + 1 or step == self.steps or "val_loss" in rec
        )

    def update(self, rec: dict[str, Any], *, step_time: float, units: float, write=None) -> str | None:
        """Account one step (its compute time and tokens or evaluations); print its line when due.

        Args:
            rec: the step's metrics (`step`, `loss` or `reward`, `val_loss`, `lr`, `elapsed`, ...).
            step_time: seconds the step's own work took (not validation or saving).
            units: tokens (or evaluations) the step processed.
            write: where to print (default `print` to stdout, flushed); e.g. `bar.write`.
        Returns:
            the line printed, or None.
        """
        self._acc_time += step_time
        self._acc_units += units
        step = int(rec["step"])
        if not self.due(step, rec):
            return None
        line = self.format(rec)
        self._acc_time = self._acc_units = 0.0
        (write or _print)(line)
        return line

    def format(self, rec: dict[str, Any]) -> str:
        step = int(rec["step"])
        parts = [f"step {step}/{self.steps}"]
        if "loss" in rec:
            parts.append(f"loss {rec['loss']:.4f}")
        elif "reward" in rec:
            parts.append(f"reward {rec['reward']:.4f}")
        if "val_loss" in rec:
            parts.append(f"val loss {rec['val_loss']:.4f}")
        if "lr" in rec:
            parts.append(f"lr {rec['lr']:.2e}")
        key, unit = self.rate
        if self._acc_time > 0:
            parts.append(f"{self._acc_units / self._acc_time:,.0f} {unit}")
        elif key in rec:
            parts.append(f"{rec[key]:,.0f} {unit}")
        if "elapsed" in rec:
            elapsed = float(rec["elapsed"])
            parts.append(f"{_duration(elapsed)} elapsed")
            done = step - self.start_step
            if 0 < done and step < self.steps:
                parts.append(f"eta {_duration(elapsed / done * (self.steps - step))}")
        return " | ".join(parts)


def _print(line: str) -> None:
    print(line, flush=True)
