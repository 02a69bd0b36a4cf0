"""`EvalMatrixDashboard`: the evaluation matrix in a notebook: one prompt's outputs side by side, the reference
loss per setup, and new questions run through every setup.

    from tinygpt.eval import EvalMatrix
    from tinygpt.widgets import EvalMatrixDashboard

    matrix = EvalMatrix(base, lora=lora_model, retrieval="data/shakespeare_notes.md", few_shot=examples, k=1)
    dash = EvalMatrixDashboard(matrix, "data/eval_prompts.jsonl")
    dash                          # displays in a notebook
    dash.prompt.value = 3         # choose a prompt: the table and the highlighted points follow
    dash.question.value = "Who kills Polonius?"; dash.reference.value = "Hamlet kills Polonius."
    dash.run_button.click()       # runs the new question through every setup and selects it

A thin layer over `tinygpt.eval.EvalMatrix`: the state lives in `dash.result` (an `EvalMatrixResult`), the chart
is the result's own `.figure(highlight=...)`, and every callback copies its numbers into the widgets. The models
are never modified.
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any

import ipywidgets as W
import plotly.graph_objects as go

from tinygpt.eval import EvalMatrix
from tinygpt.inputs import progress_enabled

from .base import Dashboard, captured, show_figure

if TYPE_CHECKING:
    from tinygpt.eval.matrix import EvalMatrixResult


class EvalMatrixDashboard(Dashboard):
    """Side-by-side outputs of one prompt under every setup, a loss chart, and a box to ask new questions.

    Attributes:
        matrix (EvalMatrix): the setups (models, retriever, few-shot examples, generation settings).
        result (EvalMatrixResult): every prompt run so far.
        widget (ipywidgets.VBox): the container; displaying the dashboard displays it.
        Controls: `prompt` (Dropdown over the prompts), `k` (retrieved chunks, re-runs the selected prompt),
        `question`, `reference` (Text) and `run_button`; outputs: `table` (HTML, the selected prompt's outputs,
        losses, inputs and retrieved chunks), `fig` (plotly FigureWidget: mean reference loss per setup, one
        point per prompt, the selected prompt's in red), `status` (HTML); `output` shows progress and errors.
    """

    def __init__(
        self, matrix: EvalMatrix, prompts: Any = None, answers: Any = None, *, result=None, progress: bool | None = None
    ):
        """
        Args:
            matrix: an `EvalMatrix` (see `tinygpt.evalmatrix`).
            prompts, answers: prompts to run now (records, (q, a) pairs, strings + answers, or a JSONL path).
            result: an `EvalMatrixResult` already computed with `matrix` (instead of `prompts`).
            progress: progress bars while running (None: the package default).
        """
        super().__init__()
        if not isinstance(matrix, EvalMatrix):
            raise TypeError("EvalMatrixDashboard needs an EvalMatrix (tinygpt.eval.EvalMatrix(model, ...))")
        if (prompts is None) == (result is None):
            raise ValueError("give either prompts (run now) or result= (already run), not both")
        self.matrix = matrix
        self.progress = progress_enabled(progress)
        with captured(self.output):
            self.result: EvalMatrixResult = (
                result if result is not None else matrix.run(prompts, answers, progress=self.progress)
            )
        if list(self.result.setups) != list(matrix.setups):
            raise ValueError(f"the result's setups {self.result.setups} are not the matrix's {matrix.setups}")

        self.prompt = W.Dropdown(options=self._options(), value=0, description="prompt", layout={"width": "60%"})
        retrieval = any("retrieval" in s for s in matrix.setups)
        self.k = W.IntSlider(
            value=matrix.k,
            min=0,
            max=max(8, matrix.k),
            description="chunks (k)",
            continuous_update=False,
            disabled=not retrieval,
        )
        self.question = W.Text(placeholder="a new question", description="question", layout={"width": "45%"})
        self.reference = W.Text(placeholder="its reference answer (optional)", description="reference")
        self.run_button = W.Button(description="run", icon="play", button_style="primary", tooltip="run every setup")
        self.table = W.HTML()
        self.fig = go.FigureWidget()
        self.fig.update_layout(height=380, margin={"t": 50, "b": 40})

        self._observe(self.refresh, self.prompt)
        self._observe(self._rerun_with_k, self.k)
        self._on_click(self.run_button, self._ask_typed, errors=(ValueError,))
        self._layout(
            "Evaluation matrix: the same prompts under every setup",
            W.HBox([self.prompt, self.k]),
            self.table,
            self.fig,
            W.HTML("<b>Ask a new question</b>"),
            W.HBox([self.question, self.reference, self.run_button]),
            self.status,
            self.output,
        )
        self.refresh()

    # ------------------------------------------------------------------ actions
    def _options(self) -> list[tuple[str, int]]:
        return [(f"[{i}] {q}", i) for i, q in enumerate(self.result.prompts)]

    def refresh(self) -> None:
        """Redraw the table and the figure for the selected prompt."""
        i = self.prompt.value
        show_figure(self.fig, self.result.figure(highlight=i))
        self.fig.update_layout(height=380, margin={"t": 50, "b": 40})
        self.table.value = self.row_html(i)
        summ = self.result.summary()
        best = min(self.result.setups, key=lambda s: (summ[s]["loss"] != summ[s]["loss"], summ[s]["loss"]))
        self._say(
            f"{len(self.result)} prompts; lowest mean reference loss: <b>{html.escape(best)}</b> "
            f"({summ[best]['loss']:.3f} nats/token)"
        )

    def row_html(self, i: int) -> str:
        """The selected prompt: reference, and per setup its output, reference loss and (folded) full input."""
        row = self.result.row(i)
        ref = row["reference"]
        out = [
            f"<div style='font-size:13px'><b>[{i}] {html.escape(row['prompt'])}</b><br>"
            f"reference: <i>{html.escape(ref) if ref is not None else '(none)'}</i></div>",
            "<table style='border-collapse:collapse;font-size:12px;width:100%'>",
            "<tr><th style='text-align:left'>setup</th><th style='text-align:left'>output</th>"
            "<th>ref loss</th><th style='text-align:left'>input</th></tr>",
        ]
        losses = [c["loss"] for c in row["setups"].values() if c["loss"] == c["loss"]]
        best = min(losses) if losses else None
        for s, c in row["setups"].items():
            loss = "" if c["loss"] != c["loss"] else f"{c['loss']:.3f}"
            if best is not None and c["loss"] == best:
                loss = f"<b>{loss}</b>"
            cut = f" ({c['truncated']} tokens cut)" if c["truncated"] else ""
            mark = " ✓" if c["match"] else ""
            out.append(
                "<tr style='border-top:1px solid #ddd'>"
                f"<td style='vertical-align:top'>{html.escape(s)}</td>"
                f"<td style='vertical-align:top'><code>{html.escape(c['output'])}</code>{mark}</td>"
                f"<td style='vertical-align:top;text-align:right'>{loss}</td>"
                f"<td style='vertical-align:top'><details><summary>{len(c['input'])} chars{cut}</summary>"
                f"<pre style='white-space:pre-wrap;margin:0'>{html.escape(c['input'])}</pre></details></td></tr>"
            )
        out.append("</table>")
        if row["retrieved"]:
            hits = "".join(
                f"<li>{html.escape(c)} <span style='color:#666'>({s:.2f})</span></li>" for c, s in row["retrieved"]
            )
            out.append(f"<div style='font-size:12px'>retrieved (BM25):<ol style='margin:2px 0'>{hits}</ol></div>")
        return "".join(out)

    def ask(self, question: str, reference: str | None = None) -> int:
        """Run a new question through every setup, add it to the result and select it; returns its index."""
        question = question.strip()
        if not question:
            raise ValueError("type a question first")
        new = self.matrix.run([(question, reference or None)], progress=self.progress)
        self.result.extend(new)
        i = len(self.result) - 1
        self.prompt.options = self._options()
        self.prompt.value = i  # the observer redraws
        return i

    def rerun_selected(self) -> None:
        """Run the selected prompt again (e.g. with another k) and replace its row."""
        i = self.prompt.value
        new = self.matrix.run([(self.result.prompts[i], self.result.references[i])], progress=self.progress)
        r = self.result
        for s in r.setups:
            r.outputs[s][i], r.losses[s][i] = new.outputs[s][0], new.losses[s][0]
            r.inputs[s][i], r.truncated[s][i] = new.inputs[s][0], new.truncated[s][0]
        if r.retrieved:
            r.retrieved[i] = new.retrieved[0]
        self.refresh()

    def _rerun_with_k(self) -> None:
        self.matrix.k = int(self.k.value)
        self.rerun_selected()

    def _ask_typed(self) -> None:
        self.ask(self.question.value, self.reference.value.strip() or None)
        self.question.value = ""
        self.reference.value = ""

    def __repr__(self) -> str:
        return f"EvalMatrixDashboard({self.result!r})"


__all__ = ["EvalMatrixDashboard"]
