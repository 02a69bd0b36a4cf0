"""LoRA: low-rank adapters on chosen linear layers, saved as a small file pinned to the base model.

    import tinygpt
    from tinygpt.training.lora import add_lora, lora_finetune, load_lora, merge_lora, save_lora

    model = tinygpt.load("tiny.tinygpt")
    res = lora_finetune(model, "sonnets.txt", targets="attn.q_proj,attn.v_proj,mlp.fc_in", rank=8, alpha=16,
                        steps=300, out="tiny-sonnets.lora")          # trains only the adapters
    base = tinygpt.load("tiny.tinygpt")
    load_lora(base, "tiny-sonnets.lora")                              # checks it is the same base model
    merge_lora(base).save("tiny-sonnets.tinygpt")                     # folded in: a plain .tinygpt again

An adapted linear computes `y = x Wᵀ + b + (α / r) · dropout(x) Aᵀ Bᵀ` with A [r, in] (Kaiming-uniform, as
`nn.Linear` and `peft` initialise it) and B [out, r] (zeros, so a fresh adapter leaves the model unchanged).
`LoRALinear` subclasses `nn.Linear` and keeps the base `weight`/`bias` under their usual names, so module paths,
every TransformerLens hook name, `run_with_cache` and the `W_Q`/`W_in`-style weight views are unchanged (the
views read the *base* weights; merge to see the adapted ones).

Targets are named as `tinygpt inspect` shows them, relative to a block: `attn.q_proj`, `attn.k_proj`,
`attn.v_proj`, `attn.o_proj`, `mlp.fc_in`, `mlp.fc_out`, the groups `attn`, `mlp`, `all`, or any block-relative
path to a linear layer with `*` wildcards (e.g. `moe.experts.*.fc_in` in a mixture-of-experts model); `layers`
as in `tinygpt.surgery` ("0-3", "0,2", [1, 2], None = all). The default targets are `attn.q_proj` and
`attn.v_proj`, as in Hu et al. (2021).

## Files
An adapter file is one safetensors file: `<module>.lora_A` / `.lora_B` tensors and a JSON manifest (metadata
key "tinygpt_lora") with each module's rank, alpha and dropout, and the **base-model pin**: the sha256 of all
the base model's weights (every tensor but the adapters, so also the layers it does not adapt, since the
adapters were trained against all of them) and its config. `load_lora` refuses another base (clear error;
`check=False` overrides). A model with adapters attached can also be saved with `tinygpt.save` as a full
`.tinygpt` (the adapters are recorded like other module surgery and rebuilt by `tinygpt.load`).

## Training
`lora_finetune` is `tinygpt.training.loop.fit` (schedule, clipping, accumulation, progress, callbacks, atomic saves,
`strategy=` "ddp"/"fsdp" under torchrun) with every base parameter frozen, so only the adapters are in the
optimizer and the base stays bitwise unchanged. Its defaults differ from `train()` in two places:
`max_lr=1e-3` and `weight_decay=0.0`. While training, the run's checkpoint is a full `.tinygpt` of the adapted
model with the optimizer state, written to `<out>.run.tinygpt` (atomic, every `save_every` steps and at the
end) so `resume=True` continues exactly; the adapter file `out` is written at the end (also after an
interrupt). Delete the run file when you no longer need to resume. Under torchrun, rank 0 alone writes the run
checkpoint, the adapter and the merged model (under FSDP the full weights are gathered onto rank 0's CPU first).

## Why not `peft`
`peft` 0.21 works on this model (checked: `LoraConfig(target_modules=["q_proj", "fc_in"])` + `get_peft_model`
keeps the hook names of the inner model and `run_with_cache` works), but it is not used because (1) it
depends on `transformers` and `accelerate` at import (≈ 2.7 s to import on this machine; tinygpt's core
needs neither), (2) its adapter format is a directory keyed `base_model.model.…` with no content pin of the
base, so the save/load/pin layer would be ours anyway, (3) it wraps the model in a `PeftModel` whose module
names gain a `base_model.model.` prefix, so `inspect`-style names hold only on the unwrapped inner model, and
(4) the adapter itself is thirty lines. The math and initialisation follow peft's `Linear` LoRA layer.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from tinygpt.checkpoint import _MAGIC_HINTS, FORMAT, CheckpointError, content_hash
from tinygpt.io import atomic_write_bytes
from tinygpt.surgery.common import TARGET_GROUPS, TARGETS, LayerSpec, resolve_layers, set_module
from tinygpt.training import distributed

LORA_FORMAT = "tinygpt-lora"
LORA_FORMAT_VERSION = 1
META_KEY = "tinygpt_lora"
DEFAULT_TARGETS: tuple[str, ...] = ("attn.q_proj", "attn.v_proj")
LORA_DEFAULTS = {"max_lr": 1e-3, "weight_decay": 0.0}
_LEAF = {t.split(".")[1]: t for t in TARGETS}


class LoRAError(CheckpointError):
    """An adapter does not fit the model (another base model, missing modules) or its file is malformed."""


# ---------------------------------------------------------------------------------------------- module
class LoRALinear(nn.Linear):
    """`nn.Linear` plus a low-rank update: `y = x Wᵀ + b + (alpha / rank) · dropout(x) Aᵀ Bᵀ`.

    Attributes:
        weight, bias: the base layer's parameters (frozen by `add_lora`), under `nn.Linear`'s names.
        lora_A: [rank, in_features], Kaiming-uniform. lora_B: [out_features, rank], zeros.
        rank, alpha, scale (= alpha / rank), dropout (on the adapter's input only).
    """

    kind = "lora"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        device=None,
        dtype=None,
    ):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        _check_hparams(rank, alpha, dropout)
        self.rank, self.alpha, self.dropout = int(rank), float(alpha), float(dropout)
        self.scale = self.alpha / self.rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora_parameters()

    @classmethod
    def wrap(cls, lin: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> LoRALinear:
        """An adapter around `lin`, sharing its weight and bias Parameters (nothing is copied)."""
        w = lin.weight
        new = cls(
            lin.in_features,
            lin.out_features,
            lin.bias is not None,
            rank=rank,
            alpha=alpha,
            dropout=dropout,
            device="meta",
            dtype=w.dtype,
        )
        new.weight, new.bias = lin.weight, lin.bias
        new.lora_A = nn.Parameter(torch.empty(rank, lin.in_features, device=w.device, dtype=w.dtype))
        new.lora_B = nn.Parameter(torch.zeros(lin.out_features, rank, device=w.device, dtype=w.dtype))
        new.reset_lora_parameters()
        new.train(lin.training)
        return new

    @classmethod
    def from_spec(cls, spec: dict[str, Any], like: nn.Linear) -> LoRALinear:
        """An adapter shaped by a manifest `spec` around a Linear shaped like `like` (for `tinygpt.load`)."""
        if (spec.get("in_features"), spec.get("out_features")) != (like.in_features, like.out_features):
            raise ValueError(f"LoRA record {spec} does not match a Linear {like.in_features}->{like.out_features}")
        return cls.wrap(like, int(spec["rank"]), float(spec["alpha"]), float(spec.get("dropout", 0.0)))

    def surgery_spec(self) -> dict[str, Any]:
        return {
            "type": self.kind,
            "rank": self.rank,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "in_features": self.in_features,
            "out_features": self.out_features,
        }

    def reset_lora_parameters(self) -> None:
        """A ~ Kaiming-uniform (as `nn.Linear`/peft), B = 0: the adapter starts as an exact no-op."""
        if self.lora_A.device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> Tensor:
        """The update `(alpha / rank) · B A` [out_features, in_features], in float32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale

    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(x, self.weight, self.bias)
        return out + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scale

    def to_linear(self, merge: bool = True) -> nn.Linear:
        """A plain `nn.Linear`: the adapter folded in (`merge=True`) or dropped (the base, shared Parameters)."""
        w = self.weight
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None, device="meta", dtype=w.dtype)
        if merge:
            with torch.no_grad():
                lin.weight = nn.Parameter((w.float() + self.delta_weight()).to(w.dtype))
        else:
            lin.weight = w
        lin.bias = self.bias
        lin.train(self.training)
        return lin

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha:g}, dropout={self.dropout:g}"


