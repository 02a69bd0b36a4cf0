"""HQQ analyses that leave the model as it was: the error grid and validation loss against bits.

grid = hqq_error_grid(model, bits=(2, 3, 4, 8), group_sizes=(32, 64, 128))   # every matrix, RTN and HQQ
curve = hqq_loss_curve(model, None, bits=(2, 3, 4, 8), group_size=64)       # the whole model quantized
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from tinygpt.checkpoint import as_model
from tinygpt.inputs import progress_enabled
from tinygpt.surgery.evaluation import eval_data, eval_loss
from tinygpt.surgery.hqq.apply import _validate, hqq
from tinygpt.surgery.hqq.packing import check_bits
from tinygpt.surgery.hqq.quantize import check_hqq_params, hqq_quantize, quantize_rtn
from tinygpt.surgery.hqq.results import METHODS, HqqGridResult, HqqLossCurve
from tinygpt.surgery.restore import one_thread, progress_bar
from tinygpt.surgery.targets import LayerSpec, SurgeryError, TargetSpec, concrete_targets, select_linears


def hqq_error_grid(
    model: Any,
    bits: tuple[int, ...] | list[int] = (2, 3, 4, 8),
    group_sizes: tuple[int | None, ...] | list[int | None] = (32, 64, 128),
    targets: TargetSpec = "all",
    layers: LayerSpec = None,
    *,
    p: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
    iters: int = 20,
    progress: bool | None = None,
) -> HqqGridResult:
    """Relative reconstruction error of RTN and HQQ for every selected matrix and every (bits, group size).

    The model is not modified.

    Args:
        model: a `tinygpt.GPT` (or a `.tinygpt` path).
        bits: bit widths to try (each 1..8).
        group_sizes: group sizes to try (None = whole rows); a group size that does not divide a matrix's
            in_features gives NaN for that matrix (it must divide at least one selected matrix).
        targets, layers: which matrices (see `hqq_`).
        p, beta, kappa, iters: HQQ hyperparameters (see `hqq_quantize`).
        progress: show a progress bar (None: the package default).
    """
    model = as_model(model)
    bits_l = list(dict.fromkeys(check_bits(b) for b in bits))
    groups = list(dict.fromkeys(group_sizes))
    if not bits_l or not groups:
        raise SurgeryError("bits and group_sizes must each hold at least one value, e.g. bits=(2, 3, 4, 8)")
    check_hqq_params(p, beta, kappa, iters)
    chosen = select_linears(model, targets, layers)
    in_features = sorted({lin.in_features for _, _, lin in chosen})
    for g in groups:
        if g is None:
            continue
        if isinstance(g, bool) or not isinstance(g, int) or g < 1:
            raise SurgeryError(f"group sizes must be positive ints (or None for whole rows), got {g!r}")
        if not any(n % g == 0 for n in in_features):
            raise SurgeryError(
                f"group size {g} divides none of the selected matrices (in_features {in_features}); "
                "choose divisors of those"
            )
    tgts, lays = concrete_targets(chosen)
    params = {"p": p, "beta": beta, "kappa": kappa, "iters": iters}
    shape = lambda: [[[math.nan] * len(groups) for _ in bits_l] for _ in lays]  # noqa: E731
    rtn = {t: shape() for t in tgts}
    hq = {t: shape() for t in tgts}
    weights: dict[tuple[int, str], Tensor] = {}
    counter = progress_bar(len(chosen) * len(bits_l) * len(groups), "HQQ error grid", progress_enabled(progress))
    with torch.no_grad(), one_thread(), counter as bar:
        for layer, target, lin in chosen:
            W = lin.weight.detach().float().cpu().clone()
            weights[(layer, target)] = W
            i = lays.index(layer)
            for j, b in enumerate(bits_l):
                for k, g in enumerate(groups):
                    if g is None or W.shape[1] % g == 0:
                        rtn[target][i][j][k] = quantize_rtn(W, b, g).rel_error(W)
                        hq[target][i][j][k] = hqq_quantize(W, b, g, **params).rel_error(W)
                    bar.update()
    return HqqGridResult(tgts, lays, bits_l, groups, rtn, hq, params, weights)


def hqq_loss_curve(
    model: Any,
    corpus: Any = None,
    bits: tuple[int, ...] | list[int] = (2, 3, 4, 8),
    group_size: int | None = 64,
    targets: TargetSpec = "all",
    layers: LayerSpec = None,
    *,
    p: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
    iters: int = 20,
    ctx: int | None = None,
    n_windows: int = 16,
    batch_size: int = 8,
    progress: bool | None = None,
) -> HqqLossCurve:
    """Validation loss vs bits with all selected matrices quantized (RTN and HQQ); the model is restored.

    Args:
        model: a `tinygpt.GPT` (or a `.tinygpt` path).
        corpus: validation data (see `tinygpt.surgery.eval_data`).
        bits: bit widths (each 1..8).
        group_size: one group size for every matrix (must divide their in_features; None = rows).
        targets, layers: which matrices (see `hqq_`).
        p, beta, kappa, iters: HQQ hyperparameters.
        ctx, n_windows, batch_size: how validation windows are cut from a stream.
        progress: show a progress bar (None: the package default).
    """
    model = as_model(model)
    bits_l = [check_bits(b) for b in bits]
    if not bits_l:
        raise SurgeryError("bits must hold at least one value, e.g. bits=(2, 3, 4, 8)")
    chosen = _validate(model, bits_l[0], group_size, targets, layers, p, beta, kappa, iters)
    windows = eval_data(model, corpus, ctx=ctx, n_windows=n_windows, batch_size=batch_size)
    base = eval_loss(model, windows)
    losses: dict[str, list[float]] = {m: [] for m in METHODS}
    errors: dict[str, list[float]] = {m: [] for m in METHODS}
    kw = {"p": p, "beta": beta, "kappa": kappa, "iters": iters}
    with progress_bar(2 * len(bits_l), "HQQ loss vs bits", progress_enabled(progress)) as bar:
        for b in bits_l:
            for m in METHODS:
                with hqq(model, b, group_size, targets, layers, optimize=m == "hqq", **kw) as report:
                    losses[m].append(eval_loss(model, windows))
                    errors[m].append(report.mean_error)
                bar.update()
    tgts, lays = concrete_targets(chosen)
    return HqqLossCurve(
        base,
        bits_l,
        group_size,
        losses["rtn"],
        losses["hqq"],
        errors["rtn"],
        errors["hqq"],
        tgts,
        lays,
        windows.n_tokens,
    )


__all__ = ["hqq_error_grid", "hqq_loss_curve"]
