"""The shape every model-family converter has: a name table, fused-tensor groups, config mapping both ways.

A `Family` maps tinygpt state_dict names to a checkpoint's tensor names. Most tensors map one to one
(`Family.rename`, a list of regex rules); tensors HF stores fused (GPT-NeoX's per-head interleaved q|k|v, and
transformers-5 style stacked experts) are `Group`s: several tinygpt tensors <-> several HF tensors with a split
and a merge function. The import and export code (`tinygpt.interop.hf.files`) is the same for every family.

Shared config helpers: `rope_of(c)` reads rotary settings from any transformers version (v5 `rope_parameters`,
v4 `rope_theta` / `rope_scaling` / `rotary_pct`); `sliding_window_of(c)` the window a config actually uses;
`hf_act(...)` the activation names both sides share.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from tinygpt.interop.hf.common import InteropError

__all__ = ["ACTS", "Family", "Group", "Rule", "hf_act", "rope_of", "sliding_window_of"]

ACTS = ("silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")
"""HF `hidden_act` values tinygpt computes identically (its `act_fn` uses the same names)."""


@dataclass(frozen=True)
class Group:
    """Tensors stored fused: `ours` (tinygpt names) <-> `theirs` (checkpoint names).

    Attributes:
        split: checkpoint tensors (in `theirs` order) -> tinygpt tensors (in `ours` order).
        merge: tinygpt tensors -> checkpoint tensors.
    """

    ours: tuple[str, ...]
    theirs: tuple[str, ...]
    split: Callable[[Sequence[Tensor]], Sequence[Tensor]]
    merge: Callable[[Sequence[Tensor]], Sequence[Tensor]]


Rule = tuple[str, str]
"""(regex over a tinygpt name, replacement giving the checkpoint name), e.g. (r"blocks\\.(\\d+)\\.ln1\\.(.+)",
r"model.layers.\\1.input_layernorm.\\2")."""


class Family:
    """Base of the per-family converters (see the module docstring). Subclasses set the class attributes."""

    model_types: tuple[str, ...] = ()
    rules: tuple[Rule, ...] = ()
    prefix = ""  # the HF base model's prefix ("model." / "gpt_neox."): some checkpoints are saved without it
    ignorable: tuple[str, ...] = ("rotary_emb.inv_freq",)  # buffers older transformers saved

    def rules_for(self, model_type: str) -> tuple[Rule, ...]:
        """The renaming rules of one of `model_types` (the same for all of them unless a family says otherwise)."""
        return self.rules

    def rename(self, ours: str, model_type: str) -> str | None:
        """The checkpoint name of a tinygpt tensor, or None when no rule covers it."""
        for pattern, repl in self.rules_for(model_type):
            if re.fullmatch(pattern, ours):
                return re.sub(pattern, repl, ours)
        return None

    def groups(self, cfg: Any, model_type: str, available: set[str] | None) -> list[Group]:
        """Fused tensors of this config; `available` = the checkpoint's names on import, None on export."""
        return []

    def config_fields(self, c: Any, *, n_ctx: int | None = None, dropout: float | None = None) -> dict[str, Any]:
        """GPTConfig fields (all but dtype) of an HF config; `InteropError` naming what cannot be expressed.
        `dropout` matters to GPT-2 only (its three dropouts); the other families import with dropout 0."""
        raise NotImplementedError

    def check(self, cfg: Any, model_type: str) -> None:
        """Raise `InteropError` naming every knob of `cfg` the HF architecture `model_type` cannot express."""
        raise NotImplementedError

    def hf_config(self, cfg: Any, tokenizer: Any, model_type: str) -> Any:
        """The transformers config object of an expressible tinygpt config."""
        raise NotImplementedError


def refuse(model_type: str, problems: list[str]) -> None:
    if problems:
        raise InteropError(
            f"tinygpt cannot express this {model_type} config exactly: {'; '.join(problems)} (nothing is imported "
            "approximately; use tinygpt.interop.hf.load_hf_causal_lm(dir) to run it with transformers instead)"
        )


def hf_act(c: Any, problems: list[str], key: str = "hidden_act") -> str:
    act = getattr(c, key, "silu")
    if act not in ACTS:
        problems.append(f"{key}={act!r} (tinygpt has {', '.join(ACTS)})")
    return act


def rope_of(c: Any, problems: list[str]) -> tuple[float, dict[str, Any] | None, float]:
    """(rope_theta, rope_scaling dict for tinygpt or None, partial_rotary_factor) of an HF config.

    Types other than default / linear / llama3 are added to `problems`, naming the config field.
    """
    params = getattr(c, "rope_parameters", None)
    if params is None:  # transformers 4
        params = dict(getattr(c, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(c, "rope_theta", getattr(c, "rotary_emb_base", 10000.0)))
        if getattr(c, "rotary_pct", None) is not None:
            params.setdefault("partial_rotary_factor", c.rotary_pct)
    field = "rope_parameters" if getattr(c, "rope_parameters", None) is not None else "rope_scaling"
    if any(isinstance(v, dict) for v in params.values()):
        problems.append(f"{field} per layer type {sorted(params)} (tinygpt has one rotary setting)")
        return 10000.0, None, 1.0
    p = dict(params)
    theta = float(p.pop("rope_theta", 10000.0))
    partial = float(p.pop("partial_rotary_factor", None) or getattr(c, "partial_rotary_factor", None) or 1.0)
    kind = p.pop("rope_type", p.pop("type", "default"))
    keys = {
        "default": set(),
        "linear": {"factor"},
        "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
    }
    if kind not in keys:
        problems.append(f"{field} rope_type={kind!r} (tinygpt has default, linear and llama3)")
        return theta, None, partial
    extra = sorted(set(p) - keys[kind])
    if extra:
        problems.append(f"{field} keys {extra} for rope_type {kind!r}")
    if kind == "default":
        return theta, None, partial
    return theta, {"rope_type": kind, **{k: p[k] for k in sorted(keys[kind])}}, partial


def sliding_window_of(c: Any) -> int | None:
    """The sliding window some layer of an HF config uses (None: every layer attends to all earlier positions)."""
    w = getattr(c, "sliding_window", None)
    if not w:
        return None
    if c.model_type in ("qwen2", "qwen2_moe"):
        types = getattr(c, "layer_types", None)
        uses = getattr(c, "use_sliding_window", False) and (types is None or "sliding_attention" in types)
        return int(w) if uses else None
    return int(w)
