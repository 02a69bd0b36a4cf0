"""`AblationExplorer`: knock out a layer, its attention, its MLP or one head; compare generations and losses.

    from tinygpt.widgets import AblationExplorer
    ex = AblationExplorer(model, val_tokens, prompt="ROMEO:")
    ex                                  # displays in a notebook
    ex.layer.value, ex.component.value = 1, "attn"     # or use the controls
    ex.sweeps["zero"].top(3)            # the state lives in the pure result objects

A thin layer over `tinygpt.interp.ablation_sweep` (the loss increase of every single ablation, one sweep per
mode, computed when the mode is first shown) and `tinygpt.generate(..., ablate=...)` (the same prompt and seed
with and without the chosen ablation). The model is never modified: ablations are forward hooks that are
removed after each call.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

import ipywidgets as W
import plotly.graph_objects as go
import torch
from torch import Tensor

from tinygpt.interp.ablation import MODES, Ablation, AblationError, AblationSweepResult, ablate, ablation_sweep
from tinygpt.sampling import generate

from ._common import captured, decode, parse_tokens, prompt_text, status_html, user_errors

COMPONENT_OPTIONS = [("whole layer", "layer"), ("attention", "attn"), ("MLP", "mlp"), ("one head", "head")]
SWEEP_COMPONENTS = ("layer", "attn", "mlp")
COLORS = {"layer": "#7f7f7f", "attn": "#1f77b4", "mlp": "#2ca02c", "head": "#9467bd"}
SELECTED = "#d62728"


def default_tokens(model, data: Any = None, n_windows: int = 8) -> Tensor:
    """Evaluation tokens [n, n_ctx]: `data` if it is already a [batch, pos] tensor, else `n_windows` windows of
    held-out text (see `tinygpt.surgery.common.eval_data`; None = the built-in Shakespeare)."""
    if isinstance(data, Tensor) and data.ndim == 2:
        return data.long()
    from tinygpt.surgery.common import eval_data

    d = eval_data(model, data, ctx=model.cfg.n_ctx - 1, n_windows=n_windows)
    return torch.cat([d.x, d.y[:, -1:]], dim=1)


class AblationExplorer:
    """Layer / component / head / mode controls, generations with and without the ablation, loss-increase bars.

    Attributes:
        sweeps (dict[str, AblationSweepResult]): one sweep per mode shown so far (every layer, attention, MLP and
            head ablation, one at a time, on `tokens`).
        tokens (Tensor): the evaluation tokens [batch, pos] (also the reference batch for mean / resample).
        sample_clean, sample_ablated (str): the last two continuations (without the prompt).
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
        modes: Sequence[str] = MODES,
        n_windows: int = 8,
        progress: bool = True,
    ):
        """
        Args:
            model: a `tinygpt.GPT` (without a tokenizer, prompts and generations are token ids).
            tokens: evaluation tokens [batch, pos], or data for `eval_data` (text, a corpus path, None = the
                held-out end of the built-in Shakespeare), cut into `n_windows` windows.
            targets: optional [batch, pos] targets (-100 ignored) to score only some positions (e.g. the repeated
                half of induction sequences); passed to `ablation_sweep`.
            prompt, max_new_tokens, temperature, seed: the two generations (temperature 0 = greedy; the same
                seed for both). The prompt is text, or token ids (typed as "5 17 3" for a model without a
                tokenizer, whose generations are shown as ids too).
            modes: the modes offered ("zero", "mean", "resample").
            progress: tqdm progress bars for the sweeps.
        """
        self.model = model
        self.tokens = default_tokens(model, tokens, n_windows).to(model.embed.weight.device)
        self.targets = targets
        self.progress = progress
        self.sample_options = {"max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed}
        self.sweeps: dict[str, AblationSweepResult] = {}
        self.sample_clean: str = ""
        self.sample_ablated: str = ""
        bad = [m for m in modes if m not in MODES]
        if bad or not modes:
            raise AblationError(f"modes must be a non-empty subset of {MODES}, got {tuple(modes)}")
        cfg = model.cfg

        self.layer = W.Dropdown(options=[(f"layer {i}", i) for i in range(cfg.n_layers)], description="layer")
        self.component = W.Dropdown(options=COMPONENT_OPTIONS, value="attn", description="component")
        self.head = W.Dropdown(
            options=[(f"head {h}", h) for h in range(cfg.n_heads)], description="head", disabled=True
        )
        self.mode = W.ToggleButtons(
            options=list(modes),
            value=modes[0],
            tooltips=[
                {
                    "zero": "replace by zeros",
                    "mean": "replace by the mean over the evaluation batch",
                    "resample": "replace by the activation of a random evaluation row",
                }[m]
                for m in modes
            ],
        )
        self.prompt = W.Text(
            value=prompt_text(model, prompt),
            description="prompt",
            continuous_update=False,
            layout=W.Layout(width="70%"),
        )
        self.status = W.HTML()
        self.samples = W.HTML()
        self.output = W.Output()
        self.fig = go.FigureWidget()

        for w in (self.layer, self.component, self.head, self.prompt):
            w.observe(self._on_change, names="value")
        self.mode.observe(self._on_mode, names="value")

        self.widget = W.VBox(
            [
                W.HTML("<h3 style='margin:4px 0'>Ablation explorer</h3>"),
                W.HBox([self.layer, self.component, self.head]),
                self.mode,
                self.prompt,
                self.status,
                self.samples,
                self.output,
                self.fig,
            ]
        )
        with captured(self.output):
            self.sweep()
            self.update()

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
            self.status.value = status_html(f"<i>sweeping every {mode} ablation…</i>")
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
        with user_errors(self.status, AblationError, ValueError):
            self.status.value = status_html(
                f"<b>{html.escape(str(ab))}</b>: evaluation loss {sweep.baseline_loss:.4f} → <b>{loss:.4f}</b> "
                f"({loss - sweep.baseline_loss:+.4f}) on {self._n_scored():,} tokens"
            )
            prompt = self.prompt.value
            tokens = parse_tokens(self.model, prompt)
            n = tokens.shape[1]
            ctx = ablate(self.model, [ab], reference_tokens=self.tokens, seed=self.sample_options["seed"])
            clean = generate(self.model, tokens, **self.sample_options)
            ablated = generate(self.model, tokens, ablate=ctx, **self.sample_options)
            # decode only the new tokens: the prompt is shown as typed
            self.sample_clean = decode(self.model, clean[0, n:].tolist())
            self.sample_ablated = decode(self.model, ablated[0, n:].tolist())
            self.samples.value = _side_by_side(prompt, self.sample_clean, self.sample_ablated, str(ab))

    def _n_scored(self) -> int:
        if self.targets is None:
            return self.tokens.shape[0] * (self.tokens.shape[1] - 1)
        return int((self.targets != -100).sum())

    def _draw_bars(self) -> None:
        sweep = self.sweeps.get(self.mode.value)
        if sweep is None:
            return
        chosen = self.ablation
        colors = [SELECTED if a == chosen else COLORS[a.component] for a in sweep.ablations]
        with self.fig.batch_update():
            if not self.fig.data:
                self.fig.add_trace(go.Bar(name="loss increase"))
                self.fig.update_layout(
                    template="plotly_white",
                    height=360,
                    margin={"t": 50, "b": 60},
                    xaxis={"title": "ablation", "type": "category", "tickangle": -60},
                    yaxis={"title": "loss increase"},
                    showlegend=False,
                )
            bar = self.fig.data[0]
            bar.x = [a.label for a in sweep.ablations]
            bar.y = sweep.deltas.tolist()
            bar.marker.color = colors
            bar.hovertemplate = "%{x}: %{y:+.4f}<extra></extra>"
            self.fig.layout.title.text = (
                f"{sweep.ablations[0].mode} ablation: loss increase (baseline {sweep.baseline_loss:.4f}); "
                "red = selected"
            )

    # ------------------------------------------------------------------ callbacks
    def _on_change(self, _change: Any = None) -> None:
        with captured(self.output):
            self.update()

    def _on_mode(self, _change: Any = None) -> None:
        with captured(self.output):
            self.sweep()
            self.update()

    # ------------------------------------------------------------------ display
    def _repr_mimebundle_(self, **kwargs: Any):
        return self.widget._repr_mimebundle_(**kwargs)

    def __repr__(self) -> str:
        return f"AblationExplorer(selected {self.spec}, sweeps: {sorted(self.sweeps)})"


def _side_by_side(prompt: str, a: str, b: str, label: str) -> str:
    """Two columns: the prompt in bold, then each continuation (`a` without, `b` with the ablation); the
    ablated one is red from where it differs."""
    same = 0
    while same < min(len(a), len(b)) and a[same] == b[same]:
        same += 1

    def col(title: str, text: str, split: int | None) -> str:
        body = (
            html.escape(text)
            if split is None
            else (html.escape(text[:split]) + f"<span style='color:{SELECTED}'>{html.escape(text[split:])}</span>")
        )
        return (
            "<div style='flex:1;min-width:0'>"
            f"<div style='font-weight:600;margin-bottom:2px'>{html.escape(title)}</div>"
            "<pre style='white-space:pre-wrap;margin:0;padding:6px;background:#f6f6f6;border-radius:4px'>"
            f"<b>{html.escape(prompt)}</b>{body}</pre></div>"
        )

    note = "identical" if a == b else f"diverges after {same} characters"
    return (
        "<div style='display:flex;gap:12px'>"
        + col("without ablation", a, None)
        + col(f"with {label} ({note})", b, same if a != b else None)
        + "</div>"
    )


__all__ = ["AblationExplorer"]
