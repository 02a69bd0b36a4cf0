"""Import / export of Llama, Qwen2, Mistral, GPT-NeoX, Mixtral and Qwen2-MoE checkpoints, checked against
Hugging Face's own implementation: small random models built from a `transformers` config in memory (no download,
fp32) are saved, imported, compared (logits <= 1e-4 max abs, greedy tokens equal), exported back, reloaded by
transformers and compared again."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from _hf_helpers import CASES, CTX, V, make_hf, max_diff, save, tokens

from tinygpt import generate
from tinygpt.interop.hf import InteropError, export_hf, hf_tokenizer, import_hf
from tinygpt.tokenizer import ByteTokenizer

MEASURED: dict[str, tuple[float, float]] = {}


@pytest.mark.parametrize("name", list(CASES))
def test_import_matches_hugging_face_and_exports_back(tmp_path, name):
    hf = make_hf(name)
    ours = import_hf(save(hf, tmp_path / "hf"))
    assert isinstance(ours.tokenizer, ByteTokenizer)
    assert ours.hf_architecture == hf.config.model_type
    x = tokens()
    d_import = max_diff(ours, hf, x)
    assert d_import <= 1e-4, d_import
    prompt = x[:1, :5]
    with torch.no_grad():
        want = hf.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(generate(ours, prompt, 8, temperature=0), want)

    export_hf(ours, tmp_path / "out")
    back = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out", local_files_only=True).eval()
    assert type(back) is type(hf)
    d_export = max_diff(ours, back, x)
    assert d_export <= 1e-4, d_export
    sd, sd_back = hf.state_dict(), back.state_dict()
    assert sd.keys() == sd_back.keys()
    assert [k for k in sd if not torch.equal(sd[k], sd_back[k])] == []  # the round trip is exact
    MEASURED[name] = (d_import, d_export)
    print(f"{name}: import max|dlogits| {d_import:.2e}, export {d_export:.2e}")


def test_config_fields_map_to_the_knobs(tmp_path):
    m = import_hf(save(make_hf("gpt_neox"), tmp_path / "a"))
    c = m.cfg
    assert (c.positional_embedding_type, c.normalization_type, c.parallel_attn_mlp) == ("rotary", "LN", True)
    assert c.rotary_dim == 4 and c.rotary_base == 1000 and c.act_fn == "gelu" and c.bias
    q = import_hf(save(make_hf("qwen2"), tmp_path / "b")).cfg
    assert (q.normalization_type, q.gated_mlp, q.bias, q.qkv_bias, q.n_key_value_heads) == ("RMS", True, False, True, 2)
    assert q.tie_embeddings
    mo = import_hf(save(make_hf("qwen2_moe"), tmp_path / "c")).cfg
    assert (mo.moe_style, mo.moe_experts, mo.moe_topk, mo.moe_norm_topk, mo.moe_shared_d_mlp, mo.d_mlp) == (
        "qwen2_moe", 4, 2, False, 28, 20,
    )  # fmt: skip


def test_sharded_checkpoint_is_read_one_tensor_at_a_time(tmp_path, monkeypatch):
    from tinygpt.interop.hf import shards

    hf = make_hf("llama")
    hf.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    hf_tokenizer(ByteTokenizer()).save_pretrained(tmp_path / "hf")
    files = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    reads = []
    real_get = shards.TensorSource.get
    monkeypatch.setattr(shards.TensorSource, "get", lambda self, n: reads.append(n) or real_get(self, n))
    ours = import_hf(tmp_path / "hf")
    assert sorted(reads) == sorted(set(reads)) and len(reads) == len(hf.state_dict())  # each tensor once
    assert max_diff(ours, hf, tokens()) <= 1e-4


@pytest.mark.parametrize("name", ["llama", "mixtral"])
def test_bfloat16_checkpoints_import_to_bfloat16_or_float32(tmp_path, name):
    hf = make_hf(name).to(torch.bfloat16)
    save(hf, tmp_path / "hf")
    ours = import_hf(tmp_path / "hf")
    assert ours.cfg.dtype == "bfloat16" and ours.embed.weight.dtype == torch.bfloat16
    assert torch.equal(ours.embed.weight, hf.model.embed_tokens.weight)
    wide = import_hf(tmp_path / "hf", dtype="float32")
    assert wide.cfg.dtype == "float32" and wide.embed.weight.dtype == torch.float32
    ref = T.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert max_diff(wide, ref, tokens()) <= 1e-4  # the bf16 weights, computed in fp32, as HF does
    export_hf(ours, tmp_path / "out")
    back = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert back.model.embed_tokens.weight.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    "name,overrides,field",
    [
        ("mistral", dict(sliding_window=8), "sliding_window=8"),
        ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1), "sliding_window=8"),
        ("llama", dict(rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}), "rope_type='yarn'"),
        ("llama", dict(attention_bias=True, mlp_bias=False), "attention_bias=True with mlp_bias=False"),
        ("llama", dict(hidden_act="gelu_fast"), "hidden_act='gelu_fast'"),
        ("gpt_neox", dict(rotary_pct=0.375), "rotary_pct"),
        ("gpt_neox", dict(attention_bias=False), "attention_bias=False"),
        ("qwen2_moe", dict(decoder_sparse_step=2), "decoder_sparse_step=2"),
        ("qwen2_moe", dict(mlp_only_layers=[1]), "mlp_only_layers"),
    ],
)
def test_inexpressible_configs_are_refused_naming_the_field(tmp_path, name, overrides, field):
    save(make_hf(name, **overrides), tmp_path / "hf")
    with pytest.raises(InteropError, match=field.replace("[", r"\[").replace("(", r"\(")):
        import_hf(tmp_path / "hf")


def test_a_window_no_longer_than_the_context_imports_exactly(tmp_path):
    hf = make_hf("mistral", sliding_window=8)
    ours = import_hf(save(hf, tmp_path / "hf"), n_ctx=8)
    assert ours.cfg.n_ctx == 8
    assert max_diff(ours, hf, tokens(t=8)) <= 1e-4


def test_weights_the_config_does_not_declare_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    d = save(make_hf("llama"), tmp_path / "hf")
    sd = load_file(d / "model.safetensors")
    sd["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(32)
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InteropError, match=r"o_proj\.bias"):
        import_hf(d)


def test_tying_mismatches_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    d = save(make_hf("llama"), tmp_path / "hf")  # untied
    sd = load_file(d / "model.safetensors")
    del sd["lm_head.weight"]
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InteropError, match="tie_word_embeddings=False"):
        import_hf(d)


def test_unsupported_families_and_pickles_are_refused(tmp_path):
    save(make_hf("llama"), tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").rename(tmp_path / "hf" / "pytorch_model.bin")
    with pytest.raises(InteropError, match="never unpickles"):
        import_hf(tmp_path / "hf")
    T.PhiConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=4).save_pretrained(
        tmp_path / "p"
    )
    with pytest.raises(InteropError, match="'phi' is not supported"):
        import_hf(tmp_path / "p")


# ------------------------------------------------------------------------------------- CLI
def test_cli_import_then_export(tmp_path, capsys):
    from tinygpt import load
    from tinygpt.cli import main

    hf = make_hf("qwen2_moe")
    save(hf, tmp_path / "hf")
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "m.tinygpt")]) == 0
    assert "saved" in capsys.readouterr().out
    assert max_diff(load(tmp_path / "m.tinygpt"), hf, tokens()) <= 1e-4
    assert main(["export", str(tmp_path / "m.tinygpt"), "--hf", str(tmp_path / "out")]) == 0
    back = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert back.config.model_type == "qwen2_moe"
    assert max_diff(load(tmp_path / "m.tinygpt"), back, tokens()) <= 1e-4


# ------------------------------------------------------------------------------------- layouts, tokenizers, scratch
@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_stacked_expert_layout_imports_too(tmp_path, name):
    """transformers 5's in-memory names (mlp.experts.gate_up_proj [N, 2F, d], mlp.gate) saved as is."""
    from safetensors.torch import save_file

    hf = make_hf(name)
    d = save(hf, tmp_path / "hf")
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in sd
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    assert max_diff(import_hf(d), hf, tokens()) <= 1e-4


