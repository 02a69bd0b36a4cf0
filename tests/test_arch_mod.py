"""Mixture-of-Depths (`tinygpt.arch.mod`): routing, real compute saving, causal predictor, KV cache, combos."""

from __future__ import annotations

import re

import pytest
import torch

import tinygpt
from tinygpt import GPT, GPTConfig
from tinygpt.arch.mod import (
    MOD_AUX_COEF,
    MoDBlock,
    RoutedKV,
    capacity_k,
    routing,
    routing_agreement,
    set_routing,
)
from tinygpt.arch.moe import MoE
from tinygpt.cli import main
from tinygpt.model import Block

CFG = GPTConfig(n_layers=4, d_model=32, n_heads=2, d_mlp=40, n_ctx=64, mod=True, mod_capacity=0.25)


def model(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(CFG.replace(**kw))


def balanced_router(m: GPT, seed: int = 1) -> GPT:
    """Router weights large enough that the predictor (r > 0) routes a mix of tokens in every row."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for blk in m.blocks:
            if isinstance(blk, MoDBlock):
                blk.router.weight.copy_(torch.randn(blk.router.weight.shape, generator=g) * 3.0)
    return m


def reference_block(blk: MoDBlock, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row by row: run the block's parts on the routed tokens in causal order, gate by sigmoid(r)."""
    out = x.clone()
    ffn = getattr(blk, blk._ffn_name)
    for row in range(x.shape[0]):
        pos = mask[row].nonzero().squeeze(1)
        if pos.numel() == 0:
            continue
        xs = x[row : row + 1, pos]
        g = torch.sigmoid(blk.router(xs))  # [1, k, 1]
        mid = xs + g * blk.attn(blk.ln1(xs))
        out[row, pos] = (mid + g * ffn(blk.ln2(mid)))[0]
    return out


def test_routed_layers_and_names_in_inspect(tmp_path):
    m = model()
    assert [isinstance(b, MoDBlock) for b in m.blocks] == [False, True, False, True]  # i % 2 == 1
    assert all(isinstance(b, Block) for b in m.blocks)
    assert [isinstance(b, MoDBlock) for b in model(mod_every=3, n_layers=6).blocks] == [0, 0, 1, 0, 0, 1]
    assert all(isinstance(b, MoDBlock) for b in model(mod_every=1).blocks)
    path = tmp_path / "mod.tinygpt"
    tinygpt.save(m, path)
    text = tinygpt.describe(path)
    for i in (1, 3):
        assert re.search(rf"^blocks\.{i}\.router\.weight\s+float32\s+\[1, 32\]", text, re.M)
        assert f"blocks.{i}.router.bias" in text
        assert f"blocks.{i}.attn.q_proj.weight" in text and f"blocks.{i}.mlp.fc_in.weight" in text
    assert "blocks.0.router" not in text and "blocks.2.router" not in text
    assert "mod=True" in text and "mod_capacity=0.25" in text


def test_capacity_k():
    assert capacity_k(0.125, 128) == 16
    assert capacity_k(0.125, 20) == 3
    assert capacity_k(0.1, 30) == 3  # no float round-up to 4
    assert capacity_k(0.125, 1) == 1
    assert capacity_k(1.0, 7) == 7


def test_only_k_tokens_are_computed():
    m = model().train()
    tokens = torch.randint(0, 256, (3, 20))
    k = capacity_k(0.25, 20)
    fed = {}

    def record(key):
        def hook(mod, inp, out):
            fed[key] = tuple(inp[0].shape)

        return hook

    for i, blk in enumerate(m.blocks):
        blk.mlp.fc_in.register_forward_hook(record(i))
        blk.attn.q_proj.register_forward_hook(record(f"q{i}"))
    m(tokens, return_type="loss")
    assert fed[0] == fed["q0"] == (3, 20, 32)  # dense block
    assert fed[1] == fed["q1"] == (3, k, 32)  # routed: attention and MLP see k = 5 tokens
    assert fed[3] == fed["q3"] == (3, k, 32)
    _, cache = m.eval().run_with_cache(tokens)  # eval: causal routing, counts vary per row
    mask = cache["blocks.1.hook_routing_mask"]
    assert mask.shape == (3, 20) and mask.dtype == torch.bool
    assert cache["blocks.1.hook_router_scores"].shape == (3, 20)
    assert cache["blocks.1.attn.hook_q"].shape[1] == int(mask.sum(1).max())
    assert cache["blocks.1.hook_resid_post"].shape == (3, 20, 32)
    with routing(m, "topk"):
        _, cache = m.run_with_cache(tokens)
    assert cache["blocks.1.hook_routing_mask"].sum(1).tolist() == [k] * 3
    assert cache["blocks.1.attn.hook_pattern"].shape == (3, 2, k, k)
    assert cache["blocks.1.mlp.hook_pre"].shape == (3, k, 40)


@pytest.mark.parametrize("mode", ["topk", "predictor"])
def test_block_equals_reference_and_skipped_tokens_pass_unchanged(mode):
    m = balanced_router(model()).eval()
    tokens = torch.randint(0, 256, (3, 17))
    blk = m.blocks[1]
    with routing(m, mode), torch.no_grad():
        _, cache = m.run_with_cache(tokens)
    x, mask = cache["blocks.1.hook_resid_pre"], cache["blocks.1.hook_routing_mask"]
    r = cache["blocks.1.hook_router_scores"]
    post = cache["blocks.1.hook_resid_post"]
    if mode == "topk":
        assert mask.sum(1).tolist() == [capacity_k(0.25, 17)] * 3
        assert torch.equal(mask, r >= r.topk(capacity_k(0.25, 17), -1).values[:, -1:])
    else:
        assert torch.equal(mask, r > 0)
        assert len(set(mask.sum(1).tolist())) > 1  # rows route different counts: padding is exercised
    assert torch.equal(post[~mask], x[~mask])  # bit for bit
    assert not torch.allclose(post[mask], x[mask])
    with torch.no_grad():
        torch.testing.assert_close(post, reference_block(blk, x, mask), atol=1e-5, rtol=1e-5)
    # the block hooks stay exact
    assert torch.equal(cache["blocks.1.hook_resid_mid"], x + cache["blocks.1.hook_attn_out"])
    assert torch.equal(post, cache["blocks.1.hook_resid_mid"] + cache["blocks.1.hook_mlp_out"])
    assert cache["blocks.1.hook_attn_out"][~mask].abs().max() == 0


def test_routing_mask_hook_changes_routing():
    m = model().eval()
    tokens = torch.randint(0, 256, (2, 9))
    seen = {}

    def route_all(mask, hook):
        seen["mask"] = mask.clone()
        return torch.ones_like(mask, dtype=torch.float)  # a float mask is accepted (> 0.5 = routed)

    def grab(x, hook):
        seen[hook.name] = x.clone()

    with torch.no_grad():
        m.run_with_hooks(
            tokens,
            return_type=None,
            fwd_hooks=[
                ("blocks.1.hook_routing_mask", route_all),
                ("blocks.1.hook_resid_pre", grab),
                ("blocks.1.hook_resid_post", grab),
                ("blocks.1.attn.hook_q", grab),
            ],
        )
        want = reference_block(m.blocks[1], seen["blocks.1.hook_resid_pre"], torch.ones(2, 9, dtype=torch.bool))
    assert not bool(seen["mask"].all())  # the model itself would have skipped some tokens
    assert seen["blocks.1.attn.hook_q"].shape == (2, 9, 2, 16)
    torch.testing.assert_close(seen["blocks.1.hook_resid_post"], want, atol=1e-5, rtol=1e-5)


def test_router_gets_gradient_from_lm_loss_and_bce():
    m = model().train()
    tokens = torch.randint(0, 256, (2, 16))
    GPT.loss_fn(m(tokens), tokens).backward(retain_graph=True)  # the LM loss alone, through the sigmoid gate
    g_lm = m.blocks[1].router.weight.grad.clone()
    assert g_lm.abs().sum() > 0 and m.blocks[3].router.weight.grad.abs().sum() > 0
    m.zero_grad()
    m.blocks[1].aux_loss.backward()  # the BCE alone
    assert m.blocks[1].router.weight.grad.abs().sum() > 0 and m.blocks[1].router.bias.grad.abs() > 0
    # the training loss is LM + the BCE terms of both routed blocks
    m.zero_grad()
    loss = m(tokens, return_type="loss")
    aux = m.blocks[1].aux_loss + m.blocks[3].aux_loss
    with torch.no_grad():
        lm = GPT.loss_fn(m(tokens), tokens)
    assert loss.item() == pytest.approx(lm.item() + aux.item(), rel=1e-5)
    assert aux.item() == pytest.approx(2 * MOD_AUX_COEF * 0.6931, rel=0.05)  # BCE ~ log 2 at init


def test_metrics_and_bce_training_raises_agreement():
    torch.manual_seed(0)
    m = GPT(CFG.replace(n_layers=2, mod_every=1))
    assert m.arch_metrics() == {}
    ev = torch.randint(0, 256, (16, 32))
    before = routing_agreement(m, ev)
    assert set(before) == {"mod/l0/agreement", "mod/l0/recall", "mod/l1/agreement", "mod/l1/recall", "mod/agreement"}
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    m.train()
    for _ in range(80):
        loss = m(torch.randint(0, 256, (8, 32)), return_type="loss")
        opt.zero_grad()
        loss.backward()
        opt.step()
    met = m.arch_metrics()
    assert set(met) == {f"mod/l{i}/{k}" for i in (0, 1) for k in ("agreement", "predicted", "bce")}
    after = routing_agreement(m, ev)
    chance = 1 - CFG.mod_capacity  # predicting "skip" for every token
    assert after["mod/agreement"] > max(before["mod/agreement"] + 0.1, chance + 0.1)
    for i in (0, 1):
        assert after[f"mod/l{i}/agreement"] > chance + 0.05
        assert after[f"mod/l{i}/recall"] > 0.5
    assert m.training  # routing_agreement restores the mode


def test_kv_cache_equals_full_forward_with_predictor_routing(decode_in_chunks):
    m = balanced_router(model()).eval()
    tokens = torch.randint(0, 256, (3, 20))
    with torch.no_grad():
        full = m(tokens)  # eval: predictor routing
        with routing(m, "predictor"):
            assert torch.equal(m(tokens), full)
        inc, cache = decode_in_chunks(m, tokens, [6] + [1] * 10 + [4])
        _, hooks = m.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_routing_mask"))
    torch.testing.assert_close(inc, full, atol=1e-5, rtol=1e-5)
    # only routed tokens entered the routed layers' caches, and each row keeps its own length
    for i in (1, 3):
        st = cache.routed_layers[i]
        assert isinstance(st, RoutedKV)
        assert st.lengths == hooks[f"blocks.{i}.hook_routing_mask"].sum(1).tolist()
        assert 0 < min(st.lengths) < 20 and len(set(st.lengths)) > 1
    # batch 1, token by token
    with torch.no_grad():
        inc1, _ = decode_in_chunks(m, tokens[1:2], [1] * 20)
    torch.testing.assert_close(inc1, full[1:2], atol=1e-5, rtol=1e-5)


def test_topk_routing_refuses_a_kv_cache():
    m = model().eval()
    set_routing(m, "topk")
    with pytest.raises(ValueError, match="not causal"):
        m(torch.randint(0, 256, (1, 4)), past_kv_cache=m.make_cache(1))
    with pytest.raises(ValueError, match="routing must be one of"):
        set_routing(m, "random")


def test_generation_cached_equals_uncached_also_after_context_crop():
    m = balanced_router(model(n_ctx=16)).eval()
    prompt = torch.randint(0, 256, (2, 5))
    a = m.generate(prompt, 30, seed=3)  # 35 > n_ctx: the context is cropped and re-encoded
    b = m.generate(prompt, 30, seed=3, use_cache=False)
    assert a.shape == (2, 35) and torch.equal(a, b)
    text = m.generate("To be", 10, seed=0)
    assert isinstance(text, str) and text.startswith("To be")


def test_moe_plus_mod(decode_in_chunks):
    m = balanced_router(model(moe_experts=4, moe_topk=2)).train()
    assert isinstance(m.blocks[1], MoDBlock) and isinstance(m.blocks[1].moe, MoE)
    assert "blocks.1.moe.router.weight" in dict(m.named_parameters())
    assert "blocks.1.router.weight" in dict(m.named_parameters())
    tokens = torch.randint(0, 256, (2, 16))
    loss = m(tokens, return_type="loss")
    loss.backward()
    assert m.blocks[1].moe.aux_loss is not None and m.blocks[1].aux_loss is not None
    assert m.blocks[1].router.weight.grad.abs().sum() > 0 and m.blocks[1].moe.router.weight.grad.abs().sum() > 0
    met = m.arch_metrics()
    assert "mod/l1/agreement" in met and "moe/l1/entropy" in met and "moe/l0/entropy" in met
    # the routed block's MoE only sees the routed tokens
    _, cache = m.eval().run_with_cache(tokens)
    mask = cache["blocks.1.hook_routing_mask"]
    assert cache["blocks.1.moe.hook_router_logits"].shape == (2, int(mask.sum(1).max()), 4)
    with torch.no_grad():
        full = m(tokens)
        inc, _ = decode_in_chunks(m, tokens, [5] + [1] * 11)
    torch.testing.assert_close(inc, full, atol=1e-5, rtol=1e-5)


def test_diff_attn_plus_mod_plus_moe(decode_in_chunks):
    from tinygpt.arch.diff_attn import DiffAttention

    m = balanced_router(model(diff_attn=True, moe_experts=3, moe_topk=1)).train()
    assert isinstance(m.blocks[1], MoDBlock) and isinstance(m.blocks[1].attn, DiffAttention)
    assert isinstance(m.blocks[1].moe, MoE)
    tokens = torch.randint(0, 256, (2, 12))
    m(tokens, return_type="loss").backward()
    assert m.blocks[1].router.weight.grad.abs().sum() > 0
    m.eval()
    with torch.no_grad():
        full = m(tokens)
        inc, _ = decode_in_chunks(m, tokens, [4] + [1] * 8)
    torch.testing.assert_close(inc, full, atol=1e-5, rtol=1e-5)
    with torch.no_grad(), routing(m, "topk"):
        _, cache = m.run_with_cache(tokens)
    k = capacity_k(0.25, 12)
    assert cache["blocks.1.attn.hook_pattern"].shape == (2, 2, k, k)  # the differential map, routed tokens only


def test_save_load_round_trip(tmp_path):
    m = balanced_router(model(moe_experts=2, moe_topk=1)).eval()
    tokens = torch.randint(0, 256, (2, 10))
    path = tmp_path / "m.tinygpt"
    tinygpt.save(m, path)
    back = tinygpt.load(path)
    assert back.cfg.mod and back.cfg.mod_capacity == 0.25 and back.cfg.mod_every == 2
    assert isinstance(back.blocks[3], MoDBlock)
    with torch.no_grad():
        assert torch.equal(back(tokens), m(tokens))
        with routing(back, "topk"), routing(m, "topk"):
            assert torch.equal(back(tokens), m(tokens))


def test_cli_train_mod(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TINYGPT_CACHE_DIR", str(tmp_path / "cache"))
    corpus = tmp_path / "c.txt"
    corpus.write_text("To be, or not to be, that is the question.\n" * 60)
    out = tmp_path / "mod.tinygpt"
    argv = ["train", "--preset", "nano", "--mod", "--mod-capacity", "0.25", "--steps", "20", "--corpus",
            str(corpus), "--batch", "2", "--ctx", "32", "--warmup", "2", "--val-every", "10", "--val-split", "0.1",
            "--out", str(out), "--no-progress", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    assert re.search(r"done: step 20.*val loss \d", capsys.readouterr().out)
    back = tinygpt.load(out)
    assert back.cfg.mod and back.cfg.mod_capacity == 0.25
    hist = back.train_state["history"]
    assert "mod/l1/agreement" in hist[-1] and 0.0 <= hist[-1]["mod/l1/agreement"] <= 1.0
    assert main(["sample", str(out), "--tokens", "12", "--seed", "1", "--prompt", "To"]) == 0
    assert "To" in capsys.readouterr().out
