"""The settings every training function shares: `TrainConfig` and the one keyword tail.

Every training function (`train`, `finetune`, `sft`, `distill`, `lora_finetune`, `es`) is called the same way:

    fn(model, data, <its own options>, *, <the run options>, <settings>)

- **run options** (`RunOptions`): `config`, `out`, `resume`, `overwrite`, `callbacks`, `device`, `progress`,
  `cache_dir`, `strategy`;
- **settings**: the fields of the function's settings class (`TrainConfig` for everything built on `fit`:
  `steps`, `batch_size`, `accum`, `ctx`, `max_lr`, `min_lr`, `lr_schedule`, `warmup`, `grad_clip`, `dtype`,
  `val_split`, `val_every`, `val_batches`, `save_every`, `seed`, ...; `ESConfig` for `es`).

`RunOptions.split(kwargs, what=...)` turns a function's `**kwargs` into the two, and refuses an unknown keyword
with an `UnknownSettingError` naming the closest valid one ("did you mean 'max_lr'?").
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tinygpt.errors import TinyGPTError, TinyGPTValueError
from tinygpt.training.distributed import STRATEGIES


class SettingError(TinyGPTValueError):
    """A training setting has an invalid value (e.g. `steps=0`, an unknown `lr_schedule`)."""


class UnknownSettingError(TinyGPTError, TypeError):
    """A training function got a keyword it does not know (a `TypeError`, as Python's own would be)."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """`" (did you mean 'x'?)"` for the closest of `choices`, or "" when none is close."""
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_keywords(given: Iterable[str], known: Iterable[str], *, what: str) -> None:
    """Raise `UnknownSettingError` for the first keyword of `given` not in `known`, with a did-you-mean hint."""
    known = sorted(set(known))
    for name in given:
        if name not in known:
            raise UnknownSettingError(
                f"{what}() got an unexpected keyword argument {name!r}{did_you_mean(name, known)}; "
                f"it takes: {', '.join(known)}"
            )


def given(**options: Any) -> dict[str, Any]:
    """The options given explicitly: those that are not None (None means "the default, or the resumed run's")."""
    return {k: v for k, v in options.items() if v is not None}


def field_names(cls: type) -> list[str]:
    """The field names of a settings dataclass."""
    return [f.name for f in dataclasses.fields(cls)]


@dataclass
class TrainConfig:
    """Hyper-parameters of a run (saved in every checkpoint; `resume` reuses them).

    Attributes:
        steps: total optimizer steps of the run.
        batch_size: sequences per micro-batch.
        accum: micro-batches per optimizer step (gradient accumulation). The global batch is
            `batch_size × accum` sequences whatever the number of processes: under torchrun each of W
            processes takes `batch_size × accum / W` of them (see docs/distributed.md).
        ctx: sequence length (default: the model's n_ctx).
        max_lr, min_lr: peak and final learning rate (min_lr defaults to max_lr / 10).
        lr_schedule: "cosine" (warmup, then cosine decay to min_lr) or "constant" (warmup, then max_lr).
        warmup: linear warmup steps.
        weight_decay, betas, eps: AdamW; no decay on biases, LayerNorm and other 1-D parameters.
        grad_clip: max global gradient norm (0 disables).
        dtype: "float32" or "bfloat16" (autocast: fp32 weights, each cast to bf16 where a matmul uses it).
        param_dtype: "float32" (default) or "bfloat16": the weights themselves are bf16 while training and the
            optimizer updates fp32 master copies (`tinygpt.training.precision.MasterWeights`); the forward and
            backward then run in bf16 without casts, faster than autocast on bf16-capable CPUs and GPUs. The
            model ends (and checkpoints hold it) in fp32. One process only.
        compile: run the forward `torch.compile`d while nothing is hooked (hooked calls run eager); one process
            only (ignored under torchrun).
        log_every: print a plain progress line every N steps (None: every 10% of the run, at most every 50
            steps, when stderr is not a terminal and progress is on; 0: never); see `tinygpt.training.logline`.
        val_split: fraction of the tokens held out for validation.
        val_every, val_batches: validate every N steps on `val_batches` fixed batches (0 disables).
        save_every: write the checkpoint every N steps (and at the end) when `out` is set.
        sample_every, sample_prompt, sample_tokens: print a sample every N steps.
        seed: seeds initialisation, batches and dropout.
    """

    steps: int = 500
    batch_size: int = 8
    accum: int = 1
    ctx: int | None = None
    max_lr: float = 6e-4
    min_lr: float | None = None
    lr_schedule: str = "cosine"
    warmup: int = 50
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    dtype: str = "float32"
    param_dtype: str = "float32"
    compile: bool = False
    log_every: int | None = None
    val_split: float = 0.01
    val_every: int = 100
    val_batches: int = 8
    save_every: int = 0
    sample_every: int = 0
    sample_prompt: str = "\n"
    sample_tokens: int = 200
    seed: int = 1337

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        if self.min_lr is None:
            self.min_lr = self.max_lr / 10
        checks = {  # name -> (valid?, the valid range)
            "steps": (self.steps >= 1, "an integer >= 1"),
            "batch_size": (self.batch_size >= 1, "an integer >= 1"),
            "accum": (self.accum >= 1, "an integer >= 1"),
            "warmup": (self.warmup >= 0, "an integer >= 0"),
            "max_lr": (self.max_lr > 0 and math.isfinite(self.max_lr), "a finite number > 0"),
            "min_lr": (0 <= self.min_lr <= self.max_lr, f"in [0, max_lr={self.max_lr}]"),
            "weight_decay": (self.weight_decay >= 0 and math.isfinite(self.weight_decay), "a finite number >= 0"),
            "grad_clip": (self.grad_clip >= 0 and math.isfinite(self.grad_clip), "a finite number >= 0 (0: off)"),
            "val_split": (0 <= self.val_split < 1, "in [0, 1)"),
            "val_every": (self.val_every >= 0, "an integer >= 0 (0: never)"),
            "val_batches": (self.val_batches >= 1, "an integer >= 1"),
            "save_every": (self.save_every >= 0, "an integer >= 0 (0: at the end only)"),
            "sample_every": (self.sample_every >= 0, "an integer >= 0 (0: never)"),
            "ctx": (self.ctx is None or self.ctx >= 1, "an integer >= 1"),
            "log_every": (self.log_every is None or self.log_every >= 0, "an integer >= 0 (0: never; None: auto)"),
        }
        for name, (ok, valid) in checks.items():
            if not ok:  # NaN fails every comparison
                raise SettingError(f"invalid training setting {name}={getattr(self, name)!r}: must be {valid}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise SettingError(f"lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise SettingError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.param_dtype not in ("float32", "bfloat16"):
            raise SettingError(f"param_dtype must be 'float32' or 'bfloat16', got {self.param_dtype!r}")
        self.compile = bool(self.compile)

    def lr_at(self, step: int) -> float:
        """Learning rate for optimizer step `step` (0-based)."""
        if step < self.warmup:
            return self.max_lr * (step + 1) / self.warmup
        if self.lr_schedule == "constant":
            return self.max_lr
        span = max(1, self.steps - self.warmup)
        ratio = min(1.0, (step - self.warmup) / span)
        return self.min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (self.max_lr - self.min_lr)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = set(field_names(cls))
        unknown = sorted(set(d) - known)
        if unknown:
            raise SettingError(f"unknown training setting(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


def make_config(cls: type, config: Any, settings: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> Any:
    """The settings of a new run: `config` with `settings` replaced, or `cls(**defaults, **settings)`.

    The function's `defaults` (e.g. `SFT_DEFAULTS`) apply only without a `config`: a config given is complete.
    """
    if config is not None:
        if not isinstance(config, cls):
            raise SettingError(f"config must be a {cls.__name__}, got {type(config).__name__}")
        return dataclasses.replace(config, **settings)
    return cls(**{**(defaults or {}), **settings})


@dataclass
class RunOptions:
    """The run options of every training function (the keyword tail besides the settings fields).

    Attributes:
        config: a settings object (`TrainConfig`; `ESConfig` for `es`) whose fields the keyword settings
            override.
        out: the checkpoint to write (`.tinygpt`), atomically every `save_every` steps and at the end.
        resume: continue the run saved in `out` (weights, optimizer, step, history and settings; the settings
            given explicitly override the saved ones).
        callbacks: functions called with each step's metrics dict; raising KeyboardInterrupt stops cleanly.
        device: "cuda", "mps" or "cpu" (default: the best available).
        progress: show a progress bar (None: `tinygpt.inputs.DEFAULT_PROGRESS`).
        cache_dir: the token cache directory (default `$TINYGPT_CACHE_DIR` or `~/.cache/tinygpt`).
        strategy: under torchrun, "ddp" (default) or "fsdp" (fully sharded); see `tinygpt.training.distributed`.
        overwrite: replace an existing `out` with a new run (default False: an existing file is refused unless
            `resume=True`, so a trained model is never replaced by accident).
    """

    config: Any = None
    out: str | os.PathLike | None = None
    resume: bool = False
    callbacks: Sequence[Callable[[dict[str, float]], Any]] = ()
    device: str | None = None
    progress: bool | None = None
    cache_dir: str | os.PathLike | None = None
    strategy: str = "ddp"
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise SettingError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        self.callbacks = tuple(self.callbacks)

    @classmethod
    def split(
        cls, kwargs: Mapping[str, Any], *, what: str, settings: type = TrainConfig, own: Iterable[str] = ()
    ) -> tuple[RunOptions, dict[str, Any]]:
        """Split a training function's `**kwargs` into its `RunOptions` and its settings fields.

        Args:
            kwargs: the keywords given.
            what: the function's name, for the error message.
            settings: the settings class whose fields are accepted (`TrainConfig`, `ESConfig`).
            own: the function's other keyword names (listed in the error's suggestions).
        Raises:
            UnknownSettingError: a keyword that is neither a run option nor a setting (with a did-you-mean).
        """
        run_names, setting_names = set(field_names(cls)), set(field_names(settings))
        check_keywords(kwargs, run_names | setting_names | set(own), what=what)
        run = cls(**{k: v for k, v in kwargs.items() if k in run_names})
        return run, {k: v for k, v in kwargs.items() if k in setting_names and k not in run_names}


__all__ = [
    "RunOptions",
    "SettingError",
    "TrainConfig",
    "UnknownSettingError",
    "check_keywords",
    "did_you_mean",
    "field_names",
    "given",
    "make_config",
]
