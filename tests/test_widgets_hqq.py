"""HqqDashboard (widgets/hqq.py), driven through its controls outside a kernel.

Observers run synchronously, so a callback that raises fails the test that set the control.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _widget_helpers import as_array, make_model

from tinygpt import GPT, GPTConfig
from tinygpt.widgets import HqqDashboard


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
