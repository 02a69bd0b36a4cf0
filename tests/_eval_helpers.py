"""What the evaluation tests share: a text with multi-byte characters, small models, a uniform model and a byte
model paired with a BPE model that computes exactly the same thing."""

from __future__ import annotations

import torch

from tinygpt import GPT, GPTConfig, train_bpe
from tinygpt.tokenizer import unicode_to_bytes

TEXT = (
    "Hark, the café's crème brûlée — naïve Zoë said “to be or not to be” 🙂.\n"
    "First Citizen: Before we proceed any further, hear me speak.\n"
    "All: Speak, speak. Résumé: 東京 and Ünïcödé.\n"
) * 3


def small(d_vocab=256, tokenizer=None, n_ctx=64, seed=0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layers=2, d_model=32, n_heads=2, n_ctx=n_ctx, d_vocab=d_vocab), tokenizer=tokenizer).eval()


def uniform(model: GPT) -> GPT:
    with torch.no_grad():
        model.unembed.weight.zero_()  # every logit 0: the uniform distribution over d_vocab
    return model


def make_bpe():
    """A 300-token byte-level BPE trained on TEXT."""
    return train_bpe([TEXT * 4, "Speak, speak; hear me speak."], 300, progress=False)


def byte_identical_bpe_pair():
    """A byte model and a BPE model (256 byte tokens, no merges, another id order) with the same weights."""
    tok = train_bpe(["abc"], 256, special_tokens=(), progress=False)
    assert tok.vocab_size == 256
    perm = torch.empty(256, dtype=torch.long)
    for ch, b in unicode_to_bytes().items():
        perm[b] = tok.tok.token_to_id(ch)
    byte_model = small(seed=3)
    with torch.no_grad():
        byte_model.unembed.weight.mul_(20)  # far from uniform, so a mismatch would show
    bpe_model = small(256, tok, seed=4)
    sd = {k: v.clone() for k, v in byte_model.state_dict().items()}
    sd["embed.weight"][perm] = byte_model.embed.weight.detach()
    sd["unembed.weight"][perm] = byte_model.unembed.weight.detach()
    bpe_model.load_state_dict(sd)
    return byte_model, bpe_model
