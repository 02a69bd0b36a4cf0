"""Architecture variants: each knob of `GPTConfig` maps to a small module here, chosen by this registry.

    backends.py   attention kernels (SDPA, our Triton kernel in triton/, eager) and the fast/eager rule
    diff_attn.py  differential attention (`diff_attn`)
    moe.py        mixture-of-experts feed-forward (`moe_experts`)
    mod.py        mixture-of-depths routed blocks (`mod`)
    yoco.py       YOCO's decoder-decoder (`yoco`): a model-level variant (`YocoStack`)

`tinygpt.model.GPT` asks this registry for each block (`make_block`: its attention class and feed-forward module)
and for the model-level strategy (`model_stack`: how the blocks are chained, which cache decoding needs); a
config with every knob off gets exactly the plain GPT-2 pieces of `tinygpt.model.layers`.
"""

from __future__ import annotations

from torch import nn

from tinygpt.arch import backends
from tinygpt.arch.diff_attn import DiffAttention
from tinygpt.arch.mod import MoDBlock
from tinygpt.arch.moe import MoE
from tinygpt.arch.yoco import YOCO_STACK
from tinygpt.config import GPTConfig
from tinygpt.model.layers import MLP, Attention, Block
from tinygpt.model.stack import Stack

__all__ = ["attention_class", "backends", "make_block", "make_ffn", "model_stack"]

_PLAIN_STACK = Stack()


def attention_class(cfg: GPTConfig) -> type[nn.Module]:
    """Attention module class for a block."""
    return DiffAttention if cfg.diff_attn else Attention


def make_ffn(cfg: GPTConfig, layer: int) -> tuple[str, nn.Module]:
    """(attribute name, module) of a block's feed-forward part: ("mlp", MLP) for a dense model."""
    return ("moe", MoE(cfg, layer)) if cfg.moe_experts else ("mlp", MLP(cfg))


def make_block(cfg: GPTConfig, layer: int) -> Block:
    """The block at `layer`, with the attention and feed-forward modules the config asks for."""
    routed = cfg.mod and layer % cfg.mod_every == cfg.mod_every - 1  # layers 1, 3, 5, ... for mod_every=2
    attn = attention_class(cfg)(cfg, layer)
    ffn = make_ffn(cfg, layer)
    return (MoDBlock if routed else Block)(cfg, layer, attn, ffn)


def model_stack(cfg: GPTConfig) -> Stack:
    """The model-level strategy a config needs: the plain `Stack` unless a variant changes the layer stack."""
    return YOCO_STACK if cfg.yoco else _PLAIN_STACK