def _check_hparams(rank: Any, alpha: Any, dropout: Any) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    if not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"LoRA alpha must be > 0, got {alpha!r}")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")


# ---------------------------------------------------------------------------------------------- selection
def _patterns(targets: str | Sequence[str] | None) -> list[str]:
    """Canonical names for known targets/groups/leaves, the rest kept as block-relative patterns."""
    items = (targets.split(",") if isinstance(targets, str) else list(targets)) if targets is not None else []
    out: list[str] = []
    for raw in items:
        if not isinstance(raw, str):
            raise ValueError(f"targets must be strings, got {raw!r}")
        name = raw.strip()
        if not name:
            continue
        expanded = TARGET_GROUPS.get(name) or ([_LEAF[name]] if name in _LEAF else [name])
        out.extend(t for t in expanded if t not in out)
    if not out:
        raise ValueError(
            f"no LoRA targets given; valid targets: {', '.join(TARGETS)}, groups {', '.join(TARGET_GROUPS)}"
        )
    return out


def select_targets(model: nn.Module, targets: str | Sequence[str] | None, layers: LayerSpec = None) -> list[str]:
    """Full module names (e.g. "blocks.2.attn.q_proj") of the linear layers `targets` x `layers` select.

    Raises:
        ValueError: a target that matches no linear layer in a selected block (the message lists the block's
            linear layers), or one that is already adapted or replaced by surgery.
    """
    if not hasattr(model, "blocks") or not hasattr(model, "cfg"):
        raise ValueError(f"expected a tinygpt.GPT (with .blocks and .cfg), got {type(model).__name__}")
    pats = _patterns(targets if targets is not None else DEFAULT_TARGETS)
    names: list[str] = []
    for layer in resolve_layers(layers, len(model.blocks)):
        block = model.blocks[layer]
        mods = dict(block.named_modules())
        for pat in pats:
            hits = [n for n, m in mods.items() if n and fnmatch.fnmatchcase(n, pat) and isinstance(m, nn.Linear)]
            if not hits:
                other = [n for n, m in mods.items() if n and fnmatch.fnmatchcase(n, pat)]
                if other:
                    kinds = ", ".join(f"{n} ({type(mods[n]).__name__})" for n in other[:3])
                    raise ValueError(f"blocks.{layer}: target {pat!r} names {kinds}, not a linear layer")
                linears = sorted(n for n, m in mods.items() if isinstance(m, nn.Linear))
                raise ValueError(
                    f"target {pat!r} matches no linear layer in blocks.{layer}; its linear layers are: "
                    f"{', '.join(linears)} (groups: {', '.join(TARGET_GROUPS)}; `*` matches a path component)"
                )
            for n in hits:
                full = f"blocks.{layer}.{n}"
                if isinstance(mods[n], LoRALinear):
                    raise ValueError(f"{full} already has a LoRA adapter; merge_lora or remove_lora first")
                if full not in names:
                    names.append(full)
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return sorted(names, key=order.__getitem__)