def test_checkpoint_saved_without_the_base_model_prefix(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = make_hf("llama")
    d = save(hf, tmp_path / "hf")
    sd = {k.removeprefix("model."): v for k, v in load_file(d / "model.safetensors").items()}
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    assert max_diff(import_hf(d), hf, tokens()) <= 1e-4


def test_the_directory_bpe_tokenizer_is_attached(tmp_path):
    from tinygpt import train_bpe
    from tinygpt.tokenizer import BPETokenizer

    bpe = train_bpe(["the quick brown fox jumps over the lazy dog " * 30], 300, progress=False)
    hf = make_hf("qwen2", vocab_size=bpe.vocab_size)
    hf.save_pretrained(tmp_path / "hf")
    hf_tokenizer(bpe).save_pretrained(tmp_path / "hf")
    ours = import_hf(tmp_path / "hf")
    assert isinstance(ours.tokenizer, BPETokenizer) and ours.tokenizer.fingerprint == bpe.fingerprint
    text = "the lazy fox"
    with torch.no_grad():
        want = hf(input_ids=torch.tensor([bpe.encode(text)])).logits
        assert (ours(text) - want).abs().max() <= 1e-4  # text goes through the attached tokenizer


def _scratch(**kw):
    from tinygpt import GPT, GPTConfig

    base = dict(n_layers=2, d_model=32, n_heads=4, d_mlp=48, n_ctx=CTX, positional_embedding_type="rotary")
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**base, **kw}), tokenizer=ByteTokenizer())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.15)
    return model.eval()


