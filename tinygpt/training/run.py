"""The start every training function shares: its keywords checked, the run read back on `resume=`, the corpus.

    opts, settings = RunOptions.split(kwargs, what="finetune")
    run = start_run(opts, settings, what="finetune", record="finetune", defaults=FINETUNE_DEFAULTS)
    model = run.model(model)                       # the resumed model, or the GPT / .tinygpt path given
    batches, corpus_rec = corpus_batches(model, run.corpus(corpus), run.config, run=run)
    res = fit(model, run.config, batches, **run.fit_options(), state={"corpus": corpus_rec, ...}, desc="finetune")

`resume=True` reads the checkpoint at `out`: its weights, optimizer, step, history and settings (the settings
given explicitly override the saved ones, with a warning when that changes the run), and the function's own record
in the training state (`train_state["sft"]`, `["distill"]`, ...), which says which data, template or teacher the
run used.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tinygpt.checkpoint import CheckpointError, OutputError, as_model, load, read_checkpoint
from tinygpt.data import Corpus, CorpusError, load_corpus, tokenize_corpus
from tinygpt.inputs import progress_enabled
from tinygpt.io import check_output
from tinygpt.model import GPT
from tinygpt.training.loop import TokenBatches, default_device
from tinygpt.training.settings import RunOptions, SettingError, TrainConfig, make_config

#: Settings a resumed run may change without changing what it computes.
HARMLESS = {
    "steps",
    "val_every",
    "save_every",
    "sample_every",
    "sample_prompt",
    "sample_tokens",
    "val_batches",
    "log_every",
    "compile",
}

#: the training-state record each training function writes -> the function (`train` writes none); a checkpoint
#: belongs to the first of these it holds (`finetune` keeps the model's "sft" record, so it comes before "sft")
RECORD_OWNERS = {"lora": "lora_finetune", "distill": "distill", "es": "es", "finetune": "finetune", "sft": "sft"}

#: what a resumed run's CLI command is called, for the hint in the error
_COMMANDS = {"lora_finetune": "lora", "train": "train"}


def run_owner(train_state: dict[str, Any]) -> str:
    """The training function that wrote a checkpoint's training state ("train" when it holds no record)."""
    return next((fn for key, fn in RECORD_OWNERS.items() if key in train_state), "train")


def check_device(device: str | None) -> str | None:
    """`device` as given, or a `SettingError` (before anything runs) when this torch cannot use it.

    Raises:
        SettingError: not a device name, or CUDA / MPS asked of a torch build or machine without it.
    """
    if device is None:
        return None
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError) as e:
        raise SettingError(f"device={device!r} is not a device: give cuda, cuda:N, mps or cpu ({e})") from None
    if kind == "cuda" and not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise SettingError(f"device={device!r}: {why} (torch {torch.__version__}); use device='cpu'")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise SettingError(f"device={device!r}: MPS is not available on this machine; use device='cpu'")
    return device


def check_run_output(out: str | os.PathLike | None, *, overwrite: bool, resume: bool, inputs=()) -> Path | None:
    """The preflight of a run's `out` (before the first step): not an input, no existing file replaced by a new
    run unless `overwrite`, writable. Raises `OutputError` naming `out`."""
    if out is None:
        return None
    return check_output(
        out,
        overwrite=overwrite or resume,
        inputs=inputs,
        error=OutputError,
        hint="pass overwrite=True (--overwrite) to replace it with a new run, or resume=True (--resume) to continue it",
    )


@dataclass
class ResumedRun:
    """What `resume_run` recovers from a training checkpoint."""

    checkpoint: Any
    config: TrainConfig
    model: GPT
    step: int
    history: list[dict[str, float]]

    @property
    def train_state(self) -> dict[str, Any]:
        return self.checkpoint.train_state


