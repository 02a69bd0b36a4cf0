"""`AblationExplorer`: knock out a layer, its attention, its MLP or one head; compare generations and losses.

    from tinygpt.widgets import AblationExplorer
    ex = AblationExplorer(model, val_tokens, prompt="ROMEO:")
    ex                                  # displays in a notebook
    ex.layer.value, ex.component.value = 1, "attn"     # or use the controls
    ex.sweeps["zero"].top(3)            # the state lives in the pure result objects

A thin layer over `tinygpt.interp.ablation_sweep` (the loss increase of every single ablation, one sweep per
mode, computed when the mode is first shown; the bars are the sweep's own `.figure(mode, highlight=...)`) and
`tinygpt.interp.ablation_compare` (the same prompt and seed with and without the chosen ablation; the samples are
its `.to_html()`). The model is never modified: ablations are forward hooks that are removed after each call.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

import ipywidgets as W
import plotly.graph_objects as go
from torch import Tensor

from tinygpt.inputs import progress_enabled
from tinygpt.interp import (
    Ablation,
    AblationComparison,
    AblationError,
    AblationSweepResult,
    ablation_compare,
    ablation_sweep,
)

from ._inputs import eval_tokens, parse_tokens, prompt_box
from .base import Dashboard, layer_dropdown, show_figure

COMPONENT_OPTIONS = [("whole layer", "layer"), ("attention", "attn"), ("MLP", "mlp"), ("one head", "head")]
SWEEP_COMPONENTS = ("layer", "attn", "mlp")
MODE_TOOLTIPS = {
    "zero": "replace by zeros",
    "mean": "replace by the mean over the evaluation batch",
    "resample": "replace by the activation of a random evaluation row",
}


class AblationExplorer(Dashboard):
    """Layer / component / head / mode controls, generations with and without the ablation, loss-increase bars.

    Attributes:
        sweeps (dict[str, AblationSweepResult]): one sweep per mode shown so far (every layer, attention, MLP and
            head ablation, one at a time, on `tokens`).
        tokens (Tensor): the evaluation tokens [batch, pos] (also the reference batch for mean / resample).
        comparison (AblationComparison | None): the last two continuations (`ablation_compare`'s result).
        sample_clean, sample_ablated (str): those continuations (without the prompt).
        widget (ipywidgets.VBox): the container; displaying the explorer displays it.
        Controls: `layer`, `component`, `head` (enabled for component "head"), `mode`, `prompt`; outputs:
        `fig` (plotly FigureWidget with one bar per ablation), `samples` and `status` (HTML), `output`.
    """

    def __init__(
        self,
        model,
        tokens: Any = None,
        *,
        targets: Tensor | None = None,
        prompt: Any = "\n",
        max_new_tokens: int = 80,
        temperature: float = 0.0,
        seed: int = 0,
        modes: Sequence[str] = tuple(MODE_TOOLTIPS),
        n_windows: int = 8,
        progress: bool | None = None,
    ):
        """
        Args:
            model: a `tinygpt.GPT` (without a tokenizer, prompts and generations are token ids).
            tokens: evaluation tokens [batch, pos], or data for `tinygpt.surgery.eval_data` (text, a corpus path,
                None = the held-out end of the built-in Shakespeare), cut into `n_windows` windows.
            targets: optional [batch, pos] targets (-100 ignored) to score only some positions (e.g. the repeated
                half of induction sequences); passed to `ablation_sweep`.
            prompt, max_new_tokens, temperature, seed: the two generations (temperature 0 = greedy; the same
                seed for both). The prompt is text, or token ids (typed as "5 17 3" for a model without a
                tokenizer, whose generations are shown as ids too).
            modes: the modes offered ("zero", "mean", "resample").
            progress: tqdm progress bars for the sweeps (None: the package default).
        """
        super().__init__()
        if not modes:
            raise AblationError(f"modes must be a non-empty subset of {tuple(MODE_TOOLTIPS)}, got ()")
        for m in modes:
            Ablation(0, mode=m)  # the library's check of the mode
        self.model = model
        self.tokens = eval_tokens(model, tokens, n_windows)
        self.targets = targets
        self.progress = progress_enabled(progress)
        self.sample_options = {"max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed}
        self.sweeps: dict[str, AblationSweepResult] = {}
        self.comparison: AblationComparison | None = None
        cfg = model.cfg

        self.layer = layer_dropdown(range(cfg.n_layers))
        self.component = W.Dropdown(options=COMPONENT_OPTIONS, value="attn", description="component")
        self.head = W.Dropdown(
            options=[(f"head {h}", h) for h in range(cfg.n_heads)], description="head", disabled=True
        )
        self.mode = W.ToggleButtons(
            options=list(modes), value=modes[0], tooltips=[MODE_TOOLTIPS.get(m, m) for m in modes]
        )
        self.prompt = prompt_box(model, prompt)
        self.samples = W.HTML()
        self.fig = go.FigureWidget()

        self._observe(self.update, self.layer, self.component, self.head, self.prompt)
        self._observe(self._on_mode, self.mode)
        self._layout(
            "Ablation explorer",
            W.HBox([self.layer, self.component, self.head]),
            self.mode,
            self.prompt,
            self.status,
            self.samples,
            self.output,
            self.fig,
        )
        self._run(self._on_mode)

    # ------------------------------------------------------------------ state
    @property
    def ablation(self) -> Ablation:
        """The ablation the controls select."""
        comp = self.component.value
        return Ablation(self.layer.value, comp, self.head.value if comp == "head" else None, self.mode.value)

    @property
    def spec(self) -> str:
        """The selected ablation as a spec string, e.g. "1.head3:mean" (for `ablate` / `generate(ablate=...)`)."""
        return str(self.ablation)

    def sweep(self, mode: str | None = None) -> AblationSweepResult:
        """The sweep for `mode` (default: the selected one), computed on first use, and redraw the bars."""
        mode = mode or self.mode.value
        if mode not in self.sweeps:
            self._say(f"<i>sweeping every {mode} ablation…</i>")
            self.sweeps[mode] = ablation_sweep(
                self.model,
                self.tokens,
                modes=(mode,),
                components=SWEEP_COMPONENTS,
                heads=True,
                targets=self.targets,
                progress=self.progress,
            )
        self._draw_bars()
        return self.sweeps[mode]

    def update(self) -> None:
        """Regenerate both samples for the selected ablation and highlight its bar."""
        self.head.disabled = self.component.value != "head"
        self._draw_bars()
        ab = self.ablation
        sweep = self.sweeps.get(ab.mode) or self.sweep(ab.mode)
        loss = float(sweep.losses[sweep.ablations.index(ab)])
        with self._reporting(AblationError, ValueError):
            self._say(
                f"<b>{html.escape(str(ab))}</b>: evaluation loss {sweep.baseline_loss:.4f} → <b>{loss:.4f}</b> "
                f"({loss - sweep.baseline_loss:+.4f}) on {self._n_scored():,} tokens"
            )
            tokens = parse_tokens(self.model, self.prompt.value)
            self.comparison = ablation_compare(
                self.model, ab, tokens, reference_tokens=self.tokens, **self.sample_options
            )
            self.samples.value = self.comparison.to_html()

    @property
    def sample_clean(self) -> str:
        """The last continuation without the ablation (without the prompt)."""
        return self.comparison.sample_clean if self.comparison is not None else ""

    @property
    def sample_ablated(self) -> str:
        """The last continuation with the ablation (without the prompt)."""
        return self.comparison.sample_ablated if self.comparison is not None else ""

    def _on_mode(self) -> None:
        self.sweep()
        self.update()

    def _n_scored(self) -> int:
        if self.targets is None:
            return self.tokens.shape[0] * (self.tokens.shape[1] - 1)
        return int((self.targets != -100).sum())

    def _draw_bars(self) -> None:
        sweep = self.sweeps.get(self.mode.value)
        if sweep is not None:
            show_figure(self.fig, sweep.figure(self.mode.value, highlight=self.ablation))

    def __repr__(self) -> str:
        return f"AblationExplorer(selected {self.spec}, sweeps: {sorted(self.sweeps)})"


__all__ = ["AblationExplorer"]
