"""EvalMatrixDashboard (widgets/evalmatrix.py), driven through its controls outside a kernel.

Observers run synchronously, so a callback that raises fails the test that set the control. The models, the
questions and the manual loss are those of tests/test_eval_matrix.py.
"""

from __future__ import annotations

import pytest
from test_eval_matrix import NOTES, QA, SHOTS, make_lora, make_model, manual_loss

from tinygpt.eval.matrix import BM25Retriever, EvalMatrix


@pytest.fixture(scope="module")
def retriever() -> BM25Retriever:
    return BM25Retriever(NOTES, chunk_chars=160)


@pytest.fixture
def dash(retriever):
    from tinygpt.widgets import EvalMatrixDashboard

    base = make_model()
    matrix = EvalMatrix(base, lora=make_lora(base), retrieval=retriever, few_shot=SHOTS, k=1, max_new_tokens=4)
    return EvalMatrixDashboard(matrix, QA)


def test_dashboard_shows_the_selected_prompt_and_highlights_it(dash):
    r = dash.result
    assert dash.prompt.value == 0 and len(dash.prompt.options) == 3
    assert "Who kills Polonius?" in dash.table.value
    dash.prompt.value = 2
    assert QA[2]["instruction"] in dash.table.value and QA[0]["instruction"] not in dash.table.value
    for s in r.setups:
        assert f"{r.losses[s][2]:.3f}" in dash.table.value
    sizes = list(dash.fig.data[1].marker.size)
    n = len(r)
    assert [sizes[j * n + 2] for j in range(len(r.setups))] == [14] * len(r.setups)
    assert list(dash.fig.data[0].y) == pytest.approx([r.mean_loss(s) for s in r.setups])
    assert "lowest mean reference loss" in dash.status.value


def test_dashboard_runs_a_new_question_through_every_setup(dash):
    dash.question.value = "Who saves Antonio in court?"
    dash.reference.value = "Portia saves Antonio."
    dash.run_button.click()
    r = dash.result
    assert len(r) == 4 and dash.prompt.value == 3 and len(dash.prompt.options) == 4
    assert "Who saves Antonio in court?" in dash.table.value and dash.question.value == ""
    want = manual_loss(dash.matrix.model, r.inputs["base"][3], " Portia saves Antonio.")
    assert r.losses["base"][3] == pytest.approx(want, abs=1e-5)
    assert all(len(r.outputs[s]) == 4 for s in r.setups)
    dash.run_button.click()  # empty question: an error in the status line, nothing added
    assert "type a question" in dash.status.value and len(r) == 4


def test_dashboard_k_slider_reruns_the_selected_prompt(dash):
    r = dash.result
    assert len(r.retrieved[0]) == 1
    dash.k.value = 0
    assert r.retrieved[0] == [] and r.inputs["lora+retrieval"][0] == r.inputs["lora"][0]
    dash.k.value = 3
    assert len(r.retrieved[0]) == 3 and all(c in r.inputs["lora+retrieval"][0] for c, _ in r.retrieved[0])
    assert len(r.retrieved[1]) == 1  # other prompts keep their rows