# ---------------------------------------------------------------------------------------------- attach
def add_lora(
    model: nn.Module,
    targets: str | Sequence[str] | None = DEFAULT_TARGETS,
    rank: int = 8,
    alpha: float | None = None,
    dropout: float = 0.0,
    layers: LayerSpec = None,
    *,
    freeze: bool = True,
) -> list[str]:
    """Attach LoRA adapters in place; returns the adapted module names.

    Args:
        model: a tinygpt `GPT` (any architecture whose targets are `nn.Linear`).
        targets: names as `inspect` shows them relative to a block (see the module docstring).
        rank: r, the adapter's inner dimension.
        alpha: scale numerator (update scaled by alpha / rank); default `2 * rank`.
        dropout: dropout on the adapter's input (training mode only).
        layers: blocks to adapt ("0-3", [1, 2], None = all).
        freeze: make the adapters the only trainable parameters (`mark_only_lora_trainable`).
    """
    alpha = float(2 * rank) if alpha is None else alpha
    _check_hparams(rank, alpha, dropout)
    names = select_targets(model, targets, layers)  # validates everything before changing anything
    for name in names:
        set_module(model, name, LoRALinear.wrap(model.get_submodule(name), rank, alpha, dropout))
    if freeze:
        mark_only_lora_trainable(model)
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """{module name: LoRALinear} of every adapter in the model, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' parameters (lora_A and lora_B of every adapted layer)."""
    return [p for m in lora_modules(model).values() for p in (m.lora_A, m.lora_B)]


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """{"<module>.lora_A": A, "<module>.lora_B": B} (on the CPU, detached)."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{name}.lora_A"] = m.lora_A.detach().cpu().contiguous()
        out[f"{name}.lora_B"] = m.lora_B.detach().cpu().contiguous()
    return out


def mark_only_lora_trainable(model: nn.Module) -> int:
    """Freeze every parameter except the adapters'; returns the number of trainable elements."""
    keep = {id(p) for p in lora_parameters(model)}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _is_lora_key(name: str) -> bool:
    return name.endswith((".lora_A", ".lora_B"))


