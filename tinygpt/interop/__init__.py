"""Interoperability with other libraries: Hugging Face `transformers` (and, through it, TransformerLens).

    from tinygpt.interop import hf
    hf.export_hf(model, "gpt2-dir/")               # a GPT2LMHeadModel directory with tokenizer files
    model = hf.import_hf("gpt2-dir/")              # any GPT-2-architecture checkpoint -> tinygpt GPT
    teacher, tok = hf.load_hf_causal_lm("some-local-causal-lm/")   # any AutoModelForCausalLM, offline
    bridge = hf.transformer_bridge(model)          # a TransformerLens TransformerBridge over the export

`transformers` is imported only when one of these functions runs (the `interop` extra).
"""

from tinygpt.interop.hf import InteropError, export_hf, import_hf, load_hf_causal_lm, transformer_bridge

__all__ = ["InteropError", "export_hf", "import_hf", "load_hf_causal_lm", "transformer_bridge"]
