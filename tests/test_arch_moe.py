"""Mixture-of-Experts feed-forward (`tinygpt.arch.moe`): names, dispatch, losses, monitoring, round trips."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F

import tinygpt
from tinygpt import GPT, GPTConfig
from tinygpt.arch.moe import (
    COLLAPSE_ENTROPY,
    LOAD_WINDOW,
    MoE,
    RoutingCollapseWarning,
    load_balancing_loss,
    router_z_loss,
)
from tinygpt.cli import main

CFG = GPTConfig(n_layers=2, d_model=32, n_heads=2, d_mlp=48, n_ctx=64, moe_experts=4, moe_topk=2)


def model(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(CFG.replace(**kw))


def dense_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, combined with the softmax over the top-k logits."""
    logits = x.float() @ moe.router.weight.float().T  # [b, p, N]
    top_v, top_i = logits.topk(moe.top_k, -1)
    w = top_v.softmax(-1)
    all_out = torch.stack([e(x) for e in moe.experts], dim=-2)  # [b, p, N, d]
    chosen = all_out.gather(-2, top_i[..., None].expand(-1, -1, -1, x.shape[-1]))  # [b, p, k, d]
    return (chosen * w[..., None]).sum(-2)


def test_parameter_names_in_inspect(tmp_path):
    m = model()
    path = tmp_path / "moe.tinygpt"
    tinygpt.save(m, path)
    text = tinygpt.describe(path)
    for i in range(CFG.n_layers):
        assert re.search(rf"^blocks\.{i}\.moe\.router\.weight\s+float32\s+\[4, 32\]", text, re.M)
        for j in range(4):
            for part in ("fc_in.weight", "fc_in.bias", "fc_out.weight", "fc_out.bias"):
                assert f"blocks.{i}.moe.experts.{j}.{part}" in text
    assert "moe.router.bias" not in text
    assert "blocks.0.mlp." not in text
    assert "moe_experts=4" in text and "moe_topk=2" in text


@pytest.mark.parametrize("k", [1, 2, 3])
def test_dispatch_equals_dense_reference(k):
    m = model(moe_topk=k).eval()
    moe = m.blocks[0].moe
    x = torch.randn(3, 11, 32)
    with torch.no_grad():
        got = moe(x)
        want = dense_reference(moe, x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_experts_only_see_their_tokens():
    """No dense compute: each expert runs once, on exactly the tokens routed to it."""
    m = model().eval()
    moe = m.blocks[0].moe
    seen = {}
    for j, e in enumerate(moe.experts):
        e.register_forward_hook(lambda mod, inp, out, j=j: seen.setdefault(j, []).append(inp[0].shape[0]))
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        moe(x)
        idx = F.linear(x, moe.router.weight).topk(2, -1).indices
    counts = torch.bincount(idx.flatten(), minlength=4).tolist()
    assert {j: sum(v) for j, v in seen.items()} == {j: c for j, c in enumerate(counts) if c}
    assert all(len(v) == 1 for v in seen.values())
    assert sum(sum(v) for v in seen.values()) == 2 * 2 * 9  # k * tokens, not N * tokens


def test_hooks_and_shapes():
    m = model().eval()
    tokens = torch.randint(0, 256, (2, 7))
    _, cache = m.run_with_cache(tokens)
    for i in range(2):
        logits = cache[f"blocks.{i}.moe.hook_router_logits"]
        idx = cache[f"blocks.{i}.moe.hook_expert_indices"]
        w = cache[f"blocks.{i}.moe.hook_expert_weights"]
        assert logits.shape == (2, 7, 4) and logits.dtype == torch.float32
        assert idx.shape == (2, 7, 2) and idx.dtype == torch.int64
        assert w.shape == (2, 7, 2)
        torch.testing.assert_close(w.sum(-1), torch.ones(2, 7))
        assert torch.equal(idx, logits.topk(2, -1).indices)
        assert cache[f"blocks.{i}.hook_mlp_out"].shape == (2, 7, 32)
        assert f"blocks.{i}.mlp.hook_pre" not in m.hook_dict


def test_hook_can_force_an_expert():
    m = model().eval()
    tokens = torch.randint(0, 256, (1, 6))

    def force(idx, hook):
        return torch.full_like(idx, 3)

    with torch.no_grad():
        forced = m.run_with_hooks(tokens, fwd_hooks=[("blocks.0.moe.hook_expert_indices", force)])
        normal = m(tokens)
    assert not torch.allclose(forced, normal)
    moe, x = m.blocks[0].moe, torch.randn(1, 5, 32)
    moe.hook_expert_indices.add_hook(force)
    try:
        with torch.no_grad():
            torch.testing.assert_close(moe(x), moe.experts[3](x), atol=1e-5, rtol=1e-5)  # weights sum to 1
    finally:
        moe.hook_expert_indices.remove_hooks()


def test_aux_loss_matches_hand_computation():
    m = model().train()
    moe = m.blocks[1].moe
    x = torch.randn(2, 5, 32)
    moe(x)
    logits = (x @ moe.router.weight.T).reshape(10, 4).double()
    top = logits.topk(2, -1).indices
    # by hand: f_i = assignments to i / (tokens * k); P_i = mean full-softmax probability
    f = torch.tensor([(top == i).sum().item() / 20 for i in range(4)], dtype=torch.double)
    probs = torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)
    balance = 4 * sum(f[i] * probs[:, i].mean() for i in range(4))
    z = (torch.log(torch.exp(logits).sum(-1)) ** 2).mean()
    want = 0.01 * balance + 0.001 * z
    assert moe.aux_loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert load_balancing_loss(logits, top, 4).item() == pytest.approx(balance.item(), rel=1e-9)
    assert router_z_loss(logits).item() == pytest.approx(z.item(), rel=1e-9)
    # uniform routing gives a balance loss of exactly 1
    uni = torch.zeros(8, 4, dtype=torch.double)
    assert load_balancing_loss(uni, torch.arange(8)[:, None] % 4, 4).item() == pytest.approx(1.0)
    moe.eval()
    moe(x)
    assert moe.aux_loss is None


