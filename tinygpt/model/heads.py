"""Per-head inputs and outputs: the hook switches edge methods need (TransformerLens' `use_*` switches).

TransformerLens computes, on request, each head's own copy of its inputs and outputs, so that a hook (or a
gradient) can reach one head without touching the others. The switches live on the model's config (not
saved; off by default) and are set by `GPT.set_use_attn_result` etc.:

    cfg.use_attn_result      blocks.{i}.attn.hook_result      [batch, pos, n_heads, d_model]
                             each head's output `z[h] @ W_O[h]` (no `b_O`); attn_out = Σ_h result[h] + b_O
    cfg.use_split_qkv_input  blocks.{i}.hook_q_input          [batch, pos, n_heads, d_model]
                             blocks.{i}.hook_k_input / hook_v_input [batch, pos, n_key_value_heads, d_model]
                             the residual stream each head's query / key / value reads, before ln1 (which is
                             then applied per head)
    cfg.use_attn_in          blocks.{i}.hook_attn_in          [batch, pos, n_heads, d_model]
                             one input per head for its query, key and value together
    cfg.use_hook_mlp_in      blocks.{i}.hook_mlp_in           [batch, pos, d_model]
                             the feed-forward input before ln2 (a copy of resid_mid)

When a switch is off its hook point is never called and the forward is exactly the usual one (the fused
kernels included). When it is on, every head's input is a copy of the same residual stream and each head
projects its own copy, so outputs equal the unsplit model's up to float rounding; a hook that edits one head's
copy changes that head only. With both `use_attn_in` and `use_split_qkv_input`, the query/key/value inputs are
copies of `hook_attn_in` (an edit there reaches all three); TransformerLens ignores `hook_attn_in` then.

Projections of per-head inputs go through the modules the model has: an `nn.Linear` by one einsum with its
weight, any other linear module (LoRA, factored or quantized surgery layers) by running each head's input
through the whole projection and keeping that head's slice, which is exact for any affine module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn as nn
from torch import Tensor

from tinygpt.errors import TinyGPTValueError

__all__ = [
    "SWITCHES",
    "HeadInputs",
    "SwitchError",
    "map_inputs",
    "project_heads",
    "repeat_heads",
    "head_results",
]

SWITCHES = ("use_attn_result", "use_split_qkv_input", "use_attn_in", "use_hook_mlp_in")


class SwitchError(TinyGPTValueError):
    """A hook switch (`set_use_split_qkv_input`, ...) that this architecture variant cannot express."""


class HeadInputs(NamedTuple):
    """Per-head attention inputs (after ln1): q [batch, pos, n_heads, d_model], k and v [batch, pos,
    n_key_value_heads, d_model]. The same tensor may serve several of them (`use_attn_in`)."""

    q: Tensor
    k: Tensor
    v: Tensor

    def map(self, fn: Callable[[Tensor], Tensor]) -> HeadInputs:
        """`fn` applied to each input once (an input shared by q, k and v stays shared)."""
        done: dict[int, Tensor] = {}
        out = []
        for x in self:
            if id(x) not in done:
                done[id(x)] = fn(x)
            out.append(done[id(x)])
        return HeadInputs(*out)


def map_inputs(x: Tensor | HeadInputs, fn: Callable[[Tensor], Tensor]) -> Tensor | HeadInputs:
    """`fn(x)` for a plain input [batch, pos, d_model], `x.map(fn)` for per-head inputs."""
    return x.map(fn) if isinstance(x, HeadInputs) else fn(x)


def repeat_heads(x: Tensor, n: int) -> Tensor:
    """[batch, pos, d] -> [batch, pos, n, d], a copy per head (so hooks may edit heads in place)."""
    return x.unsqueeze(2).repeat(1, 1, n, 1)


def project_heads(proj: nn.Module, x: Tensor, n: int, d_head: int) -> Tensor:
    """A projection to `n` heads of width `d_head`: [batch, pos, n, d_head].

    Args:
        proj: a linear module d_model -> n * d_head (`nn.Linear` or a swapped linear layer).
        x: [batch, pos, d_model] (one input for every head) or [batch, pos, n, d_model] (each head its own).
    """
    b, t = x.shape[:2]
    if x.ndim == 3:
        return proj(x).view(b, t, n, d_head)
    if type(proj) is nn.Linear:
        out = torch.einsum("bpnd,ned->bpne", x, proj.weight.view(n, d_head, -1).to(x.dtype))
        return out if proj.bias is None else out + proj.bias.view(n, d_head).to(out.dtype)
    full = proj(x).view(b, t, n, n, d_head)  # head i's input through every head's projection
    return torch.diagonal(full, dim1=2, dim2=3).permute(0, 1, 3, 2)


def head_results(o_proj: nn.Module, z: Tensor) -> tuple[Tensor, Tensor | None]:
    """Each head's output through `o_proj` without its bias, and the bias.

    Args:
        o_proj: a linear module n_heads * d_head -> d_model.
        z: [batch, pos, n_heads, d_head].

    Returns:
        (result [batch, pos, n_heads, d_model], bias [d_model] or None): `o_proj(z) == result.sum(2) + bias`.
    """
    b, t, n, dh = z.shape
    if type(o_proj) is nn.Linear:
        w = o_proj.weight.view(-1, n, dh).to(z.dtype)  # [d_model, n, d_head]
        return torch.einsum("bpne,dne->bpnd", z, w), o_proj.bias
    eye = torch.eye(n, dtype=z.dtype, device=z.device)
    spread = (eye[:, :, None] * z[:, :, :, None, :]).reshape(b, t, n, n * dh)  # head h's z in its own slot only
    bias = o_proj(z.new_zeros(1, n * dh))[0]
    return o_proj(spread) - bias, bias
