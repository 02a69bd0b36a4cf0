"""YOCO (You Only Cache Once): self-decoder with sliding-window attention, one shared K/V, cross-decoder;
window + global cache decoding equal to the full forward; save/load, describe, CLI, generation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import tinygpt
from tinygpt import GPT, GPTConfig, KVCache
from tinygpt.arch.yoco import CrossAttention, SlidingWindowAttention, YocoCache, YocoGPT
from tinygpt.config import ConfigError

W = 6  # the window; sequences below are several windows long
CFG = GPTConfig(n_layers=4, d_model=24, n_heads=3, d_mlp=40, n_ctx=48, yoco=True, yoco_window=W)


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.3) -> None:
    """Perturb every parameter (LN gains and biases too) so no check passes thanks to a trivial init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale)


def make_model(cfg: GPTConfig = CFG, seed: int = 0, **changes) -> YocoGPT:
    torch.manual_seed(seed)
    model = GPT(cfg.replace(**changes) if changes else cfg)
    randomize(model, seed)
    return model.eval()


def tokens(batch: int = 2, pos: int = 30, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (batch, pos), generator=torch.Generator().manual_seed(seed))


def reference_logits(model: YocoGPT, toks: torch.Tensor) -> torch.Tensor:
    """YOCO written out position by position from the paper's equations, with the model's weights."""
    cfg = model.cfg
    b, t = toks.shape
    H, dh, w, n_self = cfg.n_heads, cfg.d_head, cfg.yoco_window, cfg.n_layers // 2

    def ln(mod, x):
        x = x - x.mean(-1, keepdim=True)
        return x / (x.pow(2).mean(-1, keepdim=True) + cfg.layer_norm_eps).sqrt() * mod.weight + mod.bias

    def heads(lin, h):
        return lin(h).view(b, t, H, dh)

    def attend(q, k, v, visible):
        out = torch.zeros_like(q)
        for i in range(t):
            js = [j for j in range(t) if visible(i, j)]
            scores = torch.einsum("bhd,bjhd->bhj", q[:, i], k[:, js]) / math.sqrt(dh)
            out[:, i] = torch.einsum("bhj,bjhd->bhd", scores.softmax(-1), v[:, js])
        return out

    x = model.W_E[toks] + model.W_pos[:t]
    for i, blk in enumerate(model.blocks):
        h = ln(blk.ln1, x)
        if i < n_self:
            a = blk.attn
            z = attend(heads(a.q_proj, h), heads(a.k_proj, h), heads(a.v_proj, h), lambda d, s: d - w < s <= d)
        else:
            if i == n_self:  # the shared K/V, once, from the self-decoder's output
                kv_in = ln(model.yoco_kv.ln, x)
                K, V = heads(model.yoco_kv.k_proj, kv_in), heads(model.yoco_kv.v_proj, kv_in)
            z = attend(heads(blk.attn.q_proj, h), K, V, lambda d, s: s <= d)
        x = x + blk.attn.o_proj(z.reshape(b, t, H * dh))
        x = x + blk.mlp.fc_out(F.gelu(blk.mlp.fc_in(ln(blk.ln2, x)), approximate="tanh"))
    return model.unembed(ln(model.ln_final, x))


# ------------------------------------------------------------------------------------------------ structure
def test_gpt_builds_yoco_with_self_and_cross_decoder():
    model = make_model()
    assert type(model) is YocoGPT and isinstance(model, GPT) and model.n_self == 2
    assert type(GPT(CFG.replace(yoco=False))) is GPT
    for i, blk in enumerate(model.blocks):
        assert {"ln1", "attn", "ln2", "mlp"} <= set(dict(blk.named_children()))
        if i < model.n_self:
            assert type(blk.attn) is SlidingWindowAttention and blk.attn.window == W
        else:
            assert type(blk.attn) is CrossAttention
            assert set(dict(blk.attn.named_children())) == {"q_proj", "o_proj", "hook_q", "hook_z",
                                                             "hook_attn_scores", "hook_pattern"}  # fmt: skip
    names = {n for n, _ in model.named_parameters()}
    cross_kv = [n for n in names if n.startswith(("blocks.2.", "blocks.3.")) and ("k_proj" in n or "v_proj" in n)]
    assert cross_kv == []
    assert {"yoco_kv.ln.weight", "yoco_kv.ln.bias", "yoco_kv.k_proj.weight", "yoco_kv.v_proj.bias"} <= names
    # Cross-decoder W_K/W_V are views of the one shared projection, so model.W_K stacks for every layer.
    assert model.blocks[3].attn.W_K.data_ptr() == model.yoco_kv.k_proj.weight.data_ptr()
    assert model.W_K.shape == (4, 3, 24, 8) and torch.equal(model.W_K[2], model.W_K[3])


