"""Hugging Face-style sparse MoE blocks: Mixtral (`moe_style="mixtral"`) and Qwen2-MoE (`moe_style="qwen2_moe"`).

Same module name (`blocks.{i}.moe`), router, hooks, dispatch, auxiliary losses and monitoring as tinygpt's own
`tinygpt.arch.moe.MoE` (this class derives from it); what differs is the experts and the routing weights:

    blocks.{i}.moe.router.weight                    [n_experts, d_model]     (HF `gate.weight`)
    blocks.{i}.moe.experts.{j}.gate_proj/up_proj/down_proj                   gated experts of width d_mlp
                                                                             (HF Mixtral w1 / w3 / w2)
    blocks.{i}.moe.shared_expert.gate_proj/up_proj/down_proj                 Qwen2-MoE only, width moe_shared_d_mlp
    blocks.{i}.moe.shared_expert_gate.weight        [1, d_model]             its sigmoid gate

Routing, as HF computes it (router logits in the model's dtype, softmax in fp32):

    logits        = x @ router.weight.T                                 -> hook_router_logits  [batch, pos, N] fp32
    probs         = softmax(logits) over all N experts
    top_p, top_i  = topk(probs, k)                                      -> hook_expert_indices [batch, pos, k]
    weights       = top_p / sum(top_p)   (Mixtral always; Qwen2-MoE iff moe_norm_topk, else top_p as is)
                                                                        -> hook_expert_weights [batch, pos, k] fp32
    out           = sum_j weights_j * expert_{top_i_j}(x)
                    + sigmoid(x @ shared_expert_gate.weight.T) * shared_expert(x)      (-> hook_shared_gate [b, p, 1])

Renormalised top-k softmax probabilities are the softmax of the top-k logits, i.e. tinygpt's own routing; Mixtral
differs from `MoE` only by its gated experts. Each expert is a `GatedExpert`: down(act(gate(x)) * up(x)), act_fn
from the config ("silu" for both families), no biases (as in both HF families, whatever `cfg.bias` says).

Qwen2-MoE casts the routing weights to the model's dtype before use (bf16 rounding), as HF does; in fp32 the
result equals HF's up to the order the k expert outputs are summed in.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from tinygpt.arch.gated_mlp import GatedExpert
from tinygpt.arch.moe import LOAD_WINDOW, MoE, load_balancing_loss, router_z_loss
from tinygpt.config import ConfigError, GPTConfig

__all__ = ["HF_MOE_STYLES", "HFMoE"]

HF_MOE_STYLES = ("mixtral", "qwen2_moe")


class HFMoE(MoE):
    """A Mixtral / Qwen2-MoE sparse block (see the module docstring). x: [batch, pos, d_model] -> same.

    Args:
        cfg: reads moe_experts, moe_topk, moe_style, moe_norm_topk, moe_shared_d_mlp, d_mlp, act_fn, bias,
            moe_aux_coef, moe_z_coef, dropout, init_std.
        layer: the block index (metric keys and warnings).
    """

    def __init__(self, cfg: GPTConfig, layer: int):
        nn.Module.__init__(self)  # not MoE.__init__: its experts are ungated; the state below is MoE's
        style = getattr(cfg, "moe_style", "mixtral")
        if style not in HF_MOE_STYLES:
            raise ConfigError(f"HFMoE needs moe_style in {HF_MOE_STYLES}, got {style!r}")
        if cfg.moe_experts < 1:
            raise ConfigError("HFMoE needs cfg.moe_experts >= 1 (0 means a dense MLP)")
        self.cfg, self.layer, self.style = cfg, layer, style
        self.n_experts, self.top_k = cfg.moe_experts, cfg.moe_topk
        self.norm_topk = style == "mixtral" or bool(getattr(cfg, "moe_norm_topk", True))
        self.router = nn.Linear(cfg.d_model, cfg.moe_experts, bias=False)
        self.experts = nn.ModuleList(GatedExpert(cfg, bias=False) for _ in range(cfg.moe_experts))
        shared = int(getattr(cfg, "moe_shared_d_mlp", 0) or 0)
        if shared:
            self.shared_expert = GatedExpert(cfg, shared, bias=False)
            self.shared_expert_gate = nn.Linear(cfg.d_model, 1, bias=False)
            self.hook_shared_gate = HookPoint()  # [batch, pos, 1] sigmoid gate of the shared expert
        else:
            self.shared_expert = self.shared_expert_gate = None
        self.p_drop = cfg.dropout
        self.hook_router_logits = HookPoint()
        self.hook_expert_indices = HookPoint()
        self.hook_expert_weights = HookPoint()
        self.aux_loss: Tensor | None = None
        self.register_buffer(
            "load_window", torch.zeros(LOAD_WINDOW, cfg.moe_experts, dtype=torch.long), persistent=False
        )
        self._window_steps = 0
        self._last_load: Tensor | None = None
        self._collapsed = False

    def extra_repr(self) -> str:
        return f"style={self.style}, experts={self.n_experts}, top_k={self.top_k}, norm_topk={self.norm_topk}"

    def forward(self, x: Tensor) -> Tensor:
        """x: [batch, pos, d_model] -> [batch, pos, d_model]."""
        b, t, d = x.shape
        logits = self.hook_router_logits(F.linear(x, self.router.weight).float())  # [b, t, N]
        probs = logits.softmax(-1)
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        top_i = self.hook_expert_indices(top_i)  # [b, t, k]
        if self.norm_topk:
            top_p = top_p / top_p.sum(-1, keepdim=True)
        weights = self.hook_expert_weights(top_p)  # [b, t, k] fp32
        if self.style == "qwen2_moe":
            weights = weights.to(x.dtype)

        flat = x.reshape(b * t, d)
        out = self.dispatch(flat, top_i.reshape(b * t, -1), weights.reshape(b * t, -1))
        if self.shared_expert is not None:
            gate = self.hook_shared_gate(torch.sigmoid(self.shared_expert_gate(x)))  # [b, t, 1]
            out = out + gate.reshape(b * t, 1) * self.shared_expert(flat)
        out = out.view(b, t, d)

        if self.training:
            counts = torch.bincount(top_i.reshape(-1), minlength=self.n_experts)
            flat_logits = logits.reshape(b * t, self.n_experts)
            self.aux_loss = self.cfg.moe_aux_coef * load_balancing_loss(
                flat_logits, top_i.reshape(b * t, -1), self.n_experts
            ) + self.cfg.moe_z_coef * router_z_loss(flat_logits)
            with torch.no_grad():
                self.load_window[self._window_steps % LOAD_WINDOW] = counts
            self._window_steps += 1
            self._last_load = counts.detach()
        else:
            self.aux_loss = None
        return F.dropout(out, self.p_drop, self.training) if self.p_drop else out
