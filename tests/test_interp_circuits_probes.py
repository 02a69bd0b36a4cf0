"""Linear probes (`tinygpt.interp.circuits.probes`): on the induction model the previous token's identity becomes
decodable only after layer 0's previous-token heads; the Hewitt & Liang control task (a random label per token
type) is learnable from the token's own embedding; sequence labels, the fit itself, and errors."""

from __future__ import annotations

import pytest
import torch

from tinygpt import GPT, GPTConfig
from tinygpt.interp import ProbeResult, ProbeSweep, train_probe
from tinygpt.interp.circuits import CircuitError


@pytest.fixture(scope="module")
def data():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 64, (96, 32), generator=gen)
    labels = torch.full_like(tokens, -100)
    labels[:, 1:] = tokens[:, :-1] % 2  # per token: the parity of the previous token
    return tokens, labels


def test_previous_token_appears_after_layer_zero(induction_model, data):
    """A fact about this model checked by probing: the residual stream entering layer 0 holds only the current
    token (and position), so the previous token's parity is at chance there; layer 0's previous-token heads write
    it into the stream, so it is decodable entering layer 1. The control task (a random label per current token)
    is easy everywhere: the token's identity is linearly decodable (which is why selectivity matters)."""
    tokens, labels = data
    sweep = train_probe(induction_model, tokens, labels, hook="blocks.{layer}.hook_resid_pre")
    assert isinstance(sweep, ProbeSweep) and sweep.layers == [0, 1]
    first, second = sweep.probes
    assert first.accuracy < 0.6, first
    assert second.accuracy > first.accuracy + 0.12, (first, second)
    assert first.control_accuracy > 0.85, first  # a random function of the current token: memorisable
    assert first.selectivity < 0 and second.selectivity > first.selectivity
    assert first.n_test == 24 * 31 and first.n_train == 72 * 31 and first.n_classes == 2
    assert 0.4 < first.majority < 0.6
    fig = sweep.figure()
    assert [t.name for t in fig.data] == ["task accuracy", "control accuracy", "selectivity"]
    assert list(fig.data[0].y) == pytest.approx(sweep.accuracy.tolist())
    assert sweep.best() is second


def test_fit_recovers_a_planted_direction():
    """The probe itself: labels that are a linear function of a hook point's activations are learned (held-out
    accuracy ~1), predict() reproduces them, and a label that is no function of the input stays near chance."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layers=1, d_model=32, n_heads=2, n_ctx=16, d_vocab=50)).eval()
    tokens = torch.randint(0, 50, (64, 16), generator=torch.Generator().manual_seed(1))
    _, cache = model.run_with_cache(tokens, names_filter=["blocks.0.hook_resid_post"])
    acts = cache["blocks.0.hook_resid_post"]
    w = torch.randn(32, generator=torch.Generator().manual_seed(2))
    labels = (acts @ w > (acts @ w).median()).long()
    res = train_probe(model, tokens, labels, hook="blocks.0.hook_resid_post", control=False)
    assert isinstance(res, ProbeResult) and res.accuracy > 0.95 and res.train_accuracy > 0.97, res
    assert res.control_accuracy != res.control_accuracy  # NaN without the control task
    assert (res.predict(acts) == labels).double().mean() > 0.95
    noise = torch.randint(0, 3, (64, 16), generator=torch.Generator().manual_seed(3))
    res = train_probe(model, tokens, noise, hook="blocks.0.hook_resid_post", l2=1e-1)
    assert res.accuracy < 0.5 and res.n_classes == 3
    assert res.figure().data[0].x == ("task", "control", "majority")


def test_sequence_labels():
    """Per-sequence labels read one position (default the last) or the mean over positions."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layers=2, d_model=32, n_heads=2, n_ctx=16, d_vocab=50)).eval()
    tokens = torch.randint(0, 50, (160, 12), generator=torch.Generator().manual_seed(1))
    _, cache = model.run_with_cache(tokens, names_filter=["blocks.1.hook_resid_post"])
    acts = cache["blocks.1.hook_resid_post"]
    w = torch.randn(32, generator=torch.Generator().manual_seed(2))
    last = (acts[:, -1] @ w > (acts[:, -1] @ w).median()).long()  # [batch]: planted in the last position
    res = train_probe(model, tokens, last, hook="blocks.1.hook_resid_post", test_size=0.25)
    assert res.n_test == 40 and res.n_train == 120 and res.accuracy >= 0.9, res
    assert train_probe(model, tokens, last, hook="blocks.1.hook_resid_post", pos=3).accuracy < 0.75
    pooled = (acts.mean(1) @ w > (acts.mean(1) @ w).median()).long()
    mean = train_probe(model, tokens, pooled, hook="blocks.{layer}.hook_resid_post", pos="mean", layers=[1])
    assert mean.layers == [1] and len(mean.probes) == 1 and mean.probes[0].accuracy >= 0.9, mean
    # the control task of mean pooling: a random label per distinct sequence, not learnable on held-out rows
    assert mean.probes[0].control_accuracy < 0.75


def test_errors(data):
    tokens, labels = data
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layers=1, d_model=32, n_heads=2, n_ctx=32, d_vocab=64)).eval()
    with pytest.raises(CircuitError, match=r"\[batch, pos\]"):
        train_probe(model, tokens, labels[:, :-1])
    with pytest.raises(CircuitError, match="per sequence"):
        train_probe(model, tokens, labels[:, :, None])
    with pytest.raises(CircuitError, match="no hook point"):
        train_probe(model, tokens, labels, hook="blocks.0.hook_nothing")
    with pytest.raises(CircuitError, match="'mean'"):
        train_probe(model, tokens, labels[:, -1], pos="first")
    with pytest.raises(CircuitError, match="every label is -100"):
        train_probe(model, tokens, torch.full_like(labels, -100), hook="blocks.0.hook_resid_post")
    with pytest.raises(CircuitError, match="batch, pos, d"):
        train_probe(model, tokens, labels, hook="blocks.0.attn.hook_z")
