"""LaserDashboard (widgets/laser.py), driven through its controls outside a kernel.

Observers run synchronously, so a callback that raises fails the test that set the control.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch.nn as nn
from _widget_helpers import as_array, make_model

from tinygpt.surgery import laser, laser_sweep
from tinygpt.widgets import LaserDashboard

FRACTIONS = (0.5, 0.25, 0.05)


@pytest.fixture(scope="module")
def laser_dash(tokens, snapshot, assert_bitwise_equal):
    model = make_model()
    snap = snapshot(model)
    dash = LaserDashboard(model, tokens, fractions=FRACTIONS, prompt="ab", max_new_tokens=10, progress=False)
    assert_bitwise_equal(model, snap)  # the sweep restored it
    dash.snap = snap
    return dash


def test_laser_sweep_at_construction_is_plotted_and_selects_the_best(laser_dash, tokens):
    d = laser_dash
    ref = laser_sweep(d.model, tokens, "mlp", None, FRACTIONS, progress=False)
    assert d.sweep.base_loss == pytest.approx(ref.base_loss)
    for t in ("mlp.fc_in", "mlp.fc_out"):
        np.testing.assert_allclose(d.sweep.losses[t], ref.losses[t], rtol=1e-6)
    lines = [tr for tr in d.sweep_fig.data if tr.type == "scatter"]
    heat = [tr for tr in d.sweep_fig.data if tr.type == "heatmap"]
    assert len(lines) == 2 * 2 and len(heat) == 1
    assert list(lines[0].y) == pytest.approx(d.sweep.losses["mlp.fc_in"][0])
    assert list(lines[3].y) == pytest.approx(d.sweep.losses["mlp.fc_out"][1])
    want = [[v - d.sweep.base_loss for v in row] for t in d.sweep.targets for row in d.sweep.losses[t]]
    np.testing.assert_allclose(as_array(heat[0].z), want)
    best, loss = d.sweep.best()
    assert d.intervention == best
    assert f"{loss:.4f}" in d.sweep_status.value and f"{loss:.4f}" in d.choice_status.value


def test_laser_spectrum_follows_the_layer_and_normalize_controls(laser_dash):
    d = laser_dash
    d.normalize.value = False
    for layer in (1, 0):
        d.spectrum_layer.value = layer
        for trace, t in zip(d.spectrum_fig.data, d.targets):
            assert trace.name == t
            assert list(trace.y) == pytest.approx(d.spectrum.spectrum(t, layer))
        assert d.spectrum_fig.layout.title.text == f"singular values, layer {layer}"
    d.normalize.value = True
    s = d.spectrum.spectrum("mlp.fc_out", 0)
    assert list(d.spectrum_fig.data[1].y) == pytest.approx([v / s[0] for v in s])
    assert d.spectrum_fig.layout.yaxis.title.text == "σ / σ_max"
    d.normalize.value = False
    d.layer.value = 0
    d.layer.value = 1  # choosing the intervention's layer shows its spectrum
    assert d.spectrum_layer.value == 1
    assert list(d.spectrum_fig.data[0].y) == pytest.approx(d.spectrum.spectrum("mlp.fc_in", 1))


def test_laser_choice_moves_the_rho_marker_and_reports_energy(laser_dash):
    d = laser_dash
    d.target.value, d.layer.value, d.rank_fraction.value = "mlp.fc_in", 0, 0.25
    shape = d.spectrum_fig.layout.shapes[0]
    assert shape.x0 == shape.x1 == 0.25
    energy = d.spectrum.energy_kept("mlp.fc_in", 0, 0.25)
    assert f"{energy:.2%}" in d.choice_status.value
    assert f"{d.sweep.loss('mlp.fc_in', 0, 0.25):.4f}" in d.choice_status.value
    widths = {tr.name: tr.line.width for tr in d.spectrum_fig.data}
    assert widths["mlp.fc_in"] > widths["mlp.fc_out"]
    d.rank_fraction.value = 1.0  # not in the sweep: no sweep loss, still an energy
    assert "sweep loss" not in d.choice_status.value and "100.00%" in d.choice_status.value


def test_laser_preview_shows_both_sides_and_restores_the_model(laser_dash, tokens, assert_bitwise_equal, loss_of):
    d = laser_dash
    d.target.value, d.layer.value, d.rank_fraction.value = "mlp.fc_out", 1, 0.05
    d.apply_button.click()
    c = d.comparison
    assert c is not None and (c.intervention.target, c.intervention.layer, c.intervention.rank_fraction) == (
        "mlp.fc_out",
        1,
        0.05,
    )
    assert_bitwise_equal(d.model, d.snap)
    assert c.loss_before == pytest.approx(loss_of(d.model, tokens), abs=1e-6)
    with laser(d.model, "mlp.fc_out", [1], 0.05):
        assert c.loss_after == pytest.approx(loss_of(d.model, tokens), abs=1e-6)
    assert c.loss_after == pytest.approx(d.sweep.loss("mlp.fc_out", 1, 0.05), abs=1e-6)  # the same windows
    assert f"{c.loss_before:.4f}" in d.result.value and f"{c.loss_after:.4f}" in d.result.value
    assert "before" in d.result.value and "after" in d.result.value
    assert d.intervention_args == ("mlp.fc_out", [1], 0.05)


def test_laser_sweep_button(tokens):
    model = make_model(seed=1)
    d = LaserDashboard(model, tokens, "attn.v_proj", [1], (0.5, 0.1), run_sweep=False, progress=False)
    assert d.sweep is None and len(d.sweep_fig.data) == 0
    d.sweep_button.click()
    assert d.sweep is not None and d.sweep.targets == ["attn.v_proj"] and d.sweep.layers == [1]
    assert len(d.sweep_fig.data) == 2  # one curve and the heatmap
    assert list(d.sweep_fig.data[0].y) == pytest.approx(d.sweep.losses["attn.v_proj"][0])
    assert d.intervention == d.sweep.best()[0]
    bundle = d._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == d.widget.model_id


def test_laser_dashboard_rejects_bad_arguments(tokens):
    model = make_model()
    with pytest.raises(ValueError, match="unknown target"):
        LaserDashboard(model, tokens, targets="mlp.fc_middle", run_sweep=False, progress=False)
    with pytest.raises(ValueError, match="rank_fraction"):
        LaserDashboard(model, tokens, fractions=(0.5, 2.0), run_sweep=False, progress=False)


def test_laser_dashboard_on_every_variant(arch_model, tokens, snapshot, assert_bitwise_equal):
    model = arch_model
    snap = snapshot(model)
    d = LaserDashboard(model, tokens, "all", fractions=(0.5, 0.1), prompt="ab", max_new_tokens=4, progress=False)
    assert_bitwise_equal(model, snap)
    have = {n for n, m in model.named_modules() if type(m) is nn.Linear and n.startswith("blocks.")}
    have -= {n for n in have if n.endswith("router")}
    assert d.targets == d.sweep.targets == d.spectrum.targets == list(d.target.options)
    assert {f"blocks.{ly}.{t}" for t in d.targets for ly in d.spectrum.layers_of(t)} == have
    for layer in (0, 1):
        d.spectrum_layer.value = layer
        assert [tr.name for tr in d.spectrum_fig.data] == d.targets
        for trace, t in zip(d.spectrum_fig.data, d.targets):
            assert list(trace.y) == pytest.approx(d.spectrum.spectrum(t, layer))  # empty where the block lacks t
    for t in d.targets:  # every matrix the model has can be chosen and previewed
        for layer in d.spectrum.layers_of(t):
            d.target.value, d.layer.value, d.rank_fraction.value = t, layer, 0.1
            assert f"{d.sweep.loss(t, layer, 0.1):.4f}" in d.choice_status.value
    d.apply_button.click()
    assert (d.comparison.intervention.target, d.comparison.intervention.layer) == (d.targets[-1], 1)
    assert d.comparison.loss_after == pytest.approx(d.sweep.loss(d.targets[-1], 1, 0.1), abs=1e-6)
    assert_bitwise_equal(model, snap)
    missing = [(t, ly) for t in d.targets for ly in (0, 1) if ly not in d.spectrum.layers_of(t)]
    if missing:  # YOCO: attn.k_proj / attn.v_proj of the cross-decoder block
        d.comparison = None
        d.target.value, d.layer.value = missing[0]
        assert f"block {missing[0][1]} has no {missing[0][0]}" in d.choice_status.value
        d.apply_button.click()  # reported in the result line, nothing raised or changed
        assert d.comparison is None and "is in none of the selected blocks" in d.result.value
        assert_bitwise_equal(model, snap)
