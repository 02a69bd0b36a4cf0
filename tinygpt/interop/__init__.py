"""Interoperability with other libraries: Hugging Face `transformers` (and, through it, TransformerLens).

    from tinygpt.interop import hf
    model = hf.import_hf("hf-dir/")                # gpt2, llama, qwen2, mistral, gpt_neox, mixtral, qwen2_moe
    hf.export_hf(model, "out-dir/")                # back to that HF architecture, with tokenizer files
    teacher, tok = hf.load_hf_causal_lm("some-local-causal-lm/")   # any AutoModelForCausalLM, offline
    bridge = hf.transformer_bridge(model)          # a TransformerLens TransformerBridge over the export

`transformers` is imported only when one of these functions runs (the `interop` extra).
"""

from tinygpt.interop.hf import InteropError, export_hf, import_hf, load_hf_causal_lm, transformer_bridge

__all__ = ["InteropError", "export_hf", "import_hf", "load_hf_causal_lm", "transformer_bridge"]
