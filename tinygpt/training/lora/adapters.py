"""LoRA adapters: the `LoRALinear` module, attaching and selecting adapters, merging them back in.

An adapted linear computes `y = x Wᵀ + b + (α / r) · dropout(x) Aᵀ Bᵀ` with A [r, in] (Kaiming-uniform, as
`nn.Linear` and `peft` initialise it) and B [out, r] (zeros, so a fresh adapter leaves the model unchanged).
Targets follow `tinygpt.surgery.targets` (with `patterns=True`: any block-relative path to a linear layer,
`*` wildcards allowed). `LoRALinear` registers itself with `tinygpt.checkpoint.register_swap`, so a model
with adapters saves as a full `.tinygpt` and loads back with them.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from tinygpt.checkpoint import CheckpointError, model_fingerprint, register_swap, set_module
from tinygpt.errors import TinyGPTValueError
from tinygpt.surgery.targets import LayerSpec, SurgeryError, select_modules

DEFAULT_TARGETS: tuple[str, ...] = ("attn.q_proj", "attn.v_proj")


class LoRAError(CheckpointError):
    """An adapter that does not fit the model (another base model, missing modules) or
    a malformed adapter file."""


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
            raise LoRAError(f"LoRA record {spec} does not match a Linear {like.in_features}->{like.out_features}")
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


register_swap(LoRALinear.kind, LoRALinear)


def _check_hparams(rank: Any, alpha: Any, dropout: Any) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise TinyGPTValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    if not isinstance(alpha, (int, float)) or not alpha > 0:
        raise TinyGPTValueError(f"LoRA alpha must be > 0, got {alpha!r}")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise TinyGPTValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")


def select_targets(model: nn.Module, targets: str | Sequence[str] | None, layers: LayerSpec = None) -> list[str]:
    """Full module names (e.g. "blocks.2.attn.q_proj") of the linear layers `targets` x `layers` select, in
    module order.

    `targets` follow `tinygpt.surgery.targets` with `patterns=True`: names, groups, leaves, MoE expert names,
    or block-relative paths with `*` wildcards (None = `DEFAULT_TARGETS`).

    Raises:
        SurgeryError: a target that matches no linear layer in the selected blocks (the message lists a block's
            linear layers), or a selected layer that is already adapted or replaced by surgery.
    """
    chosen = select_modules(model, targets, layers, dense_only=False, patterns=True, default=DEFAULT_TARGETS)
    names: list[str] = []
    for layer, target, mod in chosen:
        full = f"blocks.{layer}.{target}"
        if isinstance(mod, LoRALinear):
            raise SurgeryError(f"{full} already has a LoRA adapter; merge_lora or remove_lora first")
        if not isinstance(mod, nn.Linear):
            raise SurgeryError(f"{full} is a {type(mod).__name__}, not a linear layer: LoRA adapts nn.Linear layers")
        names.append(full)
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return sorted(names, key=order.__getitem__)


# ---------------------------------------------------------------------------------------------- attach
def add_lora(
    model: nn.Module,
    targets: str | Sequence[str] | None = DEFAULT_TARGETS,
    *,
    rank: int = 8,
    alpha: float | None = None,
    dropout: float = 0.0,
    layers: LayerSpec = None,
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


def is_lora_key(name: str) -> bool:
    """Whether a state-dict key is an adapter tensor (`<module>.lora_A` / `.lora_B`)."""
    return name.endswith((".lora_A", ".lora_B"))


def base_fingerprint(model: nn.Module) -> str:
    """The base-model pin: `tinygpt.checkpoint.model_fingerprint` of every weight except the adapters."""
    return model_fingerprint(model, skip=is_lora_key)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W ← W + (alpha / rank) B A) in place; returns the model.

    The result is a plain model (saves as a normal `.tinygpt`) whose logits equal the adapted model's (eval
    mode) up to float rounding; every parameter is trainable again, as after `tinygpt.load`.
    """
    return _unwrap(model, merge=True)


def remove_lora(model: nn.Module) -> nn.Module:
    """Drop every adapter in place (the base layers come back unchanged); returns the model."""
    return _unwrap(model, merge=False)


def _unwrap(model: nn.Module, merge: bool) -> nn.Module:
    """Every adapter replaced by a plain `nn.Linear` (`LoRALinear.to_linear(merge)`); all parameters trainable."""
    for name, m in lora_modules(model).items():
        set_module(model, name, m.to_linear(merge=merge))
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def merged_copy(model: nn.Module) -> nn.Module:
    """A merged deep copy; the adapted model is left as it is."""
    return merge_lora(copy.deepcopy(model))