def base_fingerprint(model: nn.Module) -> str:
    """sha256 of the base model's weights: every tensor of its state dict except the adapters (the pin)."""
    sd = {k: v for k, v in model.state_dict().items() if not _is_lora_key(k)}
    if getattr(model.cfg, "tie_embeddings", False):
        sd.pop("unembed.weight", None)
    return content_hash(sd)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W ← W + (alpha / rank) B A) in place; returns the model.

    The result is a plain model (saves as a normal `.tinygpt`) whose logits equal the adapted model's (eval
    mode) up to float rounding; every parameter is trainable again, as after `tinygpt.load`.
    """
    for name, m in lora_modules(model).items():
        set_module(model, name, m.to_linear(merge=True))
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def remove_lora(model: nn.Module) -> nn.Module:
    """Drop every adapter in place (the base layers come back unchanged); returns the model."""
    for name, m in lora_modules(model).items():
        set_module(model, name, m.to_linear(merge=False))
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def merged_copy(model: nn.Module) -> nn.Module:
    """A merged deep copy; the adapted model is left as it is."""
    return merge_lora(copy.deepcopy(model))


# ---------------------------------------------------------------------------------------------- files
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
        "content_sha256": content_hash(tensors),
    }
    from safetensors.torch import save as st_save

    try:
        data = st_save(tensors, metadata={META_KEY: json.dumps(manifest)})
    except TypeError as e:
        raise LoRAError(f"train_state is not JSON-serialisable: {e}") from e
    path = Path(path)
    atomic_write_bytes(path, data)
    return path


def read_lora(path: str | os.PathLike) -> LoRAFile:
    """Parse and validate an adapter file (never unpickles)."""
    path = Path(path)
    if not path.is_file():
        raise LoRAError(f"{path}: no such adapter file" + (" (it is a directory)" if path.is_dir() else ""))
    with open(path, "rb") as f:
        head = f.read(8)
    for magic, what in _MAGIC_HINTS.items():
        if head.startswith(magic):
            raise LoRAError(f"{path} is {what}, not a tinygpt LoRA adapter (safetensors); tinygpt never unpickles")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types
        raise LoRAError(f"{path} is not a readable safetensors file ({e})") from e
    if META_KEY not in meta:
        if FORMAT in meta:
            raise LoRAError(f"{path} is a .tinygpt model file, not a LoRA adapter; load it with tinygpt.load")
        raise LoRAError(f"{path} is a safetensors file but not a tinygpt LoRA adapter (no '{META_KEY}' manifest)")
    try:
        manifest = json.loads(meta[META_KEY])
    except json.JSONDecodeError as e:
        raise LoRAError(f"{path}: the adapter manifest is not valid JSON ({e})") from e
    if manifest.get("format") != LORA_FORMAT or not isinstance(manifest.get("format_version"), int):
        raise LoRAError(f"{path}: the manifest does not describe a tinygpt LoRA adapter")
    if manifest["format_version"] > LORA_FORMAT_VERSION:
        raise LoRAError(f"{path} was written by a newer tinygpt (adapter format {manifest['format_version']})")
    if "content_sha256" in manifest and content_hash(tensors) != manifest["content_sha256"]:
        raise LoRAError(f"{path} is corrupt: tensor content does not match its recorded sha256")
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


# ---------------------------------------------------------------------------------------------- training
@dataclass
class LoRATrainResult:
    """What `lora_finetune` returns: the training result plus the adapter files.

    Attributes:
        result: the `TrainResult` of `fit` (`.model` is the adapted model; `.history`, `.losses`, `.figure()`).
        adapter_path: the adapter file written (None without `out`).
        merged_path: the merged `.tinygpt` written (None without `merge_out`).
        run_path: the full training checkpoint used for `resume` (None when not written).
        modules: the adapted module names.
        n_trainable, n_total: adapter and model parameter counts.
    """

    result: Any
    adapter_path: Path | None = None
    merged_path: Path | None = None
    run_path: Path | None = None
    modules: list[str] = field(default_factory=list)
    n_trainable: int = 0
    n_total: int = 0

    @property
    def model(self):
        return self.result.model

    @property
    def history(self) -> list[dict[str, float]]:
        return self.result.history

    def figure(self):
        return self.result.figure()

    def __repr__(self) -> str:
        return (
            f"LoRATrainResult({self.result!r}, {len(self.modules)} adapted modules, "
            f"{self.n_trainable:,} of {self.n_total:,} parameters trained, adapter={self.adapter_path})"
        )


def run_checkpoint_path(out: str | os.PathLike) -> Path:
    """Where `lora_finetune` keeps the full training checkpoint of a run writing adapter `out`."""
    out = Path(out)
    return out.with_name(out.name + ".run.tinygpt")


def lora_finetune(
    model: Any,
    corpus: Any = None,
    targets: str | Sequence[str] | None = DEFAULT_TARGETS,
    rank: int = 8,
    alpha: float | None = None,
    dropout: float = 0.0,
    layers: LayerSpec = None,
    *,
    out: str | os.PathLike | None = None,
    merge_out: str | os.PathLike | None = None,
    checkpoint: bool | str | os.PathLike = True,
    resume: bool = False,
    config: Any = None,
    callbacks: Sequence[Callable[[dict[str, float]], Any]] = (),
    device: str | None = None,
    progress: bool = True,
    cache_dir: str | os.PathLike | None = None,
    strategy: str = "ddp",
    **settings: Any,
) -> LoRATrainResult:
    """Fine-tune LoRA adapters on a corpus with `tinygpt.training.loop.fit`; the base weights stay frozen.

    Args:
        model: the base model: a `GPT` or a `.tinygpt` path (modified in place: adapters are attached).
        corpus: a path (text file, directory, .jsonl), a `Corpus`, or None for the built-in Shakespeare.
        targets, rank, alpha, dropout, layers: see `add_lora`.
        out: the adapter file to write at the end (and after an interrupt).
        merge_out: also write the merged model here as a plain `.tinygpt`.
        checkpoint: the run's full training checkpoint for `resume`: True (default) = `<out>.run.tinygpt`
            when `out` is set, a path, or False for none.
        resume: continue the run saved in the checkpoint (its adapters, optimizer, step, history and settings;
            settings given explicitly override). `model` must be its base (checked by weight hash).
        config, **settings: a `TrainConfig` and/or its fields (`steps`, `max_lr`, `batch_size`, ...); the
            defaults are `train()`'s except `max_lr=1e-3` and `weight_decay=0.0`.
        callbacks, device, progress, cache_dir: as for `train()`.
        strategy: under torchrun, "ddp" (default) or "fsdp" (the frozen base and the adapters sharded); see
            `tinygpt.distributed`. Each process takes its share of a step's `batch_size × accum` sequences, so
            the run equals a single-process run with the same settings. Rank 0 alone writes files.
    Returns:
        `LoRATrainResult` (its paths are set on every process; the files are complete when it returns).
    """
    from tinygpt.checkpoint import load, save
    from tinygpt.data import load_corpus, tokenize_corpus
    from tinygpt.training.loop import (
        TokenBatches,
        TrainConfig,
        _corpus_from_record,
        _corpus_record,
        default_device,
        fit,
        resume_run,
    )

    if strategy not in distributed.STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(distributed.STRATEGIES)}, got {strategy!r}")
    device = device or default_device()
    out = Path(out) if out is not None else None
    if checkpoint is True:
        run_path = run_checkpoint_path(out) if out is not None else None
    else:
        run_path = Path(checkpoint) if checkpoint else None
    base_source = None
    if isinstance(model, (str, os.PathLike)):
        base_source = str(model)
        model = load(model)
    elif model is not None:
        base_source = getattr(model, "source_path", None)
    if model is not None and lora_modules(model):
        raise ValueError("the model already has LoRA adapters; pass the base model (or merge_lora it first)")
    run = None
    if resume:
        if run_path is None:
            raise ValueError(
                "resume=True needs the run checkpoint: pass out= (and keep checkpoint=True) or checkpoint="
            )
        run = resume_run(run_path, config, settings)
        rec = run.train_state.get("lora")
        if not isinstance(rec, dict):
            raise CheckpointError(f"cannot resume: {run_path} is not a LoRA run checkpoint")
        if model is not None and base_fingerprint(model) != rec["base"]["sha256"]:
            raise LoRAError(
                f"cannot resume: the model given is not the base this run adapts (sha256 {rec['base']['sha256'][:12]}"
                f" from {rec['base'].get('source')}); pass the original base model"
            )
        base_source = base_source or rec["base"].get("source")
        cfg, model = run.config, run.model
        corpus = corpus if corpus is not None else _corpus_from_record(run.train_state.get("corpus"))
        names = list(lora_modules(model))
        mark_only_lora_trainable(model)
        base_sha = rec["base"]["sha256"]
    else:
        if model is None:
            raise ValueError("lora_finetune needs a base model: a GPT or a .tinygpt path")
        merged = {**LORA_DEFAULTS, **settings}
        cfg = dataclasses.replace(config, **settings) if config else TrainConfig(**merged)
        base_sha = base_fingerprint(model)
        torch.manual_seed(cfg.seed)  # adapter initialisation
        names = add_lora(model, targets, rank, alpha, dropout, layers)
    tok = model._require_tokenizer()
    corpus_obj = load_corpus(corpus)
    data = tokenize_corpus(corpus_obj, tok, cache_dir=cache_dir, progress=progress)
    batches = TokenBatches(data, cfg, model.cfg.n_ctx)
    specs = {n: m.surgery_spec() for n, m in lora_modules(model).items()}
    lora_rec = {
        "base": {"sha256": base_sha, "source": base_source},
        "modules": specs,
        "adapter": str(out) if out else None,
    }
    state = {"corpus": _corpus_record(corpus, corpus_obj), "lora": lora_rec}
    model.train_state = {}  # fit fills it unless interrupted mid-update
    result = fit(
        model,
        cfg,
        batches,
        out=run_path,
        run=run,
        callbacks=callbacks,
        device=device,
        progress=progress,
        state=state,
        desc="lora",
        strategy=strategy,
    )
    model.train_state["lora"] = lora_rec
    res = LoRATrainResult(
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
    from tinygpt.surgery.common import apply_surgery_record, surgery_record

    full = GPT(GPTConfig.from_dict(model.cfg.to_dict()), tokenizer=model.tokenizer)
    apply_surgery_record(full, surgery_record(model))  # the adapters (and any other surgery) as in `model`
    full.load_state_dict(weights, strict=True)
    mark_only_lora_trainable(full)
    full.train_state, full.source_path = dict(model.train_state), getattr(model, "source_path", None)
    return full.eval()
