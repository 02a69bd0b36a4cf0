"""Architecture variants: each knob of `GPTConfig` maps to a small module here, chosen by this registry.

    backends.py   attention kernels (SDPA, our Triton kernel in triton/, eager) and the fast/eager rule
    diff_attn.py  differential attention (`diff_attn`)
    moe.py        mixture-of-experts feed-forward (`moe_experts`)
    hf_moe.py     Hugging Face-style MoE blocks: Mixtral, Qwen2-MoE (`moe_style`)
    mod.py        mixture-of-depths routed blocks (`mod`)
    yoco.py       YOCO's decoder-decoder (`yoco`): a model-level variant (`YocoStack`)
    rotary.py     rotary position embeddings (`positional_embedding_type="rotary"`, `rotary_dim`, `rotary_base`,
                  `rope_scaling`), used by the attention of `tinygpt.model.layers`
    norms.py      RMSNorm (`normalization_type="RMS"`; `tinygpt.model.layers.make_norm` picks the norm)
    gated_mlp.py  gated feed-forwards, SwiGLU / GeGLU (`gated_mlp`)
    parallel.py   the parallel attention + MLP residual block (`parallel_attn_mlp`, GPT-NeoX / GPT-J)

Grouped-query attention (`n_key_value_heads`) and the bias knobs (`bias`, `qkv_bias`) are options of the plain
attention and MLP modules themselves (fewer key/value heads, `nn.Linear(..., bias=...)`), not separate classes.

`tinygpt.model.GPT` asks this registry for each block (`make_block`: its attention class, feed-forward module and
block class) and for the model-level strategy (`model_stack`: how the blocks are chained, which cache decoding
needs); a config with every knob off gets exactly the plain GPT-2 pieces of `tinygpt.model.layers`.
"""

from __future__ import annotations

from torch import nn

from tinygpt.arch import backends
from tinygpt.arch.diff_attn import DiffAttention
from tinygpt.arch.gated_mlp import GatedMLP
from tinygpt.arch.hf_moe import HFMoE
from tinygpt.arch.mod import MoDBlock
from tinygpt.arch.moe import MoE
from tinygpt.arch.parallel import ParallelBlock
from tinygpt.arch.yoco import YOCO_STACK
from tinygpt.config import GPTConfig
from tinygpt.model.layers import MLP, Attention, Block, make_norm
from tinygpt.model.stack import Stack

__all__ = ["attention_class", "backends", "block_class", "make_block", "make_ffn", "make_norm", "model_stack"]

_PLAIN_STACK = Stack()


def attention_class(cfg: GPTConfig) -> type[nn.Module]:
    """Attention module class for a block."""
    return DiffAttention if cfg.diff_attn else Attention


def make_ffn(cfg: GPTConfig, layer: int) -> tuple[str, nn.Module]:
    """(attribute name, module) of a block's feed-forward part: ("mlp", MLP or GatedMLP) for a dense model,
    ("moe", MoE or HFMoE) with experts."""
    if cfg.moe_experts:
        return "moe", (MoE if cfg.moe_style == "tinygpt" else HFMoE)(cfg, layer)
    return "mlp", (GatedMLP if cfg.gated_mlp else MLP)(cfg)


def block_class(cfg: GPTConfig, layer: int) -> type[Block]:
    """The block class at `layer`: routed (mixture-of-depths), parallel residual, or the plain `Block`."""
    if cfg.mod and layer % cfg.mod_every == cfg.mod_every - 1:  # layers 1, 3, 5, ... for mod_every=2
        return MoDBlock
    return ParallelBlock if cfg.parallel_attn_mlp else Block


def make_block(cfg: GPTConfig, layer: int) -> Block:
    """The block at `layer`, with the attention and feed-forward modules the config asks for."""
    attn = attention_class(cfg)(cfg, layer)
    ffn = make_ffn(cfg, layer)
    return block_class(cfg, layer)(cfg, layer, attn, ffn)


def model_stack(cfg: GPTConfig) -> Stack:
    """The model-level strategy a config needs: the plain `Stack` unless a variant changes the layer stack."""
    return YOCO_STACK if cfg.yoco else _PLAIN_STACK
