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

from tinygpt.inputs import progress_enabled
from tinygpt.interp import PatchingError, PatchingResult, patch_sweep, patching_figure
from tinygpt.interp.patching import SITES

from ._inputs import parse_answer, parse_tokens, prompt_box, token_strs
from .base import Dashboard, show_figure

DEFAULT_SITES = ("resid_pre", "attn_out", "mlp_out", "head")


class PatchingDashboard(Dashboard):
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
        progress: bool | None = None,
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
            progress: tqdm progress bars for the sweeps (None: the package default).
        """
        super().__init__()
        bad = [s for s in sites if s not in SITES]
        if bad or not sites:
            raise PatchingError(f"sites must be a non-empty subset of {list(SITES)}, got {list(sites)}")
        self.model = model
        self.sites = tuple(sites)
        self.progress = progress_enabled(progress)
        self.results: dict[str, PatchingResult] = {}
        self.answers: tuple[int, int] | None = None

        self.clean = prompt_box(model, clean, "clean", "48%")
        self.corrupted = prompt_box(model, corrupted, "corrupted", "48%")
        answer = dict(placeholder="top prediction", width="24%")
        self.correct = prompt_box(model, _answer_text(correct), "correct", **answer)
        self.incorrect = prompt_box(model, _answer_text(incorrect), "incorrect", **answer)
        self.normalize = W.Checkbox(value=normalize, description="normalise (0 = corrupted, 1 = clean)", indent=False)
        self.run_button = W.Button(description="patch", icon="play", tooltip="recompute every sweep")
        self.fig = go.FigureWidget()

        self._observe(self.run, self.clean, self.corrupted, self.correct, self.incorrect)
        self._observe(self.draw, self.normalize)
        self._on_click(self.run_button, self.run)
        self._layout(
            "Activation patching: clean → corrupted",
            W.HBox([self.clean, self.corrupted]),
            W.HBox([self.correct, self.incorrect, self.normalize, self.run_button]),
            self.status,
            self.output,
            self.fig,
        )
        self._run(self.run)

    # ------------------------------------------------------------------ actions
    def _answers(self) -> tuple[int | None, int | None]:
        """Answer ids from the text boxes; None for a blank box (`patch_sweep` then uses the clean / corrupted
        run's top prediction)."""
        c, k = self.correct.value, self.incorrect.value
        return (parse_answer(self.model, c) if c else None), (parse_answer(self.model, k) if k else None)

    def run(self) -> dict[str, PatchingResult]:
        """Recompute every sweep for the current prompts and answers, and redraw."""
        with self._reporting(ValueError):
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
            correct, incorrect = self._answers()
            self._say("<i>patching…</i>")
            results = {
                site: patch_sweep(
                    self.model, clean, corrupted, site, correct=correct, incorrect=incorrect, progress=self.progress
                )
                for site in self.sites
            }
            meta = next(iter(results.values())).meta  # the answers patch_sweep resolved (blank box: top prediction)
            self.results, self.answers = results, (meta["correct"][0], meta["incorrect"][0])
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
        with self._reporting(PatchingError):
            shown = {s: self.shown(s) for s in self.sites}
            show_figure(self.fig, patching_figure(shown))
            r = next(iter(self.results.values()))
            c, k = (html.escape(repr(s)) for s in token_strs(self.model, list(self.answers)))
            best = ", ".join(f"{s} {_cell(cell)} {v:.2f}" for s in self.sites for cell, v in shown[s].top(1))
            self._say(
                f"metric: logit({c}) − logit({k}) at the last position · clean <b>{r.clean_metric:.3f}</b>, "
                f"corrupted <b>{r.corrupted_metric:.3f}</b> · largest cells: {best}"
            )

    def __repr__(self) -> str:
        return f"PatchingDashboard(sites={list(self.sites)}, results={list(self.results)})"


def _answer_text(answer: str | int | None) -> str:
    if answer is None:
        return ""
    return answer if isinstance(answer, str) else str(int(answer))


def _cell(cell: dict[str, int]) -> str:
    parts = {"layer": "L", "head": "H", "pos": " pos "}
    return "".join(f"{parts.get(a, a)}{i}" for a, i in cell.items())


__all__ = ["PatchingDashboard"]
