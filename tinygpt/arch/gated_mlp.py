"""Gated MLPs (Shazeer 2020): SwiGLU (`gated_mlp` + act_fn "silu", Llama / Qwen2 / Mistral) and GeGLU ("gelu*").

    pre        = x @ gate_proj.weight.T (+ b)         -> hook_pre         [batch, pos, d_mlp]   (TL: the gate)
    pre_linear = x @ up_proj.weight.T (+ b)           -> hook_pre_linear  [batch, pos, d_mlp]
    post       = act(pre) * pre_linear                -> hook_post        [batch, pos, d_mlp]
    out        = post @ down_proj.weight.T (+ b)                          [batch, pos, d_model]

Parameters use Hugging Face's names (`gate_proj`, `up_proj`, `down_proj`, `nn.Linear`s, biases when `cfg.bias`);
TransformerLens' names are properties: `W_gate` [d_model, d_mlp], `W_in` (the up projection) [d_model, d_mlp],
`W_out` [d_mlp, d_model], `b_gate`, `b_in`, `b_out` (None without biases). Hook names and shapes are
TransformerLens' `GatedMLP`'s. `GatedExpert` is the same computation without hooks, for mixture-of-experts blocks
(`tinygpt.arch.hf_moe`), whose experts see a variable number of tokens.

`ACTIVATIONS` maps tinygpt's `act_fn` names to the functions Hugging Face's `ACT2FN` computes for them:
"gelu_new" (and HF's "gelu_pytorch_tanh", numerically the same) = tanh-approximated GELU, "gelu" = exact GELU,
"silu", "relu".

Initialisation (`reset_variant_parameters`, called by `GPT.reset_parameters` after the generic N(0, init_std)):
`down_proj.weight` ~ N(0, init_std / sqrt(2 n_layers)), like the dense MLP's `fc_out`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from tinygpt.config import ConfigError, GPTConfig

__all__ = ["ACTIVATIONS", "GatedExpert", "GatedMLP", "activation"]

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "silu": F.silu,
    "relu": F.relu,
}


def activation(name: str) -> Callable[[Tensor], Tensor]:
    """The activation function of an `act_fn` name (ConfigError naming the choices otherwise)."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ConfigError(f"act_fn must be one of {sorted(ACTIVATIONS)}, got {name!r}") from None


def _bias(cfg: GPTConfig) -> bool:
    return bool(getattr(cfg, "bias", True))


class GatedExpert(nn.Module):
    """One gated MLP without hooks: x [n, d_model] -> [n, d_model].

    Args:
        cfg: reads d_model, act_fn, bias, init_std, n_layers.
        d_mlp: the hidden width (default cfg.d_mlp).
        bias: override cfg.bias.
    """

    def __init__(self, cfg: GPTConfig, d_mlp: int | None = None, *, bias: bool | None = None):
        super().__init__()
        d_mlp = d_mlp or cfg.d_mlp
        b = _bias(cfg) if bias is None else bias
        self.gate_proj = nn.Linear(cfg.d_model, d_mlp, bias=b)
        self.up_proj = nn.Linear(cfg.d_model, d_mlp, bias=b)
        self.down_proj = nn.Linear(d_mlp, cfg.d_model, bias=b)
        self.act_fn = cfg.act_fn
        self.act = activation(cfg.act_fn)
        self._cfg_init = (cfg.init_std, cfg.n_layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))

    def reset_variant_parameters(self) -> None:
        std, n_layers = self._cfg_init
        nn.init.normal_(self.down_proj.weight, 0.0, std / math.sqrt(2 * n_layers))

    W_gate = property(lambda self: self.gate_proj.weight.T)  # [d_model, d_mlp]
    W_in = property(lambda self: self.up_proj.weight.T)  # [d_model, d_mlp]
    W_out = property(lambda self: self.down_proj.weight.T)  # [d_mlp, d_model]
    b_gate = property(lambda self: self.gate_proj.bias)
    b_in = property(lambda self: self.up_proj.bias)
    b_out = property(lambda self: self.down_proj.bias)


class GatedMLP(GatedExpert):
    """A block's gated feed-forward with TransformerLens' hooks. x [batch, pos, d_model] -> [batch, pos, d_model].

    Args:
        cfg: reads d_model, d_mlp, act_fn, bias, dropout (on the output, training only), init_std, n_layers.
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__(cfg)
        self.p_drop = cfg.dropout
        self.hook_pre = HookPoint()  # [batch, pos, d_mlp] gate pre-activation
        self.hook_pre_linear = HookPoint()  # [batch, pos, d_mlp] up projection
        self.hook_post = HookPoint()  # [batch, pos, d_mlp] act(gate) * up

    def forward(self, x: Tensor) -> Tensor:
        pre = self.hook_pre(self.gate_proj(x))
        pre_linear = self.hook_pre_linear(self.up_proj(x))
        out = self.down_proj(self.hook_post(self.act(pre) * pre_linear))
        return F.dropout(out, self.p_drop, self.training) if self.p_drop else out