def test_parameter_count_formula():
    d, L, hd = CFG.d_model, CFG.n_layers, CFG.n_heads * CFG.d_head
    vanilla = GPT(CFG.replace(yoco=False)).n_params()
    proj = d * hd + hd  # one k or v projection with bias
    expected = vanilla - (L - L // 2) * 2 * proj + 2 * proj + 2 * d  # cross layers lose k/v; shared k/v + LN
    assert make_model().n_params() == CFG.n_params() == expected


def test_unsupported_combinations_and_wrong_cache_are_clear_errors():
    with pytest.raises(ConfigError, match="yoco cannot be combined with diff_attn"):
        GPT(CFG.replace(diff_attn=True))
    with pytest.raises(ConfigError, match="mod"):
        GPT(CFG.replace(mod=True))
    with pytest.raises(ConfigError, match="yoco=True"):
        YocoGPT(CFG.replace(yoco=False))
    with pytest.raises(ConfigError, match="attn_impl='triton' is not available with yoco"):
        GPT(CFG.replace(attn_impl="triton"))
    model = make_model()
    model.cfg.attn_impl = "triton"  # a runtime switch is refused too, never silently ignored
    with pytest.raises(RuntimeError, match="attn_impl='triton' is not available with yoco"):
        model(tokens(1, 3))
    model.cfg.attn_impl = "auto"
    with pytest.raises(TypeError, match="YocoCache"):
        model(tokens(1, 3), past_kv_cache=KVCache(model.cfg, 1, 48, "cpu", torch.float32))


# ------------------------------------------------------------------------------------------------ forward
@pytest.mark.parametrize("impl", ["auto", "eager"])
def test_forward_matches_the_reference(impl):
    model = make_model(attn_impl=impl)
    toks = tokens(2, 20)  # > 3 windows
    with torch.no_grad():
        torch.testing.assert_close(model(toks), reference_logits(model, toks), atol=1e-5, rtol=1e-5)


def test_a_query_cannot_see_keys_older_than_the_window():
    model = make_model()
    blk = model.blocks[0]
    x = torch.randn(1, 20, 24, generator=torch.Generator().manual_seed(0))
    j = 4
    x2 = x.clone()
    x2[:, j] += torch.randn(24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, out2 = blk.attn(blk.ln1(x)), blk.attn(blk.ln1(x2))
    changed = (out - out2).abs().amax(-1)[0] > 1e-6  # [pos]
    # position i sees j iff i - W < j <= i
    assert changed.tolist() == [j <= i < j + W for i in range(20)]
    # Through the whole self-decoder the receptive field is n_self * (W - 1) + 1 positions.
    reach = model.n_self * (W - 1)

    def bump(resid, hook):
        resid[:, j] += torch.randn(24, generator=torch.Generator().manual_seed(1))
        return resid

    name = f"blocks.{model.n_self - 1}.hook_resid_post"
    toks = tokens(1, 20)
    with torch.no_grad():
        _, clean = model.run_with_cache(toks, names_filter=name)
        with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", bump)]):
            _, bumped = model.run_with_cache(toks, names_filter=name)
    diff = (clean[name] - bumped[name]).abs().amax(-1)[0] > 1e-6
    assert diff.tolist() == [j <= i <= j + reach for i in range(20)]


def test_self_decoder_pattern_is_zero_outside_the_window_and_cross_pattern_is_causal():
    model = make_model()
    toks = tokens(2, 15)
    with torch.no_grad():
        logits, cache = model.run_with_cache(toks)
        torch.testing.assert_close(logits, model(toks), atol=1e-5, rtol=1e-5)  # eager == fast
    dest, src = torch.arange(15)[:, None], torch.arange(15)[None, :]
    in_window = (src <= dest) & (src > dest - W)
    for i in range(4):
        pattern = cache[f"blocks.{i}.attn.hook_pattern"]
        assert pattern.shape == (2, 3, 15, 15)
        torch.testing.assert_close(pattern.sum(-1), torch.ones(2, 3, 15))
        visible = in_window if i < model.n_self else src <= dest
        assert (pattern[..., ~visible] == 0).all() and (pattern[..., visible] > 0).all()
        assert torch.isinf(cache[f"blocks.{i}.attn.hook_attn_scores"][..., ~visible]).all()


def test_cross_decoder_attends_to_the_shared_kv():
    model = make_model()
    toks = tokens(2, 12)
    with torch.no_grad():
        _, cache = model.run_with_cache(toks)
    k, v = cache["yoco_kv.hook_k"], cache["yoco_kv.hook_v"]
    assert k.shape == v.shape == (2, 12, 3, 8)
    # K/V come from yoco_kv.ln of the self-decoder output.
    h = cache["yoco_kv.ln.hook_normalized"]
    torch.testing.assert_close(h, F.layer_norm(cache["blocks.1.hook_resid_post"], (24,),
                                               model.yoco_kv.ln.weight, model.yoco_kv.ln.bias))  # fmt: skip
    torch.testing.assert_close(k, model.yoco_kv.k_proj(h).view(2, 12, 3, 8))
    for i in (2, 3):
        q = cache[f"blocks.{i}.attn.hook_q"]
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(8)
        scores = scores.masked_fill(torch.ones(12, 12, dtype=torch.bool).triu(1), float("-inf"))
        torch.testing.assert_close(cache[f"blocks.{i}.attn.hook_pattern"], scores.softmax(-1), atol=1e-6, rtol=1e-5)
        z = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)
        torch.testing.assert_close(cache[f"blocks.{i}.attn.hook_z"], z, atol=1e-6, rtol=1e-5)

    # Patching the shared V changes every cross-decoder layer and nothing in the self-decoder.
    def zero(t, hook):
        return torch.zeros_like(t)

    names = [f"blocks.{i}.hook_attn_out" for i in range(4)]
    with torch.no_grad():
        _, clean = model.run_with_cache(toks, names_filter=names)
        with model.hooks(fwd_hooks=[("yoco_kv.hook_v", zero)]):
            _, patched = model.run_with_cache(toks, names_filter=names)
    same = [torch.equal(clean[n], patched[n]) for n in names]
    assert same == [True, True, False, False]


def test_sdpa_impl_refuses_pattern_hooks():
    model = make_model(attn_impl="sdpa")
    for name in ("blocks.0.attn.hook_pattern", "blocks.3.attn.hook_attn_scores"):
        with pytest.raises(RuntimeError, match="attn_impl='sdpa'"):
            model.run_with_cache(tokens(1, 5), names_filter=name)


def test_training_reaches_every_parameter():
    model = make_model().train()
    loss = model(tokens(2, 16), return_type="loss")
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


# ------------------------------------------------------------------------------------------------ cache
@pytest.mark.parametrize("impl", ["auto", "eager"])
def test_incremental_decoding_equals_the_full_forward(impl):
    model = make_model(attn_impl=impl)
    toks = tokens(2, 40)  # more than six windows
    with torch.no_grad():
        full = model(toks)
        cache = model.make_cache(2)
        steps = torch.cat([model(toks[:, i : i + 1], past_kv_cache=cache) for i in range(40)], dim=1)
        torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)
        assert cache.length == 40
        # chunked prefill: chunks shorter and longer than the window, then single tokens
        cache.length = 0  # start over in the same cache, as generate() does on context overflow
        chunks, i = [], 0
        for n in (3, 1, 9, 5, 6, 13, 1, 1, 1):
            chunks.append(model(toks[:, i : i + n], past_kv_cache=cache))
            i += n
        torch.testing.assert_close(torch.cat(chunks, 1), full[:, :i], atol=1e-5, rtol=1e-5)


