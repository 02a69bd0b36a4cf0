"""YOCO (You Only Cache Once): self-decoder with sliding-window attention, one shared K/V, cross-decoder;
window + global cache decoding equal to the full forward; save/load, describe, CLI, generation; and YOCO
combined with differential attention, Mixture-of-Depths and Mixture-of-Experts (each alone and all three)."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

import tinygpt
from tinygpt import GPT, GPTConfig, KVCache
from tinygpt.arch.diff_attn import DiffAttention
from tinygpt.arch.mod import MoDBlock, RoutedKV, capacity_k, routing, routing_agreement
from tinygpt.arch.moe import MoE
from tinygpt.arch.yoco import (
    CrossAttention,
    DiffCrossAttention,
    DiffSlidingWindowAttention,
    SlidingWindowAttention,
    YocoCache,
    YocoStack,
)
from tinygpt.config import ConfigError

W = 6  # the window; sequences below are several windows long
CFG = GPTConfig(n_layers=4, d_model=24, n_heads=3, d_mlp=40, n_ctx=48, yoco=True, yoco_window=W)


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.3) -> None:
    """Perturb every parameter (LN gains and biases too) so no check passes thanks to a trivial init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale)


def make_model(cfg: GPTConfig = CFG, seed: int = 0, **changes) -> GPT:
    torch.manual_seed(seed)
    model = GPT(cfg.replace(**changes) if changes else cfg)
    randomize(model, seed)
    return model.eval()


def tokens(batch: int = 2, pos: int = 30, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (batch, pos), generator=torch.Generator().manual_seed(seed))


def reference_logits(model: GPT, toks: torch.Tensor) -> torch.Tensor:
    """YOCO written out position by position from the papers' equations, with the model's weights.

    Covers the combinations: differential attention (both maps, λ, per-head RMSNorm), Mixture-of-Experts (each
    token through its top-k experts, one by one, weighted by the softmax over their logits) and Mixture-of-Depths
    with top-k routing (a routed block runs on its routed tokens only: in the self-decoder a routed token sees
    the last `yoco_window` routed tokens; in the cross-decoder the shared keys of every position up to its own;
    both sub-layer outputs gated by sigmoid(router score)).
    """
    cfg = model.cfg
    b, t = toks.shape
    H, dh, w, n_self = cfg.n_heads, cfg.d_head, cfg.yoco_window, cfg.n_layers // 2

    def ln(mod, x):
        x = x - x.mean(-1, keepdim=True)
        return x / (x.pow(2).mean(-1, keepdim=True) + cfg.layer_norm_eps).sqrt() * mod.weight + mod.bias

    def heads(lin, h):  # [n, d_model] -> [n, H, dh]
        return lin(h).view(h.shape[0], H, dh)

    def softmax_attend(q, k, v, scale):  # one query [H, e], keys [j, H, e], values [j, H, dh] -> [H, dh]
        return torch.einsum("hj,jhd->hd", (torch.einsum("he,jhe->hj", q, k) * scale).softmax(-1), v)

    def attention(attn, q, k, v, visible):  # q [n, H, dh]; k, v [m, H, dh]; visible(a): key indices of query a
        out = []
        for a in range(q.shape[0]):
            js = visible(a)
            if isinstance(attn, DiffAttention):
                e = dh // 2
                lam_init = 0.8 - 0.6 * math.exp(-0.3 * attn.layer)
                lam = (attn.lambda_q1 @ attn.lambda_k1).exp() - (attn.lambda_q2 @ attn.lambda_k2).exp() + lam_init
                o1 = softmax_attend(q[a, :, :e], k[js, :, :e], v[js], 1 / math.sqrt(e))
                o2 = softmax_attend(q[a, :, e:], k[js, :, e:], v[js], 1 / math.sqrt(e))
                o = o1 - lam * o2
                o = o / (o.pow(2).mean(-1, keepdim=True) + cfg.layer_norm_eps).sqrt() * attn.subln.weight
                out.append(o * (1 - lam_init))
            else:
                out.append(softmax_attend(q[a], k[js], v[js], 1 / math.sqrt(dh)))
        return attn.o_proj(torch.stack(out).reshape(q.shape[0], H * dh))

    def ffn(blk, h):  # h [n, d_model]
        if not cfg.moe_experts:
            return blk.mlp.fc_out(F.gelu(blk.mlp.fc_in(h), approximate="tanh"))
        top_v, top_i = (h @ blk.moe.router.weight.T).topk(cfg.moe_topk, -1)
        weights = top_v.softmax(-1)
        out = torch.zeros_like(h)
        for n in range(h.shape[0]):
            for j, wgt in zip(top_i[n].tolist(), weights[n]):
                e = blk.moe.experts[j]
                out[n] += wgt * e.fc_out(F.gelu(e.fc_in(h[n]), approximate="tanh"))
        return out

    x = model.W_E[toks] + model.W_pos[:t]
    for i, blk in enumerate(model.blocks):
        if i == n_self:  # the shared K/V, once, from the self-decoder's output
            kv_in = ln(model.yoco_kv.ln, x)
            K = model.yoco_kv.k_proj(kv_in).view(b, t, H, dh)
            V = model.yoco_kv.v_proj(kv_in).view(b, t, H, dh)
        out = x.clone()
        for r in range(b):
            P, gate = torch.arange(t), torch.ones(t, 1)
            if isinstance(blk, MoDBlock):  # top-k routing: the routed positions, in causal order
                scores = blk.router(x[r]).squeeze(-1)
                P = scores.topk(capacity_k(cfg.mod_capacity, t)).indices.sort().values
                gate = torch.sigmoid(scores[P])[:, None]
            xs = x[r, P]
            h, a = ln(blk.ln1, xs), blk.attn
            if i < n_self:  # the window runs over the (routed) sub-sequence
                k_, v_ = heads(a.k_proj, h), heads(a.v_proj, h)
                attn_out = attention(a, heads(a.q_proj, h), k_, v_, lambda c: list(range(max(0, c - w + 1), c + 1)))
            else:  # every shared key up to the query's own position
                attn_out = attention(a, heads(a.q_proj, h), K[r], V[r], lambda c, P=P: list(range(int(P[c]) + 1)))
            mid = xs + gate * attn_out
            out[r, P] = mid + gate * ffn(blk, ln(blk.ln2, mid))
        x = out
    return model.unembed(ln(model.ln_final, x))


