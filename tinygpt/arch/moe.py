"""Mixture-of-Experts feed-forward (`--moe-experts N --moe-topk k`): a token-choice top-k router over N MLPs.

A MoE block's feed-forward module is named `moe` (instead of `mlp`); its parameters are

    blocks.{i}.moe.router.weight              [n_experts, d_model]   (nn.Linear, no bias)
    blocks.{i}.moe.experts.{j}.fc_in.weight   [d_mlp, d_model]   + .bias [d_mlp]
    blocks.{i}.moe.experts.{j}.fc_out.weight  [d_model, d_mlp]   + .bias [d_model]

Routing (router math in fp32, whatever the model's dtype):

    logits  = x @ router.weight.T                      [batch, pos, n_experts]
    top_v, top_i = topk(logits, k)                      the k chosen experts per token
    weights = softmax(top_v)                            softmax over the top-k logits only (sums to 1)
    out     = sum_j weights_j * expert_{top_i_j}(x)

Tokens are *dispatched* (`MoE.dispatch`): the (token, expert) assignments are sorted by expert once, one
`index_select` gathers the tokens in that order, each expert runs only on its contiguous slice, and the
outputs return to token order through the inverse permutation (a second gather: on CPU much faster than a
scatter-add), weighted and summed over the k slots. No expert ever sees a token that was not routed to it.

Auxiliary losses (added to the training loss through `aux_loss`, see `tinygpt.model.gpt.GPT.aux_loss`):

- Switch-Transformer load balancing (Fedus et al. 2021), coefficient `GPTConfig.moe_aux_coef` (0.01):
  `N * sum_i f_i * P_i`, with `f_i` the fraction of the k·T (token, expert) assignments that went to expert
  i (i.e. the tokens dispatched to i, divided by k·T) and `P_i` the mean over tokens of the *full*
  softmax over all N router logits. It is 1 for perfectly uniform routing.
- Router z-loss (Zoph et al. 2022, ST-MoE), coefficient `GPTConfig.moe_z_coef` (0.001):
  `mean_tokens(logsumexp(logits)^2)`; keeps router logits small.

`aux_loss` is set on every training forward and is None in eval mode.

Initialisation: experts' `fc_in`/`fc_out` follow the generic GPT-2 init (`fc_out.weight` scaled by
1/sqrt(2·n_layers) like the dense MLP); the router is N(0, init_std) (`reset_variant_parameters`), small
random logits that break ties (an all-zero router would send every token to experts 0..k-1).

Monitoring (`metrics()`, merged into each training step's record by `tinygpt.train`), per layer `i`:

- `moe/l{i}/load_e{j}`: fraction of the last training batch's assignments that went to expert j;
- `moe/l{i}/entropy`: normalised entropy H(load)/log(N) of the load summed over the last `LOAD_WINDOW`
  training forwards (1 = uniform, 0 = a single expert);
- `moe/l{i}/dead`: experts that received no token in that window.

Routing is declared collapsed when, with at least `COLLAPSE_MIN_STEPS` forwards in the window, the
normalised entropy is below `COLLAPSE_ENTROPY` (0.5) or more than `COLLAPSE_DEAD_FRACTION` (half) of the
experts are dead; `metrics()` then raises a `RoutingCollapseWarning` once per layer (again only after the
layer has recovered and collapsed anew).

Hook points (TransformerLens style, see docs/hooks.md):

    blocks.{i}.moe.hook_router_logits   [batch, pos, n_experts]   fp32 router logits
    blocks.{i}.moe.hook_expert_indices  [batch, pos, k]           chosen experts (int64), best first
    blocks.{i}.moe.hook_expert_weights  [batch, pos, k]           their weights (fp32, softmax of the top-k)

A hook may return edited indices or weights (e.g. force an expert); the edited routing is what runs.
The block's `hook_mlp_out` holds the combined MoE output as for a dense block.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from tinygpt.arch.gated_mlp import activation
from tinygpt.config import ConfigError, GPTConfig

__all__ = [
    "COLLAPSE_DEAD_FRACTION",
    "COLLAPSE_ENTROPY",
    "COLLAPSE_MIN_STEPS",
    "LOAD_WINDOW",
    "Expert",
    "MoE",
    "RoutingCollapseWarning",
    "load_balancing_loss",
    "router_z_loss",
]

LOAD_WINDOW = 20
"""Training forwards over which expert load, entropy and dead experts are counted."""
COLLAPSE_ENTROPY = 0.5
"""Routing counts as collapsed when the window's normalised load entropy H/log(N) falls below this..."""
COLLAPSE_DEAD_FRACTION = 0.5
"""...or when more than this fraction of the experts received no token in the window."""
COLLAPSE_MIN_STEPS = 5
"""Forwards needed in the window before a collapse is declared (one small batch is not evidence)."""