def resume_run(out: Path | None, config: TrainConfig | None, settings: dict[str, Any]) -> ResumedRun:
    """Read a training checkpoint: its model, settings (overridden by those given), step and history."""
    if out is None:
        raise SettingError("resume=True needs out= (the checkpoint to continue)")
    out = Path(out)
    if not out.exists():
        raise CheckpointError(f"cannot resume: {out} does not exist (drop --resume to start a new run)")
    ckpt = read_checkpoint(out)
    state = ckpt.train_state
    if "train_config" not in state:
        raise CheckpointError(f"cannot resume from {out}: it holds no training state")
    saved = TrainConfig.from_dict(state["train_config"])
    cfg = dataclasses.replace(saved, **{**(dataclasses.asdict(config) if config else {}), **settings})
    step = int(state["step"])
    if cfg.steps < step:
        raise SettingError(
            f"cannot resume {out} with steps={cfg.steps} (--steps): the run is already at step {step}; give "
            f"steps > {step} to train on, or drop --resume (with overwrite) to start a new run"
        )
    if cfg.steps == step:
        warnings.warn(f"{out} is already at step {step} of steps={cfg.steps}: nothing to train", stacklevel=3)
    warn_changed(saved, cfg, settings)
    return ResumedRun(ckpt, cfg, load(ckpt), step, list(state.get("history", [])))


def warn_changed(saved: Any, new: Any, explicit: dict[str, Any], what: str = "settings") -> None:
    """Warn when explicitly given settings change a resumed run (beyond `HARMLESS` ones)."""
    changed = [k for k in explicit if k not in HARMLESS and getattr(saved, k) != getattr(new, k)]
    if changed:
        warnings.warn(
            f"resuming with changed {what} {changed}: the run will not reproduce an uninterrupted one", stacklevel=4
        )


def warn_changed_options(saved: dict[str, Any], given: dict[str, Any], what: str) -> None:
    """Warn when a resumed run is given objective options (`temperature`, `packing`, ...) other than its own."""
    if changed := sorted(k for k, v in given.items() if saved.get(k) != v):
        warnings.warn(
            f"resuming with changed {what} {changed}: the run will not reproduce an uninterrupted one", stacklevel=3
        )


@dataclass
class Run:
    """A training function's run once its keywords are checked (see the module docstring).

    Attributes:
        options: the run options given.
        config: the settings of the run (the saved ones on resume, overridden by those given).
        out: the checkpoint path (None: nothing is written).
        device: where to train.
        progress: whether to show progress bars.
        resumed: the checkpoint read back (`resume=True`), else None.
        what: the function's name, for messages.
        record_key: the key of the function's own record in the training state.
    """

    options: RunOptions
    config: TrainConfig
    out: Path | None
    device: str
    progress: bool
    resumed: ResumedRun | None = None
    what: str = "train"
    record_key: str | None = None

    @property
    def record(self) -> dict[str, Any] | None:
        """The function's record in the resumed checkpoint (None for a new run)."""
        return self.resumed.train_state.get(self.record_key) if self.resumed and self.record_key else None

    def model(self, model: Any, what: str = "model") -> GPT:
        """The resumed model, or `model` (a `GPT` or a `.tinygpt` path) for a new run."""
        if self.resumed is not None:
            return self.resumed.model
        if model is None:
            raise SettingError(f"{self.what} needs a {what}: a GPT or a .tinygpt path")
        return as_model(model, what=what)

    def corpus(self, corpus: Any) -> Any:
        """`corpus` as given, or (on resume, when None) the corpus the run recorded."""
        if corpus is None and self.resumed is not None:
            return corpus_from_record(self.resumed.train_state.get("corpus"))
        return corpus

    def seed(self) -> None:
        """Seed torch with the run's seed (a new run, before its model or adapters are initialised); on resume
        `fit` restores the saved RNG state instead."""
        if self.resumed is None:
            torch.manual_seed(self.config.seed)

    def fit_options(self, *callbacks: Any) -> dict[str, Any]:
        """The keywords of `fit` that come from the run options; `callbacks` run before the user's."""
        o = self.options
        return dict(
            out=self.out,
            run=self.resumed,
            callbacks=[*callbacks, *o.callbacks],
            device=self.device,
            progress=self.progress,
            strategy=o.strategy,
        )