@pytest.mark.parametrize(
    "kw,arch",
    [
        (dict(normalization_type="RMS", gated_mlp=True, act_fn="silu", bias=False, n_key_value_heads=2), "llama"),
        (dict(normalization_type="RMS", gated_mlp=True, act_fn="silu", bias=False, qkv_bias=True), "qwen2"),
        (dict(parallel_attn_mlp=True, rotary_dim=4, act_fn="gelu"), "gpt_neox"),
        (dict(normalization_type="RMS", gated_mlp=True, act_fn="silu", bias=False, moe_experts=4, moe_style="mixtral"),
         "mixtral"),
    ],
)  # fmt: skip
def test_a_model_trained_here_exports_to_the_architecture_its_knobs_describe(tmp_path, kw, arch):
    from tinygpt.interop.hf import infer_architecture

    ours = _scratch(**kw)
    assert infer_architecture(ours.cfg) == arch
    export_hf(ours, tmp_path / "out")
    back = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert back.config.model_type == arch
    assert max_diff(ours, back, tokens()) <= 1e-4
    again = import_hf(tmp_path / "out")
    assert again.cfg == ours.cfg.replace(moe_z_coef=0.0 if ours.cfg.moe_experts else ours.cfg.moe_z_coef)
    # the config survives the round trip (but for tinygpt's router z-loss, which HF does not have)


def test_export_refuses_what_the_architecture_lacks(tmp_path):
    llama = dict(normalization_type="RMS", gated_mlp=True, act_fn="silu", bias=False)
    with pytest.raises(InteropError, match="rotary_adjacent_pairs"):
        export_hf(_scratch(**llama, rotary_adjacent_pairs=True), tmp_path / "a")
    with pytest.raises(InteropError, match="qwen2 has bias=False, qkv_bias=True"):
        export_hf(_scratch(**llama), tmp_path / "b", architecture="qwen2")
    with pytest.raises(InteropError, match="GPTNeoXForCausalLM cannot express moe_experts=4"):
        export_hf(_scratch(moe_experts=4), tmp_path / "c")  # tinygpt's own (ungated) experts
    with pytest.raises(InteropError, match="normalization_type='LN'"):
        export_hf(_scratch(gated_mlp=True, act_fn="silu", bias=False), tmp_path / "d", architecture="llama")
    assert not any(tmp_path.iterdir())  # nothing written


_PEAK = r"""
import resource, sys, torch
from tinygpt.interop.hf import import_hf
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model = import_hf(sys.argv[1])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
size = sum(p.numel() * p.element_size() for p in model.parameters())
print((after - before) * 1024 / size)
"""


