"""How a `GPT` chains its blocks: the model-level part of an architecture variant.

`GPT` is one class; what differs between a GPT-2 decoder and, say, YOCO's decoder-decoder is how the residual
stream goes through the blocks, which cache incremental decoding needs, and which model-level modules exist.
`Stack` is that strategy for the plain decoder (each block in turn, one `KVCache`); a variant subclasses it
(`tinygpt.arch.yoco.YocoStack`) and `tinygpt.arch.model_stack(cfg)` picks the one a config asks for. A stack
holds no state: its methods take the model.

`run_from` is the model run from any layer (`GPT.run_from`): the blocks from `layer` on, given that block's
`resid_pre` (or `resid_mid`), optionally with the keys and values of earlier positions from a cache, and with
the final block computing the last position only. Every caller (activation patching, lenses) uses it instead of
re-implementing block math.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from tinygpt.model.cache import KVCache, PackedRows, PrefixKV
from tinygpt.model.layers import Attention, Block, ModelError

if TYPE_CHECKING:
    from torch import nn

__all__ = ["STARTS", "Stack"]

STARTS = ("resid_pre", "resid_mid")


class Stack:
    """The plain block stack: every block in turn, each reading and extending the model's `KVCache`."""

    name = "gpt"

    def build(self, model: nn.Module) -> None:
        """Add the variant's model-level modules to `model` (called by `GPT.__init__` after the blocks)."""

    def run_blocks(self, model: nn.Module, x: Tensor, cache: KVCache | None) -> Tensor:
        """The residual stream through every block: [batch, pos, d_model] -> [batch, pos, d_model]."""
        for block in model.blocks:
            x = block(x, cache)
        return x

    def make_cache(self, model: nn.Module, batch: int, max_len: int) -> KVCache:
        """The cache incremental decoding needs."""
        w = model.embed.weight
        return KVCache(model.cfg, batch, max_len, w.device, w.dtype)

    def run_from(
        self,
        model: nn.Module,
        layer: int,
        x: Tensor,
        *,
        start_at: str = "resid_pre",
        stop_at: int,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> Tensor:
        """The residual stream from block `layer`'s `start_at` to the input of block `stop_at`.

        Args:
            model: the model.
            layer: the first block.
            x: `blocks.{layer}.hook_{start_at}` [batch, pos, d_model] (packed rows [1, N, d_model] with a
                `PackedRows` cache).
            start_at: "resid_pre" (the whole block) or "resid_mid" (its feed-forward half only).
            stop_at: the block before which to stop (n_layers: after the final block).
            cache: keys and values of the positions before x's (a `PrefixKV`, `PackedRows` or `KVCache`; read
                only: its length is not advanced).
            last_only: return the last position only ([batch, 1, d_model]); when the final block runs, it
                computes the keys and values of every position but the output of the last one only.

        Returns:
            [batch, pos, d_model] (or [batch, 1, d_model] with `last_only`).
        """
        self.check_run_from(model, layer, start_at, stop_at, cache)
        if start_at == "resid_mid":
            block = model.blocks[layer]
            x = block.finish(_last(x, cache) if last_only and layer == len(model.blocks) - 1 else x)
            layer += 1
        return self.run_range(model, layer, x, stop_at, cache, last_only)

    def check_run_from(self, model: nn.Module, layer: int, start_at: str, stop_at: int, cache) -> None:
        """Raise if this stack cannot run from `layer` (every layer of the plain stack can)."""

    def run_range(
        self, model: nn.Module, layer: int, x: Tensor, stop_at: int, cache: KVCache | None, last_only: bool
    ) -> Tensor:
        """Blocks `layer .. stop_at - 1` on their input x (see `run_from`)."""
        n = len(model.blocks)
        for i in range(layer, stop_at):
            block = model.blocks[i]
            if last_only and i == n - 1:
                if _plain(block) and x.shape[1] > 1:
                    x, cache = _split_last(block, x, cache)
                    return block(x, cache)
                if isinstance(cache, PackedRows):
                    raise ModelError("packed rows run through plain blocks only")
                return block(x, cache)[:, -1:]  # a variant block runs whole (e.g. its routing sees every token)
            x = block(x, cache)
        return _last(x, cache) if last_only else x


def _plain(block: nn.Module) -> bool:
    """A block whose last position can run on its own, after the others' keys and values (`_split_last`)."""
    return getattr(block, "splits_last", False) and type(block.attn) is Attention


def _last(x: Tensor, cache) -> Tensor:
    return cache.last_rows(x) if isinstance(cache, PackedRows) else x[:, -1:]


def _split_last(block: Block, x: Tensor, cache: KVCache | None) -> tuple[Tensor, KVCache]:
    """(the last position of x, the cache to run it with), writing the keys and values of the others first."""
    if isinstance(cache, PackedRows):
        return cache.split_last(block, x)
    rest, x = x[:, :-1], x[:, -1:]
    k, v = block.keys_values(rest, cache)
    past = 0 if cache is None else cache.length
    if cache is not None:
        k, v = cache.update(block.attn.layer, k, v)
    return x, PrefixKV({block.attn.layer: k}, {block.attn.layer: v}, past + rest.shape[1])