def test_cache_pattern_hooks_see_the_window_cache():
    model = make_model()
    toks = tokens(1, 20)
    with torch.no_grad():
        cache = model.make_cache(1)
        model(toks[:, :15], past_kv_cache=cache)
        _, act = model.run_with_cache(toks[:, 15:18], past_kv_cache=cache)
    # self-decoder: the W - 1 cached keys the new queries can still see, then the 3 new ones
    assert act["blocks.0.attn.hook_pattern"].shape == (1, 3, 3, W - 1 + 3)
    assert act["blocks.2.attn.hook_pattern"].shape == (1, 3, 3, 18)  # cross: every shared key so far
    assert act["yoco_kv.hook_k"].shape == (1, 3, 3, 8)


def test_generate_with_and_without_cache_agree_through_context_overflow():
    model = make_model(n_ctx=24, yoco_window=5)  # 70 new tokens: several re-prefills after overflow
    prompt = tokens(1, 10)[0]
    a = tinygpt.generate(model, prompt, 70, seed=3, use_cache=True)
    b = tinygpt.generate(model, prompt, 70, seed=3, use_cache=False)
    assert a.shape == (1, 80) and torch.equal(a, b)
    text = model.generate("ROMEO:", 12, seed=0, temperature=0.8)
    assert isinstance(text, str) and text.startswith("ROMEO:") and len(text) > len("ROMEO:")


