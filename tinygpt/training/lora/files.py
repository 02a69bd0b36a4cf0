"""`.lora` files: the adapters of a model, pinned to the base model they were trained on.

One safetensors file (written by `tinygpt.checkpoint.write_tensor_file`): `<module>.lora_A` / `.lora_B`
tensors and a JSON manifest (metadata key "tinygpt_lora") with each module's rank, alpha and dropout, and the
**base-model pin**: `tinygpt.checkpoint.model_fingerprint` of all the base model's weights (every tensor but
the adapters, so also the layers it does not adapt, since the adapters were trained against all of them)
and its config. `load_lora` refuses another base (clear error; `check=False` overrides).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from tinygpt.checkpoint import FORMAT, read_manifest, read_tensor_file, set_module, write_tensor_file
from tinygpt.training.lora.adapters import (
    LoRAError,
    LoRALinear,
    base_fingerprint,
    lora_modules,
    lora_state_dict,
    mark_only_lora_trainable,
)

LORA_FORMAT = "tinygpt-lora"
LORA_FORMAT_VERSION = 1
META_KEY = "tinygpt_lora"


@dataclass
class LoRAFile:
    """A parsed adapter file: manifest, adapter tensors, and (training) optimizer / RNG state if present."""

    path: Path
    manifest: dict[str, Any]
    tensors: dict[str, Tensor]

    @property
    def modules(self) -> dict[str, dict[str, Any]]:
        return self.manifest["modules"]

    @property
    def base(self) -> dict[str, Any]:
        return self.manifest["base"]

    @property
    def train_state(self) -> dict[str, Any]:
        return self.manifest.get("train_state") or {}

    def n_params(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    def describe(self) -> str:
        b = self.base
        ranks = sorted({s["rank"] for s in self.modules.values()})
        size = self.path.stat().st_size
        lines = [
            f"file        {self.path}  ({size:,} bytes, {LORA_FORMAT} {self.manifest['format_version']})",
            f"base        sha256 {b['sha256'][:16]}" + (f", from {b['source']}" if b.get("source") else ""),
            f"adapters    {len(self.modules)} modules, rank {', '.join(map(str, ranks))}, "
            f"{self.n_params():,} parameters",
        ]
        lines += [
            f"  {n:<32} rank {s['rank']:<3} alpha {s['alpha']:g}  dropout {s.get('dropout', 0):g}"
            for n, s in self.modules.items()
        ]
        return "\n".join(lines)


def save_lora(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    train_state: dict[str, Any] | None = None,
    base_source: str | None = None,
    base_sha256: str | None = None,
) -> Path:
    """Write the model's adapters to a small safetensors file pinned to its base model (atomically).

    Args:
        model: a model with adapters (`add_lora` / `load_lora`).
        path: destination (conventionally `.lora`).
        train_state: JSON-serialisable notes (steps, loss, corpus) stored in the manifest.
        base_source: where the base model came from (default: the model's `source_path`).
        base_sha256: the base pin, when already known (default: computed, `base_fingerprint`).
    """
    mods = lora_modules(model)
    if not mods:
        raise LoRAError("the model has no LoRA adapters to save; attach them with add_lora (or lora_finetune)")
    tensors = lora_state_dict(model)
    tok = getattr(model, "tokenizer", None)
    manifest = {
        "format": LORA_FORMAT,
        "format_version": LORA_FORMAT_VERSION,
        "base": {
            "sha256": base_sha256 or base_fingerprint(model),
            "config": model.cfg.to_dict(),
            "tokenizer_sha256": tok.fingerprint if tok is not None else None,
            "source": base_source if base_source is not None else getattr(model, "source_path", None),
        },
        "modules": {n: m.surgery_spec() for n, m in mods.items()},
        "train_state": train_state or {},
    }
    return write_tensor_file(path, tensors, manifest, key=META_KEY, error=LoRAError, what="train_state")


def read_lora(path: str | os.PathLike) -> LoRAFile:
    """Parse and validate an adapter file (never unpickles): framing, manifest, content hash, tensors."""

    path = Path(path)
    manifest = read_manifest(
        path,
        key=META_KEY,
        format_name=LORA_FORMAT,
        max_version=LORA_FORMAT_VERSION,
        label="LoRA adapter",
        desc="tinygpt LoRA adapter",
        error=LoRAError,
        missing=lambda meta: (
            f"{path} is a .tinygpt model file, not a LoRA adapter; load it with tinygpt.load"
            if FORMAT in meta
            else f"{path} is a safetensors file but not a tinygpt LoRA adapter (no '{META_KEY}' manifest)"
        ),
        directory=f"{path}: no such adapter file (it is a directory)",
        version_name="adapter format",
        manifest_name="adapter",
    )
    tensors = read_tensor_file(path, manifest, error=LoRAError)
    for name in manifest.get("modules", {}):
        if f"{name}.lora_A" not in tensors or f"{name}.lora_B" not in tensors:
            raise LoRAError(f"{path}: the manifest lists {name} but its lora_A/lora_B tensors are missing")
    return LoRAFile(path, manifest, tensors)


def check_base(model: nn.Module, f: LoRAFile) -> None:
    """Raise `LoRAError` unless `model` is the base model the adapter file is pinned to."""
    want, have = f.base.get("config", {}), model.cfg.to_dict()
    diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
    src = f.base.get("source")
    where = f" ({src})" if src else ""
    if diff:
        shown = ", ".join(f"{k}: adapter {want.get(k)!r} vs model {have.get(k)!r}" for k in diff[:4])
        raise LoRAError(f"{f.path} was trained on a different architecture{where}: {shown}")
    sha = base_fingerprint(model)
    if sha != f.base.get("sha256"):
        raise LoRAError(
            f"{f.path} is pinned to another base model: it was trained on weights with sha256 "
            f"{str(f.base.get('sha256'))[:12]}{where}, this model's are {sha[:12]} (other weights, already merged "
            "adapters, or quantized). Load the base it was trained on, or pass check=False to apply it anyway"
        )


def load_lora(
    model: nn.Module, path: str | os.PathLike | LoRAFile, *, check: bool = True, freeze: bool = False
) -> list[str]:
    """Attach the adapters of a file to `model` in place (replacing the values of existing adapters).

    Args:
        model: the base model the adapter was trained on (checked unless `check=False`).
        path: the adapter file (or a parsed `LoRAFile`).
        check: verify the base-model pin (config and weight sha256).
        freeze: make the adapters the only trainable parameters.
    Returns:
        The adapted module names.
    Raises:
        LoRAError: another base model, a module the model lacks, or a malformed file.
    """
    f = path if isinstance(path, LoRAFile) else read_lora(path)
    if check:
        check_base(model, f)
    plan = []
    for name, spec in f.modules.items():  # validate everything first
        try:
            mod = model.get_submodule(name)
        except AttributeError as e:
            raise LoRAError(f"{f.path} adapts {name}, which this model does not have") from e
        if not isinstance(mod, nn.Linear):
            raise LoRAError(f"{f.path} adapts {name}, which is a {type(mod).__name__} here, not a linear layer")
        a, b = f.tensors[f"{name}.lora_A"], f.tensors[f"{name}.lora_B"]
        r = int(spec["rank"])
        if tuple(a.shape) != (r, mod.in_features) or tuple(b.shape) != (mod.out_features, r):
            raise LoRAError(f"{f.path}: the adapter of {name} has shapes {tuple(a.shape)}/{tuple(b.shape)}")
        plan.append((name, spec, mod, a, b))
    for name, spec, mod, a, b in plan:
        if isinstance(mod, LoRALinear) and mod.rank == int(spec["rank"]):
            mod.alpha, mod.scale = float(spec["alpha"]), float(spec["alpha"]) / mod.rank
        else:
            base = mod.to_linear(merge=False) if isinstance(mod, LoRALinear) else mod
            mod = LoRALinear.wrap(base, int(spec["rank"]), float(spec["alpha"]), float(spec.get("dropout", 0.0)))
            set_module(model, name, mod)
        with torch.no_grad():
            mod.lora_A.copy_(a)
            mod.lora_B.copy_(b)
    if freeze:
        mark_only_lora_trainable(model)
    return [p[0] for p in plan]


__all__ = [
    "LORA_FORMAT",
    "LORA_FORMAT_VERSION",
    "META_KEY",
    "LoRAFile",
    "check_base",
    "load_lora",
    "read_lora",
    "save_lora",
]
