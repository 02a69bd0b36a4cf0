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
ACT_FNS = ("gelu_new", "gelu", "gelu_pytorch_tanh", "silu", "relu")  # tinygpt.arch.gated_mlp.ACTIVATIONS
NORMALIZATION_TYPES = ("LN", "RMS")
POSITIONAL_EMBEDDING_TYPES = ("standard", "rotary")
ROPE_SCALING_TYPES = ("default", "linear", "llama3")  # validated in detail by tinygpt.arch.rotary
# Fields added after the first .tinygpt format: `to_dict` saves them only when they differ from their defaults, so
# a model without these knobs has the same saved config (and the same LoRA / lens / dictionary pins) as before.
_LATER_FIELDS = (
    "n_key_value_heads", "positional_embedding_type", "rotary_dim", "rotary_base", "rotary_adjacent_pairs",
    "rope_scaling", "normalization_type", "gated_mlp", "bias", "qkv_bias", "parallel_attn_mlp",
    "moe_style", "moe_norm_topk", "moe_shared_d_mlp",
)  # fmt: skip
MOE_STYLES = ("tinygpt", "mixtral", "qwen2_moe")  # tinygpt.arch.moe / tinygpt.arch.hf_moe


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
        act_fn: MLP activation: "gelu_new" (GPT-2's tanh approximation; HF's "gelu_pytorch_tanh" is the same
            function), "gelu", "silu" or "relu".
        dropout: dropout on attention probabilities and on each sublayer output (0 disables).
        init_std: standard deviation of the normal initialisation (GPT-2: 0.02).
        attn_impl: "auto" (fastest fused path, eager when a hook needs the pattern), "eager", "sdpa",
            "triton" (our Triton flash-attention kernel) or "mps" (SDPA on Apple's Metal); see
            `tinygpt.arch.backends`. A runtime choice: it does not change the weights.
        n_key_value_heads: key/value heads (grouped-query attention when fewer than n_heads, which they must
            divide; None = n_heads).
        positional_embedding_type: "standard" (learned absolute positions, `pos_embed`) or "rotary" (RoPE on
            queries and keys; no `pos_embed`).
        rotary_dim: dims of each head that rotary rotates (None = d_head; partial rotary = rotary_pct * d_head).
        rotary_base: rotary's base (HF `rope_theta`).
        rotary_adjacent_pairs: rotate adjacent pairs (GPT-J) instead of the two halves (HF / NeoX "rotate_half").
        rope_scaling: None, or HF's `rope_scaling` dict ("linear", or "llama3" with its four keys).
        normalization_type: "LN" (LayerNorm) or "RMS" (RMSNorm, no bias, no centring); eps = layer_norm_eps.
        gated_mlp: gated feed-forward `down(act(gate(x)) * up(x))` (SwiGLU with act_fn "silu", GeGLU with "gelu").
        bias: biases on every linear layer (attention and MLP).
        qkv_bias: biases on the query/key/value projections (None = `bias`; Qwen2: bias=False, qkv_bias=True).
        parallel_attn_mlp: GPT-NeoX / GPT-J parallel residual: resid_post = resid_pre + attn(ln1(x)) + mlp(ln2(x)).
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
    # The models people study (issue 16): Llama / Qwen2 / Mistral / GPT-NeoX knobs (TransformerLens names).
    n_key_value_heads: int | None = None
    positional_embedding_type: str = "standard"
    rotary_dim: int | None = None
    rotary_base: float = 10000.0
    rotary_adjacent_pairs: bool = False
    rope_scaling: dict | None = None
    normalization_type: str = "LN"
    gated_mlp: bool = False
    bias: bool = True
    qkv_bias: bool | None = None
    parallel_attn_mlp: bool = False
    # Architecture knobs; each variant lives in its own module under tinygpt/arch/.
    diff_attn: bool = False
    mod: bool = False
    mod_capacity: float = 0.125
    mod_every: int = 2
    moe_experts: int = 0
    moe_topk: int = 2
    moe_aux_coef: float = 0.01
    moe_z_coef: float = 0.001
    # --- HF-style MoE (helper `families`; tinygpt/arch/hf_moe.py) ---
    moe_style: str = "tinygpt"
    moe_norm_topk: bool = True
    moe_shared_d_mlp: int = 0
    # --- end HF-style MoE ---
    yoco: bool = False
    yoco_window: int = 64
    device: str = field(default="cpu", compare=False)

    # Read by TransformerLens utilities (ActivationCache, patching, logit lens).
    attn_only: bool = field(default=False, init=False, repr=False, compare=False)
    default_prepend_bos: bool = field(default=False, init=False, repr=False, compare=False)
    # TransformerLens' hook switches (`GPT.set_use_attn_result` etc., see tinygpt.model.heads): runtime, not saved.
    use_attn_result: bool = field(default=False, init=False, repr=False, compare=False)
    use_split_qkv_input: bool = field(default=False, init=False, repr=False, compare=False)
    use_attn_in: bool = field(default=False, init=False, repr=False, compare=False)
    use_hook_mlp_in: bool = field(default=False, init=False, repr=False, compare=False)

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
        if self.act_fn not in ACT_FNS:
            raise ConfigError(f"act_fn must be one of {ACT_FNS}, got {self.act_fn!r}")
        self._check_knobs()
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
        # --- HF-style MoE (helper `families`) ---
        if self.moe_style not in MOE_STYLES:
            raise ConfigError(f"moe_style must be one of {MOE_STYLES}, got {self.moe_style!r}")
        if (
            not isinstance(self.moe_shared_d_mlp, int)
            or isinstance(self.moe_shared_d_mlp, bool)
            or (self.moe_shared_d_mlp < 0)
        ):
            raise ConfigError(f"moe_shared_d_mlp must be an integer >= 0, got {self.moe_shared_d_mlp!r}")
        if not isinstance(self.moe_norm_topk, bool):
            raise ConfigError(f"moe_norm_topk must be True or False, got {self.moe_norm_topk!r}")
        if self.moe_experts and self.moe_style != "qwen2_moe" and (self.moe_shared_d_mlp or not self.moe_norm_topk):
            raise ConfigError(
                f"moe_shared_d_mlp and moe_norm_topk=False are Qwen2-MoE options; moe_style={self.moe_style!r} "
                "has no shared expert and always renormalises its top-k weights (set moe_style='qwen2_moe')"
            )
        # --- end HF-style MoE ---
        if self.diff_attn and self.d_head % 2:
            raise ConfigError(
                f"diff_attn splits each head's queries/keys into two halves: d_head must be even, got {self.d_head}"
            )
        if self.yoco and (self.n_layers < 2 or self.yoco_window < 1):
            raise ConfigError("yoco needs n_layers >= 2 (self- and cross-decoder halves) and yoco_window >= 1")

    def _check_knobs(self) -> None:
        """The issue-16 knobs: each value, then the combinations tinygpt does not implement."""
        kv = self.n_key_value_heads
        if kv is not None and (not isinstance(kv, int) or isinstance(kv, bool) or kv < 1 or self.n_heads % kv):
            raise ConfigError(f"n_key_value_heads must be a positive divisor of n_heads={self.n_heads}, got {kv!r}")
        if self.positional_embedding_type not in POSITIONAL_EMBEDDING_TYPES:
            raise ConfigError(
                f"positional_embedding_type must be one of {POSITIONAL_EMBEDDING_TYPES}, "
                f"got {self.positional_embedding_type!r}"
            )
        if self.normalization_type not in NORMALIZATION_TYPES:
            raise ConfigError(
                f"normalization_type must be one of {NORMALIZATION_TYPES}, got {self.normalization_type!r}"
            )
        rotary = self.positional_embedding_type == "rotary"
        dim = self.rotary_dim
        if dim is not None and (
            not isinstance(dim, int) or isinstance(dim, bool) or dim < 2 or dim % 2 or dim > self.d_head
        ):
            raise ConfigError(f"rotary_dim must be an even integer in [2, d_head={self.d_head}], got {dim!r}")
        base = self.rotary_base
        if not isinstance(base, (int, float)) or isinstance(base, bool) or base <= 0:
            raise ConfigError(f"rotary_base must be a positive number, got {self.rotary_base!r}")
        if self.rope_scaling is not None:
            scaling = self.rope_scaling if isinstance(self.rope_scaling, dict) else {}
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind not in ROPE_SCALING_TYPES:
                raise ConfigError(
                    f"rope_scaling must be None or an HF rope_scaling dict of type {ROPE_SCALING_TYPES}, "
                    f"got {self.rope_scaling!r}"
                )
        if not rotary and (
            dim is not None or self.rope_scaling is not None or self.rotary_adjacent_pairs or base != 10000.0
        ):
            raise ConfigError(
                "rotary_dim, rotary_base, rope_scaling and rotary_adjacent_pairs need "
                "positional_embedding_type='rotary'"
            )
        for name in ("gated_mlp", "bias", "parallel_attn_mlp", "rotary_adjacent_pairs"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.qkv_bias is not None and not isinstance(self.qkv_bias, bool):
            raise ConfigError(f"qkv_bias must be None, True or False, got {self.qkv_bias!r}")
        # Combinations not implemented (yet): refused by name rather than built approximately.
        gqa = kv is not None and kv != self.n_heads
        for on, knob in ((gqa, "n_key_value_heads < n_heads (grouped-query attention)"), (rotary, "rotary")):
            for other, flag in (("diff_attn", self.diff_attn), ("yoco", self.yoco)):
                if on and flag:
                    raise ConfigError(f"{knob} is not implemented together with {other}; drop one of them")
        if rotary and self.mod:
            raise ConfigError("rotary is not implemented together with mod (routed tokens keep their positions)")
        if self.parallel_attn_mlp and self.mod:
            raise ConfigError("parallel_attn_mlp is not implemented together with mod; drop one of them")
        if self.gated_mlp and self.moe_experts and self.moe_style == "tinygpt":
            raise ConfigError(
                "gated_mlp with moe_experts: tinygpt's own experts are ungated; use moe_style='mixtral' "
                "(gated experts) or drop gated_mlp"
            )

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
        """The saved fields (everything but `device` and the TransformerLens extras); the knobs added after the
        first file format only when they differ from their defaults (so older models' configs are unchanged)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not f.init or f.name == "device" or (f.name in _LATER_FIELDS and value == f.default):
                continue
            out[f.name] = dict(value) if isinstance(value, dict) else value
        return out

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

    @property
    def n_kv_heads(self) -> int:
        """Key/value heads: `n_key_value_heads`, or n_heads without grouped-query attention."""
        return self.n_key_value_heads or self.n_heads

    @property
    def qkv_has_bias(self) -> bool:
        """Whether the query/key/value projections have biases (`qkv_bias`, defaulting to `bias`)."""
        return self.bias if self.qkv_bias is None else self.qkv_bias


def _did_you_mean(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
