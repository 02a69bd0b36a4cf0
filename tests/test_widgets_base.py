"""The Dashboard base (widgets/base.py) and the package: every dashboard exported, lazily, and displayable."""

from __future__ import annotations

import ipywidgets as W
import plotly.graph_objects as go
import pytest
from _widget_helpers import tiny_model

from tinygpt import GPT
from tinygpt.widgets import TrainingDashboard
from tinygpt.widgets.base import Dashboard, error_html, layer_dropdown, show_figure, update_figure


@pytest.fixture(scope="module")
def model() -> GPT:
    return tiny_model()


def test_every_dashboard_is_exported_and_displayable(model):
    import tinygpt.widgets as w

    for name in ("LensDashboard", "AblationExplorer", "PatchingDashboard", "AttentionViewer", "TrainingDashboard"):
        assert name in w.__all__ and name in dir(w)
    bundle = TrainingDashboard()._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    for name in w.__all__:  # every dashboard shares the Dashboard base
        assert issubclass(getattr(w, name), Dashboard), name


class Doubler(Dashboard):
    """A minimal dashboard: a number box whose double is drawn as one bar; negative numbers are refused."""

    def __init__(self):
        super().__init__()
        self.number = W.IntText(value=1)
        self.fig = go.FigureWidget()
        self._observe(self.update, self.number, errors=(ValueError,))
        self._layout("Doubler", self.number, None, self.status, self.output, self.fig)
        self._run(self.update)

    def update(self):
        if self.number.value < 0:
            raise ValueError("type a number >= 0")
        if self.number.value == 13:
            raise RuntimeError("a bug")
        show_figure(self.fig, go.Figure(go.Bar(y=[2 * self.number.value])))
        self._say(f"doubled: <b>{2 * self.number.value}</b>")


def test_dashboard_callbacks_report_user_errors_and_raise_bugs():
    d = Doubler()
    assert list(d.widget.children[1:]) == [d.number, d.status, d.output, d.fig]  # None children are left out
    assert "Doubler" in d.widget.children[0].value  # the heading
    assert list(d.fig.data[0].y) == [2] and "doubled: <b>2</b>" in d.status.value
    d.number.value = 4
    assert list(d.fig.data[0].y) == [8]
    d.number.value = -1  # bad input: a red message, the figure stays
    assert d.status.value == error_html("type a number >= 0") and list(d.fig.data[0].y) == [8]
    with pytest.raises(RuntimeError, match="a bug"):  # anything else propagates (in a kernel: the output area)
        d.number.value = 13
    bundle = d._repr_mimebundle_()
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == d.widget.model_id


def test_show_figure_replaces_traces_and_layout():
    fig = go.FigureWidget(go.Heatmap(z=[[1, 2]], zmax=5), layout={"title": "old"})
    show_figure(fig, go.Figure(go.Heatmap(z=[[3, 4]]), layout={"title": "new"}))
    assert fig.data[0].zmax is None and list(fig.data[0].z[0]) == [3, 4]  # no stale property
    assert fig.layout.title.text == "new"


def test_update_figure_keeps_the_traces_when_they_match():
    target = go.FigureWidget(go.Heatmap(z=[[1, 2]], x=["a", "b"], zmax=2))
    heat = target.data[0]
    fig = go.Figure(go.Heatmap(z=[[3, None]], x=["a", "b"], zmax=5))
    fig.update_layout(title="second", yaxis={"type": "log"})
    update_figure(target, fig)
    assert target.data[0] is heat and heat.z == ([3, None],) and heat.zmax == 5
    assert target.layout.title.text == "second" and target.layout.yaxis.type == "log"
    update_figure(target, go.Figure([go.Bar(y=[1]), go.Bar(y=[2])]))  # other traces: replaced
    assert [t.type for t in target.data] == ["bar", "bar"] and target.data[1].y == (2,)


def test_layer_dropdown_labels_and_extra_options():
    d = layer_dropdown([0, 2], extra=[("all layers (mean)", None)], label=lambda i: f"block {i}")
    assert d.options == (("all layers (mean)", None), ("block 0", 0), ("block 2", 2)) and d.description == "layer"