# ------------------------------------------------------------------------------------------------ structure
def test_gpt_builds_yoco_with_self_and_cross_decoder():
    model = make_model()
    assert type(model) is GPT and isinstance(model.stack, YocoStack) and model.n_self == 2
    assert type(GPT(CFG.replace(yoco=False))) is GPT
    for i, blk in enumerate(model.blocks):
        assert {"ln1", "attn", "ln2", "mlp"} <= set(dict(blk.named_children()))
        if i < model.n_self:
            assert type(blk.attn) is SlidingWindowAttention and blk.attn.window == W
        else:
            assert type(blk.attn) is CrossAttention
            assert set(dict(blk.attn.named_children())) == {"q_proj", "o_proj", "hook_q", "hook_z", "hook_result",
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


def test_wrong_config_and_cache_are_clear_errors():
    with pytest.raises(ConfigError, match="yoco=True"):
        YocoStack().build(GPT(CFG.replace(yoco=False)))
    model = make_model()
    with pytest.raises(TypeError, match="YocoCache"):
        model(tokens(1, 3), past_kv_cache=KVCache(model.cfg, 1, 48, "cpu", torch.float32))
    with pytest.raises(TypeError, match="shared K/V"):  # a cross-decoder block needs the model's SharedKV
        model.blocks[3].attn(torch.zeros(1, 3, 24), None)


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
    assert isinstance(loaded.stack, YocoStack) and loaded.cfg.yoco and loaded.cfg.yoco_window == W
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
    assert isinstance(model.stack, YocoStack) and model.cfg.yoco_window == 16 and model.cfg.n_ctx == 128
    history = tinygpt.read_checkpoint(out).train_state["history"]
    assert history[-1]["loss"] < history[0]["loss"]
    assert main(["sample", str(out), "--prompt", "ROMEO:", "--tokens", "20", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO:")


# ------------------------------------------------------------------------------------------------ combinations
COMBOS = {
    "diff": dict(diff_attn=True),
    "moe": dict(moe_experts=4, moe_topk=2),
    "mod": dict(mod=True, mod_capacity=0.5),  # routed: block 1 (self-decoder) and block 3 (cross-decoder)
    "mod-every-block": dict(mod=True, mod_capacity=0.4, mod_every=1),
    "diff+mod+moe": dict(diff_attn=True, mod=True, mod_capacity=0.5, moe_experts=3, moe_topk=2),
}


def combo(name: str, **changes) -> GPT:
    """The combination's model, with routers large enough that MoD's causal predictor (score > 0) routes a mix."""
    model = make_model(**COMBOS[name], **changes)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for blk in model.blocks:
            if isinstance(blk, MoDBlock):
                blk.router.weight.copy_(torch.randn(blk.router.weight.shape, generator=g))
                blk.router.bias.zero_()
    return model


def routed_layers(model: GPT) -> list[int]:
    return [i for i, blk in enumerate(model.blocks) if isinstance(blk, MoDBlock)]


@pytest.mark.parametrize("name", list(COMBOS))
def test_combination_builds_the_variants_pieces_in_both_halves(name):
    model = combo(name)
    cfg = model.cfg
    assert isinstance(model.stack, YocoStack)
    for i, blk in enumerate(model.blocks):
        if cfg.diff_attn:
            assert type(blk.attn) is (DiffSlidingWindowAttention if i < 2 else DiffCrossAttention)
        else:
            assert type(blk.attn) is (SlidingWindowAttention if i < 2 else CrossAttention)
        assert isinstance(blk, MoDBlock) == (cfg.mod and i % cfg.mod_every == cfg.mod_every - 1)
        assert isinstance(getattr(blk, "moe", None), MoE) == bool(cfg.moe_experts)
    names = {n for n, _ in model.named_parameters()}
    assert not [
        n for n in names if n.startswith(("blocks.2.attn.", "blocks.3.attn.")) and ("k_proj" in n or "v_proj" in n)
    ]
    if cfg.diff_attn:  # the cross-decoder's differential attention has its own λ and RMSNorm
        assert {"blocks.3.attn.lambda_q1", "blocks.3.attn.lambda_k2", "blocks.3.attn.subln.weight"} <= names
        assert "blocks.3.attn.hook_pattern1" in model.hook_dict and "blocks.3.attn.hook_k" not in model.hook_dict
        assert model.blocks[3].attn.W_K.data_ptr() == model.yoco_kv.k_proj.weight.data_ptr()
    # YOCO changes only the attention's keys/values: the parameter count follows the same formula
    d, L, hd = cfg.d_model, cfg.n_layers, cfg.n_heads * cfg.d_head
    proj = d * hd + hd
    expected = GPT(cfg.replace(yoco=False)).n_params() - (L - L // 2) * 2 * proj + 2 * proj + 2 * d
    assert model.n_params() == cfg.n_params() == expected


@pytest.mark.parametrize("impl", ["auto", "eager"])
@pytest.mark.parametrize("name", list(COMBOS))
def test_combination_forward_matches_the_reference(name, impl):
    model = combo(name, attn_impl=impl)
    toks = tokens(2, 20)  # > 3 windows
    with torch.no_grad(), routing(model, "topk"):
        got = model(toks)
        want = reference_logits(model, toks)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("name", list(COMBOS))
def test_combination_fast_and_eager_agree_on_logits_and_gradients(name):
    toks = tokens(2, 20)
    runs = {}
    for impl in ("auto", "eager"):
        model = combo(name, attn_impl=impl).train()  # training: MoD routes top-k, MoE adds its aux losses
        logits, loss = model(toks, return_type="both")
        loss.backward()
        runs[impl] = logits.detach(), {n: p.grad for n, p in model.named_parameters()}
    torch.testing.assert_close(runs["auto"][0], runs["eager"][0], atol=1e-5, rtol=1e-5)
    for n, g in runs["eager"][1].items():
        assert g is not None and g.abs().sum() > 0, f"{n} gets no gradient"
        torch.testing.assert_close(runs["auto"][1][n], g, atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("impl", ["auto", "eager"])
@pytest.mark.parametrize("name", list(COMBOS))
def test_combination_incremental_decoding_equals_the_full_forward(name, impl, decode_in_chunks):
    model = combo(name, attn_impl=impl)
    toks = tokens(2, 40)  # more than six windows
    with torch.no_grad():
        full = model(toks)  # eval mode: MoD's causal predictor, the routing generation uses
        steps, cache = decode_in_chunks(model, toks, [1] * 40)
        chunked, _ = decode_in_chunks(model, toks, [3, 1, 9, 5, 6, 13, 1, 1, 1])  # chunks shorter and longer than W
    # float rounding only (experts and projections run on different token counts): logits are O(1) here
    torch.testing.assert_close(steps, full, atol=5e-5, rtol=1e-4)
    torch.testing.assert_close(chunked, full, atol=5e-5, rtol=1e-4)
    if not model.cfg.mod:
        return
    # the predictor routes a mix of tokens in every routed block (else the check above proves little) ...
    names = [f"blocks.{i}.hook_routing_mask" for i in routed_layers(model)]
    with torch.no_grad():
        _, act = model.run_with_cache(toks, names_filter=names)
    for i in routed_layers(model):
        counts = act[f"blocks.{i}.hook_routing_mask"].sum(1)
        assert 0 < counts.min() and counts.max() < 40 and counts[0] != counts[1], (i, counts)
        # ... a routed self-decoder block caches only its routed tokens, in a ring of yoco_window per row;
        # a routed cross-decoder block reads the shared K/V and keeps no cache of its own
        st = cache.routed_layers.get(i)
        if i < model.n_self:
            assert isinstance(st, RoutedKV) and st.window == W and st.k.shape[2] == W
            assert st.lengths == counts.tolist()
        else:
            assert st is None


@pytest.mark.parametrize("name", list(COMBOS))
def test_combination_generates_alike_with_and_without_cache(name):
    model = combo(name, n_ctx=24, yoco_window=5)  # 40 new tokens: re-prefills after context overflow
    prompt = tokens(2, 10)
    a = tinygpt.generate(model, prompt, 40, seed=3, use_cache=True)
    b = tinygpt.generate(model, prompt, 40, seed=3, use_cache=False)
    assert a.shape == (2, 50) and torch.equal(a, b)


@pytest.mark.parametrize("name", list(COMBOS))
def test_combination_save_load_and_describe(name, tmp_path):
    model = combo(name)
    path = tmp_path / "m.tinygpt"
    tinygpt.save(model, path)
    loaded = tinygpt.load(path)
    assert isinstance(loaded.stack, YocoStack) and loaded.cfg == model.cfg
    assert [type(b.attn) for b in loaded.blocks] == [type(b.attn) for b in model.blocks]
    toks = tokens(2, 20)
    with torch.no_grad():
        assert torch.equal(loaded(toks), model(toks))
    text = tinygpt.describe(path)
    for key, value in COMBOS[name].items():
        assert f"{key}={value}" in text
    expect = {"yoco_kv.k_proj.weight", "blocks.3.attn.q_proj.weight"}
    if model.cfg.diff_attn:
        expect |= {"blocks.0.attn.lambda_q1", "blocks.3.attn.lambda_k2", "blocks.3.attn.subln.weight"}
    if model.cfg.mod:
        expect |= {f"blocks.{i}.router.weight" for i in routed_layers(model)}
    if model.cfg.moe_experts:
        expect |= {
            "blocks.3.moe.router.weight",
            "blocks.3.moe.experts.1.fc_in.weight",
            "blocks.0.moe.experts.0.fc_out.bias",
        }
    for n in expect:
        assert n in text, n
    assert "blocks.3.attn.k_proj" not in text


def test_yoco_diff_attn_hooks_mask_both_maps():
    model = combo("diff")
    toks = tokens(2, 15)
    with torch.no_grad():
        logits, act = model.run_with_cache(toks)
        torch.testing.assert_close(logits, model(toks), atol=1e-5, rtol=1e-5)  # eager == fast
    dest, src = torch.arange(15)[:, None], torch.arange(15)[None, :]
    band = (src <= dest) & (src > dest - W)
    for i in range(4):
        a = f"blocks.{i}.attn."
        visible = band if i < 2 else src <= dest
        for m in ("1", "2"):
            p = act[a + "hook_pattern" + m]
            assert p.shape == (2, 3, 15, 15) and (p[..., ~visible] == 0).all() and (p[..., visible] > 0).all()
            torch.testing.assert_close(p.sum(-1), torch.ones(2, 3, 15))
            assert torch.isinf(act[a + "hook_attn_scores" + m][..., ~visible]).all()
        lam = act[a + "hook_lambda"]
        torch.testing.assert_close(act[a + "hook_pattern"], act[a + "hook_pattern1"] - lam * act[a + "hook_pattern2"])
    # the cross-decoder's maps are built from its queries and the shared keys' halves
    q, k = act["blocks.3.attn.hook_q"], act["yoco_kv.hook_k"]
    s1 = torch.einsum("bqhd,bkhd->bhqk", q[..., :4], k[..., :4]) / 2.0
    torch.testing.assert_close(act["blocks.3.attn.hook_attn_scores1"], s1.masked_fill(src > dest, float("-inf")))
    # a hook on λ of a cross-decoder block changes the output on the fast path too
    with torch.no_grad():
        patched = model.run_with_hooks(toks, fwd_hooks=[("blocks.3.attn.hook_lambda", lambda t, hook: t * 0)])
    assert not torch.allclose(patched, logits)


def test_yoco_mod_hooks_inside_routed_blocks():
    model = combo("mod")
    toks = tokens(2, 16)
    k = capacity_k(0.5, 16)
    with torch.no_grad(), routing(model, "topk"):
        _, act = model.run_with_cache(toks)
    for i in (1, 3):
        mask = act[f"blocks.{i}.hook_routing_mask"]
        assert mask.sum(1).tolist() == [k, k]
        assert torch.equal(act[f"blocks.{i}.hook_resid_post"][~mask], act[f"blocks.{i}.hook_resid_pre"][~mask])
    # self-decoder (block 1): a band of yoco_window over the routed sub-sequence
    p = act["blocks.1.attn.hook_pattern"]
    d, s = torch.arange(k)[:, None], torch.arange(k)[None, :]
    assert p.shape == (2, 3, k, k) and (p[..., (s > d) | (s <= d - W)] == 0).all()
    assert (p[..., (s <= d) & (s > d - W)] > 0).all()
    # cross-decoder (block 3): the routed queries see every shared key up to their own position
    p = act["blocks.3.attn.hook_pattern"]
    assert p.shape == (2, 3, k, 16)
    for r in range(2):
        pos = act["blocks.3.hook_routing_mask"][r].nonzero().squeeze(1)
        visible = torch.arange(16)[None, :] <= pos[:, None]  # [k, 16]
        assert (p[r][:, ~visible] == 0).all() and (p[r][:, visible] > 0).all()
    agreement = routing_agreement(model, toks)
    assert set(agreement) >= {"mod/l1/agreement", "mod/l3/agreement", "mod/agreement"}


def test_yoco_mod_cache_memory_stays_windowed(decode_in_chunks):
    model = combo("mod-every-block")
    toks = tokens(1, 40)
    with torch.no_grad():
        _, cache = decode_in_chunks(model, toks, [1] * 40)
    plain = model.make_cache(1)
    extra = cache.nbytes - plain.nbytes
    ring = 2 * 3 * W * 8 * 4  # k and v, n_heads * W slots * d_head, fp32, one row
    assert sorted(cache.routed_layers) == [0, 1]  # the self-decoder's routed blocks only
    assert extra == 2 * ring


def test_cli_train_yoco_with_every_knob_then_inspect_and_sample(tmp_path, monkeypatch, capsys):
    from tinygpt.cli import main

    monkeypatch.setenv("TINYGPT_CACHE_DIR", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("ROMEO: But soft, what light through yonder window breaks?\n" * 200)
    out = tmp_path / "y.tinygpt"
    args = ["train", "--preset", "nano", "--yoco", "--yoco-window", "8", "--diff-attn", "--mod", "--mod-capacity",
            "0.5", "--moe-experts", "4", "--moe-topk", "2", "--steps", "12", "--ctx", "32", "--corpus", str(corpus),
            "--batch", "4", "--warmup", "2", "--val-every", "0", "--out", str(out), "--no-progress",
            "--device", "cpu"]  # fmt: skip
    assert main(args) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("done: step 12")
    model = tinygpt.load(out)
    cfg = model.cfg
    assert (cfg.yoco, cfg.yoco_window, cfg.diff_attn, cfg.mod, cfg.mod_capacity, cfg.moe_experts) == (
        True, 8, True, True, 0.5, 4)  # fmt: skip
    assert type(model.blocks[1].attn) is DiffCrossAttention and isinstance(model.blocks[1], MoDBlock)
    history = tinygpt.read_checkpoint(out).train_state["history"]
    assert history[-1]["loss"] < history[0]["loss"]
    assert {"mod/l1/agreement", "moe/l0/entropy", "moe/l1/entropy"} <= set(history[-1])
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    for name in ("yoco=True", "diff_attn=True", "mod=True", "moe_experts=4", "blocks.1.router.weight",
                 "blocks.1.attn.lambda_q1", "blocks.1.moe.experts.3.fc_out.weight",
                 "yoco_kv.v_proj.weight"):  # fmt: skip
        assert name in text, name
    assert main(["sample", str(out), "--prompt", "ROMEO:", "--tokens", "20", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO:")


def documented_hooks(table: str, n_layers: int, routed: list[int]) -> set[str]:
    """Hook names of one table of docs/hooks.md (`{i}` every block, `{s}`/`{c}` self/cross-decoder, `{r}` routed)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "hooks.md").read_text(encoding="utf-8")
    body = text[text.index(f"<!-- {table}:start -->") : text.index(f"<!-- {table}:end -->")]
    half = n_layers // 2
    layers = {"{i}": range(n_layers), "{s}": range(half), "{c}": range(half, n_layers), "{r}": routed}
    names = set()
    for name in re.findall(r"^\|\s*`([^`]+)`\s*\|", body, flags=re.M):
        key = next((k for k in layers if k in name), None)
        names |= {name.replace(key, str(i)) for i in layers[key]} if key else {name}
    return names


@pytest.mark.parametrize("name", list(COMBOS))
def test_combination_hooks_are_the_documented_union(name):
    """docs/hooks.md: a combination has the hooks of each variant's table, less each variant's stated exceptions
    (diff_attn: no attn.hook_attn_scores; YOCO: no cross-decoder attn.hook_k/v; MoE: no mlp.hook_pre/post)."""
    model = combo(name)
    cfg = model.cfg
    routed = routed_layers(model)
    tables = ["hook-table", "hook-table:yoco"]
    tables += ["hook-table:diff_attn"] * cfg.diff_attn + ["hook-table:moe"] * bool(cfg.moe_experts)
    tables += ["hook-table:mod"] * cfg.mod
    documented = set().union(*(documented_hooks(t, cfg.n_layers, routed) for t in tables))
    absent = {f"blocks.{c}.attn.hook_{kv}" for c in range(2, 4) for kv in "kv"}
    if cfg.diff_attn:
        absent |= {f"blocks.{i}.attn.hook_attn_scores" for i in range(4)}
    if cfg.moe_experts:
        absent |= {f"blocks.{i}.mlp.hook_{h}" for i in range(4) for h in ("pre", "post")}
    assert documented - absent == set(model.hook_dict)
