"""`.tinygpt` files: one safetensors file holding the weights and a JSON manifest.

The manifest (safetensors metadata key "tinygpt") records the format version, the `GPTConfig`, the
tokenizer, the training state (step, metrics, training config) and a sha256 of the tensor content.
Training checkpoints also carry the optimizer state (`optimizer.*` tensors) and RNG state (`rng.*`).
Writes are atomic; reads validate everything and never unpickle.

Swapped modules (LASER, HQQ, LoRA) are rebuilt through `tinygpt.checkpoint.swaps`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tinygpt.checkpoint.files import (
    CheckpointError,
    load_matching,
    read_manifest,
    read_tensor_file,
    tensor_mismatch,
    write_tensor_file,
)
from tinygpt.checkpoint.swaps import apply_surgery_record, surgery_record
from tinygpt.config import ConfigError, GPTConfig

FORMAT = "tinygpt"
FORMAT_VERSION = 1
OPTIM_PREFIX = "optimizer."
RNG_PREFIX = "rng."


@dataclass
class Checkpoint:
    """The parsed content of a `.tinygpt` file."""

    path: Path
    manifest: dict[str, Any]
    tensors: dict[str, Tensor]  # model weights
    optimizer: dict[str, Tensor] = field(default_factory=dict)  # names without the prefix
    rng: dict[str, Tensor] = field(default_factory=dict)

    @property
    def config(self) -> GPTConfig:
        return GPTConfig.from_dict(self.manifest["config"])

    @property
    def train_state(self) -> dict[str, Any]:
        return self.manifest.get("train_state") or {}


# ------------------------------------------------------------------------------------- writing
def save(
    model,
    path: str | os.PathLike,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    train_state: dict[str, Any] | None = None,
    include_rng: bool = False,
    weights: dict[str, Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write `model` (with its tokenizer) to a `.tinygpt` file atomically.

    Args:
        model: a `tinygpt.GPT`.
        path: destination; parent directories are created.
        optimizer: if given, its state is stored for exact resumption.
        train_state: JSON-serialisable training state (defaults to `model.train_state`).
        include_rng: also store torch's CPU RNG state.
        weights: tensors to write instead of `model.state_dict()` (e.g. gathered from a sharded model).
        optimizer_state: an `optimizer.state_dict()`-layout dict to write instead of `optimizer`'s own
            (e.g. gathered from a sharded optimizer); `optimizer` still names the class.
    Returns:
        The path written.
    """
    path = Path(path)
    if model.tokenizer is None:
        raise CheckpointError("the model has no tokenizer attached; set model.tokenizer before saving")
    sd = weights if weights is not None else model.state_dict()
    tensors = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    if model.cfg.tie_embeddings:
        tensors.pop("unembed.weight", None)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": model.cfg.to_dict(),
        "tokenizer": model.tokenizer.to_dict(),
        "train_state": train_state if train_state is not None else getattr(model, "train_state", {}),
    }
    surgery = surgery_record(model)  # swapped modules (factored, packed, LoRA) and the surgery log; else absent
    if surgery is not None:
        manifest["surgery"] = surgery
    if optimizer is not None:
        groups, state = _flatten_optimizer(optimizer, optimizer_state)
        manifest["optimizer"] = {"class": type(optimizer).__name__, "param_groups": groups}
        tensors.update({OPTIM_PREFIX + k: v for k, v in state.items()})
    if include_rng:
        tensors[RNG_PREFIX + "torch"] = torch.get_rng_state()
    return write_tensor_file(path, tensors, manifest, key=FORMAT, error=CheckpointError, what="training state")


def _flatten_optimizer(opt: torch.optim.Optimizer, sd: dict | None = None) -> tuple[list[dict], dict[str, Tensor]]:
    sd = sd if sd is not None else opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            t = v if isinstance(v, Tensor) else torch.tensor(v)
            tensors[f"state.{idx}.{k}"] = t.detach().cpu().contiguous()
    groups = json.loads(json.dumps(sd["param_groups"], default=_json_default))
    return groups, tensors


def _json_default(o):
    if isinstance(o, Tensor):
        return o.item() if o.numel() == 1 else o.tolist()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"{type(o).__name__} is not JSON-serialisable")


def load_optimizer_state(opt: torch.optim.Optimizer, ckpt: Checkpoint) -> None:
    """Restore an optimizer saved with `save(..., optimizer=opt)`."""
    opt.load_state_dict(optimizer_state_dict(ckpt, type(opt).__name__))


