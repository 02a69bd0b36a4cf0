"""Architecture variants: each knob of `GPTConfig` maps to a small module here.

`tinygpt.model` asks this registry which attention class, feed-forward module, block and model class a
config needs; a vanilla config gets the plain GPT-2 pieces from `tinygpt.model`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from tinygpt.config import GPTConfig


def attention_class(cfg: GPTConfig) -> type[nn.Module]:
    """Attention module class for a block."""
    if cfg.diff_attn:
        from tinygpt.arch.diff_attn import DiffAttention

        return DiffAttention
    from tinygpt.model import Attention

    return Attention


def make_ffn(cfg: GPTConfig, layer: int) -> tuple[str, nn.Module]:
    """(attribute name, module) of a block's feed-forward part: ("mlp", MLP) for a dense model."""
    if cfg.moe_experts:
        from tinygpt.arch.moe import MoE

        return "moe", MoE(cfg, layer)
    from tinygpt.model import MLP

    return "mlp", MLP(cfg)


def make_block(cfg: GPTConfig, layer: int) -> nn.Module:
    """The block at `layer`."""
    if cfg.mod and layer % cfg.mod_every == cfg.mod_every - 1:  # routed: layers 1, 3, 5, ... for mod_every=2
        from tinygpt.arch.mod import MoDBlock

        return MoDBlock(cfg, layer)
    from tinygpt.model import Block

    return Block(cfg, layer)


def model_class(cfg: GPTConfig) -> type:
    """The model class a config needs (GPT unless a variant changes the layer stack)."""
    if cfg.yoco:
        from tinygpt.arch.yoco import YocoGPT

        return YocoGPT
    from tinygpt.model import GPT

    return GPT