def test_aux_loss_enters_training_loss_and_router_gets_gradients():
    m = model(moe_aux_coef=0.5, moe_z_coef=0.1).train()
    tokens = torch.randint(0, 256, (2, 12))
    loss = m(tokens, return_type="loss")
    aux = sum(b.moe.aux_loss for b in m.blocks)
    lm = GPT.loss_fn(m.eval()(tokens), tokens)
    assert loss.item() == pytest.approx(lm.item() + aux.item(), rel=1e-5)
    m.train()
    m(tokens, return_type="loss").backward()
    for b in m.blocks:
        g = b.moe.router.weight.grad
        assert g is not None and g.abs().sum() > 0
    # the LM loss alone (no aux terms) also reaches the router through the top-k weights
    m.zero_grad()
    GPT.loss_fn(m(tokens), tokens).backward()
    assert m.blocks[0].moe.router.weight.grad.abs().sum() > 0


def test_metrics_keys_and_values():
    m = model().train()
    assert m.arch_metrics() == {}
    tokens = torch.randint(0, 256, (4, 16))
    for _ in range(3):
        m(tokens, return_type="loss")
    met = m.arch_metrics()
    for i in range(2):
        loads = [met[f"moe/l{i}/load_e{j}"] for j in range(4)]
        assert sum(loads) == pytest.approx(1.0)
        assert 0.0 <= met[f"moe/l{i}/entropy"] <= 1.0
        assert met[f"moe/l{i}/dead"] == float(sum(x == 0 for x in loads))  # 3 identical batches
        st = m.blocks[i].moe.load_stats()
        frac = torch.tensor(st["load"])
        nz = frac[frac > 0]
        assert met[f"moe/l{i}/entropy"] == pytest.approx(float(-(nz * nz.log()).sum() / math.log(4)))
    m.eval()
    m(tokens)
    assert m.arch_metrics() == met  # eval forwards do not count


