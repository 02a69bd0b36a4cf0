"""The one adapter for "a tinygpt or Hugging Face causal LM": logits, cached decoding, tokenizer, device, errors."""

from __future__ import annotations

import pytest
import torch

from tinygpt import GPT, ByteTokenizer, CheckpointError, GPTConfig, save
from tinygpt.interop.causal_lm import GPTCausalLM, HFCausalLM, HFTokenizer, NotACausalLM, as_causal_lm
from tinygpt.tokenizer import vocab_mismatch

CHATML = ("<|im_start|>", "<|im_end|>")


def small_model() -> GPT:
    torch.manual_seed(0)
    tok = ByteTokenizer(list(CHATML))
    return GPT(GPTConfig(n_layers=2, d_model=32, n_heads=2, n_ctx=32, d_vocab=tok.vocab_size), tokenizer=tok)


def test_a_tinygpt_model_gives_its_own_logits_and_cached_decoding(tmp_path):
    model = small_model().train()
    lm = as_causal_lm(model)
    assert isinstance(lm, GPTCausalLM) and lm.kind == "tinygpt" and lm.model is model
    assert (lm.n_ctx, lm.d_vocab, lm.device.type) == (32, 258, "cpu")
    x = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model.eval()(x)
    model.train()
    assert torch.equal(lm.logits(x), full)
    assert model.training and all(m.training for m in model.modules())  # eval only inside each call
    first = lm.start(x[:, :6])
    steps = [lm.step(x[:, i]) for i in range(6, 10)]
    assert torch.allclose(first, full[:, 5], atol=1e-5)
    for i, s in enumerate(steps):
        assert torch.allclose(s, full[:, 6 + i], atol=1e-5)
    path = save(model, tmp_path / "m.tinygpt")
    loaded = as_causal_lm(path)
    assert loaded.source == str(path) and loaded.fingerprint == lm.fingerprint
    assert loaded.record() == {"kind": "tinygpt", "path": str(path), "fingerprint": lm.fingerprint}
    assert as_causal_lm(loaded) is loaded


def test_what_is_not_a_causal_lm_is_refused_clearly(tmp_path):
    with pytest.raises(CheckpointError, match="teacher .* does not exist; pass a .tinygpt file or a Hugging Face"):
        as_causal_lm(tmp_path / "missing.tinygpt", what="teacher")
    with pytest.raises(NotACausalLM, match="cannot use a int as the model"):
        as_causal_lm(3)
    assert issubclass(NotACausalLM, TypeError)


def test_a_hugging_face_directory_matches_the_tinygpt_model(tmp_path):
    pytest.importorskip("transformers")
    from tinygpt.interop.hf import export_hf

    model = small_model().eval()
    hf = as_causal_lm(export_hf(model, tmp_path / "hf"))
    assert isinstance(hf, HFCausalLM) and hf.kind == "hf" and isinstance(hf.tokenizer, HFTokenizer)
    assert (hf.n_ctx, hf.d_vocab) == (32, 258)
    assert hf.tokenizer.special_tokens == {"<|im_start|>": 256, "<|im_end|>": 257}
    assert hf.tokenizer.encode("a<|im_end|>") == [97, 257] == model.tokenizer.encode("a<|im_end|>")
    assert vocab_mismatch(model.tokenizer, hf.tokenizer) is None
    x = torch.randint(0, 258, (2, 9), generator=torch.Generator().manual_seed(2))
    lm = as_causal_lm(model)
    assert torch.allclose(hf.logits(x), lm.logits(x), atol=1e-5)
    assert torch.allclose(hf.start(x[:, :5]), lm.start(x[:, :5]), atol=1e-5)
    assert torch.allclose(hf.step(x[:, 5]), lm.step(x[:, 5]), atol=1e-5)
    assert isinstance(hf.tinygpt_tokenizer(), ByteTokenizer)  # a byte-level vocabulary becomes bytes again
    with pytest.raises(NotACausalLM, match="as its directory"):
        as_causal_lm(hf.model)
