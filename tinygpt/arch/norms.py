"""RMSNorm (Zhang & Sennrich 2019), as Hugging Face's `LlamaRMSNorm` computes it, with TransformerLens' hooks.

    scale = sqrt(mean(x²) + eps)                 over the last dim, in fp32     -> hook_scale       [batch, pos, 1]
    y     = (x / scale).to(x.dtype) * weight                                      -> hook_normalized  [batch, pos, d]

Parameter: `weight` [d] (init 1; `w` is the TransformerLens alias, like `LayerNorm.w`); no bias, no mean
subtraction. `hook_normalized` holds the norm's *output* (after the weight), as tinygpt's `LayerNorm` does, so it
is the input the next sublayer sees (what transcoders and the lenses read); TransformerLens' RMSNorm hooks the
value before its weight, which is the same thing once TransformerLens has folded the weight into the next layer.

Fast path: while nothing observes `hook_scale` (`tinygpt.model.layers.observed`), fp32/fp64 inputs go through
`torch.nn.functional.rms_norm` (one fused kernel) and other dtypes (bf16) through HF's exact op order (normalise in
fp32, round to the input dtype, multiply by the weight), so an imported bf16 model computes what HF computes. When
`hook_scale` is observed the scale is materialised; a hook that returns an edited scale (or edits it in place)
changes the normalisation, e.g. to freeze it for attribution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from tinygpt.arch.backends import observed

__all__ = ["RMSNorm"]


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dim. x: [..., d] -> [..., d] (see the module docstring).

    Args:
        d: the normalised width (d_model).
        eps: added to mean(x²) (HF `rms_norm_eps`; tinygpt's `layer_norm_eps`).
    """

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))
        self.hook_scale = HookPoint()  # [batch, pos, 1]
        self.hook_normalized = HookPoint()  # [batch, pos, d]

    w = property(lambda self: self.weight)  # TransformerLens name

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"

    def forward(self, x: Tensor) -> Tensor:
        if observed(self.hook_scale):
            xf = x.float() if x.dtype not in (torch.float32, torch.float64) else x
            inv = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
            scale = inv.reciprocal()
            version = scale._version
            hooked = self.hook_scale(scale)
            edited = hooked is not scale or scale._version != version  # replaced, or changed in place
            y = (xf / hooked if edited else xf * inv).to(x.dtype) * self.weight
        elif x.dtype in (torch.float32, torch.float64) and x.dtype == self.weight.dtype:
            y = F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        else:  # HF's op order: fp32 statistics, round to the input dtype, then the weight
            xf = x.float()
            y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight
        return self.hook_normalized(y)
