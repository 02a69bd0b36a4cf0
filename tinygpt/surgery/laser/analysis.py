"""LASER analyses that leave the model exactly as it was: sweeps, the greedy composition, spectra, previews.

    sweep = laser_sweep(model, None, targets="mlp")        # validation loss for every (target, layer, ρ)
    best, loss = sweep.best()
    greedy = laser_greedy(model, None)                      # the paper's composition, last layer first
    spectrum = singular_values(model, "all")
    preview = laser_compare(model, "mlp.fc_in", 3, 0.1)     # loss and a seeded sample, before and after

`model` may also be a `.tinygpt` path; `corpus` (the validation data) is anything `tinygpt.surgery.eval_data` accepts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from tinygpt.checkpoint import as_model
from tinygpt.inputs import eval_mode, progress_enabled
from tinygpt.surgery.evaluation import eval_data, eval_loss
from tinygpt.surgery.laser.apply import laser
from tinygpt.surgery.laser.decompose import PAPER_GRID, check_fraction, check_fractions, truncations
from tinygpt.surgery.laser.results import (
    Intervention,
    LaserComparison,
    LaserGreedyResult,
    LaserSweepResult,
    SpectrumResult,
)
from tinygpt.surgery.restore import progress_bar, restoring
from tinygpt.surgery.targets import (
    LayerSpec,
    SurgeryError,
    TargetSpec,
    concrete_targets,
    resolve_layers,
    resolve_targets,
    select_linears,
    select_modules,
)


def laser_sweep(
    model: Any,
    corpus: Any = None,
    targets: TargetSpec = "all",
    layers: LayerSpec = None,
    fractions: Sequence[float] = PAPER_GRID,
    *,
    ctx: int | None = None,
    n_windows: int = 16,
    batch_size: int = 8,
    metric: Callable[[Any], float] | None = None,
    progress: bool | None = None,
) -> LaserSweepResult:
    """Validation loss (and optionally a task metric) for every single LASER intervention; the model is left
    exactly as it was.

    Args:
        model: a `tinygpt.GPT` (or a `.tinygpt` path).
        corpus: validation data: tokens [batch, pos], a 1-D token stream, text, a corpus path, or None (the
            last 1% of the built-in Shakespeare). See `tinygpt.surgery.eval_data`.
        targets, layers: which matrices to try (see `laser_`).
        fractions: ρ values to try (default: the paper's `PAPER_GRID`).
        ctx, n_windows, batch_size: how validation windows are cut from a stream.
        metric: an optional task metric, `metric(model) -> float` (higher is better, e.g. accuracy on a probe
            set), called once on the unmodified model and once per intervention (the model in eval mode,
            under `torch.no_grad`); `result.best(by="metric")` ranks by it.
        progress: show a progress bar (None: the package default).
    """
    model = as_model(model)
    fr, chosen, windows, base = _sweep_setup(model, corpus, targets, layers, fractions, ctx, n_windows, batch_size)
    tgts, lays = concrete_targets(chosen)
    losses = {t: [[math.nan] * len(fr) for _ in lays] for t in tgts}
    metrics = None if metric is None else {t: [[math.nan] * len(fr) for _ in lays] for t in tgts}
    base_metric = None if metric is None else _score(model, metric)
    counter = progress_bar(len(chosen) * len(fr), "LASER sweep", progress_enabled(progress))
    with restoring(model) as restorer, counter as bar:
        for layer, target, lin in chosen:
            reduced = truncations(lin.weight)
            for j, f in enumerate(fr):
                restorer.write_weight(lin, reduced(f))
                losses[target][lays.index(layer)][j] = eval_loss(model, windows)
                if metrics is not None:
                    metrics[target][lays.index(layer)][j] = _score(model, metric)
                bar.update()
            restorer.write_weight(lin, restorer.original(lin))
    return LaserSweepResult(base, tgts, lays, fr, losses, windows.n_tokens, base_metric, metrics)


def _score(model, metric: Callable[[Any], float]) -> float:
    """`metric(model)` as a float, in eval mode and without gradients (the mode is restored)."""
    with eval_mode(model), torch.no_grad():
        return float(metric(model))


def _sweep_setup(model, corpus, targets, layers, fractions, ctx, n_windows, batch_size):
    """Validated (fractions, selected matrices, validation windows, base loss) of a sweep."""
    fr = check_fractions(fractions)
    chosen = select_linears(model, targets, layers)
    windows = eval_data(model, corpus, ctx=ctx, n_windows=n_windows, batch_size=batch_size)
    return fr, chosen, windows, eval_loss(model, windows)


def laser_greedy(
    model: Any,
    corpus: Any = None,
    targets: TargetSpec = "all",
    layers: LayerSpec = None,
    fractions: Sequence[float] = PAPER_GRID,
    *,
    ctx: int | None = None,
    n_windows: int = 16,
    batch_size: int = 8,
    progress: bool | None = None,
) -> LaserGreedyResult:
    """Compose LASER interventions greedily from the last layer down, as in the paper.

    For each layer, from the last selected one to the first, and each target in it, every ρ in
    `fractions` is tried on top of the interventions kept so far; the best one is kept only if it lowers
    the validation loss. The model is restored exactly at the end: call `result.apply(model)` to keep
    the composition.

    Args: as for `laser_sweep`.
    """
    model = as_model(model)
    fr, chosen, windows, base = _sweep_setup(model, corpus, targets, layers, fractions, ctx, n_windows, batch_size)
    order = sorted(chosen, key=lambda c: -c[0])  # last layer first; targets in selection order within a layer
    current = base
    kept: list[Intervention] = []
    steps: list[dict[str, Any]] = []
    counter = progress_bar(len(chosen) * len(fr), "LASER greedy", progress_enabled(progress))
    with restoring(model) as restorer, counter as bar:
        for layer, target, lin in order:
            reduced = truncations(lin.weight)
            trials = []
            for f in fr:
                restorer.write_weight(lin, reduced(f))
                trials.append((eval_loss(model, windows), f))
                bar.update()
            loss, f = min(trials)
            keep = loss < current
            steps.append(
                {
                    "layer": layer,
                    "target": target,
                    "rank_fraction": f,
                    "loss_before": current,
                    "loss_after": loss,
                    "kept": keep,
                }
            )
            if keep:
                restorer.write_weight(lin, reduced(f))
                kept.append(Intervention(layer, target, f))
                current = loss
            else:
                restorer.write_weight(lin, restorer.original(lin))
    return LaserGreedyResult(base, current, kept, steps)


def singular_values(
    model: Any,
    targets: TargetSpec = "all",
    layers: LayerSpec = None,
    *,
    progress: bool | None = None,
) -> SpectrumResult:
    """Singular values (exact SVD in fp32) of every selected weight matrix.

    Works on dense layers and on layers already factored (`LowRankLinear`) or packed
    (`PackedQuantLinear`): their effective `weight` is decomposed.

    Args:
        model: a `tinygpt.GPT` (or a `.tinygpt` path).
        targets, layers: which matrices (see `laser_`).
        progress: show a progress bar (None: the package default).
    Returns:
        A `SpectrumResult`; `.figure()` plots it.
    """
    model = as_model(model)
    chosen = select_modules(model, targets, layers, dense_only=False)
    tgts, lays = concrete_targets(chosen)
    spectra: dict[str, list[list[float]]] = {t: [[] for _ in lays] for t in tgts}
    shapes: dict[str, tuple[int, int]] = {}
    with torch.no_grad(), progress_bar(len(chosen), "singular values", progress_enabled(progress)) as bar:
        for layer, t, mod in chosen:
            W = mod.weight
            shapes[t] = (int(W.shape[0]), int(W.shape[1]))
            spectra[t][lays.index(layer)] = torch.linalg.svdvals(W.detach().float().cpu()).tolist()
            bar.update()
    return SpectrumResult(tgts, lays, spectra, shapes)


def laser_compare(
    model: Any,
    target: str,
    layer: int,
    rank_fraction: float,
    corpus: Any = None,
    *,
    prompt: str = "\n",
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    seed: int = 0,
    ctx: int | None = None,
    n_windows: int = 16,
    batch_size: int = 8,
) -> LaserComparison:
    """Validation loss and a seeded sample before and after one LASER intervention; the model is restored.

    Args:
        model: a `tinygpt.GPT` with a tokenizer (or a `.tinygpt` path).
        target: one matrix name ("mlp.fc_in", "moe.experts.2.fc_out", ...; on a MoE block "mlp.fc_in" reduces
            every expert's fc_in together); layer: one layer; rank_fraction: ρ.
        corpus: validation data (see `laser_sweep`); an `EvalData` is used as it is.
        prompt, max_new_tokens, temperature, seed: the sample (the same seed before and after).
    """
    from tinygpt.sampling import generate

    model = as_model(model)
    tgts = resolve_targets(target)
    if len(tgts) != 1:
        raise SurgeryError(f"laser_compare takes one target, got {target!r} ({', '.join(tgts)})")
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise SurgeryError(f"laser_compare takes one layer (an int), got {layer!r}")
    check_fraction(rank_fraction)
    select_linears(model, tgts, [layer])  # validates before any work
    windows = eval_data(model, corpus, ctx=ctx, n_windows=n_windows, batch_size=batch_size)
    kw = {"temperature": temperature, "seed": seed}
    before = eval_loss(model, windows)
    sample_before = generate(model, prompt, max_new_tokens, **kw)
    with laser(model, tgts, [layer], rank_fraction) as report:
        after = eval_loss(model, windows)
        sample_after = generate(model, prompt, max_new_tokens, **kw)
    iv = Intervention(resolve_layers(layer, len(model.blocks))[0], tgts[0], float(rank_fraction))
    return LaserComparison(iv, before, after, prompt, sample_before, sample_after, report, windows.n_tokens)


__all__ = ["laser_compare", "laser_greedy", "laser_sweep", "singular_values"]
