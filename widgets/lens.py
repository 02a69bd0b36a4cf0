"""`LensDashboard`: what every layer already predicts, read with the logit lens or a tuned lens.

    from tinygpt.widgets import LensDashboard
    dash = LensDashboard(model, lens="tiny.lenses", prompt="ROMEO: But soft, what light")
    dash                       # displays in a notebook
    dash.result                # the LensResult the heatmap shows
    dash.lens_kind.value = "tuned"; dash.metric.value = "entropy"   # or use the controls

A thin layer over `tinygpt.interp.logit_lens`: every control change recomputes one `LensResult` (one forward
pass) and shows `LensResult.figure(metric)`: a (layer x position) heatmap with each layer's top-1 token in the
cells and its top-5 (with probabilities) on hover.
"""

from __future__ import annotations

import os
from typing import Any

import ipywidgets as W
import plotly.graph_objects as go

from tinygpt.interp import LensError, LensResult, TunedLens, logit_lens

from ._inputs import parse_tokens, prompt_box
from .base import Dashboard, show_figure

METRIC_OPTIONS = [
    ("KL(final ‖ layer)", "kl"),
    ("entropy", "entropy"),
    ("P(next token)", "prob"),
    ("rank of next token", "rank"),
]
DEFAULT_PROMPT = "ROMEO: But soft, what light through yonder window breaks?"


class LensDashboard(Dashboard):
    """Prompt box, logit / tuned lens toggle, metric choice, `.lenses` loader and the lens heatmap.

    Attributes:
        result (LensResult): what the heatmap shows (recomputed on every control change).
        lens (TunedLens | None): the tuned lens, if one was given or loaded.
        widget (ipywidgets.VBox): the container; displaying the dashboard displays it.
        Controls: `prompt` (Text; applies on Enter), `lens_kind` ("logit" / "tuned"), `metric` ("kl",
        "entropy", "prob", "rank"), `lens_path` (Text) and `load_button`; outputs: `fig` (plotly
        FigureWidget), `status` (HTML), `output` (progress and tracebacks).
    """

    def __init__(
        self,
        model,
        lens: TunedLens | str | os.PathLike | None = None,
        prompt: Any = DEFAULT_PROMPT,
        *,
        metric: str = "kl",
        k: int = 5,
        target: Any = None,
    ):
        """
        Args:
            model: a `tinygpt.GPT` (without a tokenizer, the prompt box takes token ids).
            lens: a `TunedLens`, a `.lenses` path (checked against the model), or None (logit lens only until
                a lens is loaded with the path box).
            prompt: the initial prompt: text, or token ids (a model without a tokenizer takes ids typed as
                "5 17 3").
            metric: the heatmap's colour: "kl" (KL(final || layer)), "entropy", "prob" or "rank" of the target.
            k: top tokens kept per cell (the hover shows up to 5).
            target: the tracked token (see `logit_lens`; None = the actual next token).
        """
        super().__init__()
        self.model = model
        self.k = k
        self.target = target
        self.lens: TunedLens | None = None
        self.result: LensResult | None = None

        self.prompt = prompt_box(model, prompt, placeholder="type a prompt and press Enter")
        self.lens_kind = W.ToggleButtons(
            options=[("logit lens", "logit"), ("tuned lens", "tuned")],
            value="logit",
            tooltips=["unembed(ln_final(h)) of each layer", "translate each layer first (a trained TunedLens)"],
        )
        self.metric = W.Dropdown(options=METRIC_OPTIONS, value=metric, description="colour")
        self.lens_path = W.Text(description=".lenses", placeholder="path/to/model.lenses", layout=W.Layout(width="50%"))
        self.load_button = W.Button(description="load lens", icon="folder-open", tooltip="TunedLens.load(path, model)")
        self.fig = go.FigureWidget()

        if lens is not None:
            self.lens = self._load(lens)
            self.lens_kind.value = "tuned"

        self._observe(self.update, self.prompt, self.lens_kind, self.metric)
        self._on_click(self.load_button, self._load_typed_path, errors=(LensError, OSError, ValueError))
        self._layout(
            "Logit lens / tuned lens",
            self.prompt,
            W.HBox([self.lens_kind, self.metric]),
            W.HBox([self.lens_path, self.load_button]),
            self.status,
            self.output,
            self.fig,
        )
        self.update()

    # ------------------------------------------------------------------ actions
    def _load(self, lens: TunedLens | str | os.PathLike) -> TunedLens:
        if isinstance(lens, TunedLens):
            lens.check_model(self.model)
            return lens
        return TunedLens.load(lens, self.model)

    def load(self, path: str | os.PathLike) -> TunedLens:
        """Load a `.lenses` file for this model, switch to the tuned lens and redraw."""
        self.lens = self._load(path)
        if self.lens_kind.value == "tuned":
            self.update()
        else:
            self.lens_kind.value = "tuned"  # redraws
        return self.lens

    def update(self) -> LensResult | None:
        """Recompute the lens for the current controls and redraw the heatmap."""
        if self.lens_kind.value == "tuned" and self.lens is None:
            self.lens_kind.value = "logit"  # redraws the logit lens (the observer calls update() again)
            self._warn(
                "no tuned lens yet: load a .lenses file below (or pass lens= / train one with "
                "tinygpt.interp.tuned_lens); showing the logit lens"
            )
            return self.result
        with self._reporting(ValueError, LensError):
            self._draw()
        return self.result

    def _draw(self) -> None:
        res = logit_lens(
            self.model,
            parse_tokens(self.model, self.prompt.value)[0],
            k=self.k,
            target=self.target,
            lens=self.lens if self.lens_kind.value == "tuned" else None,
        )
        self.result = res
        fig = res.figure(self.metric.value)
        fig.update_traces(colorbar_title_side="right")  # a long title would be cut at the figure's edge
        show_figure(self.fig, fig)
        kl = res.kl[:-1].mean(dim=1)
        worst = ", ".join(f"{lab} {float(v):.2f}" for lab, v in zip(res.labels, kl))
        self._say(
            f"{res.lens} lens · {len(res.labels)} layers × {len(res.str_tokens)} tokens · "
            f"mean KL(final ‖ layer) per layer: {worst}"
        )

    def _load_typed_path(self) -> None:
        path = self.lens_path.value.strip()
        if not path:
            raise ValueError("type the path of a .lenses file (written by TunedLens.save or tinygpt tuned-lens)")
        self.load(os.path.expanduser(path))

    def __repr__(self) -> str:
        lens = "no tuned lens" if self.lens is None else "tuned lens loaded"
        return f"LensDashboard({self.lens_kind.value} lens, metric={self.metric.value!r}, {lens}, {self.result!r})"


__all__ = ["LensDashboard"]
