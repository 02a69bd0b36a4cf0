"""LaserDashboard and HqqDashboard, driven through their controls outside a kernel.

Observers run synchronously, so a callback that raises fails the test that set the control.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from tinygpt import GPT, GPTConfig
from tinygpt.surgery import laser, laser_sweep
from tinygpt.widgets import HqqDashboard, LaserDashboard


def make_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layers=2, d_model=64, n_heads=2, n_ctx=64)).eval()


def as_array(z) -> np.ndarray:
    return np.array([[math.nan if v is None else v for v in row] for row in z], dtype=float)


# ------------------------------------------------------------------------------------- LASER
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


# ------------------------------------------------------------------------------------- HQQ
@pytest.fixture(scope="module")
def hqq_dash(tokens, snapshot, assert_bitwise_equal):
    model = make_model(seed=2)
    snap = snapshot(model)
    dash = HqqDashboard(model, tokens, bits=(2, 4, 8), group_sizes=(16, 32, 128), loss_group_size=32, progress=False)
    assert_bitwise_equal(model, snap)
    return dash


def test_hqq_heatmap_follows_method_layer_and_target(hqq_dash):
    d = hqq_dash
    heat = d.heatmap_fig.data[0]
    assert list(heat.x) == ["16", "32", "128"] and list(heat.y) == ["2-bit", "4-bit", "8-bit"]
    for method in ("rtn", "hqq"):
        d.method.value = method
        for layer in (None, 1):
            d.layer.value = layer
            for target in (None, "attn.k_proj", "mlp.fc_out"):
                d.target.value = target
                np.testing.assert_allclose(as_array(heat.z), d.grid.table(method, layer, target))
                assert d.heatmap_fig.layout.title.text.startswith(method.upper())
    d.method.value, d.layer.value, d.target.value = "hqq", 0, "attn.k_proj"
    z = as_array(heat.z)
    assert math.isnan(z[0][2])  # group 128 does not divide in_features 64: an empty cell
    assert z[1][0] == d.grid.error("hqq", 0, "attn.k_proj", 4, 16)
    d.method.value = "rtn"
    assert as_array(heat.z)[1][0] == d.grid.error("rtn", 0, "attn.k_proj", 4, 16) > z[1][0]


def test_hqq_loss_figure_shows_the_curve(hqq_dash):
    d = hqq_dash
    assert [list(tr.y) for tr in d.loss_fig.data] == [d.curve.rtn, d.curve.hqq]
    assert list(d.loss_fig.data[0].x) == [2, 4, 8]
    assert d.curve.group_size == 32 and d.curve.targets == d.grid.targets


def test_hqq_histogram_controls(hqq_dash):
    d = hqq_dash
    d.hist_layer.value, d.hist_target.value, d.hist_bits.value, d.hist_group.value = 1, "mlp.fc_in", 2, 16
    h = d.grid.residual_histogram(1, "mlp.fc_in", 2, 16)
    assert [list(tr.y) for tr in d.hist_fig.data] == [h["rtn"], h["hqq"]]
    assert list(d.hist_fig.data[0].x) == pytest.approx(h["centers"])
    assert f"{h['hqq_error']:.4f}" in d.hist_status.value
    assert d.hist_fig.layout.title.text == "W − Ŵ, layer 1 mlp.fc_in, 2-bit, group 16"
    d.hist_bits.value = 8
    h8 = d.grid.residual_histogram(1, "mlp.fc_in", 8, 16)
    assert list(d.hist_fig.data[1].y) == h8["hqq"] and h8["edges"][-1] < h["edges"][-1]
    d.hist_group.value = 128  # does not divide in_features = 64: emptied, with a message
    assert len(d.hist_fig.data[0].y) == 0 and "does not divide" in d.hist_status.value
    d.hist_target.value = "mlp.fc_out"  # in_features 256: fits
    assert list(d.hist_fig.data[0].y) == d.grid.residual_histogram(1, "mlp.fc_out", 8, 128)["rtn"]


def test_hqq_heatmap_selection_drives_the_histogram(hqq_dash):
    d = hqq_dash
    d.hist_group.value = 32
    d.layer.value, d.target.value = 0, "attn.o_proj"
    assert (d.hist_layer.value, d.hist_target.value) == (0, "attn.o_proj")
    h = d.grid.residual_histogram(0, "attn.o_proj", d.hist_bits.value, 32)
    assert list(d.hist_fig.data[1].y) == h["hqq"]
    d.layer.value, d.target.value = None, None  # a mean view leaves the histogram where it was
    assert (d.hist_layer.value, d.hist_target.value) == (0, "attn.o_proj")


def test_hqq_dashboard_without_loss_curve_and_display(tokens):
    d = HqqDashboard(
        make_model(), tokens, bits=(3,), group_sizes=(32,), targets="mlp", loss_curve=False, progress=False
    )
    assert d.curve is None and len(d.loss_fig.data) == 0
    assert as_array(d.heatmap_fig.data[0].z).shape == (1, 1)
    assert "application/vnd.jupyter.widget-view+json" in d._repr_mimebundle_()


def test_hqq_loss_group_size_auto_fits_every_matrix(tokens):
    torch.manual_seed(0)
    narrow = GPT(GPTConfig(n_layers=1, d_model=32, n_heads=2, n_ctx=64)).eval()  # in_features 32 and 128
    d = HqqDashboard(narrow, tokens, bits=(4,), group_sizes=(16, 32, 64), iters=5, progress=False)
    assert d.curve.group_size == 32  # 64 does not divide the attention matrices
    assert math.isnan(d.grid.error("hqq", 0, "attn.q_proj", 4, 64)) and d.grid.error("hqq", 0, "mlp.fc_out", 4, 64) > 0
    with pytest.raises(ValueError, match="group_size 64 does not divide"):
        HqqDashboard(narrow, tokens, bits=(4,), group_sizes=(32,), loss_group_size=64, progress=False)


# ------------------------------------------------------------------------------------- every architecture variant
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


def test_hqq_dashboard_on_every_variant(arch_model, tokens, snapshot, assert_bitwise_equal):
    model = arch_model
    snap = snapshot(model)
    d = HqqDashboard(model, tokens, bits=(3, 8), group_sizes=(16, 32), iters=4, progress=False)
    assert_bitwise_equal(model, snap)
    g = d.grid
    assert list(d.hist_target.options) == g.targets == d.curve.targets
    assert [o[1] for o in d.target.options] == [None, *g.targets]
    for t in g.targets:
        d.target.value = t
        np.testing.assert_allclose(as_array(d.heatmap_fig.data[0].z), g.table("hqq", None, t))
        for layer in g.layers:
            d.hist_layer.value, d.hist_target.value = layer, t
            if (layer, t) in g.weights:
                h = g.residual_histogram(layer, t, d.hist_bits.value, d.hist_group.value)
                assert [list(tr.y) for tr in d.hist_fig.data] == [h["rtn"], h["hqq"]]
            else:  # YOCO cross-decoder keys/values
                assert len(d.hist_fig.data[0].y) == 0 and f"block {layer} has no {t}" in d.hist_status.value
    assert d.curve.group_size == 32 and d.curve.hqq[1] == pytest.approx(d.curve.base_loss, abs=2e-3)
