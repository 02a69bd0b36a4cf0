"""The issue-16 knobs wired into the model: rotary, RMSNorm, gated MLPs, grouped-query attention, no-bias / qkv_bias,
the parallel residual. Each knob against a reference (Hugging Face's Llama / Qwen2 for the combination, the
equations for the parallel block), with its hooks, KV cache, fast/eager paths, run_from, weights views, save/load
and the hook switches; and a Llama-style model that trains and decodes incrementally like its full forward."""

from __future__ import annotations

import pytest
import torch
from _model_helpers import randomize, single_thread

from tinygpt import GPT, GPTConfig, KVCache
from tinygpt.arch.gated_mlp import GatedMLP
from tinygpt.arch.norms import RMSNorm
from tinygpt.arch.parallel import ParallelBlock
from tinygpt.config import ConfigError
from tinygpt.model import ModelError
from tinygpt.model.heads import SWITCHES, SwitchError

B, T, D, H, KV, DH, D_MLP = 2, 9, 48, 4, 2, 12, 40
BASE = dict(n_layers=2, d_model=D, n_heads=H, d_mlp=D_MLP, n_ctx=32)
LLAMA = dict(
    positional_embedding_type="rotary",
    normalization_type="RMS",
    gated_mlp=True,
    act_fn="silu",
    n_key_value_heads=KV,
    bias=False,
    layer_norm_eps=1e-6,
    rotary_base=500.0,
)
KNOBS = {
    "rotary": dict(positional_embedding_type="rotary"),
    "partial_rotary": dict(positional_embedding_type="rotary", rotary_dim=4, rotary_base=100.0),
    "llama3_scaling": dict(
        positional_embedding_type="rotary",
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "gptj_pairs": dict(positional_embedding_type="rotary", rotary_adjacent_pairs=True, rotary_dim=8),
    "rms": dict(normalization_type="RMS"),
    "swiglu": dict(gated_mlp=True, act_fn="silu"),
    "geglu": dict(gated_mlp=True, act_fn="gelu"),
    "gqa": dict(n_key_value_heads=KV),
    "mqa": dict(n_key_value_heads=1),
    "no_bias": dict(bias=False),
    "qkv_bias": dict(bias=False, qkv_bias=True),
    "parallel": dict(parallel_attn_mlp=True),
    "llama": LLAMA,
    "neox": dict(positional_embedding_type="rotary", rotary_dim=6, parallel_attn_mlp=True),
    "llama+mixtral": {**LLAMA, "moe_experts": 3, "moe_style": "mixtral"},
    "gqa+mod": dict(n_key_value_heads=KV, mod=True, mod_capacity=0.5),
    "llama+parallel": {**LLAMA, "parallel_attn_mlp": True},
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    yield from single_thread()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(1))


def build(knob: str, seed: int = 0, **extra) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**BASE, **KNOBS[knob], **extra))
    randomize(model, seed, scale=0.2)
    return model.eval()


def close(a, b, atol=2e-5):
    torch.testing.assert_close(a, b, rtol=0, atol=atol)


