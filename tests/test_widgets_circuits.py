"""CircuitDashboard (widgets/circuits.py), driven through its controls outside a kernel.

Observers run synchronously, so a callback that raises fails the test that set the control.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _model_helpers import single_thread
from _widget_helpers import tiny_model, variant_model

from tinygpt import GPT
from tinygpt.interp import edge_attribution_patch, faithfulness, path_patch
from tinygpt.interp import node_attribution as atp_node_scores
from tinygpt.widgets import CircuitDashboard

CLEAN, CORRUPTED = "abcdefgh abcdefg", "abcdefXh abcdefg"
ANSWERS = dict(correct="h", incorrect="X")


@pytest.fixture(scope="module", autouse=True)
def _threads():
    yield from single_thread()


@pytest.fixture(scope="module")
def model() -> GPT:
    m = tiny_model()
    with torch.no_grad():  # a clearer clean - corrupted gap than the default init gives
        for p in m.parameters():
            if p.ndim == 2:
                p.mul_(3.0)
    return m


@pytest.fixture(scope="module")
def dash(model):
    return CircuitDashboard(model, CLEAN, CORRUPTED, size=10, progress=False, **ANSWERS)


def _edges_drawn(fig) -> list[str]:
    """The hover texts of the graph's edge traces ("s -> r: score"), strongest first."""
    return [t.text for t in fig.data if t.mode == "lines"][::-1]


def test_eap_circuit_graph_curve_and_table_are_the_library_results(dash, model):
    d = dash
    ref = edge_attribution_patch(model, CLEAN, CORRUPTED, **ANSWERS)
    torch.testing.assert_close(d.result.scores, ref.scores, rtol=1e-5, atol=1e-7)
    want = ref.circuit(10)
    assert [(s, r) for s, r, _ in d.circuit] == [(s, r) for s, r, _ in want]
    assert _edges_drawn(d.graph_fig) == [f"{s} -> {r}: {v:+.4f}" for s, r, v in want]
    assert d.graph_fig.layout.title.text.startswith("EAP: top 10 of")
    f = faithfulness(model, want, CLEAN, CORRUPTED, **ANSWERS)
    np.testing.assert_allclose(d.faith_fig.data[0].y, f.curve, rtol=1e-4, atol=1e-5)
    assert list(d.faith.sizes) == [0, 1, 2, 3, 5, 10]
    # the table: every node of the circuit, its score the sum of every edge out of it
    assert [r["node"] for r in d.rows] == want.nodes
    sums = ref.sender_scores()
    for row in d.rows:
        if row["node"] != "logits":
            assert row["score"] == pytest.approx(sums[row["node"]], rel=1e-4, abs=1e-7)
            assert row["edges_out"] == sum(s == row["node"] for s, _, _ in want)
        assert row["node"] in d.table.value
    assert f"{ref.clean_metric:.3f}" in d.status.value and f"{f.recovered:.0%}" in d.status.value


def test_size_slider_recuts_without_rescoring(dash, model):
    d = dash
    scores = d.result.scores
    d.size.value = 3
    assert d.result.scores is scores  # not recomputed
    assert len(_edges_drawn(d.graph_fig)) == 3 and d.faith.sizes == [0, 1, 2, 3]
    f = faithfulness(model, d.result.circuit(3), CLEAN, CORRUPTED, **ANSWERS)
    np.testing.assert_allclose(d.faith_fig.data[0].y, f.curve, rtol=1e-4, atol=1e-5)
    d.size.value = 25
    assert len(_edges_drawn(d.graph_fig)) == 25 and d.faith.sizes[-1] == 25
    d.size.value = 10


