"""Interpretability across training: run analyses on a model as it trains (a callback) or on the checkpoints a
run saved, and plot them against the loss curve.

    # live: every 10 steps of the toy induction task, the largest induction score of a later-layer head
    cb = AnalysisCallback({"induction": "induction"}, every=10)
    model = train_induction_model(seed=0, callbacks=[cb])     # or train(..., callbacks=[cb]) with cb.model set
    res = cb.result()
    res.figure()                  # loss and induction score over steps; the phase change marked
    res.phase_change("induction"), res.loss_drop_step()

    # saved: train(..., callbacks=[CheckpointEvery(model, "runs/ckpts", every=100)]), then
    res = across_training("runs/ckpts", {"induction": "induction", "dla": lambda m: direct_logit_attribution(m, ...)})

An analysis is a function `model -> value` (a number, or a tensor: `.curve()` plots its maximum) or one of the
names in `ANALYSES` ("induction": the largest induction score of a head after layer 0, "previous_token": the
largest previous-token score of a layer-0 head). It runs with the model in eval mode (restored after), so an
analysis never changes training: any function of the library fits (attribution patching, patching sweeps, lens
KL, DLA), with its own prompts.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tinygpt.inputs import eval_mode
from tinygpt.interp.circuits._common import CircuitError

__all__ = ["ANALYSES", "AcrossTraining", "AnalysisCallback", "CheckpointEvery", "across_training"]


def _induction(model) -> float:
    from tinygpt.interp.attention import induction_scores

    s = induction_scores(model, seq_len=min(20, model.cfg.n_ctx // 2))
    return float(s[1:].max() if s.shape[0] > 1 else s.max())


def _previous_token(model) -> float:
    from tinygpt.interp.attention import previous_token_scores

    return float(previous_token_scores(model, seq_len=min(40, model.cfg.n_ctx))[0].max())


ANALYSES: dict[str, Callable[[Any], Any]] = {"induction": _induction, "previous_token": _previous_token}


def _resolve(analyses: Mapping[str, Any] | Callable | str) -> dict[str, Callable[[Any], Any]]:
    if callable(analyses) or isinstance(analyses, str):
        analyses = {getattr(analyses, "__name__", str(analyses)): analyses}
    out = {}
    for name, fn in dict(analyses).items():
        if isinstance(fn, str):
            if fn not in ANALYSES:
                raise CircuitError(
                    f"unknown analysis {fn!r}; give a function model -> value or one of {list(ANALYSES)}"
                )
            fn = ANALYSES[fn]
        if not callable(fn):
            raise CircuitError(f"analysis {name!r} is not callable: give a function model -> value")
        out[str(name)] = fn
    if not out:
        raise CircuitError("give at least one analysis")
    return out


def _scalar(v: Any) -> float:
    if isinstance(v, Tensor):
        return float(v.detach().float().max()) if v.numel() > 1 else float(v)
    if hasattr(v, "total") and callable(v.total):  # e.g. a DLAResult
        return float(v.total())
    return float(v)


@dataclass
class AcrossTraining:
    """Analyses over training steps.

    Attributes:
        steps: the steps analysed; values: {analysis: [value per analysed step]} (as returned).
        loss_steps, losses: the training loss curve (every step the run reported).
        sources: the checkpoint paths (`across_training`), else empty.
    """

    steps: list[int]
    values: dict[str, list[Any]]
    loss_steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    def curve(self, name: str) -> Tensor:
        """One analysis as floats [n_steps] (a tensor value's maximum; a result with `.total()` its total)."""
        if name not in self.values:
            raise CircuitError(f"no analysis {name!r}; have {list(self.values)}")
        return torch.tensor([_scalar(v) for v in self.values[name]], dtype=torch.float64)

    def phase_change(self, name: str) -> int:
        """The step at which the analysis rises the most between two analysed steps (the middle of that
        interval): e.g. where the induction score jumps."""
        y = self.curve(name)
        if len(y) < 2:
            raise CircuitError("need at least two analysed steps to find a change")
        i = int((y[1:] - y[:-1]).argmax())
        return (self.steps[i] + self.steps[i + 1]) // 2

    def loss_drop_step(self, window: int | None = None) -> int:
        """The step at which the (moving-average) training loss falls fastest: the middle of the `window`-step
        interval (default: the spacing of the analysed steps) with the largest drop."""
        if len(self.losses) < 3:
            raise CircuitError("need a loss curve (at least 3 steps)")
        w = window or (max(1, self.steps[1] - self.steps[0]) if len(self.steps) > 1 else 10)
        loss = torch.tensor(self.losses, dtype=torch.float64)
        k = max(1, min(w, len(loss) // 3))
        smooth = torch.nn.functional.avg_pool1d(loss[None, None], k, stride=1)[0, 0]  # smooth[j]: steps j..j+k-1
        drop = smooth[:-k] - smooth[k:]  # from the window at j to the next one
        i = int(drop.argmax())
        return self.loss_steps[min(i + k, len(self.loss_steps) - 1)]  # the middle of the two windows

    def __repr__(self) -> str:
        names = ", ".join(self.values)
        span = f"steps {self.steps[0]}..{self.steps[-1]}" if self.steps else "no steps"
        return f"AcrossTraining({names}; {len(self.steps)} analysed {span}; {len(self.losses)} loss points)"

    def figure(self, names: Sequence[str] | None = None, title: str | None = None):
        """Plotly: the training loss (left axis) and each analysis (right axis) over steps, with the analysis's
        phase change and the loss's steepest drop marked."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        names = list(names or self.values)
        fig = make_subplots(specs=[[{"secondary_y": True}]])
        if self.losses:
            fig.add_trace(go.Scatter(x=self.loss_steps, y=self.losses, name="training loss", mode="lines",
                                     line=dict(color="#999")), secondary_y=False)  # fmt: skip
        for name in names:
            fig.add_trace(
                go.Scatter(x=self.steps, y=self.curve(name).tolist(), name=name, mode="lines+markers"),
                secondary_y=True,
            )
        if names and len(self.steps) > 1:
            fig.add_vline(x=self.phase_change(names[0]), line_dash="dash", annotation_text=f"{names[0]} jump")
        if len(self.losses) > 2:
            fig.add_vline(x=self.loss_drop_step(), line_dash="dot", line_color="#999", annotation_text="loss drop",
                          annotation_position="bottom right")  # fmt: skip
        fig.update_xaxes(title_text="step")
        fig.update_yaxes(title_text="loss", secondary_y=False)
        fig.update_yaxes(title_text="analysis", secondary_y=True)
        fig.update_layout(title=title or "Across training", template="plotly_white", width=760, height=420)
        return fig


class AnalysisCallback:
    """A training callback (`train(callbacks=[...])`, `train_induction_model(callbacks=[...])`) that runs analyses
    every `every` steps (and at the steps in `at`) on the model being trained, and records the loss each step.

    Args:
        analyses: {name: function model -> value or a name in `ANALYSES`}, or one function.
        every: analyse every this many steps (0: only the steps in `at`).
        at: extra steps to analyse.
        model: the model trained; with `train(model, ...)` pass it, with `train_induction_model` leave it None
            (the callback finds the model by the hook-point module it is attached to: set `cb.model` or pass it).
        step0: also analyse before the first step (when the model is known).
    """

    def __init__(
        self,
        analyses: Mapping[str, Any] | Callable | str,
        *,
        every: int = 50,
        at: Sequence[int] = (),
        model=None,
        step0: bool = True,
    ):
        if every < 0:
            raise CircuitError(f"every must be >= 0, got {every}")
        self.analyses = _resolve(analyses)
        self.every, self.at = every, set(int(s) for s in at)
        self.model = model
        self._result = AcrossTraining([], {n: [] for n in self.analyses})
        if model is not None and step0:
            self._analyse(0)

    def _analyse(self, step: int) -> None:
        if self.model is None:
            raise CircuitError("AnalysisCallback does not know the model: pass model= (or set cb.model)")
        with eval_mode(self.model):
            for name, fn in self.analyses.items():
                v = fn(self.model)
                self._result.values[name].append(v.detach().cpu() if isinstance(v, Tensor) else v)
        self._result.steps.append(step)

    def __call__(self, rec: Mapping[str, float]) -> None:
        step = int(rec["step"])
        if "loss" in rec:
            self._result.loss_steps.append(step)
            self._result.losses.append(float(rec["loss"]))
        if (self.every and step % self.every == 0) or step in self.at:
            if self.model is None:
                self.model = rec.get("model")
            self._analyse(step)

    def result(self) -> AcrossTraining:
        """What was recorded so far."""
        return self._result


class CheckpointEvery:
    """A training callback writing `directory/step{N:06d}.tinygpt` every `every` steps (weights, config,
    tokenizer and `train_state` with the step and loss), for `across_training`.

    Args:
        model: the model being trained (it needs a tokenizer to be saved).
        directory: where the files go (created).
        every: steps between files.
    """

    def __init__(self, model, directory: str | os.PathLike, every: int):
        if every < 1:
            raise CircuitError(f"every must be >= 1, got {every}")
        if getattr(model, "tokenizer", None) is None:
            raise CircuitError("the model has no tokenizer, so it cannot be saved; set model.tokenizer first")
        self.model, self.directory, self.every = model, Path(directory), every
        self.paths: list[Path] = []
        self.history: list[dict[str, float]] = []

    def __call__(self, rec: Mapping[str, float]) -> None:
        from tinygpt.checkpoint import save

        self.history.append({k: float(v) for k, v in rec.items() if isinstance(v, (int, float))})
        step = int(rec["step"])
        if step % self.every == 0:
            state = {"step": step, "loss": rec.get("loss"), "history": list(self.history)}
            self.paths.append(save(self.model, self.directory / f"step{step:06d}.tinygpt", train_state=state))


def _paths(checkpoints: Any) -> list[Path]:
    if isinstance(checkpoints, (str, os.PathLike)):
        p = Path(checkpoints)
        if p.is_dir():
            found = sorted(p.glob("*.tinygpt"))
            if not found:
                raise CircuitError(f"no .tinygpt files in {p}")
            return found
        return [p]
    return [Path(x) for x in checkpoints]


def across_training(checkpoints: Any, analyses: Mapping[str, Any] | Callable | str, *, device=None) -> AcrossTraining:
    """Run analyses on every checkpoint of a run, in step order.

    Args:
        checkpoints: a directory of `.tinygpt` files (e.g. `CheckpointEvery`'s), or a list of paths / models.
        analyses: {name: function model -> value or a name in `ANALYSES`}, or one function.
        device: where to load each model.

    Returns:
        `AcrossTraining` with one analysed step per checkpoint (its `train_state["step"]`) and the loss curve
        from the last checkpoint's history.
    """
    from tinygpt.checkpoint import as_model

    fns = _resolve(analyses)
    items = []
    sources = checkpoints if isinstance(checkpoints, (list, tuple)) else _paths(checkpoints)
    for src in sources:
        model = as_model(src, device=device)
        step = int((getattr(model, "train_state", None) or {}).get("step", len(items)))
        items.append((step, str(src) if isinstance(src, (str, os.PathLike)) else f"model {len(items)}", model))
    items.sort(key=lambda x: x[0])
    res = AcrossTraining([], {n: [] for n in fns}, sources=[s for _, s, _ in items])
    history: list[dict] = []
    for step, _, model in items:
        with eval_mode(model):
            for name, fn in fns.items():
                v = fn(model)
                res.values[name].append(v.detach().cpu() if isinstance(v, Tensor) else v)
        res.steps.append(step)
        history = (getattr(model, "train_state", None) or {}).get("history") or history
    res.loss_steps = [int(h["step"]) for h in history if "loss" in h and h["loss"] is not None]
    res.losses = [float(h["loss"]) for h in history if "loss" in h and h["loss"] is not None]
    return res