def test_cache_memory_is_window_caches_plus_one_global_cache():
    cfg = GPTConfig(n_layers=8, d_model=64, n_heads=4, n_ctx=512, yoco=True, yoco_window=32)
    model = GPT(cfg)
    cache = model.make_cache(2)
    assert isinstance(cache, YocoCache)
    per_pos = 2 * 2 * 64 * 4  # k and v, batch 2, n_heads * d_head floats of 4 bytes
    assert cache.nbytes == per_pos * (4 * 32 + 512)
    vanilla = GPT(cfg.replace(yoco=False)).make_cache(2)
    vanilla_bytes = vanilla.k.numel() * 4 + vanilla.v.numel() * 4
    assert vanilla_bytes == per_pos * 8 * 512
    assert cache.nbytes < vanilla_bytes / 6
    assert model.make_cache(1, 10).wk.shape[3] == 10  # never more window slots than positions


def test_bfloat16_model_decodes_like_its_full_forward():
    model = make_model(dtype="bfloat16")
    toks = tokens(1, 16)
    with torch.no_grad():
        full = model(toks).float()
        cache = model.make_cache(1)
        assert cache.k.dtype == torch.bfloat16
        steps = torch.cat([model(toks[:, i : i + 1], past_kv_cache=cache) for i in range(16)], 1).float()
    assert (steps - full).abs().max() < 0.1 * full.abs().max()


# ------------------------------------------------------------------------------------------------ files, CLI
def test_save_load_round_trip_and_describe(tmp_path):
    model = make_model()
    path = tmp_path / "yoco.tinygpt"
    tinygpt.save(model, path)
    loaded = tinygpt.load(path)
    assert type(loaded) is YocoGPT and loaded.cfg.yoco and loaded.cfg.yoco_window == W
    toks = tokens(2, 20)
    with torch.no_grad():
        torch.testing.assert_close(loaded(toks), model(toks), atol=0, rtol=0)
    text = tinygpt.describe(path)
    assert "yoco=True" in text and f"yoco_window={W}" in text
    for name in ("yoco_kv.ln.weight", "yoco_kv.k_proj.weight", "yoco_kv.v_proj.bias", "blocks.3.attn.q_proj.weight"):
        assert name in text
    assert "blocks.3.attn.k_proj" not in text and "blocks.1.attn.k_proj.weight" in text


def test_cli_train_yoco_end_to_end(tmp_path, monkeypatch, capsys):
    from tinygpt.cli import main

    monkeypatch.setenv("TINYGPT_CACHE_DIR", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("ROMEO: But soft, what light through yonder window breaks?\n" * 200)
    out = tmp_path / "y.tinygpt"
    args = ["train", "--preset", "nano", "--yoco", "--yoco-window", "16", "--steps", "20", "--corpus", str(corpus),
            "--batch", "4", "--val-every", "0", "--out", str(out), "--no-progress", "--device", "cpu"]  # fmt: skip
    assert main(args) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("done: step 20")
    model = tinygpt.load(out)
    assert type(model) is YocoGPT and model.cfg.yoco_window == 16 and model.cfg.n_ctx == 128
    history = tinygpt.read_checkpoint(out).train_state["history"]
    assert history[-1]["loss"] < history[0]["loss"]
    assert main(["sample", str(out), "--prompt", "ROMEO:", "--tokens", "20", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO:")


# ------------------------------------------------------------------------------------------------ combinations
def test_yoco_with_mixture_of_experts():
    from tinygpt.arch.moe import MoE

    model = make_model(moe_experts=4, moe_topk=2)
    assert all(isinstance(blk.moe, MoE) and not hasattr(blk, "mlp") for blk in model.blocks)
    assert type(model.blocks[3].attn) is CrossAttention
    toks = tokens(2, 20)
    with torch.no_grad():
        full = model(toks)
        cache = model.make_cache(2)
        steps = torch.cat([model(toks[:, i : i + 1], past_kv_cache=cache) for i in range(20)], dim=1)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)
    model.train()
    loss = model(toks, return_type="loss")
    assert model.aux_loss() > 0
    loss.backward()
    assert model.yoco_kv.k_proj.weight.grad is not None
    assert model.blocks[3].moe.router.weight.grad is not None