def optimizer_state_dict(ckpt: Checkpoint, class_name: str) -> dict[str, Any]:
    """The saved optimizer state in `optimizer.state_dict()` layout (checked to be `class_name`'s)."""
    if "optimizer" not in ckpt.manifest:
        raise CheckpointError(
            f"{ckpt.path} has no optimizer state (it was saved for inference, not as a training "
            "checkpoint); start a new run instead of resuming"
        )
    rec = ckpt.manifest["optimizer"]
    if rec["class"] != class_name:
        raise CheckpointError(f"{ckpt.path} holds {rec['class']} state, not {class_name}")
    state: dict[int, dict[str, Tensor]] = {}
    for name, t in ckpt.optimizer.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = t
    groups = rec["param_groups"]
    for g in groups:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


def read_checkpoint(path: str | os.PathLike, verify: bool = True) -> Checkpoint:
    """Parse and validate a `.tinygpt` file without building a model."""
    path = Path(path)
    manifest = _manifest(path)
    tensors = read_tensor_file(path, manifest, error=CheckpointError, verify=verify)
    ckpt = Checkpoint(path=path, manifest=manifest, tensors={})
    for k, v in tensors.items():
        if k.startswith(OPTIM_PREFIX):
            ckpt.optimizer[k[len(OPTIM_PREFIX) :]] = v
        elif k.startswith(RNG_PREFIX):
            ckpt.rng[k[len(RNG_PREFIX) :]] = v
        else:
            ckpt.tensors[k] = v
    return ckpt


def resumable_state(path: str | os.PathLike) -> str | None:
    """What a `.tinygpt` file would lose if replaced by a plain model, e.g. "a training checkpoint at step 10
    (optimizer state: resumable)"; None for a file without optimizer state or that is not a `.tinygpt` file.
    Reads the header only."""
    try:
        manifest = _manifest(Path(path))
    except CheckpointError:
        return None
    if "optimizer" not in manifest:
        return None
    step = (manifest.get("train_state") or {}).get("step", "?")
    return f"a training checkpoint at step {step} (optimizer state: resumable)"


def _manifest(path: Path) -> dict[str, Any]:
    return read_manifest(
        path,
        key=FORMAT,
        max_version=FORMAT_VERSION,
        label=".tinygpt",
        desc="tinygpt checkpoint",
        error=CheckpointError,
        missing=lambda meta: (
            f"{path} is a safetensors file but not a tinygpt checkpoint (no '{FORMAT}' manifest in its "
            "metadata); save models with tinygpt.save(model, path)"
        ),
    )


def load(path: str | os.PathLike | Checkpoint, device: str | torch.device | None = None):
    """Load a `.tinygpt` file: the model, with its tokenizer attached and `train_state` filled.

    Args:
        path: the file (or an already parsed `Checkpoint`).
        device: where to put the model (default: CPU).
    """
    from tinygpt.model import GPT
    from tinygpt.tokenizer import TokenizerError, load_tokenizer

    ckpt = path if isinstance(path, Checkpoint) else read_checkpoint(path)
    try:
        cfg = ckpt.config
        tokenizer = load_tokenizer(ckpt.manifest.get("tokenizer"))
    except (ConfigError, TokenizerError, TypeError) as e:
        raise CheckpointError(f"{ckpt.path}: invalid manifest: {e}") from e
    if tokenizer.vocab_size > cfg.d_vocab:
        raise CheckpointError(
            f"{ckpt.path}: tokenizer has {tokenizer.vocab_size} tokens but the model only {cfg.d_vocab}"
        )
    model = GPT(cfg, tokenizer=tokenizer)
    if ckpt.manifest.get("surgery"):
        _rebuild_surgery(model, ckpt)
    tied = {"unembed.weight"} if cfg.tie_embeddings else set()
    load_matching(model, ckpt.tensors, where=str(ckpt.path), record=_config_record(cfg), ignore=tied)
    model.train_state = ckpt.train_state
    model.source_path = str(ckpt.path)
    if device is not None:
        model.to(device)
    return model.eval()


def as_model(model: Any, *, device: str | torch.device | None = None, what: str = "model"):
    """The one loader of "a model or a path": a `tinygpt.GPT` passes through, a path is `load`ed.

    Args:
        model: a `GPT` (any `nn.Module` with a `cfg`), or the path of a `.tinygpt` file.
        device: for a path, where to put the loaded model (a model passed in is not moved).
        what: how the error names the argument ("teacher", "base model", ...).
    """
    if isinstance(model, Checkpoint):
        return load(model, device=device)
    if isinstance(model, (str, os.PathLike)):
        if not Path(model).exists():
            raise CheckpointError(f"{what} {model} does not exist; pass a .tinygpt file (e.g. from `tinygpt train`)")
        return load(model, device=device)
    if isinstance(model, torch.nn.Module) and hasattr(model, "cfg"):
        return model
    raise CheckpointError(f"expected a tinygpt GPT or a .tinygpt path as the {what}, got {type(model).__name__}")