def test_methods_eap_ig_exact_and_atp(model):
    d = CircuitDashboard(model, CLEAN, CORRUPTED, size=8, steps=3, progress=False, **ANSWERS)
    d.method.value = "EAP-IG"
    ig = edge_attribution_patch(model, CLEAN, CORRUPTED, method="eap-ig", steps=3, **ANSWERS)
    assert d.result.method == "eap-ig"
    torch.testing.assert_close(d.result.scores, ig.scores, rtol=1e-5, atol=1e-7)
    assert d.graph_fig.layout.title.text.startswith("EAP-IG")

    d.method.value = "exact"  # each edge patched alone: path patching of one sender into one receiver
    assert d.result.method == "exact"
    for s, r, v in d.result.top(4) + [d.result.edges[0], d.result.edges[-1]]:
        p = path_patch(model, CLEAN, CORRUPTED, sender=s, receivers=[r], **ANSWERS)
        assert v == pytest.approx(p.value - p.corrupted_metric, abs=1e-5)
    # EAP is the exact effects' first-order estimate: on this near-linear gap they agree in sign and rank
    eap = edge_attribution_patch(model, CLEAN, CORRUPTED, **ANSWERS)
    a, b = eap.scores[eap.graph.mask], d.result.scores[eap.graph.mask].float()
    assert float(torch.corrcoef(torch.stack([a, b]))[0, 1]) > 0.9

    d.method.value = "AtP"  # node scores from attribution_patch; they equal the sums of EAP's edges out
    nodes = atp_node_scores(model, CLEAN, CORRUPTED, **ANSWERS)
    sums = eap.sender_scores()
    assert set(nodes) == set(sums)
    for name, v in nodes.items():
        assert v == pytest.approx(sums[name], rel=1e-3, abs=1e-6), name
    for row in d.rows:
        if row["node"] != "logits":
            assert row["score"] == pytest.approx(nodes[row["node"]], rel=1e-6, abs=1e-9)
    assert "AtP node score" in d.table.value


def test_prompt_and_answer_edits_recompute_and_bad_input_is_reported(model):
    d = CircuitDashboard(model, CLEAN, CORRUPTED, size=5, progress=False, **ANSWERS)
    before = list(d.faith_fig.data[0].y)
    d.corrupted.value = "abcdYfgh abcdefg"
    ref = edge_attribution_patch(model, CLEAN, "abcdYfgh abcdefg", **ANSWERS)
    torch.testing.assert_close(d.result.scores, ref.scores, rtol=1e-5, atol=1e-7)
    assert list(d.faith_fig.data[0].y) != before
    drawn = _edges_drawn(d.graph_fig)
    d.corrupted.value = "abc"  # different length: a message, the figures stay
    assert "same number of tokens" in d.status.value
    assert _edges_drawn(d.graph_fig) == drawn
    d.corrupted.value = CORRUPTED
    d.correct.value = "hh"  # not a single token
    assert "not one" in d.status.value
    d.correct.value = ""  # blank: the clean run's top prediction, as the library does with correct=None
    ref = edge_attribution_patch(model, CLEAN, CORRUPTED, incorrect="X")
    torch.testing.assert_close(d.result.scores, ref.scores, rtol=1e-5, atol=1e-7)
    d.clean.value = ""
    assert "type a clean prompt" in d.status.value
    d.clean.value, d.correct.value = CLEAN, "h"
    d.run_button.click()
    assert "⚠" not in d.status.value
    with pytest.raises(ValueError, match="method"):
        CircuitDashboard(model, CLEAN, CORRUPTED, method="acdc")


@pytest.mark.parametrize("variant", ["yoco", "mod"])
def test_unsplittable_variants_say_why(variant):
    d = CircuitDashboard(variant_model(variant), CLEAN, CORRUPTED, progress=False, **ANSWERS)
    assert "edge methods cannot split this model" in d.status.value and d.result is None
    d.run_button.click()  # still a message, never a traceback
    assert "⚠" in d.status.value


def test_dashboard_on_a_splittable_variant():
    m = variant_model("diff_attn")
    d = CircuitDashboard(m, CLEAN, CORRUPTED, size=6, progress=False, **ANSWERS)
    assert "⚠" not in d.status.value and len(d.circuit) == 6
    ref = edge_attribution_patch(m, CLEAN, CORRUPTED, **ANSWERS)
    torch.testing.assert_close(d.result.scores, ref.scores, rtol=1e-5, atol=1e-7)