# ------------------------------------------------------------------------------------------ against references
def llama_reference(model: GPT, qkv_bias: bool = False):
    """A Hugging Face Llama (or Qwen2, with q/k/v biases) holding `model`'s weights."""
    import transformers

    cfg = model.cfg
    common = dict(
        vocab_size=cfg.d_vocab, hidden_size=cfg.d_model, intermediate_size=cfg.d_mlp,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.d_head, max_position_embeddings=cfg.n_ctx, rms_norm_eps=cfg.layer_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rotary_base}, hidden_act=cfg.act_fn,
        tie_word_embeddings=False, attn_implementation="eager",
    )  # fmt: skip
    if qkv_bias:
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    else:
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, attention_bias=False, mlp_bias=False))
    sd = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.ln_final.weight,
          "lm_head.weight": model.unembed.weight}  # fmt: skip
    for i, blk in enumerate(model.blocks):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = blk.ln1.weight
        sd[p + "post_attention_layernorm.weight"] = blk.ln2.weight
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            for kind in ("weight", "bias"):
                t = getattr(getattr(blk.attn, n), kind)
                if t is not None:
                    sd[p + f"self_attn.{n}.{kind}"] = t
        for n in ("gate_proj", "up_proj", "down_proj"):
            sd[p + f"mlp.{n}.weight"] = getattr(blk.mlp, n).weight
    missing, unexpected = hf.load_state_dict({k: v.detach() for k, v in sd.items()}, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return hf.eval()


@pytest.mark.parametrize("qkv_bias", [False, True], ids=["llama", "qwen2"])
def test_llama_style_model_equals_hugging_face(tokens, qkv_bias):
    model = build("llama", qkv_bias=True) if qkv_bias else build("llama")
    hf = llama_reference(model, qkv_bias)
    with torch.no_grad():
        want = hf(tokens).logits
        close(model(tokens), want, atol=1e-4)
        model.cfg.attn_impl = "eager"
        close(model(tokens), want, atol=1e-4)
        model.cfg.attn_impl = "auto"
        out = hf(tokens[:, :5], use_cache=True)  # HF's own incremental decoding, against ours
        step = hf(tokens[:, 5:6], past_key_values=out.past_key_values).logits
        cache = model.make_cache(B)
        model(tokens[:, :5], past_kv_cache=cache)
        close(model(tokens[:, 5:6], past_kv_cache=cache), step, atol=1e-4)


def test_parallel_block_follows_its_equation(tokens):
    model = build("neox")
    blk = model.blocks[1]
    assert isinstance(blk, ParallelBlock) and "blocks.1.hook_resid_mid" not in model.hook_dict
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
        x = cache["blocks.1.hook_resid_pre"]
        attn = blk.attn(blk.ln1(x))
        mlp = blk.mlp(blk.ln2(x))
    close(cache["blocks.1.hook_attn_out"], attn)
    close(cache["blocks.1.hook_mlp_out"], mlp)
    attn_out, mlp_out = cache["blocks.1.hook_attn_out"], cache["blocks.1.hook_mlp_out"]
    assert torch.equal(cache["blocks.1.hook_resid_post"], x + attn_out + mlp_out)
    with pytest.raises(ModelError, match="parallel.*resid_pre"):
        model.run_from(1, x, start_at="resid_mid")
    with torch.no_grad():  # what patching attn_out uses: resid_post from resid_pre and an attention output
        close(blk.finish_from(x, attn_out), cache["blocks.1.hook_resid_post"])
        plain = build("rotary").blocks[1]
        y = torch.randn(B, T, D)
        close(plain.finish_from(y, attn), plain.finish(y + attn))


# ------------------------------------------------------------------------------------------ every knob
@pytest.mark.parametrize("knob", list(KNOBS))
def test_each_knob_fast_eager_cached_and_run_from_agree(knob, tokens):
    model = build(knob)
    with torch.no_grad():
        want = model(tokens)
        model.cfg.attn_impl = "eager"
        close(model(tokens), want)
        model.cfg.attn_impl = "auto"
        cache = model.make_cache(B)
        pieces = [model(tokens[:, a:b], past_kv_cache=cache) for a, b in ((0, 4), (4, 5), (5, 6), (6, T))]
        close(torch.cat(pieces, 1), want)
        logits, acts = model.run_with_cache(tokens)
        close(logits, want)
        for layer in range(2):
            close(model.run_from(layer, acts[f"blocks.{layer}.hook_resid_pre"], last_only=True), want[:, -1:])
    # residual stream additive and exact, every block
    for i, blk in enumerate(model.blocks):
        pre, post = acts[f"blocks.{i}.hook_resid_pre"], acts[f"blocks.{i}.hook_resid_post"]
        attn, mlp = acts[f"blocks.{i}.hook_attn_out"], acts[f"blocks.{i}.hook_mlp_out"]
        if isinstance(blk, ParallelBlock):
            assert torch.equal(post, pre + attn + mlp)
        else:
            mid = acts[f"blocks.{i}.hook_resid_mid"]
            assert torch.equal(mid, pre + attn) and torch.equal(post, mid + mlp)


@pytest.mark.parametrize("knob", list(KNOBS))
def test_each_knob_with_every_hook_switch(knob, tokens):
    model = build(knob)
    with torch.no_grad():
        want = model(tokens)
    refused = {"use_attn_in"} if model.cfg.n_kv_heads < H else set()
    for name in SWITCHES:
        if name in refused:
            with pytest.raises(SwitchError, match="grouped-query attention.*set_use_split_qkv_input"):
                getattr(model, f"set_{name}")(True)
        else:
            getattr(model, f"set_{name}")(True)
    with torch.no_grad():
        close(model(tokens), want)
        cache = model.make_cache(B)
        pieces = [model(tokens[:, :5], past_kv_cache=cache), model(tokens[:, 5:], past_kv_cache=cache)]
        close(torch.cat(pieces, 1), want)
        _, acts = model.run_with_cache(tokens)
    kv = model.cfg.n_kv_heads
    assert acts["blocks.0.hook_q_input"].shape == (B, T, H, D)
    assert acts["blocks.0.hook_k_input"].shape == acts["blocks.0.hook_v_input"].shape == (B, T, kv, D)
    if "mod" not in knob:
        assert acts["blocks.1.attn.hook_result"].shape == (B, T, H, D)


@pytest.mark.parametrize("knob", ["gqa", "mqa", "llama"])
def test_grouped_query_attention_shapes_views_and_cache(knob, tokens):
    model = build(knob)
    kv = model.cfg.n_kv_heads
    attn = model.blocks[0].attn
    assert attn.k_proj.weight.shape == (kv * DH, D) and attn.q_proj.weight.shape == (H * DH, D)
    assert attn.W_K.shape == attn.W_V.shape == (H, D, DH) and attn._W_K.shape == (kv, D, DH)  # TransformerLens'
    g = H // kv
    assert torch.equal(attn.W_K[g - 1], attn._W_K[0]) and torch.equal(attn.W_K[-1], attn._W_K[-1])
    assert kv == 1 or not torch.equal(attn.W_K[g], attn._W_K[0])
    assert attn.b_K.shape == (H, DH)
    with torch.no_grad():
        _, acts = model.run_with_cache(tokens)
    assert acts["blocks.0.attn.hook_k"].shape == acts["blocks.0.attn.hook_v"].shape == (B, T, kv, DH)
    assert acts["blocks.0.attn.hook_q"].shape == acts["blocks.0.attn.hook_z"].shape == (B, T, H, DH)
    assert acts["blocks.0.attn.hook_pattern"].shape == (B, H, T, T)
    cache = model.make_cache(B, 16)
    assert isinstance(cache, KVCache) and cache.k.shape == (2, B, kv, 16, DH)  # only the key/value heads
    # query head h reads key/value head h // g: recompute head H-1's pattern from the cached keys
    q = acts["blocks.0.attn.hook_rot_q" if "llama" in knob else "blocks.0.attn.hook_q"][:, :, -1]
    k = acts["blocks.0.attn.hook_rot_k" if "llama" in knob else "blocks.0.attn.hook_k"][:, :, (H - 1) // g]
    scores = (q @ k.transpose(1, 2)) / DH**0.5 + torch.full((T, T), float("-inf")).triu(1)
    close(scores.softmax(-1), acts["blocks.0.attn.hook_pattern"][:, -1])


def test_rotary_hooks_and_no_positional_embedding(tokens):
    model = build("rotary")
    assert model.pos_embed is None and "hook_pos_embed" not in model.hook_dict
    assert not any("pos_embed" in n for n, _ in model.named_parameters())
    with pytest.raises(ModelError, match="rotary"):
        _ = model.W_pos
    with torch.no_grad():
        _, acts = model.run_with_cache(tokens)
        kv = model.make_cache(B)
        model(tokens[:, :6], past_kv_cache=kv)
        _, step = model.run_with_cache(tokens[:, 6:], past_kv_cache=kv)
    q, rot_q = acts["blocks.0.attn.hook_q"], acts["blocks.0.attn.hook_rot_q"]
    assert rot_q.shape == q.shape == (B, T, H, DH)
    close(rot_q[:, 0], q[:, 0])  # position 0 is not rotated
    assert not torch.allclose(rot_q[:, 3], q[:, 3])
    close(rot_q.norm(dim=-1), q.norm(dim=-1))  # a rotation
    # with a cache: rot_q at the new positions only, rot_k over every key so far (the cache holds them unrotated)
    assert step["blocks.0.attn.hook_rot_q"].shape == (B, 3, H, DH)
    assert step["blocks.0.attn.hook_rot_k"].shape == (B, T, H, DH)
    close(step["blocks.0.attn.hook_rot_q"], rot_q[:, 6:])
    close(step["blocks.0.attn.hook_rot_k"], acts["blocks.0.attn.hook_rot_k"])
    # the same tokens shifted: same relative positions inside, other absolute positions -> other logits than learned
    # positions would give, but scores depend on relative positions only
    scores = acts["blocks.0.attn.hook_attn_scores"]
    assert scores.shape == (B, H, T, T)


def test_pieces_and_parameter_names():
    model = build("llama")
    blk = model.blocks[0]
    assert isinstance(blk.ln1, RMSNorm) and isinstance(model.ln_final, RMSNorm) and isinstance(blk.mlp, GatedMLP)
    names = {n for n, _ in model.named_parameters()}
    assert not any(n.endswith("bias") for n in names)
    assert "blocks.0.mlp.gate_proj.weight" in names and "blocks.0.attn.k_proj.weight" in names
    assert model.n_params() == sum(p.numel() for p in model.parameters()) == GPTConfig(**BASE, **LLAMA).n_params()
    qwen = build("qkv_bias")
    biases = {n for n, _ in qwen.named_parameters() if n.endswith("bias")}
    assert biases == {f"blocks.{i}.attn.{p}_proj.bias" for i in range(2) for p in "qkv"} | {
        f"blocks.{i}.ln{j}.bias" for i in range(2) for j in (1, 2)
    } | {"ln_final.bias"}
    assert torch.equal(qwen.blocks[0].attn.b_O, torch.zeros(D))
    assert torch.equal(qwen.blocks[0].mlp.b_in, torch.zeros(D_MLP))


def test_reset_parameters_initialises_the_new_pieces():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**BASE, **LLAMA, "n_layers": 4}))
    std = model.cfg.init_std
    assert torch.equal(model.blocks[0].ln1.weight, torch.ones(D)) and torch.equal(model.ln_final.weight, torch.ones(D))
    for name in ("gate_proj", "up_proj"):
        assert abs(getattr(model.blocks[0].mlp, name).weight.std().item() - std) < 0.003
    down = model.blocks[0].mlp.down_proj.weight.std().item()
    assert abs(down - std / (2 * 4) ** 0.5) < 0.002  # residual projection scaled like fc_out / o_proj


