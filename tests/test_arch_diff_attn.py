"""Differential attention (`tinygpt.arch.diff_attn`): formula, paths, hooks, cache, round trips, CLI, combinations."""

from __future__ import annotations

import math
import re

import pytest
import torch

import tinygpt
from tinygpt import GPT, GPTConfig
from tinygpt.arch.diff_attn import DiffAttention, lambda_init
from tinygpt.cli import main
from tinygpt.config import ConfigError

# d_head (10) is not d_model / n_heads (8): a formula that confuses the two cannot pass.
CFG = GPTConfig(n_layers=3, d_model=24, n_heads=3, d_head=10, d_mlp=40, n_ctx=32, diff_attn=True)


def model(**kw) -> GPT:
    torch.manual_seed(0)
    m = GPT(CFG.replace(**kw))
    with torch.no_grad():  # λ far from λ_init and RMSNorm weights away from 1, so mistakes show
        for block in m.blocks:
            a = block.attn
            for p in (a.lambda_q1, a.lambda_k1, a.lambda_q2, a.lambda_k2):
                p.normal_(0.0, 0.5)
            a.subln.weight.uniform_(0.5, 1.5)
    return m


def reference(attn: DiffAttention, x: torch.Tensor, lam_override: float | None = None) -> torch.Tensor:
    """The paper's equations, head by head, in float64, from the module's weights. x: [b, t, d_model]."""
    cfg = attn.cfg
    x = x.double()
    d = cfg.d_head // 2
    t = x.shape[1]
    lq1, lk1, lq2, lk2 = (p.double() for p in (attn.lambda_q1, attn.lambda_k1, attn.lambda_q2, attn.lambda_k2))
    lam_init = 0.8 - 0.6 * math.exp(-0.3 * attn.layer)
    lam = torch.exp(lq1 @ lk1) - torch.exp(lq2 @ lk2) + lam_init if lam_override is None else lam_override
    future = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
    heads = []
    for h in range(cfg.n_heads):
        Q = x @ attn.W_Q[h].double() + attn.b_Q[h].double()  # [b, t, 2d]
        K = x @ attn.W_K[h].double() + attn.b_K[h].double()
        V = x @ attn.W_V[h].double() + attn.b_V[h].double()
        Q1, Q2, K1, K2 = Q[..., :d], Q[..., d:], K[..., :d], K[..., d:]
        A1 = torch.softmax((Q1 @ K1.transpose(-1, -2) / math.sqrt(d)).masked_fill(future, -math.inf), -1)
        A2 = torch.softmax((Q2 @ K2.transpose(-1, -2) / math.sqrt(d)).masked_fill(future, -math.inf), -1)
        out = (A1 - lam * A2) @ V  # [b, t, 2d]
        out = out / torch.sqrt(out.pow(2).mean(-1, keepdim=True) + cfg.layer_norm_eps) * attn.subln.weight.double()
        heads.append(out * (1 - lam_init))
    z = torch.stack(heads, 2)  # [b, t, H, 2d]
    return torch.einsum("bthd,hdm->btm", z, attn.W_O.double()) + attn.b_O.double()


