"""Small random Hugging Face models built in memory from a `transformers` config (no download, fp32), shared by
tests/test_interop_families.py (parity) and tests/test_families_tools.py (every tool on every family)."""

from __future__ import annotations

import torch
import transformers as T

from tinygpt.interop.hf import hf_tokenizer
from tinygpt.tokenizer import ByteTokenizer

V, CTX = 256, 64
BASE = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=CTX)
LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 500.0,
    "factor": 4.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
CASES = {
    "llama": (T.LlamaConfig, dict(num_key_value_heads=2, intermediate_size=48, tie_word_embeddings=False)),
    "llama_tied_llama3_rope": (
        T.LlamaConfig,
        dict(num_key_value_heads=1, intermediate_size=40, tie_word_embeddings=True, rope_parameters=LLAMA3),
    ),
    "llama_biases_linear_rope": (
        T.LlamaConfig,
        dict(
            intermediate_size=40,
            attention_bias=True,
            mlp_bias=True,
            rope_parameters={"rope_type": "linear", "factor": 3.0, "rope_theta": 2000.0},
        ),
    ),  # fmt: skip
    "qwen2": (T.Qwen2Config, dict(num_key_value_heads=2, intermediate_size=48, tie_word_embeddings=True)),
    "mistral": (
        T.MistralConfig,
        dict(num_key_value_heads=2, intermediate_size=48, head_dim=12, sliding_window=None, hidden_act="gelu"),
    ),
    "gpt_neox": (
        T.GPTNeoXConfig,
        dict(intermediate_size=56, rotary_pct=0.5, rotary_emb_base=1000, hidden_act="gelu"),
    ),
    "gpt_neox_sequential": (
        T.GPTNeoXConfig,
        dict(intermediate_size=56, rotary_pct=1.0, use_parallel_residual=False, tie_word_embeddings=True),
    ),
    "mixtral": (
        T.MixtralConfig,
        dict(num_key_value_heads=2, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2),
    ),
    "qwen2_moe": (
        T.Qwen2MoeConfig,
        dict(
            num_key_value_heads=2,
            intermediate_size=48,
            moe_intermediate_size=20,
            shared_expert_intermediate_size=28,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=False,
        ),
    ),  # fmt: skip
}
#: GPT-2 takes its own config names.
GPT2 = (
    T.GPT2Config,
    dict(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=CTX, bos_token_id=0, eos_token_id=0),
)


def make_hf(name: str, seed: int = 0, **overrides):
    """A seeded random `transformers` causal LM of case `name` ("gpt2" too), every weight perturbed, in eval mode."""
    if name == "gpt2":
        cls, kw = GPT2
        config = cls(**{**kw, **overrides})
    else:
        cls, kw = CASES[name]
        config = cls(**{**BASE, **kw, **overrides})
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():  # non-trivial weights everywhere (fresh norms are 1, biases 0)
            p.add_(torch.randn(p.shape, generator=g) * 0.15)
    return model


def save(hf, d):
    """`save_pretrained` with a byte-level tokenizer next to it (what `import_hf` attaches); returns `d`."""
    hf.save_pretrained(d)
    hf_tokenizer(ByteTokenizer()).save_pretrained(d)
    return d


def tokens(seed: int = 3, b: int = 2, t: int = 13) -> torch.Tensor:
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


def max_diff(ours, hf, x) -> float:
    """max |our logits - HF's logits| on tokens `x` (asserting the comparison is not trivially small)."""
    with torch.no_grad():
        a, b = ours(x), hf(input_ids=x).logits
    assert b.abs().max() > 0.5  # a non-trivial comparison
    return (a - b).abs().max().item()
