"""The LASER analyses under the dashboard (`tinygpt.surgery.laser.analysis`): spectra, before/after."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from _surgery_helpers import make_model

from tinygpt import GPT, generate
from tinygpt.surgery import LowRankLinear, laser, laser_, laser_compare, singular_values


@pytest.fixture(scope="module")
def model() -> GPT:
    return make_model()


# ------------------------------------------------------------------------------------- spectra
def test_singular_values_match_torch_and_are_sorted(model):
    sp = singular_values(model, "all", [1])
    assert sp.layers == [1] and len(sp.targets) == 6
    for t in sp.targets:
        W = model.get_submodule(f"blocks.1.{t}").weight
        s = sp.spectrum(t, 1)
        assert sp.shapes[t] == tuple(W.shape)
        assert len(s) == min(W.shape) == len(sp.rank_fractions(t))
        assert np.allclose(s, torch.linalg.svdvals(W).tolist(), rtol=1e-5, atol=1e-7)
        assert all(a >= b for a, b in zip(s, s[1:]))
        assert sp.rank_fractions(t)[-1] == 1.0


def test_energy_kept_matches_the_laser_report(model):
    sp = singular_values(model, "mlp", None)
    for rho in (0.05, 0.3, 1.0):
        with laser(model, "mlp.fc_out", [0], rho) as report:
            pass
        assert sp.energy_kept("mlp.fc_out", 0, rho) == pytest.approx(report.entries[0].energy_kept, rel=1e-5)
    assert sp.energy_kept("mlp.fc_in", 1, 1.0) == pytest.approx(1.0)


def test_spectrum_traces_and_figures(model):
    sp = singular_values(model, "mlp", None)
    per_target = sp.traces(layer=1)
    assert [tr["name"] for tr in per_target] == sp.targets
    assert per_target[0]["y"] == sp.spectrum(sp.targets[0], 1)
    normed = sp.traces(layer=1, normalize=True)
    assert normed[1]["y"][0] == pytest.approx(1.0)
    assert normed[1]["y"][5] == pytest.approx(per_target[1]["y"][5] / per_target[1]["y"][0])
    per_layer = sp.traces(target="mlp.fc_in")
    assert [tr["name"] for tr in per_layer] == ["layer 0", "layer 1"]
    with pytest.raises(ValueError, match="exactly one"):
        sp.traces()
    assert len(sp.figure(layer=0).data) == 2
    assert len(sp.figure().data) == 2 * 2  # a line per layer in each target's panel


def test_singular_values_of_a_factored_layer_show_the_kept_rank():
    m = make_model(seed=3)
    laser_(m, "mlp.fc_in", [0], 0.125, factored=True)
    assert isinstance(m.blocks[0].mlp.fc_in, LowRankLinear)
    s = singular_values(m, "mlp.fc_in", [0]).spectrum("mlp.fc_in", 0)
    r = m.blocks[0].mlp.fc_in.rank  # floor(0.125 * 64) = 8
    assert r == 8
    assert s[r - 1] > 1e-3 and max(s[r:]) < 1e-5 * s[0]


def test_singular_values_reject_bad_selections(model):
    with pytest.raises(ValueError, match="unknown target"):
        singular_values(model, "mlp.fc_middle")
    with pytest.raises(ValueError, match="out of range"):
        singular_values(model, "mlp", [5])


# ------------------------------------------------------------------------------------- laser_compare
def test_laser_compare_restores_the_model_and_reports_both_sides(
    model, tokens, snapshot, assert_bitwise_equal, loss_of
):
    snap = snapshot(model)
    cmp = laser_compare(model, "fc_out", -1, 0.05, tokens, prompt="ab", max_new_tokens=12, seed=4)
    assert_bitwise_equal(model, snap)
    assert cmp.intervention.layer == 1 and cmp.intervention.target == "mlp.fc_out"
    assert cmp.loss_before == pytest.approx(loss_of(model, tokens), abs=1e-6)
    with laser(model, "mlp.fc_out", [1], 0.05):
        after = loss_of(model, tokens)
        sample_after = generate(model, "ab", 12, temperature=0.8, seed=4)
    assert cmp.loss_after == pytest.approx(after, abs=1e-6)
    assert cmp.loss_after != cmp.loss_before
    assert cmp.delta == pytest.approx(cmp.loss_after - cmp.loss_before)
    assert cmp.sample_before == generate(model, "ab", 12, temperature=0.8, seed=4)
    assert cmp.sample_after == sample_after
    assert cmp.report.entries[0].rank_kept == 3  # floor(0.05 * 64)
    text = cmp.to_html()
    assert f"{cmp.loss_before:.4f}" in text and f"{cmp.loss_after:.4f}" in text
    assert "&lt;b&gt;x" in dataclasses.replace(cmp, sample_after="<b>x").to_html()  # samples are escaped


def test_laser_compare_full_rank_changes_nothing(model, tokens):
    cmp = laser_compare(model, "mlp.fc_in", 0, 1.0, tokens, prompt="x", max_new_tokens=8)
    assert cmp.loss_after == pytest.approx(cmp.loss_before, abs=1e-4)


def test_laser_compare_takes_exactly_one_matrix(model, tokens):
    with pytest.raises(ValueError, match="one target"):
        laser_compare(model, "mlp", 0, 0.5, tokens)
    with pytest.raises(ValueError, match="one layer"):
        laser_compare(model, "mlp.fc_in", [0, 1], 0.5, tokens)
    with pytest.raises(ValueError, match="rank_fraction"):
        laser_compare(model, "mlp.fc_in", 0, 0.0, tokens)
