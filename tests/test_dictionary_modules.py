"""tinygpt.dictionary.modules: each architecture's forward against its formula, hooks, configs, estimators."""

import pytest
import torch

from tinygpt.dictionary import ARCHS, DictionaryConfig, DictionaryError, make_dictionary
from tinygpt.dictionary.modules import _JumpReLU, batch_topk, jumprelu_l0


def _sae(arch, **kw):
    cfg = dict(arch=arch, d_in=12, d_sae=40, hook="blocks.0.hook_resid_post", k=5)
    cfg.update(kw)
    sae = make_dictionary(DictionaryConfig(**cfg), seed=1)
    with torch.no_grad():  # non-trivial biases, scales and thresholds
        g = torch.Generator().manual_seed(2)
        sae.b_enc.copy_(torch.randn(sae.d_sae, generator=g) * 0.1)
        sae.b_dec.copy_(torch.randn(sae.d_out, generator=g) * 0.1)
        sae.in_scale.fill_(1.7)
        sae.out_scale.fill_(1.7 if not sae.cfg.transcoder else 0.6)
        if arch == "jumprelu":
            sae.threshold.copy_(torch.rand(sae.d_sae, generator=g) * 0.5)
        if arch == "batchtopk":
            sae.threshold.fill_(0.3)
        if sae.cfg.skip:
            sae.W_skip.copy_(torch.randn(sae.d_out, sae.d_in, generator=g) * 0.1)
    return sae


def _reference(sae, x):
    """The module docstring's formulas, written out."""
    c = sae.cfg
    xn = x * sae.in_scale
    pre = ((xn - sae.b_dec) if c.apply_b_dec_to_input else xn) @ sae.W_enc + sae.b_enc
    if c.arch == "topk":
        kth = pre.topk(c.k, dim=-1).values[..., -1:]
        acts = torch.where(pre >= kth, pre.relu(), torch.zeros_like(pre))
    elif c.arch in ("jumprelu", "batchtopk"):
        acts = torch.where(pre > sae.threshold, pre.relu(), torch.zeros_like(pre))
    else:
        acts = pre.relu()
    out = acts @ sae.W_dec + sae.b_dec
    if c.skip:
        out = out + xn @ sae.W_skip.T
    return acts, out / sae.out_scale


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_matches_the_formula(arch):
    sae = _sae(arch).eval()
    x = torch.randn(3, 7, 12, generator=torch.Generator().manual_seed(3))
    acts_ref, out_ref = _reference(sae, x)
    with torch.no_grad():
        acts = sae.encode(x)
        assert acts.shape == (3, 7, 40)
        torch.testing.assert_close(acts, acts_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sae(x), out_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sae.decode(acts), out_ref, rtol=1e-5, atol=1e-6)
    if arch == "topk":
        assert ((acts > 0).sum(-1) <= 5).all()


@pytest.mark.parametrize("arch", ["relu", "jumprelu"])
def test_transcoder_with_skip_matches_the_formula(arch):
    sae = _sae(arch, out_hook="blocks.0.hook_mlp_out", d_out=9, skip=True).eval()
    assert sae.cfg.transcoder and not sae.cfg.apply_b_dec_to_input and sae.W_dec.shape == (40, 9)
    x = torch.randn(4, 12)
    with torch.no_grad():
        torch.testing.assert_close(sae(x), _reference(sae, x)[1], rtol=1e-5, atol=1e-6)


def test_batchtopk_keeps_k_per_row_on_average_in_training():
    sae = _sae("batchtopk").train()
    x = torch.randn(16, 12)
    with torch.no_grad():
        acts = sae.encode(x)
    assert int((acts > 0).sum()) <= 5 * 16
    pre = sae.pre_acts(x * sae.in_scale).relu()
    kept = pre.flatten().topk(80).values
    assert torch.equal(acts.flatten().sort().values[-80:], kept.sort().values)
    assert torch.equal(batch_topk(torch.tensor([[3.0, 1.0], [2.0, 0.5]]), 1), torch.tensor([[3.0, 0.0], [2.0, 0.0]]))


