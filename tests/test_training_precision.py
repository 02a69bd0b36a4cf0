"""`tinygpt.training.precision`: bf16 weights with fp32 masters (`param_dtype="bfloat16"`) and the compiled
forward (`compile=True`) that steps aside when anything is hooked."""

from __future__ import annotations

import pytest
import torch

from tinygpt import GPT, GPTConfig, load, train
from tinygpt.training import TrainConfig
from tinygpt.training.precision import MasterWeights, compiled_forward, hooked

pytestmark = pytest.mark.usefixtures("isolated_cache")


def _run(corpus, tmp_path, **kw):
    settings = dict(
        preset="nano", steps=4, batch_size=2, ctx=32, warmup=1, val_every=0, val_split=0.1, val_batches=1,
        device="cpu", progress=False, cache_dir=tmp_path / "cache",
    )  # fmt: skip
    settings.update(kw)
    return train(corpus=corpus, **settings)


def test_master_weights_round_trip():
    """Parameters become bf16 with exact fp32 masters; restore() puts the very fp32 values back (buffers too)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layers=1, d_model=16, n_heads=2, n_ctx=16, d_vocab=50))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.ln_final.weight.requires_grad_(False)  # a frozen parameter is cast and restored, without a master
    mw = MasterWeights(model)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert len(mw.masters) == sum(1 for p in model.parameters() if p.requires_grad)
    full = mw.state_dict()
    assert set(full) == set(before) and all(torch.equal(full[k], before[k]) for k in before)
    x = torch.randint(0, 50, (2, 8))
    model(x, return_type="loss").backward()
    mw.grads_to_masters()
    assert all(m.grad is not None and m.grad.dtype == torch.float32 for m in mw.masters)
    assert all(p.grad is None for p in model.parameters())
    mw.restore()
    assert all(torch.equal(v, before[k]) and v.dtype == before[k].dtype for k, v in model.state_dict().items())


def test_bf16_weights_train_like_autocast(make_corpus, tmp_path):
    """param_dtype="bfloat16" learns as autocast does (same data and init), ends an fp32 model, and its checkpoint
    holds the fp32 masters (the returned model's weights, bit for bit)."""
    corpus = make_corpus()
    auto = _run(corpus, tmp_path / "a", dtype="bfloat16", steps=6)
    bf16 = _run(corpus, tmp_path / "b", dtype="bfloat16", param_dtype="bfloat16", steps=6, out=tmp_path / "b.tinygpt")
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())
    la, lb = auto.losses, bf16.losses
    assert abs(la[0] - lb[0]) < 0.05  # the same initial loss, to bf16 rounding
    assert lb[-1] < lb[0] - 0.3 and abs(la[-1] - lb[-1]) < 0.15
    saved = load(tmp_path / "b.tinygpt")
    for k, v in bf16.model.state_dict().items():
        assert torch.equal(saved.state_dict()[k], v), k
    assert TrainConfig(param_dtype="bfloat16").param_dtype == "bfloat16"
    with pytest.raises(ValueError, match="param_dtype"):
        TrainConfig(param_dtype="fp8")


def test_bf16_weights_resume_exactly(make_corpus, tmp_path):
    corpus = make_corpus()
    kw = dict(dtype="bfloat16", param_dtype="bfloat16", steps=4)
    whole = _run(corpus, tmp_path / "w", out=tmp_path / "w.tinygpt", **kw)
    _run(corpus, tmp_path / "h", out=tmp_path / "h.tinygpt", **{**kw, "steps": 2})
    resumed = _run(corpus, tmp_path / "h", out=tmp_path / "h.tinygpt", resume=True, **kw)
    assert resumed.losses == whole.losses
    for k, v in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k


def test_hooked_sees_every_kind_of_hook():
    model = GPT(GPTConfig(n_layers=1, d_model=16, n_heads=2, n_ctx=16, d_vocab=50))
    assert not hooked(model)
    h = model.blocks[0].mlp.register_forward_hook(lambda *a: None)
    assert hooked(model)
    h.remove()
    model.blocks[0].hook_resid_pre.add_hook(lambda t, hook: t, dir="bwd")
    assert hooked(model)
    model.reset_hooks()
    h = model.register_forward_pre_hook(lambda *a: None)
    assert hooked(model)
    h.remove()
    assert not hooked(model)


def test_compiled_forward_falls_back_when_hooked(monkeypatch):
    """Unhooked calls go to the compiled function; a hooked call (or a KV cache) runs eager and its hooks fire;
    the model's own forward is back afterwards."""
    model = GPT(GPTConfig(n_layers=1, d_model=16, n_heads=2, n_ctx=16, d_vocab=50))
    calls = []

    def fake_compile(fn, **kw):
        def compiled(*a, **k):
            calls.append("compiled")
            return fn(*a, **k)

        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    x = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        ref = model(x)
        with compiled_forward(model):
            assert torch.equal(model(x), ref) and calls == ["compiled"]
            seen = []
            model.blocks[0].hook_resid_post.add_hook(lambda t, hook: seen.append(t.shape))
            assert torch.equal(model(x), ref) and calls == ["compiled"] and seen == [(2, 8, 16)]
            model.reset_hooks()
            model(x[:, :4], past_kv_cache=model.make_cache(2))
            assert calls == ["compiled"]
        assert "forward" not in model.__dict__
        with compiled_forward(model, enabled=False):
            model(x)
        assert calls == ["compiled"]


@pytest.mark.slow
def test_compile_true_trains_like_eager(make_corpus, tmp_path):
    """A real torch.compile (slow: minutes on a loaded 2-core machine): same losses as eager to float rounding."""
    corpus = make_corpus()
    eager = _run(corpus, tmp_path / "e", steps=2)
    comp = _run(corpus, tmp_path / "c", steps=2, compile=True)
    assert max(abs(a - b) for a, b in zip(eager.losses, comp.losses)) < 1e-4
    assert "forward" not in comp.model.__dict__
