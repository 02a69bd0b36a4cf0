"""The hookable GPT: a GPT-2 style decoder that is a TransformerLens `HookedRootModule`.

    layers.py   LayerNorm / make_norm, Attention (GQA, rotary), MLP, Block, observed (the fast/eager rule's test),
                ModelError, check_switch
    heads.py    per-head inputs and outputs behind TransformerLens' hook switches (`GPT.set_use_attn_result`,
                `set_use_split_qkv_input`, `set_use_attn_in`, `set_use_hook_mlp_in`), SwitchError
    cache.py    KVCache, PrefixKV, PackedRows, SharedKV, YocoCache, CacheError
    stack.py    Stack: how a model chains its blocks (a variant's model-level strategy), run_from
    gpt.py      GPT

Import order inside the model core (checked by import-linter): `gpt` > `tinygpt.arch` (the registry and the
variants) > `stack` > `layers`, `cache` > `tinygpt.arch.backends` > `tinygpt.arch.triton`. `tinygpt.arch` is
imported first here so that its attention backends are loaded before the layers that use them, whichever
module a program imports first.
"""

from tinygpt import arch  # noqa: F401  (first: see the module docstring)
from tinygpt.model.cache import CacheError, KVCache, PackedRows, PrefixKV, SharedKV, YocoCache
from tinygpt.model.gpt import GPT, register_method
from tinygpt.model.heads import SwitchError
from tinygpt.model.layers import MLP, Attention, Block, LayerNorm, ModelError, observed
from tinygpt.model.stack import Stack

__all__ = [
    "GPT",
    "MLP",
    "Attention",
    "Block",
    "CacheError",
    "KVCache",
    "LayerNorm",
    "ModelError",
    "PackedRows",
    "PrefixKV",
    "SharedKV",
    "Stack",
    "SwitchError",
    "YocoCache",
    "observed",
    "register_method",
]