@pytest.mark.slow  # ~25 s: a 34M-parameter checkpoint and a fresh interpreter
def test_a_big_import_does_not_hold_two_copies(tmp_path):
    """Peak memory of an import (in a fresh process) is the model plus about one tensor, not model + checkpoint."""
    import subprocess
    import sys

    config = T.LlamaConfig(
        vocab_size=8000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
        max_position_embeddings=64,
    )  # fmt: skip
    save(T.LlamaForCausalLM(config), tmp_path / "hf")  # ~34M parameters, 136 MB in fp32
    out = subprocess.run([sys.executable, "-c", _PEAK, str(tmp_path / "hf")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    ratio = float(out.stdout.strip().splitlines()[-1])
    assert ratio < 1.4, ratio  # measured 0.95; two copies (HF model + tinygpt model) would be >= 2


def test_transformer_bridge_over_a_llama_export_matches_run_with_cache(tmp_path):
    """Every hook both share holds the same activation (the bridge's hook_normalized is before the RMSNorm weight,
    and it masks scores with the dtype's minimum instead of -inf: both checked in their own terms)."""
    from tinygpt.interop.hf import transformer_bridge

    ours = import_hf(save(make_hf("llama"), tmp_path / "hf"))
    bridge = transformer_bridge(ours, tmp_path / "bridge")
    x = tokens()
    with torch.no_grad():
        b_logits, b_cache = bridge.run_with_cache(x)
        o_logits, o_cache = ours.run_with_cache(x)
    assert (b_logits - o_logits).abs().max() <= 1e-4
    shared = sorted(set(b_cache.keys()) & set(o_cache.keys()))
    assert {
        "blocks.1.attn.hook_q",
        "blocks.1.attn.hook_k",
        "blocks.1.mlp.hook_post",
        "blocks.1.hook_resid_post",
    } <= set(shared)
    causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
    for name in shared:
        b, o = b_cache[name], o_cache[name]
        if name.endswith("hook_normalized"):
            b = b * ours.get_submodule(name.rsplit(".", 1)[0]).weight
        if name.endswith("hook_attn_scores"):
            b, o = b[..., causal], o[..., causal]
        assert b.shape == o.shape and torch.allclose(b, o, atol=1e-4), name


def test_float16_checkpoints_are_upcast_to_float32(tmp_path):
    hf = make_hf("qwen2").half()
    save(hf, tmp_path / "hf")
    ours = import_hf(tmp_path / "hf")
    assert ours.cfg.dtype == "float32"
    assert torch.equal(ours.embed.weight, hf.model.embed_tokens.weight.float())  # lossless


def test_cli_refusal_is_one_line_naming_the_field_and_the_fix(tmp_path, capsys):
    from tinygpt.cli import main

    save(make_hf("mistral", sliding_window=8), tmp_path / "hf")
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "m.tinygpt")]) == 2
    err = capsys.readouterr().err
    assert "sliding_window=8" in err and "--n-ctx 8" in err and "Traceback" not in err
    assert not (tmp_path / "m.tinygpt").exists()
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "m.tinygpt"), "--n-ctx", "8"]) == 0


def test_openai_style_gpt2_checkpoint_without_prefix_and_with_mask_buffers(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=V, n_positions=CTX, n_embd=32, n_layer=2, n_head=4)).eval()
    d = save(hf, tmp_path / "hf")
    sd = {k.removeprefix("transformer."): v for k, v in load_file(d / "model.safetensors").items()}
    sd["h.0.attn.bias"] = torch.ones(1, 1, CTX, CTX).tril()  # what old transformers saved
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    assert max_diff(import_hf(d), hf, tokens()) <= 1e-4


def test_an_imported_mixtral_teaches_a_tinygpt_moe_student(tmp_path):
    """The reference run's gap: distillation from an HF MoE teacher. The imported teacher (.tinygpt) and the HF
    directory itself (run by transformers) give the student the same KL, i.e. the same teacher logits."""
    from tinygpt import GPT, GPTConfig
    from tinygpt import save as save_tinygpt
    from tinygpt.training.distill import distill

    d = save(make_hf("mixtral"), tmp_path / "hf")
    save_tinygpt(import_hf(d), tmp_path / "teacher.tinygpt")
    (tmp_path / "c.txt").write_text("ROMEO: But soft, what light through yonder window breaks? " * 100)
    kls = []
    for teacher in (tmp_path / "teacher.tinygpt", d):
        torch.manual_seed(0)
        student = GPT(GPTConfig.preset("nano", moe_experts=4, moe_topk=2, n_ctx=32), tokenizer=ByteTokenizer())
        res = distill(
            student, teacher, tmp_path / "c.txt", steps=2, batch_size=2, ctx=32, device="cpu", progress=False,
            val_every=0, warmup=1,
        )  # fmt: skip
        kls.append([h["kl"] for h in res.history])
        assert res.model.cfg.moe_experts == 4 and kls[-1][0] > 0
    assert kls[0] == pytest.approx(kls[1], rel=1e-4)


def test_export_keeps_the_source_tokenizer_config(tmp_path):
    import json

    hf = make_hf("qwen2")
    save(hf, tmp_path / "hf")
    cfg_file = tmp_path / "hf" / "tokenizer_config.json"
    tc = json.loads(cfg_file.read_text())
    tc["chat_template"] = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    cfg_file.write_text(json.dumps(tc))
    ours = import_hf(tmp_path / "hf")
    export_hf(ours, tmp_path / "out")
    back = T.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert back.chat_template == tc["chat_template"]
    assert back("hi there", add_special_tokens=False).input_ids == ours.tokenizer.encode("hi there")
    export_hf(ours, tmp_path / "other", tokenizer=ByteTokenizer(["<|x|>"]))  # another tokenizer: written anew
    assert T.AutoTokenizer.from_pretrained(tmp_path / "other").chat_template is None