def test_hook_points_carry_saelens_names_and_see_each_value():
    sae = _sae("topk")
    x = torch.randn(2, 12)
    out, cache = sae.run_with_cache(x, error_term=True)
    assert set(cache) == {
        "hook_sae_input",
        "hook_sae_acts_pre",
        "hook_sae_acts_post",
        "hook_sae_recons",
        "hook_sae_error",
        "hook_sae_output",
    }
    torch.testing.assert_close(cache["hook_sae_recons"] + cache["hook_sae_error"], x)
    assert torch.equal(out, x)  # error term: exactly the input
    acts_ref, recon_ref = _reference(sae, x)
    torch.testing.assert_close(cache["hook_sae_acts_post"], acts_ref.detach())
    torch.testing.assert_close(cache["hook_sae_recons"], recon_ref.detach())


def test_error_term_is_exact_and_edits_show_through():
    sae = _sae("relu")
    x = torch.randn(5, 12) * 30
    with torch.no_grad():
        assert torch.equal(sae(x, error_term=True), x)
    assert torch.equal(sae(x, error_term=True), x)  # with grad enabled too (the path that computes everything)

    def kill(t, hook):
        return torch.zeros_like(t)

    edited = sae.run_with_hooks(x, error_term=True, fwd_hooks=[("hook_sae_acts_post", kill)])
    with torch.no_grad():
        expect = x - (sae(x) - sae.decode(torch.zeros(5, 40)))  # the latents' whole contribution removed
    torch.testing.assert_close(edited, expect, rtol=1e-5, atol=1e-4)


def test_per_head_inputs_are_flattened():
    sae = make_dictionary(DictionaryConfig(arch="relu", d_in=8, d_sae=16, hook="blocks.0.attn.hook_z"))
    z = torch.randn(2, 3, 2, 4)
    with torch.no_grad():
        assert sae(z).shape == z.shape and sae.encode(z).shape == (2, 3, 16)
        assert torch.equal(sae(z, error_term=True), z)
    with pytest.raises(DictionaryError, match=r"\[\.\.\., 8\]"):
        sae.encode(torch.randn(2, 5))


def test_decoder_rows_start_at_unit_norm_and_folding_keeps_the_function():
    sae = _sae("jumprelu")
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(40))
    x = torch.randn(6, 12)
    w = sae.folded_weights()
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    acts = pre.relu() * (pre > w["threshold"])
    with torch.no_grad():
        torch.testing.assert_close(acts @ w["W_dec"] + w["b_dec"], sae(x), rtol=1e-5, atol=1e-5)


def test_jumprelu_estimator_gradients():
    pre = torch.tensor([[0.2, 0.52, 0.9]], requires_grad=True)
    th = torch.tensor([0.5, 0.5, 0.5], requires_grad=True)
    out = _JumpReLU.apply(pre, th, 0.1)
    assert torch.equal(out.detach(), torch.tensor([[0.0, 0.52, 0.9]]))
    out.sum().backward()
    assert torch.equal(pre.grad, torch.tensor([[0.0, 1.0, 1.0]]))
    # only |pre - th| < bandwidth / 2 contributes: d/dth = -(th / eps) per such entry
    torch.testing.assert_close(th.grad, torch.tensor([0.0, -5.0, 0.0]))
    th.grad = None
    jumprelu_l0(pre, th, 0.1).sum().backward()
    torch.testing.assert_close(th.grad, torch.tensor([0.0, -10.0, 0.0]))


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(arch="gated"), "unknown dictionary architecture"),
        (dict(k=50), "k=50 is more than the 40 latents"),
        (dict(k=None), "needs k"),
        (dict(d_sae=0), "d_sae must be a positive integer"),
        (dict(skip=True), "transcoder option"),
        (dict(out_hook="blocks.0.hook_mlp_out", apply_b_dec_to_input=True), "apply_b_dec_to_input"),
    ],
)
def test_bad_configs_are_refused(kw, msg):
    cfg = dict(arch="topk", d_in=12, d_sae=40, hook="h", k=5)
    cfg.update(kw)
    with pytest.raises(DictionaryError, match=msg):
        DictionaryConfig(**cfg)