def test_save_and_load_round_trip(tmp_path, tokens):
    import tinygpt

    model = build("llama+parallel", rope_scaling=KNOBS["llama3_scaling"]["rope_scaling"])
    path = tmp_path / "llama.tinygpt"
    model.save(path)
    again = tinygpt.load(path)
    assert again.cfg == model.cfg
    with torch.no_grad():
        assert torch.equal(again(tokens), model(tokens))
    saved = tinygpt.read_checkpoint(path).manifest["config"] if hasattr(tinygpt, "read_checkpoint") else None
    if saved is not None:
        assert saved["n_key_value_heads"] == KV and saved["normalization_type"] == "RMS"


def test_config_fields_of_older_models_are_unchanged():
    cfg = GPTConfig(**BASE)
    d = cfg.to_dict()
    for name in ("n_key_value_heads", "positional_embedding_type", "rotary_base", "normalization_type", "bias",
                 "qkv_bias", "gated_mlp", "parallel_attn_mlp", "rope_scaling", "moe_style"):  # fmt: skip
        assert name not in d  # defaults are not saved: older models' configs, pins and fingerprints stay the same
    assert GPTConfig.from_dict(d) == cfg
    llama = GPTConfig(**BASE, **LLAMA).to_dict()
    assert llama["positional_embedding_type"] == "rotary" and llama["n_key_value_heads"] == KV
    assert "rotary_dim" not in llama  # still its default (None = d_head)


