"""Parallel attention + MLP residual (GPT-NeoX / Pythia, GPT-J), `GPTConfig(parallel_attn_mlp=True)`.

Both sublayers read the block's input and write into its output:

    attn_out   = attn(ln1(resid_pre))
    mlp_out    = mlp(ln2(resid_pre))               (GPT-J ties ln1 and ln2; NeoX, and tinygpt, does not)
    resid_post = resid_pre + attn_out + mlp_out    (exact, plain additions)

As in TransformerLens, a parallel block has no `hook_resid_mid` (no residual stream lies between the
sublayers); every other block hook keeps its name and shape, and `hook_mlp_in` (with `set_use_hook_mlp_in`) is
a copy of `resid_pre`. `GPT.run_from(..., start_at="resid_mid")` is refused for such a block.
"""

from __future__ import annotations

from torch import Tensor

from tinygpt.config import GPTConfig
from tinygpt.model.cache import KVCache
from tinygpt.model.layers import Block, ModelError

__all__ = ["ParallelBlock"]


class ParallelBlock(Block):
    """A `Block` whose attention and feed-forward both read `resid_pre` (see the module docstring)."""

    def __init__(self, cfg: GPTConfig, layer: int, attn=None, ffn=None):
        super().__init__(cfg, layer, attn, ffn)
        del self.hook_resid_mid  # no residual stream between the sublayers (TransformerLens has none either)

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        """x = resid_pre [batch, pos, d_model] -> resid_post [batch, pos, d_model]."""
        resid_pre = self.hook_resid_pre(x)
        attn_out = self.hook_attn_out(self.attn(self.attn_input(resid_pre), cache))
        mlp_out = self.hook_mlp_out(self.ffn(self.ln2(self.mlp_input(resid_pre))))
        return self.hook_resid_post(resid_pre + attn_out + mlp_out)

    def finish_from(self, resid_pre: Tensor, attn_out: Tensor) -> Tensor:
        """resid_post from the block's input and an attention output (e.g. a patched `hook_attn_out`)."""
        mlp_out = self.hook_mlp_out(self.ffn(self.ln2(self.mlp_input(resid_pre))))
        return self.hook_resid_post(resid_pre + attn_out + mlp_out)

    def finish(self, resid_mid: Tensor) -> Tensor:
        raise ModelError(
            f"block {self.layer} is a parallel attention+MLP block (parallel_attn_mlp): it has no resid_mid; "
            "run it from resid_pre"
        )