def start_run(
    options: RunOptions,
    settings: dict[str, Any],
    *,
    what: str,
    record: str | None = None,
    defaults: dict[str, Any] | None = None,
    out: str | os.PathLike | None = None,
) -> Run:
    """Resolve device, out and progress; on `resume=True` read the run back, else build its settings.

    Args:
        options, settings: from `RunOptions.split`.
        what: the function's name (messages).
        record: the key of the function's own record in the training state; a resumed checkpoint must hold it.
        defaults: the function's setting defaults for a new run without `config` (e.g. `SFT_DEFAULTS`).
        out: the checkpoint path when it is not `options.out` (LoRA keeps its run beside the adapter file).
    Raises:
        CheckpointError: `resume=True` and the checkpoint is missing or was not written by this function.
    """
    path = out if out is not None else options.out
    path = Path(path) if path is not None else None
    check_device(options.device)
    for p in {path, Path(options.out) if options.out is not None else None} - {None}:
        check_run_output(p, overwrite=options.overwrite, resume=options.resume)
    run = Run(
        options,
        TrainConfig(),
        path,
        options.device or default_device(),
        progress_enabled(options.progress),
        what=what,
        record_key=record,
    )
    if options.resume:
        run.resumed = resume_run(path, options.config, settings)
        owner = run_owner(run.resumed.train_state)
        if owner != what:
            raise CheckpointError(
                f"cannot resume {what} from {path}: it was not written by {what}() but by {owner}(); continue it with "
                f"`tinygpt {_COMMANDS.get(owner, owner)} ... --resume` (or {owner}(..., resume=True)), or write "
                f"this {what} run to another file"
            )
        if record is not None and not isinstance(run.record, dict):
            raise CheckpointError(
                f"cannot resume {what} from {path}: it was not written by {what}() (its training state has no "
                f"{record!r} record)"
            )
        run.config = run.resumed.config
    else:
        run.config = make_config(TrainConfig, options.config, settings, defaults)
    return run


# --------------------------------------------------------------------------------------------- corpora
def corpus_batches(model: GPT, corpus: Any, cfg: TrainConfig, *, run: Run) -> tuple[TokenBatches, Any]:
    """Tokenize `corpus` (cached) with the model's tokenizer into `TokenBatches`; also its checkpoint record."""
    corpus_obj = load_corpus(corpus)
    if run.out is not None:
        check_output(run.out, overwrite=True, inputs=[str(f) for f in corpus_obj.files], error=OutputError)
    data = tokenize_corpus(
        corpus_obj, model._require_tokenizer(), cache_dir=run.options.cache_dir, progress=run.progress
    )
    return TokenBatches(data, cfg, model.cfg.n_ctx), corpus_record(corpus, corpus_obj)


def corpus_record(corpus: Any, corpus_obj: Corpus) -> str | dict[str, Any] | None:
    """What a checkpoint records so `resume` finds the corpus again: the path given, or a `Corpus`'s fields."""
    if corpus is None or isinstance(corpus, (str, os.PathLike)):
        return None if corpus is None else str(corpus)
    return {
        "name": corpus_obj.name,
        "files": [str(f) for f in corpus_obj.files],
        "kind": corpus_obj.kind,
        "text_field": corpus_obj.text_field,
    }


def corpus_from_record(rec: Any) -> Any:
    """The corpus a checkpoint recorded (a path, None for the built-in one, or a `Corpus`)."""
    if not isinstance(rec, dict):
        return rec
    files = [Path(f) for f in rec["files"]]
    if missing := [str(f) for f in files if not f.exists()]:
        raise CorpusError(f"cannot resume: corpus file(s) {missing[:3]} no longer exist; pass corpus= / --corpus")
    return Corpus(name=rec["name"], files=files, kind=rec["kind"], text_field=rec["text_field"])


__all__ = [
    "HARMLESS",
    "RECORD_OWNERS",
    "ResumedRun",
    "Run",
    "corpus_batches",
    "corpus_from_record",
    "corpus_record",
    "resume_run",
    "check_device",
    "check_run_output",
    "run_owner",
    "start_run",
    "warn_changed",
    "warn_changed_options",
]
