"""`tinygpt.model.loss.linear_cross_entropy` (chunked linear + cross-entropy) against the unfused loss, and the
rule that `GPT.forward(..., return_type="loss")` uses it only when nothing observes the logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tinygpt import GPT, GPTConfig
from tinygpt.model import loss as loss_mod
from tinygpt.model.loss import chunk_rows, linear_cross_entropy

N, D, V = 70, 24, 300  # 70 tokens in chunks of 16: four full chunks and a partial one


def _data(dtype=torch.float32, seed=0, ignore_every=5):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, D, generator=g) * 0.5).to(dtype).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    if ignore_every:
        t[::ignore_every] = -100
    return h, w, t


def _grads(loss_fn, h, w, t, reduction, upstream):
    h.grad = w.grad = None
    out = loss_fn(h, w, t, reduction)
    (out * upstream).sum().backward()
    return out.detach(), h.grad.clone(), w.grad.clone()


def _unfused(h, w, t, reduction):
    return F.cross_entropy(F.linear(h, w).float(), t, ignore_index=-100, reduction=reduction)


def _chunked(h, w, t, reduction):
    return linear_cross_entropy(h, w, t, reduction=reduction, chunk=16)


def _close(a, b, rtol, atol=1e-9):
    """max |a - b| <= rtol * max |b| + atol (a gradient that is zero in exact arithmetic is float noise in both)."""
    scale = b.float().abs().max()
    err = (a.float() - b.float()).abs().max()
    assert err <= rtol * scale + atol, (err, scale)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_equals_unfused_loss_and_gradients_fp32(reduction):
    h, w, t = _data()
    upstream = torch.randn(N) if reduction == "none" else torch.tensor(0.37)
    ref = _grads(_unfused, h, w, t, reduction, upstream)
    got = _grads(_chunked, h, w, t, reduction, upstream)
    for a, b in zip(got, ref):
        _close(a, b, 2e-6)
    if reduction == "none":
        assert torch.all(got[0][t == -100] == 0)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_equals_unfused_in_bf16(reduction):
    """bf16 weights: the matmuls in bf16, the softmax in fp32, both paths; they agree to bf16 rounding and the
    gradients come back in bf16."""
    h, w, t = _data(torch.bfloat16)
    upstream = torch.randn(N) if reduction == "none" else torch.tensor(1.0)
    ref = _grads(_unfused, h, w, t, reduction, upstream)
    got = _grads(_chunked, h, w, t, reduction, upstream)
    assert got[1].dtype == got[2].dtype == torch.bfloat16
    _close(got[0], ref[0], 1e-5)  # the same bf16 logits, so the same fp32 loss
    for a, b in zip(got[1:], ref[1:]):
        _close(a, b, 2**-6)


def test_follows_autocast():
    """Under bf16 autocast with fp32 weights it computes as the unfused path does (bf16 matmuls) and returns fp32
    gradients."""
    h, w, t = _data()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _grads(_unfused, h, w, t, "mean", torch.tensor(1.0))
        got = _grads(_chunked, h, w, t, "mean", torch.tensor(1.0))
    assert got[1].dtype == got[2].dtype == torch.float32
    _close(got[0], ref[0], 1e-5)
    for a, b in zip(got[1:], ref[1:]):
        _close(a, b, 2**-6)
    fp32 = _grads(_unfused, h, w, t, "mean", torch.tensor(1.0))
    assert (got[0] - fp32[0]).abs() > 0  # it really ran in bf16


def test_chunking_is_invisible():
    h, w, t = _data()
    losses = [linear_cross_entropy(h, w, t, chunk=c).item() for c in (1, 7, 16, N, 10 * N)]
    assert max(losses) - min(losses) < 1e-5
    assert chunk_rows(100_000, 49152) == 512 and chunk_rows(10, 49152) == 10 and chunk_rows(10**6, 256) == 98304


def test_no_grad_and_frozen_weight():
    h, w, t = _data()
    with torch.no_grad():
        a = linear_cross_entropy(h, w, t, chunk=16, reduction="none")
    assert not a.requires_grad
    _close(a, _unfused(h, w, t, "none").detach(), 2e-6)
    w.requires_grad_(False)
    h.grad = None
    linear_cross_entropy(h, w, t, chunk=16).backward()
    ref = h.detach().clone().requires_grad_()
    _unfused(ref, w, t, "mean").backward()
    _close(h.grad, ref.grad, 2e-6)


def test_retain_graph_backward_twice():
    h, w, t = _data()
    out = linear_cross_entropy(h, w, t, chunk=16)
    out.backward(retain_graph=True)
    first = w.grad.clone()
    out.backward()
    _close(w.grad, 2 * first, 1e-6)


def test_bad_reduction():
    h, w, t = _data()
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, t, reduction="avg")


# ------------------------------------------------------------------------------------------------ GPT.forward
CFG = GPTConfig(n_layers=2, d_model=24, n_heads=3, d_mlp=40, n_ctx=32, d_vocab=300)


def _model(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(CFG.replace(**kw)).train()


def _step_grads(model, x, y, **kw):
    model.zero_grad(set_to_none=True)
    loss = model(x, return_type="loss", targets=y, **kw)
    loss.sum().backward() if loss.ndim else loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def xy():
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 300, (3, 20), generator=g)
    y = torch.randint(0, 300, (3, 20), generator=g)
    y[:, :4] = -100
    return x, y


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("per_token", [False, True])
def test_model_loss_path_matches_logits_path(xy, tied, per_token):
    """The chunked path `train()` uses gives the logits path's loss and every parameter's gradient."""
    x, y = xy
    model = _model(tie_embeddings=tied)
    assert model.logits_unobserved()
    got, g_got = _step_grads(model, x, y, loss_per_token=per_token)
    with torch.no_grad():
        assert torch.equal(model(x, return_type="loss", targets=y), model(x, return_type="loss", targets=y))
    logits = model(x)
    ref = GPT.loss_fn(logits, x, y, per_token=per_token)
    model.zero_grad(set_to_none=True)
    ref.sum().backward() if per_token else ref.backward()
    assert got.shape == ref.shape
    _close(got, ref.detach(), 2e-6)
    assert set(g_got) == {n for n, p in model.named_parameters() if p.grad is not None}
    for n, p in model.named_parameters():
        _close(g_got[n], p.grad, 1e-5)


def test_model_shifted_targets(xy):
    x, _ = xy
    model = _model()
    with torch.no_grad():
        a = model(x, return_type="loss")
        b = GPT.loss_fn(model(x), x)
    _close(a, b, 2e-6)


def test_hooked_unembed_gets_the_logits(xy, monkeypatch):
    """A forward hook on `unembed` (torch's, nnsight's) sees the logits: the chunked path stands aside."""
    x, y = xy
    model = _model()
    calls = []
    import tinygpt.model.gpt as gpt_mod

    real = loss_mod.linear_cross_entropy
    monkeypatch.setattr(gpt_mod, "linear_cross_entropy", lambda *a, **k: calls.append(1) or real(*a, **k))
    model(x, return_type="loss", targets=y)
    assert calls == [1]
    seen = []
    handle = model.unembed.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    try:
        assert not model.logits_unobserved()
        loss = model(x, return_type="loss", targets=y)
        assert seen == [(3, 20, 300)] and calls == [1] and loss.item() > 0
    finally:
        handle.remove()
    model.unembed.forward = lambda inp: nn.Linear.forward(model.unembed, inp)  # an instance-level forward
    assert not model.logits_unobserved()


def test_swapped_unembed_uses_its_own_forward(xy):
    """An unembedding that is not a plain nn.Linear (LoRA, surgery) keeps the logits path."""
    x, y = xy
    model = _model()

    class Doubled(nn.Linear):
        def forward(self, inp):
            return 2 * super().forward(inp)

    swapped = Doubled(24, 300, bias=False)
    swapped.weight = model.unembed.weight
    model.unembed = swapped
    assert not model.logits_unobserved()
    with torch.no_grad():
        _close(model(x, return_type="loss", targets=y), GPT.loss_fn(model(x), x, y), 1e-6)


def test_bf16_model(xy):
    x, y = xy
    model = _model(dtype="bfloat16")
    got, grads = _step_grads(model, x, y)
    model.zero_grad(set_to_none=True)
    ref = GPT.loss_fn(model(x), x, y)
    ref.backward()
    _close(got, ref.detach(), 1e-2)
    assert grads["unembed.weight"].dtype == torch.bfloat16
    _close(grads["unembed.weight"], model.unembed.weight.grad, 2**-5)


def test_extreme_logits_keep_their_loss():
    """A target whose probability underflows fp32 (a loss of hundreds of nats) still gets the exact loss."""
    h, w, t = _data(ignore_every=0)
    big = (w * 200).detach().requires_grad_()
    ref = _unfused(h, big, t, "none").detach()
    assert ref.max() > 100
    _close(linear_cross_entropy(h, big, t, reduction="none", chunk=16).detach(), ref, 1e-5)
