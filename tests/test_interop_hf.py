"""Hugging Face interop: GPT-2 export/import parity (tied and untied), tokenizer round trips (byte and BPE),
clear errors for what GPT-2 cannot express, the CLI, and a TransformerLens TransformerBridge over an export."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

from tinygpt import GPT, BPETokenizer, ByteTokenizer, GPTConfig, load, save, train_bpe
from tinygpt.cli import main
from tinygpt.interop.hf import (
    InteropError,
    check_gpt2_expressible,
    export_hf,
    from_hf_config,
    hf_tokenizer,
    import_hf,
    tokenizer_from_hf_dir,
    transformer_bridge,
    vocab_mismatch,
)

# All dims distinct, so a transposed or mislabelled axis cannot pass.
CFG = GPTConfig(n_layers=2, d_model=24, n_heads=3, d_mlp=40, n_ctx=32)
TEXTS = [
    "ROMEO: But, soft! what light through yonder window breaks?\n",
    "  leading spaces, tabs\tand\r\nnewlines  ",
    "ünïcödé — 日本語 🙂 \x00\x01\x7f",
    "".join(chr(i) for i in range(1, 400)),
]


def randomize(model: nn.Module, seed: int = 0, scale: float = 0.2) -> nn.Module:
    """Non-trivial weights everywhere (fresh models have zero biases and unit LayerNorms)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def tokens(n_vocab: int = 256, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, n_vocab, (2, 11), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------- export / import
@pytest.mark.parametrize("tied", [True, False])
def test_export_logits_match_hugging_face(tmp_path, tied):
    ours = randomize(GPT(CFG.replace(tie_embeddings=tied)))
    export_hf(ours, tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    # the HF loader keeps lm_head separate exactly when the model is untied
    assert (hf.lm_head.weight is hf.transformer.wte.weight) == tied
    if not tied:
        assert not torch.equal(hf.lm_head.weight, hf.transformer.wte.weight)
        assert torch.equal(hf.lm_head.weight, ours.unembed.weight)
    x = tokens()
    with torch.no_grad():
        want, got = ours(x), hf(x).logits
    assert want.abs().max() > 0.5  # a non-trivial comparison
    assert torch.allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tied", [True, False])
def test_import_of_a_hugging_face_gpt2_matches(tmp_path, tied):
    """A GPT-2 checkpoint made by transformers itself (not by us) imports with the same logits."""
    hf_cfg = transformers.GPT2Config(
        vocab_size=256, n_positions=32, n_embd=24, n_layer=2, n_head=3, n_inner=40, activation_function="gelu_new",
        resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, bos_token_id=None, eos_token_id=None,
        tie_word_embeddings=tied,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = randomize(transformers.GPT2LMHeadModel(hf_cfg), seed=3)
    hf.save_pretrained(tmp_path / "hf")
    hf_tokenizer(ByteTokenizer()).save_pretrained(tmp_path / "hf")
    ours = import_hf(tmp_path / "hf")
    assert ours.cfg.tie_embeddings == tied
    assert (ours.unembed.weight is ours.embed.weight) == tied
    assert ours.cfg.dropout == pytest.approx(0.1) and ours.cfg.act_fn == "gelu_new"
    assert isinstance(ours.tokenizer, ByteTokenizer)
    x = tokens(seed=2)
    with torch.no_grad():
        want, got = hf(x).logits, ours(x)
    assert want.abs().max() > 0.5
    assert torch.allclose(got, want, atol=1e-5, rtol=0)


def test_round_trip_is_exact_and_keeps_the_config(tmp_path):
    ours = randomize(GPT(CFG.replace(act_fn="gelu", layer_norm_eps=1e-6, init_std=0.03)))
    back = import_hf(export_hf(ours, tmp_path / "hf"))
    assert back.cfg == ours.cfg
    sd, sd_back = ours.state_dict(), back.state_dict()
    assert sd.keys() == sd_back.keys()
    assert all(torch.equal(sd[k], sd_back[k]) for k in sd)


def test_bfloat16_model_exports_and_imports_in_bfloat16(tmp_path):
    ours = randomize(GPT(CFG.replace(dtype="bfloat16")).float()).to(torch.bfloat16)
    export_hf(ours, tmp_path / "hf")
    back = import_hf(tmp_path / "hf")
    assert back.cfg.dtype == "bfloat16" and back.embed.weight.dtype == torch.bfloat16
    assert torch.equal(back.blocks[1].mlp.fc_out.weight, ours.blocks[1].mlp.fc_out.weight)


# ------------------------------------------------------------------------------------- tokenizers
def test_byte_tokenizer_exports_to_a_hugging_face_tokenizer_with_the_same_ids(tmp_path):
    model = GPT(CFG)
    export_hf(model, tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    byte = ByteTokenizer()
    assert len(hf_tok) == 256
    for text in TEXTS:
        ids = hf_tok(text, add_special_tokens=False).input_ids
        assert ids == byte.encode(text)
        assert hf_tok.decode(ids) == text
    assert vocab_mismatch(hf_tok, byte) is None  # same content, spelled differently
    assert isinstance(tokenizer_from_hf_dir(tmp_path / "hf"), ByteTokenizer)


def test_bpe_tokenizer_round_trip(tmp_path):
    text = " ".join(TEXTS[:3]) * 20
    bpe = train_bpe([text], 300, progress=False)
    model = randomize(GPT(CFG.replace(d_vocab=bpe.vocab_size), tokenizer=bpe))
    export_hf(model, tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    for t in TEXTS:
        assert hf_tok(t, add_special_tokens=False).input_ids == bpe.encode(t)
    assert hf_tok.eos_token == "<|endoftext|>" and hf_tok.eos_token_id == bpe.eos_id
    back = import_hf(tmp_path / "hf")
    assert isinstance(back.tokenizer, BPETokenizer)
    assert back.tokenizer.fingerprint == bpe.fingerprint
    x = tokens(bpe.vocab_size)
    with torch.no_grad():
        assert torch.allclose(back(x), model(x), atol=1e-6)


def test_vocab_mismatch_compares_content_not_size():
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # 256 byte symbols in another id order
    tok = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    permuted = BPETokenizer(tok)
    assert permuted.vocab_size == 256
    why = vocab_mismatch(permuted, ByteTokenizer())
    assert why is not None and "ids differ" in why


# ------------------------------------------------------------------------------------- what GPT-2 cannot express
def test_separate_d_head_is_refused_naming_the_knob(tmp_path):
    with pytest.raises(InteropError, match="d_head=4"):
        export_hf(GPT(CFG.replace(d_head=4)), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()  # nothing written


def test_architecture_variants_are_refused_naming_the_knob(tmp_path):
    with pytest.raises(InteropError, match="moe_experts=4"):
        export_hf(GPT(CFG.replace(moe_experts=4)), tmp_path / "hf")
    with pytest.raises(InteropError, match="diff_attn=True"):
        check_gpt2_expressible(CFG.replace(diff_attn=True))
    check_gpt2_expressible(CFG.replace(moe_topk=1))  # a sub-knob of a variant that is off is inert


def test_non_gpt2_structure_is_refused_naming_the_tensor(tmp_path):
    model = GPT(CFG)
    model.blocks[1].mlp.fc_in = nn.Sequential(nn.Linear(24, 40))  # e.g. weight surgery
    with pytest.raises(InteropError, match=r"blocks\.1\.mlp\.fc_in"):
        export_hf(model, tmp_path / "hf")


def test_unsupported_hugging_face_configs_are_refused_naming_the_knob():
    base = dict(vocab_size=256, n_positions=32, n_embd=24, n_layer=2, n_head=3)
    for bad, knob in [
        (dict(activation_function="relu"), "activation_function"),
        (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
        (dict(scale_attn_weights=False), "scale_attn_weights"),
        (dict(attn_pdrop=0.0, resid_pdrop=0.1), "dropout"),
    ]:
        with pytest.raises(InteropError, match=knob):
            from_hf_config(transformers.GPT2Config(**base, **bad))
    assert from_hf_config(transformers.GPT2Config(**base, attn_pdrop=0.0), dropout=0.0).dropout == 0.0
    with pytest.raises(InteropError, match="not GPT-2"):
        from_hf_config(transformers.GPTNeoXConfig())


def test_import_needs_a_model_directory(tmp_path):
    with pytest.raises(InteropError, match="config.json"):
        import_hf(tmp_path)


# ------------------------------------------------------------------------------------- CLI
def test_cli_export_then_import(tmp_path, capsys):
    ours = randomize(GPT(CFG))
    save(ours, tmp_path / "m.tinygpt")
    assert main(["export", str(tmp_path / "m.tinygpt"), "--hf", str(tmp_path / "hf")]) == 0
    assert "config.json" in capsys.readouterr().out
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "back.tinygpt")]) == 0
    assert "saved" in capsys.readouterr().out
    back = load(tmp_path / "back.tinygpt")
    x = tokens()
    with torch.no_grad():
        assert torch.allclose(back(x), ours(x), atol=1e-6)


def test_cli_export_error_is_one_clear_line(tmp_path, capsys):
    save(GPT(CFG.replace(d_head=4)), tmp_path / "m.tinygpt")
    assert main(["export", str(tmp_path / "m.tinygpt"), "--hf", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "d_head=4" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------- TransformerLens
def test_transformer_bridge_cache_matches_run_with_cache(tmp_path):
    """Boot a TransformerBridge offline over an export; every hook name both share holds the same activation.

    Two documented convention differences are checked in their own terms: the bridge's `ln*.hook_normalized`
    is taken before the LayerNorm's weight and bias (ours, like HookedTransformer's, after), and it masks
    attention scores with the dtype's minimum instead of -inf.
    """
    ours = randomize(GPT(CFG))
    bridge = transformer_bridge(ours, tmp_path / "hf")
    x = tokens()
    with torch.no_grad():
        b_logits, b_cache = bridge.run_with_cache(x)
        o_logits, o_cache = ours.run_with_cache(x)
    assert torch.allclose(b_logits, o_logits, atol=1e-5)
    shared = set(b_cache.keys()) & set(o_cache.keys())
    per_block = (
        "hook_resid_pre hook_attn_out hook_resid_mid hook_mlp_out hook_resid_post ln1.hook_scale ln1.hook_normalized "
        "ln2.hook_scale ln2.hook_normalized attn.hook_q attn.hook_k attn.hook_v attn.hook_z attn.hook_attn_scores "
        "attn.hook_pattern mlp.hook_pre mlp.hook_post"
    ).split()
    core = ["hook_embed", "hook_pos_embed", "ln_final.hook_scale", "ln_final.hook_normalized"]
    core += [f"blocks.{i}.{h}" for i in range(CFG.n_layers) for h in per_block]
    assert set(core) <= shared, sorted(set(core) - shared)
    causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
    for name in sorted(shared):
        b, o = b_cache[name], o_cache[name]
        assert b.shape == o.shape, name
        if name.endswith("hook_normalized"):
            ln = ours.get_submodule(name.rsplit(".", 1)[0])
            b = b * ln.weight + ln.bias
        if name.endswith("hook_attn_scores"):
            assert (b[..., ~causal] < -1e30).all() and (o[..., ~causal] < -1e30).all(), name
            b, o = b[..., causal], o[..., causal]
        assert torch.allclose(b, o, atol=1e-5), (name, (b - o).abs().max().item())