@pytest.mark.parametrize(
    "bad, fragment",
    [
        (dict(n_key_value_heads=3), "n_key_value_heads"),
        (dict(n_key_value_heads=0), "n_key_value_heads"),
        (dict(positional_embedding_type="alibi"), "positional_embedding_type"),
        (dict(normalization_type="LNPre"), "normalization_type"),
        (dict(positional_embedding_type="rotary", rotary_dim=5), "rotary_dim"),
        (dict(positional_embedding_type="rotary", rotary_dim=64), "rotary_dim"),
        (dict(rotary_dim=4), "positional_embedding_type='rotary'"),
        (dict(positional_embedding_type="rotary", rope_scaling={"rope_type": "yarn", "factor": 2.0}), "rope_scaling"),
        (dict(positional_embedding_type="rotary", rotary_base=0), "rotary_base"),
        (dict(bias="no"), "bias"),
        (dict(qkv_bias=1), "qkv_bias"),
        (dict(n_key_value_heads=2, diff_attn=True), "diff_attn"),
        (dict(positional_embedding_type="rotary", yoco=True), "yoco"),
        (dict(positional_embedding_type="rotary", mod=True), "mod"),
        (dict(parallel_attn_mlp=True, mod=True), "mod"),
        (dict(gated_mlp=True, moe_experts=2), "mixtral"),
    ],
)
def test_bad_knobs_are_clear_config_errors(bad, fragment):
    with pytest.raises(ConfigError, match=fragment):
        GPTConfig(**BASE, **bad)


def test_llama_style_model_trains_and_decodes_incrementally(tokens):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**BASE, **LLAMA))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(2))
    model.train()
    losses = []
    for _ in range(12):
        loss = model(data, return_type="loss")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5  # it learns (memorises the batch)
    model.eval()
    with torch.no_grad():
        full = model(data)
        cache = model.make_cache(4)
        steps = [model(data[:, :8], past_kv_cache=cache)] + [
            model(data[:, i : i + 1], past_kv_cache=cache) for i in range(8, 24)
        ]
    close(torch.cat(steps, 1), full, atol=5e-5)
