"""`GPTConfig`: the one configuration object of a tinygpt model.

Field names follow TransformerLens (`n_layers, d_model, n_heads, d_head, d_mlp, d_vocab, n_ctx`), so
code written against `HookedTransformerConfig` reads the same. The model's `cfg` *is* this object;
the few extra attributes TransformerLens utilities read (`normalization_type`, `attn_only`,
`n_key_value_heads`, `device`) are provided as well.

Presets (parameter counts with untied embeddings; vocab 256 / vocab 49152):

| preset | n_layers | d_model | n_heads | d_head | n_ctx | params (vocab 256) | params (vocab 49152) |
|--------|----------|---------|---------|--------|-------|--------------------|----------------------|
| nano   | 2        | 64      | 2       | 32     | 128   |            141,056 |            6,399,744 |
| tiny   | 4        | 128     | 4       | 32     | 256   |            891,648 |           13,409,024 |
| small  | 6        | 192     | 6       | 32     | 256   |          2,817,024 |           21,593,088 |
| medium | 8        | 192     | 6       | 32     | 512   |          3,755,904 |           22,531,968 |
| large  | 10       | 256     | 8       | 32     | 512   |          8,160,256 |           33,195,008 |
| huge   | 12       | 256     | 8       | 32     | 512   |          9,739,776 |           34,774,528 |

(`tests/test_config.py` checks this table against the model.)

Core layer: imports only `tinygpt.errors`. `GPTConfig.n_params` counts with the function `tinygpt.model`
registers (`register_param_counter`) when it is imported, so the count is exactly the built model's.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tinygpt.errors import TinyGPTValueError

PRESETS: dict[str, dict[str, int]] = {
    "nano": dict(n_layers=2, d_model=64, n_heads=2, n_ctx=128),
    "tiny": dict(n_layers=4, d_model=128, n_heads=4, n_ctx=256),
    "small": dict(n_layers=6, d_model=192, n_heads=6, n_ctx=256),
    "medium": dict(n_layers=8, d_model=192, n_heads=6, n_ctx=512),
    "large": dict(n_layers=10, d_model=256, n_heads=8, n_ctx=512),
    "huge": dict(n_layers=12, d_model=256, n_heads=8, n_ctx=512),
}

DTYPES = ("float32", "bfloat16")
ATTN_IMPLS = ("auto", "eager", "sdpa", "triton", "mps")


class ConfigError(TinyGPTValueError):
    """A configuration value is missing, unknown or inconsistent."""


_param_counter: list[Callable[[GPTConfig], int]] = []


def register_param_counter(fn: Callable[[GPTConfig], int]) -> None:
    """Register `fn(cfg) -> parameter count` of a model built from `cfg` (`tinygpt.model` does, at import)."""
    _param_counter[:] = [fn]


@dataclass
class GPTConfig:
    """Shape and options of a GPT-2 style decoder.

    Attributes:
        n_layers: number of transformer blocks.
        d_model: width of the residual stream.
        n_heads: attention heads per block.
        d_head: width of one head (default `d_model // n_heads`).
        d_mlp: hidden width of the MLP (default `4 * d_model`).
        d_vocab: vocabulary size (256 for the byte tokenizer).
        n_ctx: maximum context length (learned positions).
        tie_embeddings: share `embed.weight` with `unembed.weight`.
        dtype: parameter dtype, "float32" or "bfloat16".
        layer_norm_eps: LayerNorm epsilon.
        act_fn: MLP activation; "gelu_new" (GPT-2's tanh approximation) or "gelu".
        dropout: dropout on attention probabilities and on each sublayer output (0 disables).
        init_std: standard deviation of the normal initialisation (GPT-2: 0.02).
        attn_impl: "auto" (fastest fused path, eager when a hook needs the pattern), "eager", "sdpa",
            "triton" (our Triton flash-attention kernel) or "mps" (SDPA on Apple's Metal); see
            `tinygpt.arch.backends`. A runtime choice: it does not change the weights.
        device: where the model lives; kept up to date by the model, not saved.
    """

    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    d_head: int | None = None
    d_mlp: int | None = None
    d_vocab: int = 256
    n_ctx: int = 256
    tie_embeddings: bool = False
    dtype: str = "float32"
    layer_norm_eps: float = 1e-5
    act_fn: str = "gelu_new"
    dropout: float = 0.0
    init_std: float = 0.02
    attn_impl: str = "auto"
    # Architecture knobs; each variant lives in its own module under tinygpt/arch/.
    diff_attn: bool = False
    mod: bool = False
    mod_capacity: float = 0.125
    mod_every: int = 2
    moe_experts: int = 0
    moe_topk: int = 2
    moe_aux_coef: float = 0.01
    moe_z_coef: float = 0.001
    yoco: bool = False
    yoco_window: int = 64
    device: str = field(default="cpu", compare=False)

    # Read by TransformerLens utilities (ActivationCache, patching, logit lens).
    normalization_type: str = field(default="LN", init=False, repr=False, compare=False)
    attn_only: bool = field(default=False, init=False, repr=False, compare=False)
    n_key_value_heads: int | None = field(default=None, init=False, repr=False, compare=False)
    positional_embedding_type: str = field(default="standard", init=False, repr=False, compare=False)
    default_prepend_bos: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.d_head is None:
            if self.d_model % self.n_heads:
                raise ConfigError(
                    f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                    "choose n_heads that divides d_model or set d_head explicitly"
                )
            self.d_head = self.d_model // self.n_heads
        if self.d_mlp is None:
            self.d_mlp = 4 * self.d_model
        for name in ("n_layers", "d_model", "n_heads", "d_head", "d_mlp", "d_vocab", "n_ctx"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.act_fn not in ("gelu_new", "gelu"):
            raise ConfigError(f"act_fn must be 'gelu_new' or 'gelu', got {self.act_fn!r}")
        if self.attn_impl not in ATTN_IMPLS:
            raise ConfigError(f"attn_impl must be one of {ATTN_IMPLS}, got {self.attn_impl!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.mod and not 0.0 < self.mod_capacity <= 1.0:
            raise ConfigError(f"mod_capacity must be in (0, 1], got {self.mod_capacity!r}")
        if self.mod and (not isinstance(self.mod_every, int) or self.mod_every < 1):
            raise ConfigError(f"mod_every must be a positive integer, got {self.mod_every!r}")
        if self.moe_experts < 0 or (self.moe_experts and not 1 <= self.moe_topk <= self.moe_experts):
            raise ConfigError(f"moe_topk must be between 1 and moe_experts={self.moe_experts}, got {self.moe_topk!r}")
        if self.diff_attn and self.d_head % 2:
            raise ConfigError(
                f"diff_attn splits each head's queries/keys into two halves: d_head must be even, got {self.d_head}"
            )
        if self.yoco and (self.n_layers < 2 or self.yoco_window < 1):
            raise ConfigError("yoco needs n_layers >= 2 (self- and cross-decoder halves) and yoco_window >= 1")

    # ----------------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> GPTConfig:
        """A named preset (`nano, tiny, small, medium, large, huge`) with optional overrides."""
        if name not in PRESETS:
            raise ConfigError(
                f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}" + _did_you_mean(name, PRESETS)
            )
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        """Build a config from a dict, rejecting unknown keys with a clear message."""
        if not isinstance(d, dict):
            raise ConfigError(f"GPTConfig.from_dict expects a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(d) - known)
        if unknown:
            hints = "".join(_did_you_mean(k, known) for k in unknown)
            raise ConfigError(f"unknown GPTConfig field(s) {unknown}; known fields: {sorted(known)}{hints}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """The saved fields (everything but `device` and the TransformerLens extras)."""
        skip = {"device"}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init and f.name not in skip}

    def replace(self, **changes: Any) -> GPTConfig:
        return self.from_dict({**self.to_dict(), **changes})

    def n_params(self) -> int:
        """Parameter count of a model built from this config (built on the meta device: no memory)."""
        if not _param_counter:
            raise ConfigError("GPTConfig.n_params needs tinygpt.model (import tinygpt)")
        return _param_counter[0](self)

    @property
    def variants(self) -> list[str]:
        """The architecture knobs switched on, e.g. ["diff_attn", "moe"]."""
        on = [("diff_attn", self.diff_attn), ("mod", self.mod), ("moe", self.moe_experts > 0), ("yoco", self.yoco)]
        return [name for name, flag in on if flag]


def _did_you_mean(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
