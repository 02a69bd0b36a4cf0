"""`PatchingDashboard`: activation patching from a clean into a corrupted prompt, one heatmap per activation type.

    from tinygpt.widgets import PatchingDashboard
    dash = PatchingDashboard(model, "abcdefgh abcdefg", "abcdefXh abcdefg", correct="h", incorrect="X")
    dash                          # displays in a notebook
    dash.results["head"].top(3)   # the state lives in the pure result objects

A thin layer over `tinygpt.interp.patch_sweep`: for each activation type ("resid_pre", "attn_out", "mlp_out" per
(layer, position), "head" per (layer, head), optionally "resid_mid" and "head_by_pos"), every cell is patched
from the clean run into the corrupted run and the metric (the logit difference correct − incorrect at the last
position) is recorded. Editing a prompt or an answer recomputes every sweep; "normalise" only changes the view
((value − corrupted) / (clean − corrupted): 0 = no effect, 1 = restores the clean run).
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

import ipywidgets as W
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from tinygpt.interp.patching import SITES, PatchingError, PatchingResult, patch_sweep

from ._common import (
    captured,
    parse_answer,
    parse_tokens,
    prompt_text,
    show_figure,
    status_html,
    token_strs,
    user_errors,
)

DEFAULT_SITES = ("resid_pre", "attn_out", "mlp_out", "head")


class PatchingDashboard:
    """Clean / corrupted prompts, answer tokens, a normalise toggle and one patching heatmap per activation type.

    Attributes:
        results (dict[str, PatchingResult]): the last sweep per site, un-normalised.
        answers (tuple[int, int]): the (correct, incorrect) token ids the metric compares.
        widget (ipywidgets.VBox): the container; displaying the dashboard displays it.
        Controls: `clean`, `corrupted`, `correct`, `incorrect` (Text; apply on Enter; a blank answer means the
        clean / corrupted run's top prediction), `normalize` (Checkbox), `run_button`; outputs: `fig` (plotly
        FigureWidget, one heatmap per site), `status` (HTML), `output` (progress and tracebacks).
    """

    def __init__(
        self,
        model,
        clean: Any,
        corrupted: Any,
        correct: str | int | None = None,
        incorrect: str | int | None = None,
        *,
        sites: Sequence[str] = DEFAULT_SITES,
        normalize: bool = True,
        progress: bool = True,
    ):
        """
        Args:
            model: a `tinygpt.GPT` (without a tokenizer, prompts and answers are token ids).
            clean, corrupted: prompts with the same number of tokens: text, or token ids (a model without a
                tokenizer takes ids typed as "5 17 3").
            correct, incorrect: single-token answers for the logit difference, as text or a token id (None: the
                clean and corrupted runs' top predictions at the last position).
            sites: activation types to sweep, any of `tinygpt.interp.patching.SITES`.
            normalize: show normalised values.
            progress: tqdm progress bars for the sweeps.
        """
        bad = [s for s in sites if s not in SITES]
        if bad or not sites:
            raise PatchingError(f"sites must be a non-empty subset of {list(SITES)}, got {list(sites)}")
        self.model = model
        self.sites = tuple(sites)
        self.progress = progress
        self.results: dict[str, PatchingResult] = {}
        self.answers: tuple[int, int] | None = None

        text = dict(continuous_update=False, layout=W.Layout(width="48%"))
        self.clean = W.Text(value=prompt_text(model, clean), description="clean", **text)
        self.corrupted = W.Text(value=prompt_text(model, corrupted), description="corrupted", **text)
        answer = dict(continuous_update=False, placeholder="top prediction", layout=W.Layout(width="24%"))
        self.correct = W.Text(value=_answer_text(model, correct), description="correct", **answer)
        self.incorrect = W.Text(value=_answer_text(model, incorrect), description="incorrect", **answer)
        self.normalize = W.Checkbox(value=normalize, description="normalise (0 = corrupted, 1 = clean)", indent=False)
        self.run_button = W.Button(description="patch", icon="play", tooltip="recompute every sweep")
        self.status = W.HTML()
        self.output = W.Output()
        self.fig = go.FigureWidget()

        for w in (self.clean, self.corrupted, self.correct, self.incorrect):
            w.observe(self._on_inputs, names="value")
        self.normalize.observe(self._on_view, names="value")
        self.run_button.on_click(self._on_inputs)

        self.widget = W.VBox(
            [
                W.HTML("<h3 style='margin:4px 0'>Activation patching: clean → corrupted</h3>"),
                W.HBox([self.clean, self.corrupted]),
                W.HBox([self.correct, self.incorrect, self.normalize, self.run_button]),
                self.status,
                self.output,
                self.fig,
            ]
        )
        with captured(self.output):
            self.run()

    # ------------------------------------------------------------------ actions
    def _resolve_answers(self, clean: torch.Tensor, corrupted: torch.Tensor) -> tuple[int, int]:
        """Answer ids from the text boxes; blanks are the clean / corrupted runs' top predictions."""
        m = self.model
        c, k = self.correct.value, self.incorrect.value
        if c and k:
            return parse_answer(m, c), parse_answer(m, k)
        was = m.training
        m.eval()
        try:
            with torch.no_grad():
                top_c = int(m(clean)[0, -1].argmax())
                top_k = int(m(corrupted)[0, -1].argmax())
        finally:
            m.train(was)
        return (parse_answer(m, c) if c else top_c), (parse_answer(m, k) if k else top_k)

    def run(self) -> dict[str, PatchingResult]:
        """Recompute every sweep for the current prompts and answers, and redraw."""
        with user_errors(self.status, ValueError):
            for name, w in (("clean", self.clean), ("corrupted", self.corrupted)):
                if not w.value:
                    raise PatchingError(f"type a {name} prompt")
            clean = parse_tokens(self.model, self.clean.value)
            corrupted = parse_tokens(self.model, self.corrupted.value)
            if clean.shape != corrupted.shape:
                raise PatchingError(
                    f"clean and corrupted prompts must have the same number of tokens, got {clean.shape[1]} and "
                    f"{corrupted.shape[1]}; change the corrupted prompt without changing its length"
                )
            correct, incorrect = self._resolve_answers(clean, corrupted)
            self.status.value = status_html("<i>patching…</i>")
            results = {
                site: patch_sweep(
                    self.model,
                    clean,
                    corrupted,
                    site,
                    correct=correct,
                    incorrect=incorrect,
                    progress=self.progress,
                )
                for site in self.sites
            }
            self.results, self.answers = results, (correct, incorrect)
            self.draw()
        return self.results

    def shown(self, site: str) -> PatchingResult:
        """The result for `site` as the heatmap shows it (normalised if the toggle is on)."""
        r = self.results[site]
        return r.normalize() if self.normalize.value else r

    def draw(self) -> None:
        """Redraw the heatmaps from `results` (no recomputation)."""
        if not self.results:
            return
        with user_errors(self.status, PatchingError):
            shown = {s: self.shown(s) for s in self.sites}
            show_figure(self.fig, _figure(shown, self.sites))
            r = next(iter(self.results.values()))
            c, k = (html.escape(repr(s)) for s in token_strs(self.model, list(self.answers)))
            best = ", ".join(f"{s} {_cell(cell)} {v:.2f}" for s in self.sites for cell, v in shown[s].top(1))
            self.status.value = status_html(
                f"metric: logit({c}) − logit({k}) at the last position · clean <b>{r.clean_metric:.3f}</b>, "
                f"corrupted <b>{r.corrupted_metric:.3f}</b> · largest cells: {best}"
            )

    # ------------------------------------------------------------------ callbacks
    def _on_inputs(self, _change: Any = None) -> None:
        with captured(self.output):
            self.run()

    def _on_view(self, _change: Any = None) -> None:
        with captured(self.output):
            self.draw()

    # ------------------------------------------------------------------ display
    def _repr_mimebundle_(self, **kwargs: Any):
        return self.widget._repr_mimebundle_(**kwargs)

    def __repr__(self) -> str:
        return f"PatchingDashboard(sites={list(self.sites)}, results={list(self.results)})"


def _answer_text(model, answer: str | int | None) -> str:
    if answer is None:
        return ""
    return answer if isinstance(answer, str) else str(int(answer))


def _cell(cell: dict[str, int]) -> str:
    parts = {"layer": "L", "head": "H", "pos": " pos "}
    return "".join(f"{parts.get(a, a)}{i}" for a, i in cell.items())


def _head(label: str) -> str:
    return label if str(label).startswith("H") else f"H{label}"


def _figure(results: dict[str, PatchingResult], sites: Sequence[str]) -> go.Figure:
    """One heatmap per site on a shared diverging colour scale (rows = layers)."""
    panels = []
    for site in sites:
        r = results[site]
        v = r.values.detach().float().cpu()
        if r.axes == ("layer", "pos", "head"):  # rows L0H0, L0H1, ...; columns positions
            z = v.permute(0, 2, 1).reshape(-1, v.shape[1])
            y = [f"L{layer}{_head(h)}" for layer in r.labels["layer"] for h in r.labels["head"]]
            x = r.labels["pos"]
        elif r.axes == ("layer", "head"):
            z, y, x = v, [f"L{layer}" for layer in r.labels["layer"]], [_head(h) for h in r.labels["head"]]
        else:
            z, y, x = v, [f"L{layer}" for layer in r.labels["layer"]], r.labels["pos"]
        panels.append((site, z, x, y))
    # panel widths follow their number of columns, so a (layer x head) panel does not get a position panel's width
    fig = make_subplots(
        rows=1,
        cols=len(sites),
        subplot_titles=list(sites),
        horizontal_spacing=0.04,
        column_widths=[max(len(x), 6) for _, _, x, _ in panels],
    )
    lim = max(float(z.abs().max()) for _, z, _, _ in panels) or 1.0
    for col, (site, z, x, y) in enumerate(panels, start=1):
        fig.add_trace(
            go.Heatmap(
                z=z.tolist(),
                x=x,
                y=y,
                coloraxis="coloraxis",
                name=site,
                hovertemplate="%{y} | %{x}: %{z:.4f}<extra>" + site + "</extra>",
            ),
            row=1,
            col=col,
        )
        fig.update_yaxes(autorange="reversed", type="category", row=1, col=col)
        fig.update_xaxes(type="category", tickangle=-60, row=1, col=col)
    r0 = results[sites[0]]
    label = "normalised metric" if r0.normalized else "logit difference"
    fig.update_layout(
        title=f"patched metric per cell (clean {r0.clean_metric:.3f}, corrupted {r0.corrupted_metric:.3f})",
        coloraxis={"colorscale": "RdBu", "cmid": 0, "cmin": -lim, "cmax": lim, "colorbar": {"title": label}},
        template="plotly_white",
        height=max(340, 26 * max(len(y) for _, _, _, y in panels) + 200),
        width=min(1080, 160 + sum(40 + 18 * max(len(x), 6) for _, _, x, _ in panels)),  # a notebook's output area
        margin={"t": 80, "b": 90, "l": 60, "r": 20},
    )
    return fig


__all__ = ["PatchingDashboard"]