def test_collapse_warning_fires_once_and_rearms():
    m = model(moe_topk=1).train()
    moe = m.blocks[0].moe
    tokens = torch.randint(0, 256, (2, 16))
    # force every token to expert 0
    moe.hook_router_logits.add_hook(lambda lg, hook: lg + torch.tensor([100.0, 0, 0, 0]))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(LOAD_WINDOW):
            m(tokens, return_type="loss")
            m.arch_metrics()
    hits = [w for w in rec if issubclass(w.category, RoutingCollapseWarning)]
    assert len(hits) == 1, [str(w.message) for w in rec]
    assert "layer 0" in str(hits[0].message)
    st = moe.load_stats()
    assert st["entropy"] < COLLAPSE_ENTROPY and st["dead"] == 3
    assert not any(issubclass(w.category, RoutingCollapseWarning) and "layer 1" in str(w.message) for w in rec)
    # recovery (balanced routing for a full window) re-arms the warning
    moe.hook_router_logits.remove_hooks()
    with torch.no_grad():
        moe.router.weight.normal_(0, 0.02)
    toks = torch.randint(0, 256, (8, 32))
    for _ in range(LOAD_WINDOW):
        m(toks, return_type="loss")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        m.arch_metrics()
    assert not rec and not moe._collapsed


def test_training_run_logs_moe_metrics(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("To be, or not to be, that is the question.\n" * 40)
    res = tinygpt.train(
        model=model(), corpus=str(corpus), steps=3, batch_size=2, ctx=16, val_every=0, progress=False, warmup=1,
        cache_dir=tmp_path / "cache",
    )  # fmt: skip
    assert {"moe/l0/entropy", "moe/l1/dead", "moe/l1/load_e3"} <= set(res.history[-1])


def test_save_load_round_trip(tmp_path):
    m = model().eval()
    tokens = torch.randint(0, 256, (2, 10))
    path = tmp_path / "m.tinygpt"
    tinygpt.save(m, path)
    back = tinygpt.load(path)
    assert back.cfg.moe_experts == 4 and back.cfg.moe_topk == 2
    assert isinstance(back.blocks[1].moe, MoE)
    with torch.no_grad():
        torch.testing.assert_close(back(tokens), m(tokens), atol=0, rtol=0)


def test_generation_cache_equals_full_forward():
    m = model().eval()
    tokens = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        full = m(tokens)
        cache = m.make_cache(2)
        steps = [m(tokens[:, :5], past_kv_cache=cache)]
        steps += [m(tokens[:, i : i + 1], past_kv_cache=cache) for i in range(5, 12)]
        inc = torch.cat(steps, 1)
    torch.testing.assert_close(inc, full, atol=1e-5, rtol=1e-5)
    a = m.generate(tokens[:1, :3], 8, seed=1)
    b = m.generate(tokens[:1, :3], 8, seed=1, use_cache=False)
    assert torch.equal(a, b) and a.shape == (1, 11)


def test_bfloat16_autocast_keeps_router_in_fp32():
    m = model().train()
    tokens = torch.randint(0, 256, (2, 8))
    store = {}

    def grab(x, hook):
        store["dtype"] = x.dtype

    m.blocks[0].moe.hook_router_logits.add_hook(grab)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m(tokens, return_type="loss")
    loss.backward()
    assert store["dtype"] == torch.float32 and torch.isfinite(loss)


def test_cli_train_moe(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TINYGPT_CACHE_DIR", str(tmp_path / "cache"))
    corpus = tmp_path / "c.txt"
    corpus.write_text("To be, or not to be, that is the question.\n" * 60)
    out = tmp_path / "moe.tinygpt"
    argv = ["train", "--preset", "nano", "--moe-experts", "4", "--moe-topk", "2", "--steps", "20", "--corpus",
            str(corpus), "--batch", "2", "--ctx", "32", "--warmup", "2", "--val-every", "0", "--out", str(out),
            "--no-progress", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    assert "done: step 20" in capsys.readouterr().out
    back = tinygpt.load(out)
    assert back.cfg.moe_experts == 4 and back.cfg.moe_topk == 2
    hist = back.train_state["history"]
    assert len(hist) == 20 and "moe/l1/entropy" in hist[-1]
    assert main(["inspect", str(out)]) == 0
    assert "blocks.1.moe.experts.3.fc_out.bias" in capsys.readouterr().out