def _rebuild_surgery(model, ckpt: Checkpoint) -> None:
    """Swap in the factored / packed / LoRA modules a file records, so its tensors load into them."""
    try:
        apply_surgery_record(model, ckpt.manifest["surgery"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{ckpt.path}: invalid 'surgery' record in the manifest: {e}") from e


# ------------------------------------------------------------------------------------- inspect
def describe(path: str | os.PathLike) -> str:
    """Human-readable summary: config, tokenizer, parameter count and a table of every tensor."""
    ckpt = read_checkpoint(path)
    cfg, m = ckpt.config, ckpt.manifest
    tok = m.get("tokenizer", {})
    n_params = sum(t.numel() for t in ckpt.tensors.values())
    lines = [f"file        {ckpt.path}  ({ckpt.path.stat().st_size:,} bytes, format {m['format_version']})"]
    lines.append("config      " + ", ".join(f"{k}={v}" for k, v in cfg.to_dict().items()))
    if tok.get("type") == "bpe":
        from tinygpt.tokenizer import load_tokenizer

        lines.append(f"tokenizer   bpe, vocab {load_tokenizer(tok).vocab_size}")
    else:
        added = tok.get("added_tokens") or []
        specials = f" (256 bytes + special tokens {', '.join(added)})" if added else ""
        lines.append(f"tokenizer   {tok.get('type', '?')}, vocab {256 + len(added)}{specials}")
    lines.append(f"parameters  {n_params:,}" + ("  (embeddings tied)" if cfg.tie_embeddings else ""))
    problem = _shape_problem(ckpt)
    if problem:
        lines.append(f"WARNING     the tensors do not match {_config_record(cfg)}: {problem}; this file will not load")
    if m.get("surgery", {}).get("modules"):
        kinds: dict[str, int] = {}
        for spec in m["surgery"]["modules"].values():
            kind = spec.get("type", "?") + (f" {spec['bits']}-bit" if "bits" in spec else "")
            kinds[kind] = kinds.get(kind, 0) + 1
        lines.append("surgery     " + ", ".join(f"{n} {k}" for k, n in kinds.items()) + " modules")
    ts = ckpt.train_state
    if ts:
        keys = ("step", "loss", "val_loss", "tokens_seen")
        lines.append("training    " + ", ".join(f"{k}={ts[k]}" for k in keys if k in ts))
    if ckpt.optimizer:
        n = sum(t.numel() for t in ckpt.optimizer.values())
        lines.append(f"optimizer   {m['optimizer']['class']} state: {len(ckpt.optimizer)} tensors, {n:,} elements")
    lines.append("")
    w = max(len(k) for k in ckpt.tensors) if ckpt.tensors else 4
    lines.append(f"{'tensor':<{w}}  {'dtype':<9} {'shape':<16} {'elements':>12}")
    lines.append("-" * (w + 41))
    for k, t in sorted(ckpt.tensors.items(), key=lambda kv: _natural_key(kv[0])):
        dt = str(t.dtype).removeprefix("torch.")
        lines.append(f"{k:<{w}}  {dt:<9} {str(list(t.shape)):<16} {t.numel():>12,}")
    lines.append("-" * (w + 41))
    lines.append(f"{'total':<{w}}  {'':<9} {'':<16} {n_params:>12,}")
    return "\n".join(lines)


def _config_record(cfg: GPTConfig) -> str:
    return f"its config (n_layers={cfg.n_layers}, d_model={cfg.d_model}, d_mlp={cfg.d_mlp}, d_vocab={cfg.d_vocab})"


def _shape_problem(ckpt: Checkpoint) -> str | None:
    """The tensor/config mismatch of a file (see `tensor_mismatch`), from a model built on the meta device."""
    from tinygpt.model import GPT

    try:
        with torch.device("meta"):
            model = GPT(ckpt.config.replace(dtype="float32"))
            if ckpt.manifest.get("surgery"):
                apply_surgery_record(model, ckpt.manifest["surgery"])
    except Exception:  # an invalid manifest: `load` reports it; inspect shows what it can
        return None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return tensor_mismatch(expected, ckpt.tensors, ignore={"unembed.weight"} if ckpt.config.tie_embeddings else set())


def _natural_key(name: str) -> list:
    """Sort "blocks.2" before "blocks.10"."""
    import re

    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


from tinygpt.model import register_method  # noqa: E402  (GPT.save is this module's save)

register_method("save", save)
