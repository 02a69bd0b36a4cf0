"""`LaserDashboard`: singular-value spectra, a LASER rank sweep, and a before/after preview of one intervention.

    from tinygpt.widgets import LaserDashboard
    dash = LaserDashboard(model, targets="mlp", fractions=(0.9, 0.5, 0.2, 0.1, 0.05, 0.01))
    dash                      # displays in a notebook
    dash.sweep.best()         # the state lives in the pure result objects
    dash.apply_button.click() # or click "preview" in the notebook

A thin layer over `tinygpt.surgery.singular_values`, `laser_sweep` and `laser_compare`: every callback
recomputes one of those results (or reads a stored one) and copies its numbers into a figure. The
dashboard never modifies the model (previews run inside the `laser` context manager, which restores the
weights bitwise); to keep an intervention call `tinygpt.surgery.laser_(model, *dash.intervention_args)`.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

import ipywidgets as W
import plotly.graph_objects as go

from tinygpt.inputs import progress_enabled
from tinygpt.surgery import (
    PAPER_GRID,
    Intervention,
    LaserComparison,
    LaserSweepResult,
    SpectrumResult,
    eval_data,
    kept_rank,
    laser_compare,
    laser_sweep,
    resolve_layers,
    singular_values,
)

from .base import Dashboard, captured, heading, layer_dropdown, show_figure

#: A coarse ρ grid that sweeps quickly (the dashboard's default; `PAPER_GRID` is the paper's).
QUICK_GRID: tuple[float, ...] = (0.9, 0.5, 0.2, 0.1, 0.05, 0.01)


class LaserDashboard(Dashboard):
    """Spectra per layer, a LASER sweep (curves and heatmap), and a before/after preview of one intervention.

    Attributes:
        spectrum (SpectrumResult): singular values of the selected matrices.
        sweep (LaserSweepResult | None): the last sweep (None until run).
        comparison (LaserComparison | None): the last preview.
        widget (ipywidgets.VBox): the container; displaying the dashboard displays it.
        Controls: `spectrum_layer`, `normalize`, `sweep_button`, `target`, `layer`, `rank_fraction`,
        `apply_button`; outputs: `spectrum_fig`, `sweep_fig` (plotly FigureWidgets), `sweep_status`,
        `result` (ipywidgets.HTML); `output` (ipywidgets.Output) shows the callbacks' progress bars and
        errors in a kernel.
    """

    def __init__(
        self,
        model,
        tokens_or_corpus: Any = None,
        targets: str | Sequence[str] = "mlp",
        layers: int | str | Sequence[int] | None = None,
        fractions: Sequence[float] = QUICK_GRID,
        *,
        run_sweep: bool = True,
        prompt: str = "\n",
        max_new_tokens: int = 150,
        temperature: float = 0.8,
        seed: int = 0,
        progress: bool | None = None,
        **windows: Any,
    ):
        """
        Args:
            model: a `tinygpt.GPT` (with a tokenizer, for the samples).
            tokens_or_corpus: validation data: tokens [batch, pos], a 1-D token stream, text, a corpus path,
                or None (the held-out end of the built-in Shakespeare). Cut into windows once.
            targets, layers: the matrices to study (see `tinygpt.surgery.laser_`); default the MLP matrices
                of every layer (on a MoE model every expert's matrices, each its own target
                "moe.experts.{j}.fc_in" in the controls and the sweep).
            fractions: ρ values for the sweep and the ρ slider.
            run_sweep: run `laser_sweep` now (otherwise press "run sweep").
            prompt, max_new_tokens, temperature, seed: the before/after samples (same seed for both).
            progress: tqdm progress bars for the sweep and the spectra (None: the package default).
            **windows: the validation windows, `ctx`, `n_windows`, `batch_size` (see `tinygpt.surgery.eval_data`;
                its defaults).
        """
        super().__init__()
        self.model = model
        self.layers = resolve_layers(layers, model.cfg.n_layers)
        for f in fractions:
            kept_rank((1, 1), f)  # raises for a ρ outside (0, 1]
        if not fractions:
            raise ValueError("fractions is empty; e.g. use PAPER_GRID")
        self.fractions = [float(f) for f in fractions]
        self.progress = progress_enabled(progress)
        self.sample_options = {
            "prompt": prompt,
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "seed": seed,
        }
        with captured(self.output):  # in a kernel: progress bars and tracebacks of the construction
            # the spectra first: they check the targets before any data is loaded
            self.spectrum: SpectrumResult = singular_values(model, targets, self.layers, progress=self.progress)
            self.data = eval_data(model, tokens_or_corpus, **windows)
        self.targets = self.spectrum.targets  # concrete: one per expert matrix on MoE blocks
        self.sweep: LaserSweepResult | None = None
        self.comparison: LaserComparison | None = None

        # --- spectra
        self.spectrum_layer = layer_dropdown(self.layers)
        self.normalize = W.Checkbox(value=False, description="σ / σ_max", indent=False)
        self.spectrum_fig = go.FigureWidget(self.spectrum.figure(layer=self.layers[0]))
        self.spectrum_fig.update_layout(height=360, margin={"t": 50, "b": 40})
        # --- sweep
        self.sweep_button = W.Button(description="run sweep", icon="play", tooltip="laser_sweep over the grid")
        self.sweep_status = self.status  # the dashboard's status line: what the sweep found
        self.sweep_fig = go.FigureWidget()
        # --- one intervention
        rhos = sorted(set(self.fractions) | {1.0})
        self.target = W.Dropdown(options=self.targets, description="target")
        self.layer = layer_dropdown(self.layers)
        self.rank_fraction = W.SelectionSlider(
            options=[(f"{f:g}", f) for f in rhos],
            value=min(rhos, key=lambda f: abs(f - 0.1)),
            description="ρ (kept)",
            continuous_update=False,
        )
        self.apply_button = W.Button(
            description="preview", icon="eye", button_style="primary", tooltip="apply, sample, evaluate, restore"
        )
        self.result = W.HTML("<i>choose an intervention and press preview</i>")
        self.choice_status = W.HTML()

        self._observe(self._update_spectrum, self.spectrum_layer, self.normalize)
        self._observe(self._follow_layer, self.layer)
        self._observe(self._update_choice, self.target, self.layer, self.rank_fraction)
        self._on_click(self.sweep_button, self.run_sweep)
        # a matrix the chosen block lacks: reported in the result line
        self._on_click(self.apply_button, self.preview, errors=(ValueError,), status=self.result)
        self._layout(
            "LASER: singular values",
            W.HBox([self.spectrum_layer, self.normalize]),
            self.spectrum_fig,
            heading("LASER sweep: validation loss per (target, layer, ρ)"),
            W.HBox([self.sweep_button, self.sweep_status]),
            self.output,
            self.sweep_fig,
            heading("One intervention, before and after"),
            W.HBox([self.target, self.layer, self.rank_fraction, self.apply_button]),
            self.choice_status,
            self.result,
        )
        self._update_spectrum()
        self._update_choice()
        if run_sweep:
            self._run(self.run_sweep)

    # ------------------------------------------------------------------ actions
    @property
    def intervention(self) -> Intervention:
        """The intervention the controls select."""
        return Intervention(self.layer.value, self.target.value, self.rank_fraction.value)

    @property
    def intervention_args(self) -> tuple[str, list[int], float]:
        """(target, [layer], ρ): `laser_(model, *dash.intervention_args)` keeps the chosen intervention."""
        iv = self.intervention
        return iv.target, [iv.layer], iv.rank_fraction

    def run_sweep(self) -> LaserSweepResult:
        """Run `laser_sweep` on the dashboard's matrices and grid, plot it, and select the best intervention."""
        self.sweep_status.value = "<i>sweeping…</i>"
        self.sweep = laser_sweep(
            self.model, self.data, self.targets, self.layers, self.fractions, progress=self.progress
        )
        show_figure(self.sweep_fig, self.sweep.figure())
        iv, loss = self.sweep.best()
        self.sweep_status.value = (
            f"base loss <b>{self.sweep.base_loss:.4f}</b>; best: layer {iv.layer} {iv.target} ρ = "
            f"{iv.rank_fraction:g} → <b>{loss:.4f}</b> ({loss - self.sweep.base_loss:+.4f})"
        )
        self.target.value, self.layer.value, self.rank_fraction.value = iv.target, iv.layer, iv.rank_fraction
        return self.sweep

    def preview(self) -> LaserComparison:
        """Apply the chosen intervention temporarily: validation loss and a seeded sample, before and after."""
        iv = self.intervention
        self.result.value = "<i>running…</i>"
        self.comparison = laser_compare(
            self.model, iv.target, iv.layer, iv.rank_fraction, self.data, **self.sample_options
        )
        self.result.value = self.comparison.to_html()
        return self.comparison

    # ------------------------------------------------------------------ views
    def _update_spectrum(self) -> None:
        traces = self.spectrum.traces(layer=self.spectrum_layer.value, normalize=self.normalize.value)
        with self.spectrum_fig.batch_update():
            for trace, tr in zip(self.spectrum_fig.data, traces):
                trace.x, trace.y = tr["x"], tr["y"]
            self.spectrum_fig.layout.title.text = f"singular values, layer {self.spectrum_layer.value}"
            self.spectrum_fig.layout.yaxis.title.text = "σ / σ_max" if self.normalize.value else "singular value σ"

    def _follow_layer(self) -> None:
        self.spectrum_layer.value = self.layer.value

    def _update_choice(self) -> None:
        iv = self.intervention
        rho = iv.rank_fraction
        with self.spectrum_fig.batch_update():
            self.spectrum_fig.layout.shapes = [
                {
                    "type": "line",
                    "x0": rho,
                    "x1": rho,
                    "yref": "paper",
                    "y0": 0,
                    "y1": 1,
                    "line": {"dash": "dot", "color": "black"},
                }
            ]
            for trace in self.spectrum_fig.data:
                trace.line.width = 3 if trace.name == iv.target else 1.5
        if iv.layer not in self.spectrum.layers_of(iv.target):
            self._warn(
                f"block {iv.layer} has no {iv.target} (it is in layers {self.spectrum.layers_of(iv.target)})",
                self.choice_status,
            )
            return
        energy = self.spectrum.energy_kept(iv.target, iv.layer, rho)
        text = (
            f"layer {iv.layer} {iv.target}, ρ = {rho:g}: keeps {energy:.2%} of Σσ² "
            f"(relative error {max(0.0, 1 - energy) ** 0.5:.4f})"
        )
        if self.sweep is not None and rho in self.sweep.fractions:
            loss = self.sweep.loss(iv.target, iv.layer, rho)
            text += f"; sweep loss {loss:.4f} ({loss - self.sweep.base_loss:+.4f})"
        self.choice_status.value = html.escape(text)

    def __repr__(self) -> str:
        swept = "not run" if self.sweep is None else repr(self.sweep)
        return f"LaserDashboard(targets={self.targets}, layers={self.layers}, sweep: {swept})"


__all__ = ["LaserDashboard", "QUICK_GRID", "PAPER_GRID"]
