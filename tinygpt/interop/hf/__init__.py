"""Hugging Face interop: import and export of GPT-2, Llama, Qwen2, Mistral, GPT-NeoX, Mixtral and Qwen2-MoE
checkpoints, any local causal LM as a teacher, TransformerLens bridges.

    from tinygpt.interop import hf
    model = hf.import_hf("SmolLM2-135M/")          # config.json + safetensors (+ shards) + tokenizer -> GPT
    hf.export_hf(model, "out/")                    # back to the same HF architecture
    teacher, tok = hf.load_hf_causal_lm("dir/")    # any AutoModelForCausalLM, offline
    bridge = hf.transformer_bridge(model)          # a TransformerLens TransformerBridge over the export

One module per family, each with its name table and config mapping (and what it refuses):

    gpt2.py       GPT2LMHeadModel (Conv1D transposes, fused c_attn)
    llama.py      LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM (one decoder, three configs)
    gpt_neox.py   GPTNeoXForCausalLM / Pythia (per-head interleaved query_key_value, partial rotary, parallel residual)
    moe.py        MixtralForCausalLM, Qwen2MoeForCausalLM (tinygpt.arch.hf_moe blocks)
    spec.py       what a family provides (renaming rules, fused groups, config both ways)
    shards.py     lazy safetensors reading (one tensor at a time, sharded checkpoints) and writing
    files.py      import_hf / export_hf / load_hf_causal_lm / transformer_bridge
    tokenizers.py tinygpt tokenizers <-> transformers fast tokenizers
    common.py     InteropError, the lazy transformers import

Anything a family cannot express exactly is refused with an `InteropError` naming the config field or knob; nothing
is ever imported approximately. `transformers` is imported only when a function runs: importing this is cheap.

Tokenizer comparison (`vocab_mismatch`, in `tinygpt.tokenizer`, re-exported here) is by vocabulary *content*:
every token is reduced to the bytes it stands for, so a tinygpt tokenizer and a Hugging Face tokenizer compare
meaningfully whatever their spelling. Running any local causal LM goes through `tinygpt.interop.causal_lm`.
"""

from tinygpt.interop.hf.common import InteropError
from tinygpt.interop.hf.files import (
    ARCHITECTURES,
    config_from_hf,
    export_hf,
    hf_state_dict,
    import_hf,
    infer_architecture,
    load_hf_causal_lm,
    transformer_bridge,
)
from tinygpt.interop.hf.gpt2 import (
    check_gpt2_expressible,
    copy_hf_gpt2_weights,
    from_hf,
    from_hf_config,
    gpt2_state_dict,
    to_hf,
    to_hf_config,
)
from tinygpt.interop.hf.shards import TensorSource, write_safetensors
from tinygpt.interop.hf.tokenizers import byte_tokenizer_json, hf_tokenizer, tokenizer_from_hf_dir
from tinygpt.tokenizer import (  # noqa: F401  (tokenizer comparison, re-exported: it lived here)
    PROBE_TEXT,
    BPETokenizer,
    ByteTokenizer,
    Tokenizer,
    TokenizerError,
    bytes_to_unicode,
    canonical_vocab,
    describe_tokenizer,
    load_tokenizer,
    unicode_to_bytes,
    vocab_mismatch,
)

__all__ = [
    "ARCHITECTURES",
    "InteropError",
    "TensorSource",
    "byte_tokenizer_json",
    "check_gpt2_expressible",
    "config_from_hf",
    "copy_hf_gpt2_weights",
    "export_hf",
    "from_hf",
    "from_hf_config",
    "gpt2_state_dict",
    "hf_state_dict",
    "hf_tokenizer",
    "import_hf",
    "infer_architecture",
    "load_hf_causal_lm",
    "to_hf",
    "to_hf_config",
    "tokenizer_from_hf_dir",
    "transformer_bridge",
    "vocab_mismatch",
    "write_safetensors",
]