def closed_form_params(c: GPTConfig) -> int:
    hd = c.n_heads * c.d_head
    attn = 3 * (c.d_model * hd + hd) + hd * c.d_model + c.d_model
    diff = 4 * (c.d_head // 2) + c.d_head  # λq1, λk1, λq2, λk2 and the RMSNorm weight
    mlp = c.d_model * c.d_mlp + c.d_mlp + c.d_mlp * c.d_model + c.d_model
    block = attn + diff + mlp + 2 * 2 * c.d_model  # + ln1, ln2
    return c.d_vocab * c.d_model + c.n_ctx * c.d_model + c.n_layers * block + 2 * c.d_model + c.d_model * c.d_vocab


def test_parameter_count_matches_formula():
    for cfg in (CFG, CFG.replace(n_layers=2, d_model=32, n_heads=4, d_head=None, d_mlp=None)):
        m = GPT(cfg)
        assert m.n_params() == closed_form_params(cfg) == cfg.n_params()
        assert m.n_params() - GPT(cfg.replace(diff_attn=False)).n_params() == cfg.n_layers * 3 * cfg.d_head
    a = GPT(CFG).blocks[1].attn
    assert isinstance(a, DiffAttention)
    assert a.q_proj.weight.shape == a.k_proj.weight.shape == a.v_proj.weight.shape == (30, 24)
    assert a.o_proj.weight.shape == (24, 30) and a.lambda_q1.shape == (5,) and a.subln.weight.shape == (10,)


def test_lambda_init_schedule_and_initialisation():
    assert [round(lambda_init(i), 6) for i in (0, 1, 5)] == [
        round(0.8 - 0.6 * math.exp(-0.3 * i), 6) for i in (0, 1, 5)
    ]
    assert lambda_init(0) == pytest.approx(0.2)
    torch.manual_seed(1)
    m = GPT(CFG.replace(n_layers=8, d_model=128, n_heads=2, d_head=None, d_mlp=None))
    for i, block in enumerate(m.blocks):
        a = block.attn
        assert a.lambda_init == pytest.approx(lambda_init(i))
        assert torch.equal(a.subln.weight, torch.ones(64))  # not the generic N(0, 0.02)
    lam = torch.cat([getattr(b.attn, n) for b in m.blocks for n in ("lambda_q1", "lambda_k1")])
    assert 0.07 < lam.std().item() < 0.13  # N(0, 0.1)


def test_config_rejects_odd_head_dim():
    with pytest.raises(ConfigError, match="d_head must be even"):
        GPTConfig(n_layers=1, d_model=9, n_heads=3, diff_attn=True)


@pytest.mark.parametrize("impl", ["auto", "eager"])
def test_forward_equals_paper_reference(impl):
    m = model(attn_impl=impl).eval()
    x = torch.randn(2, 11, CFG.d_model)
    with torch.no_grad():
        for block in m.blocks:
            got = block.attn(x)
            torch.testing.assert_close(got.double(), reference(block.attn, x), atol=1e-5, rtol=1e-5)


def test_fast_and_eager_paths_agree_on_logits_and_gradients():
    tokens = torch.randint(0, 256, (2, 13))
    runs = {}
    for impl in ("sdpa", "eager"):
        m = model(attn_impl=impl)
        loss = m(tokens, return_type="loss")
        loss.backward()
        runs[impl] = (m(tokens).detach(), {n: p.grad for n, p in m.named_parameters()})
    torch.testing.assert_close(runs["sdpa"][0], runs["eager"][0], atol=1e-5, rtol=1e-5)
    for name, g in runs["eager"][1].items():
        torch.testing.assert_close(runs["sdpa"][1][name], g, atol=1e-5, rtol=1e-4, msg=name)
    assert runs["sdpa"][1]["blocks.2.attn.lambda_q2"].abs().sum() > 0


def test_hooks_expose_both_maps_and_lambda():
    m = model().eval()
    tokens = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        logits, cache = m.run_with_cache(tokens)
        fast = m(tokens)
    torch.testing.assert_close(logits, fast, atol=1e-5, rtol=1e-5)
    H = CFG.n_heads
    for i, block in enumerate(m.blocks):
        pre = f"blocks.{i}.attn."
        p1, p2, pat = cache[pre + "hook_pattern1"], cache[pre + "hook_pattern2"], cache[pre + "hook_pattern"]
        lam = cache[pre + "hook_lambda"]
        assert p1.shape == p2.shape == pat.shape == cache[pre + "hook_attn_scores1"].shape == (2, H, 9, 9)
        assert lam.shape == () and lam.dtype == torch.float32
        assert torch.allclose(lam, block.attn.lambda_full())
        torch.testing.assert_close(p1.sum(-1), torch.ones(2, H, 9))
        torch.testing.assert_close(pat, p1 - lam * p2)
        torch.testing.assert_close(pat.sum(-1), (1 - lam).expand(2, H, 9))
        assert torch.equal(torch.triu(pat, diagonal=1), torch.zeros_like(pat))
        torch.testing.assert_close(p2, cache[pre + "hook_attn_scores2"].softmax(-1))
        assert cache[pre + "hook_q"].shape == cache[pre + "hook_z"].shape == (2, 9, H, CFG.d_head)
        assert cache[pre + "subln.hook_scale"].shape == (2, 9, H)
        # hook_z is what W_O multiplies: attn_out decomposes over heads exactly
        attn_out = torch.einsum("bphd,hdm->bpm", cache[pre + "hook_z"], block.attn.W_O) + block.attn.b_O
        torch.testing.assert_close(attn_out, cache[f"blocks.{i}.hook_attn_out"], atol=1e-6, rtol=1e-5)
    assert "blocks.0.attn.hook_attn_scores" not in m.hook_dict
    # remove_batch_dim and pos_slice work with these shapes (λ is a scalar, scales put pos second)
    _, c1 = m.run_with_cache(tokens[:1], remove_batch_dim=True, pos_slice=-1)
    assert c1["blocks.0.attn.hook_lambda"].shape == () and c1["blocks.0.attn.subln.hook_scale"].shape == (1, H)


def test_lambda_hook_patches_the_fast_path():
    """hook_lambda is called on the fast path too: setting λ = 0 there equals the reference with λ = 0."""
    m = model().eval()
    x = torch.randn(1, 7, CFG.d_model)
    attn = m.blocks[1].attn
    attn.hook_lambda.add_hook(lambda lam, hook: torch.zeros_like(lam))
    try:
        assert not attn.needs_eager()
        with torch.no_grad():
            got = attn(x)
    finally:
        m.reset_hooks()
    torch.testing.assert_close(got.double(), reference(attn, x, lam_override=0.0), atol=1e-5, rtol=1e-5)


def test_fast_path_is_two_fused_calls_per_layer(monkeypatch):
    """Without pattern hooks, each layer makes two fused attention calls (A1·V and A2·V) and no eager scores."""
    from tinygpt.arch import backends

    calls = []
    real = backends.attend
    monkeypatch.setattr(
        backends, "attend", lambda q, k, v, *a, **kw: calls.append((q.shape, v.shape)) or real(q, k, v, *a, **kw)
    )
    m = model().eval()
    with torch.no_grad():
        m(torch.randint(0, 256, (2, 6)), return_type=None)
    assert calls == [((2, 3, 6, 5), (2, 3, 6, 10))] * (2 * CFG.n_layers)
    calls.clear()
    with torch.no_grad():
        m.run_with_cache(torch.randint(0, 256, (2, 6)), names_filter=lambda n: n.endswith("hook_pattern"))
    assert calls == []


def test_pattern_hook_edits_are_used():
    """Zero-ablating the second map makes λ irrelevant; a returned hook_pattern is what multiplies V."""
    m = model().eval()
    tokens = torch.randint(0, 256, (1, 8))

    def zero(t, hook):
        return torch.zeros_like(t)

    with torch.no_grad():
        a = m.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_pattern2", zero)])
        m.blocks[0].attn.lambda_q2.mul_(3.0)
        b = m.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_pattern2", zero)])
        c = m(tokens)
        d = m.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_pattern", zero)])
        e = m.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_z", zero)])
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    torch.testing.assert_close(d, e, atol=1e-5, rtol=1e-5)  # z = RMSNorm(0) = 0


def test_sdpa_refuses_pattern_hooks():
    m = model(attn_impl="sdpa").eval()
    with pytest.raises(RuntimeError, match="attn_impl='sdpa' cannot expose"):
        m.run_with_hooks(
            torch.zeros(1, 4, dtype=torch.long), fwd_hooks=[("blocks.0.attn.hook_pattern1", lambda t, hook: t)]
        )


@pytest.mark.parametrize("impl", ["auto", "eager"])
def test_kv_cache_equals_full_forward(impl, decode_in_chunks):
    m = model(attn_impl=impl).eval()
    tokens = torch.randint(0, 256, (2, 17))
    with torch.no_grad():
        full = m(tokens)
        inc, _ = decode_in_chunks(m, tokens, [5, 1, 1, 4, 1, 5])  # prefill, single tokens, and chunks after a prefix
    torch.testing.assert_close(inc, full, atol=1e-5, rtol=1e-5)


def test_generation_cached_equals_uncached():
    m = model().eval()
    prompt = m.to_tokens("To be")
    a = m.generate(prompt, max_new_tokens=12, seed=3)
    b = m.generate(prompt, max_new_tokens=12, seed=3, use_cache=False)
    assert a.shape == (1, 5 + 12) and torch.equal(a[:, :5], prompt)
    assert torch.equal(a, b)
    assert m.generate("To be", max_new_tokens=4, seed=3).startswith("To be")


def test_save_load_round_trip(tmp_path):
    m = model().eval()
    path = tmp_path / "diff.tinygpt"
    tinygpt.save(m, path)
    back = tinygpt.load(path)
    assert back.cfg.diff_attn and isinstance(back.blocks[0].attn, DiffAttention)
    tokens = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        assert torch.equal(back(tokens), m(tokens))
    text = tinygpt.describe(path)
    assert "diff_attn=True" in text
    for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
        assert re.search(rf"^blocks\.2\.attn\.{name}\s+float32\s+\[5\]", text, re.M), name
    assert re.search(r"^blocks\.0\.attn\.subln\.weight\s+float32\s+\[10\]", text, re.M)


def test_bfloat16_model_runs_and_tracks_float32():
    m32 = model().eval()
    m16 = model(dtype="bfloat16").eval()
    tokens = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        a, b = m32(tokens), m16(tokens)
    assert b.dtype == torch.bfloat16 and torch.isfinite(b).all()
    assert (a - b.float()).abs().max() < 0.1 * a.abs().max()


def test_combined_with_moe_and_mod(decode_in_chunks):
    """diff-attn + MoE + MoD on one model: builds, trains a step, decodes with the cache like the full forward."""
    cfg = CFG.replace(n_layers=2, moe_experts=3, moe_topk=2, mod=True, mod_capacity=0.5)
    torch.manual_seed(0)
    m = GPT(cfg)
    assert isinstance(m.blocks[0].attn, DiffAttention) and hasattr(m.blocks[0], "moe")
    tokens = torch.randint(0, 256, (2, 12))
    m.train()
    m(tokens, return_type="loss").backward()
    assert m.blocks[1].attn.lambda_k1.grad is not None and m.blocks[0].moe.router.weight.grad is not None
    m.eval()
    with torch.no_grad():
        full, cache = m.run_with_cache(tokens)
        inc, _ = decode_in_chunks(m, tokens, [4, 1, 1, 6])
    torch.testing.assert_close(inc, full, atol=1e-5, rtol=1e-5)
    assert cache["blocks.0.attn.hook_pattern"].shape == (2, cfg.n_heads, 12, 12)
    assert "blocks.1.moe.hook_router_logits" in cache


def test_cli_train_diff_attn(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TINYGPT_CACHE_DIR", str(tmp_path / "cache"))
    corpus = tmp_path / "c.txt"
    corpus.write_text("To be, or not to be, that is the question.\n" * 60)
    out = tmp_path / "diff.tinygpt"
    argv = ["train", "--preset", "nano", "--diff-attn", "--steps", "12", "--corpus", str(corpus), "--batch", "2",
            "--ctx", "32", "--warmup", "2", "--val-every", "0", "--out", str(out), "--no-progress", "--device",
            "cpu"]  # fmt: skip
    assert main(argv) == 0
    assert "done: step 12" in capsys.readouterr().out
    back = tinygpt.load(out)
    assert back.cfg.diff_attn and isinstance(back.blocks[1].attn, DiffAttention)
    hist = back.train_state["history"]
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert main(["inspect", str(out)]) == 0
    assert "blocks.1.attn.lambda_q1" in capsys.readouterr().out
    assert main(["sample", str(out), "--tokens", "8", "--seed", "1", "--prompt", "To"]) == 0
    assert "To" in capsys.readouterr().out