class RoutingCollapseWarning(UserWarning):
    """A MoE layer routes (almost) everything to a few experts."""


class Expert(nn.Module):
    """One expert: `fc_in` -> activation (`cfg.act_fn`) -> `fc_out` (the dense MLP without hooks).
    x: [n, d_model] -> [n, d_model]."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc_in = nn.Linear(cfg.d_model, cfg.d_mlp, bias=cfg.bias)
        self.fc_out = nn.Linear(cfg.d_mlp, cfg.d_model, bias=cfg.bias)
        activation(cfg.act_fn)  # a known name; looked up per call, so the module pickles
        self.act_fn = cfg.act_fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fc_out(activation(self.act_fn)(self.fc_in(x)))


def load_balancing_loss(logits: Tensor, indices: Tensor, n_experts: int) -> Tensor:
    """Switch-style balance loss `N * sum_i f_i * P_i`.

    Args:
        logits: [tokens, n_experts] router logits (fp32).
        indices: [tokens, k] chosen experts.
        n_experts: N.

    Returns:
        scalar; `f_i` = assignments to expert i / (tokens * k), `P_i` = mean full-softmax probability of i.
    """
    counts = torch.bincount(indices.reshape(-1), minlength=n_experts).to(logits.dtype)
    f = counts / indices.numel()
    p = logits.softmax(-1).mean(0)
    return n_experts * (f * p).sum()


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss `mean(logsumexp(logits)^2)`. logits: [tokens, n_experts] -> scalar."""
    return logits.logsumexp(-1).pow(2).mean()


