"""`lora_finetune`: fine-tune LoRA adapters with the loop every training function shares; the base stays frozen.

`lora_finetune` is `tinygpt.training.loop.fit` (schedule, clipping, accumulation, progress, callbacks, atomic
saves, `strategy=` "ddp"/"fsdp" under torchrun) with every base parameter frozen, so only the adapters are in
the optimizer and the base stays bitwise unchanged. It takes the keyword tail of every training function
(`tinygpt.training.settings`: `TrainConfig` fields and the run options); its setting defaults differ from
`train()`'s in two places, `LORA_DEFAULTS`: `max_lr=1e-3` and `weight_decay=0.0`. `out` is the adapter file
(written at the end, also after an interrupt); the run's checkpoint is a full `.tinygpt` of the adapted model
with the optimizer state, written to `<out>.run.tinygpt` (atomic, every `save_every` steps and at the end) so
`resume=True` continues exactly. Delete the run file when you no longer need to resume. Under torchrun, rank 0
alone writes the run checkpoint, the adapter and the merged model (under FSDP the full weights are gathered
onto rank 0's CPU first).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.nn as nn

from tinygpt.checkpoint import apply_surgery_record, as_model, save, surgery_record
from tinygpt.errors import TinyGPTValueError
from tinygpt.surgery.targets import LayerSpec
from tinygpt.training import distributed
from tinygpt.training.loop import TrainResult, fit
from tinygpt.training.lora.adapters import (
    DEFAULT_TARGETS,
    LoRAError,
    add_lora,
    base_fingerprint,
    lora_modules,
    lora_parameters,
    mark_only_lora_trainable,
    merged_copy,
)
from tinygpt.training.lora.files import save_lora
from tinygpt.training.run import corpus_batches, start_run
from tinygpt.training.settings import RunOptions, SettingError

LORA_DEFAULTS: dict[str, Any] = {"max_lr": 1e-3, "weight_decay": 0.0}
_OWN = ("targets", "rank", "alpha", "dropout", "layers", "merge_out", "checkpoint")


@dataclass
class LoRATrainResult(TrainResult):
    """What `lora_finetune` returns: the `TrainResult` of the run (`.model` is the adapted model; `.history`,
    `.losses`, `.figure()`) plus the adapter files.

    Attributes:
        adapter_path: the adapter file written (None without `out`).
        merged_path: the merged `.tinygpt` written (None without `merge_out`).
        run_path: the full training checkpoint used for `resume` (None when not written).
        modules: the adapted module names.
        n_trainable, n_total: adapter and model parameter counts.
    """

    adapter_path: Path | None = None
    merged_path: Path | None = None
    run_path: Path | None = None
    modules: list[str] = field(default_factory=list)
    n_trainable: int = 0
    n_total: int = 0

    @property
    def result(self) -> LoRATrainResult:
        """The training result itself (before `LoRATrainResult` became a `TrainResult`, it held one here)."""
        return self

    def __repr__(self) -> str:
        return (
            f"LoRATrainResult({super().__repr__()}, {len(self.modules)} adapted modules, "
            f"{self.n_trainable:,} of {self.n_total:,} parameters trained, adapter={self.adapter_path})"
        )


def run_checkpoint_path(out: str | os.PathLike) -> Path:
    """Where `lora_finetune` keeps the full training checkpoint of a run writing adapter `out`."""
    out = Path(out)
    return out.with_name(out.name + ".run.tinygpt")


def lora_finetune(
    model: Any,
    corpus: Any = None,
    *,
    targets: str | Sequence[str] | None = DEFAULT_TARGETS,
    rank: int = 8,
    alpha: float | None = None,
    dropout: float = 0.0,
    layers: LayerSpec = None,
    merge_out: str | os.PathLike | None = None,
    checkpoint: bool | str | os.PathLike = True,
    **options: Any,
) -> LoRATrainResult:
    """Fine-tune LoRA adapters on a corpus with `tinygpt.training.loop.fit`; the base weights stay frozen.

    Args:
        model: the base model: a `GPT` or a `.tinygpt` path (modified in place: adapters are attached). With
            `resume=True` it may be None; given, it must be the run's base (checked by weight hash).
        corpus: a path (text file, directory, .jsonl), a `Corpus`, or None for the built-in Shakespeare (on
            resume: the run's).
        targets, rank, alpha, dropout, layers: see `add_lora`.
        merge_out: also write the merged model here as a plain `.tinygpt`.
        checkpoint: the run's full training checkpoint for `resume`: True (default) = `<out>.run.tinygpt`
            when `out` is set, a path, or False for none.
        **options: the shared keyword tail, as for `train()`: `TrainConfig` fields (`steps`, `max_lr`,
            `batch_size`, ...; defaults `train()`'s except `LORA_DEFAULTS`) and the run options `config`, `out`
            (here: the adapter file, written at the end and after an interrupt), `resume` (continue the run
            saved in the checkpoint: its adapters, optimizer, step, history and settings), `callbacks`,
            `device`, `progress`, `cache_dir` and `strategy` (under torchrun "ddp" or "fsdp": the frozen base
            and the adapters sharded; each process takes its share of a step's `batch_size × accum`
            sequences, so the run equals a single-process run with the same settings).
    Returns:
        `LoRATrainResult` (its paths are set on every process; the files are complete when it returns).
    """
    opts, settings = RunOptions.split(options, what="lora_finetune", own=_OWN)
    out = Path(opts.out) if opts.out is not None else None
    if checkpoint is True:
        run_path = run_checkpoint_path(out) if out is not None else None
    else:
        run_path = Path(checkpoint) if checkpoint else None
    if opts.resume and run_path is None:
        raise SettingError("resume=True needs the run checkpoint: pass out= (and keep checkpoint=True) or checkpoint=")
    base_source = str(model) if isinstance(model, (str, os.PathLike)) else getattr(model, "source_path", None)
    if model is not None:
        model = as_model(model, what="base model")
        if lora_modules(model):
            raise TinyGPTValueError("the model already has LoRA adapters; pass the base model (or merge_lora it first)")
    run = start_run(opts, settings, what="lora_finetune", record="lora", defaults=LORA_DEFAULTS, out=run_path)
    if run.resumed is not None:
        base = run.record["base"]
        if model is not None and base_fingerprint(model) != base["sha256"]:
            raise LoRAError(
                f"cannot resume: the model given is not the base this run adapts (sha256 {base['sha256'][:12]}"
                f" from {base.get('source')}); pass the original base model"
            )
        base_source, base_sha = base_source or base.get("source"), base["sha256"]
        model = run.resumed.model
        names = list(lora_modules(model))
        mark_only_lora_trainable(model)
    else:
        if model is None:
            raise SettingError("lora_finetune needs a base model: a GPT or a .tinygpt path")
        base_sha = base_fingerprint(model)
        run.seed()  # adapter initialisation
        names = add_lora(model, targets, rank=rank, alpha=alpha, dropout=dropout, layers=layers)
    batches, corpus_rec = corpus_batches(model, run.corpus(corpus), run.config, run=run)
    lora_rec = {
        "base": {"sha256": base_sha, "source": base_source},
        "modules": {n: m.surgery_spec() for n, m in lora_modules(model).items()},
        "adapter": str(out) if out else None,
    }
    state = {"corpus": corpus_rec, "lora": lora_rec}
    model.train_state = {}  # fit fills it unless interrupted mid-update
    result = fit(model, run.config, batches, **run.fit_options(), state=state, desc="lora")
    model.train_state["lora"] = lora_rec
    res = LoRATrainResult.extend(
        result,
        run_path=result.path,
        modules=names,
        n_trainable=sum(p.numel() for p in lora_parameters(model)),
        n_total=sum(p.numel() for p in model.parameters()),
    )
    # interrupted inside an optimizer update: the adapters may be half-updated, so no file is written
    half_updated = result.interrupted and "train_config" not in model.train_state
    if half_updated or (out is None and merge_out is None):
        return res
    full = _full_model_on_main(model)  # under FSDP every process gathers; rank 0 gets the whole model
    if full is not None:  # rank 0 (or a single process) writes
        if out is not None:
            notes = {k: v for k, v in model.train_state.items() if k in ("step", "loss", "train_config")}
            notes["corpus"] = state["corpus"]
            save_lora(full, out, train_state=notes, base_source=base_source, base_sha256=base_sha)
        if merge_out is not None:
            merged_model = merged_copy(full)
            merged_model.train_state = {"lora_merged": {"adapter": str(out) if out else None, **lora_rec}}
            save(merged_model, merge_out)
    distributed.barrier()  # the files are complete before any process returns
    res.adapter_path = out
    res.merged_path = Path(merge_out) if merge_out is not None else None
    return res


def _full_model_on_main(model: nn.Module) -> nn.Module | None:
    """`model` itself unless FSDP sharded it (its parameters are DTensors); then a plain copy with the full
    weights on rank 0's CPU (every process must call: the weights are gathered) and None on the other ranks."""
    if not distributed.active():
        return model
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return model if distributed.is_main() else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not distributed.is_main():
        return None
    from tinygpt.config import GPTConfig
    from tinygpt.model import GPT

    full = GPT(GPTConfig.from_dict(model.cfg.to_dict()), tokenizer=model.tokenizer)
    apply_surgery_record(full, surgery_record(model))  # the adapters (and any other surgery) as in `model`
    full.load_state_dict(weights, strict=True)
    mark_only_lora_trainable(full)
    full.train_state, full.source_path = dict(model.train_state), getattr(model, "source_path", None)
    return full.eval()


__all__ = ["LORA_DEFAULTS", "LoRATrainResult", "lora_finetune", "run_checkpoint_path"]