class MoE(nn.Module):
    """Token-choice top-k mixture of `cfg.moe_experts` MLP experts (see the module docstring).

    Args:
        cfg: the model config (`moe_experts`, `moe_topk`, `moe_aux_coef`, `moe_z_coef`, `d_mlp`).
        layer: the block index (used in metric keys and warnings).
    """

    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        if cfg.moe_experts < 1:
            raise ConfigError("MoE needs cfg.moe_experts >= 1 (0 means a dense MLP)")
        self.cfg, self.layer = cfg, layer
        self.n_experts, self.top_k = cfg.moe_experts, cfg.moe_topk
        self.router = nn.Linear(cfg.d_model, cfg.moe_experts, bias=False)
        self.experts = nn.ModuleList(Expert(cfg) for _ in range(cfg.moe_experts))
        self.p_drop = cfg.dropout
        self.hook_router_logits = HookPoint()
        self.hook_expert_indices = HookPoint()
        self.hook_expert_weights = HookPoint()
        self.aux_loss: Tensor | None = None
        # Rolling window of per-forward expert loads (assignment counts), training forwards only.
        # Integer counts: unaffected by casting the model to bfloat16.
        self.register_buffer(
            "load_window", torch.zeros(LOAD_WINDOW, cfg.moe_experts, dtype=torch.long), persistent=False
        )
        self._window_steps = 0
        self._last_load: Tensor | None = None
        self._collapsed = False

    def reset_variant_parameters(self) -> None:
        """Router ~ N(0, init_std): small logits that break ties between experts."""
        nn.init.normal_(self.router.weight, 0.0, self.cfg.init_std)

    def forward(self, x: Tensor) -> Tensor:
        """x: [batch, pos, d_model] -> [batch, pos, d_model]."""
        b, t, d = x.shape
        with torch.autocast(x.device.type, enabled=False):  # router math in fp32, also under autocast
            logits = F.linear(x.float(), self.router.weight.float())
        logits = self.hook_router_logits(logits)  # [b, t, N] fp32
        top_v, top_i = logits.topk(self.top_k, dim=-1)
        top_i = self.hook_expert_indices(top_i)  # [b, t, k]
        weights = self.hook_expert_weights(top_v.softmax(-1))  # [b, t, k] fp32

        out = self.dispatch(x.reshape(b * t, d), top_i.reshape(b * t, -1), weights.reshape(b * t, -1))
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

    def dispatch(self, x: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
        """Run each expert on its tokens only and combine: x [T, d], indices/weights [T, k] -> [T, d].

        The T·k (token, expert) assignments are sorted by expert once; one `index_select` gathers the tokens
        in that order, expert j runs on its contiguous slice, and the outputs are put back in assignment order
        by a second gather through the inverse permutation (faster than a scatter-add on CPU), then summed
        over the k slots with the routing weights.
        """
        n_tok, k = indices.shape
        if n_tok == 0:
            return torch.zeros_like(x)
        flat_i = indices.reshape(-1)
        order = torch.argsort(flat_i, stable=True)  # assignments grouped by expert
        counts = torch.bincount(flat_i, minlength=self.n_experts).tolist()
        xs = x.index_select(0, order // k)  # [T*k, d]: the token of each sorted assignment
        parts, start = [], 0
        for j, n in enumerate(counts):
            if n:
                parts.append(self.experts[j](xs[start : start + n]))
            start += n
        ys = torch.cat(parts) if len(parts) > 1 else parts[0]
        inv = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        y = ys.index_select(0, inv).view(n_tok, k, -1)  # back in (token, slot) order
        if k == 1:
            return (y[:, 0] * weights.to(y.dtype)).to(x.dtype)
        return torch.bmm(weights.to(y.dtype)[:, None, :], y)[:, 0].to(x.dtype)

    # ------------------------------------------------------------------------------- monitoring
    def load_stats(self) -> dict[str, float | list[float]] | None:
        """Load over the window: `load` (fraction per expert), `entropy` (H/log N), `dead`; None before training."""
        if self._window_steps == 0:
            return None
        filled = min(self._window_steps, LOAD_WINDOW)
        total = self.load_window[:filled].sum(0).double()
        frac = total / total.sum().clamp_min(1)
        nz = frac[frac > 0]
        entropy = float(-(nz * nz.log()).sum()) / math.log(self.n_experts) if self.n_experts > 1 else 1.0
        return {"load": frac.tolist(), "entropy": entropy, "dead": int((total == 0).sum()), "steps": filled}

    def metrics(self) -> dict[str, float]:
        """Per-layer expert load, normalised entropy and dead experts (see the module docstring)."""
        stats = self.load_stats()
        if stats is None:
            return {}
        key = f"moe/l{self.layer}"
        last = self._last_load.double()
        last = (last / last.sum().clamp_min(1)).tolist()
        out = {f"{key}/load_e{j}": v for j, v in enumerate(last)}
        out[f"{key}/entropy"] = stats["entropy"]
        out[f"{key}/dead"] = float(stats["dead"])
        collapsed = stats["steps"] >= COLLAPSE_MIN_STEPS and (
            stats["entropy"] < COLLAPSE_ENTROPY or stats["dead"] > COLLAPSE_DEAD_FRACTION * self.n_experts
        )
        if collapsed and not self._collapsed:
            warnings.warn(
                f"MoE routing collapsed in layer {self.layer}: normalised load entropy {stats['entropy']:.2f} "
                f"(threshold {COLLAPSE_ENTROPY}), {stats['dead']} of {self.n_experts} experts received no token "
                f"in the last {stats['steps']} training steps; load {[round(v, 3) for v in stats['load']]}. "
                "Raise moe_aux_coef, lower the learning rate, or use fewer experts.",
                RoutingCollapseWarning,
                stacklevel=2,
            )
        self._collapsed = collapsed
        return out

    def reset_load_stats(self) -> None:
        """Forget the load window (e.g. after surgery on the router)."""
        self.load_window.zero_()
        self._window_steps, self._last_load, self._collapsed = 0, None, False
