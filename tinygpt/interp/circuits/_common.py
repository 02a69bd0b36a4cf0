"""What the circuit tools share: `CircuitError`, gradients of a metric at hook points, rank statistics."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from tinygpt.interp.circuits.graph import CircuitError  # the one error class of the subpackage (helper `edges`)

__all__ = ["CircuitError", "grad_enabled", "pearson", "spearman"]


@contextlib.contextmanager
def grad_enabled() -> Iterator[None]:
    """Autograd on inside (even under `torch.no_grad()` or `torch.inference_mode()`), as it was afterwards.

    Only the activations' gradients are taken (`torch.autograd.grad` with the activations as inputs): no
    parameter's `.grad` or `requires_grad` changes."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def require_hooks(model, names: Sequence[str], what: str) -> None:
    """A `CircuitError` naming the first hook point in `names` the model lacks (an architecture variant
    without it)."""
    missing = [n for n in names if n not in model.hook_dict]
    if missing:
        variants = getattr(model.cfg, "variants", None) or []
        kind = f"this model ({', '.join(map(str, variants))})" if variants else "this model"
        raise CircuitError(
            f"{what} reads hook point {missing[0]!r}, which {kind} does not have; choose another site "
            "(the residual-stream sites exist in every variant)"
        )


def scalar_metric(value: Any) -> Tensor:
    """The metric's value as a 0-d tensor, or a `CircuitError` naming the shape and the fix."""
    if not isinstance(value, Tensor):
        raise CircuitError(
            f"the metric must return a scalar tensor computed from the logits (so it has a gradient), got "
            f"{type(value).__name__}"
        )
    if value.numel() != 1:
        raise CircuitError(
            f"the metric must return a scalar, got shape {tuple(value.shape)}; reduce it (e.g. .mean() over the batch)"
        )
    return value.reshape(())


def add_zero(store: dict[str, Tensor], acts: dict[str, Tensor] | None = None) -> Callable:
    """A forward hook that adds a zero tensor requiring grad to the activation (so d metric / d zero is the
    activation's gradient, whether or not the parameters require grad), keeping the zero in `store` and the
    activation (detached) in `acts`."""

    def hook(x: Tensor, hook) -> Tensor:
        if acts is not None:
            acts[hook.name] = x.detach()
        zero = torch.zeros_like(x, requires_grad=True)
        store[hook.name] = zero
        return x + zero

    return hook


def _ranks(x: Tensor) -> Tensor:
    """Ranks 1..n of a 1-D tensor, ties given their average rank."""
    order = torch.argsort(x)
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[order] = torch.arange(1, len(x) + 1, dtype=torch.float64)
    uniq, inverse = torch.unique(x, return_inverse=True)
    if len(uniq) < len(x):  # average the ranks of tied values
        sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, ranks)
        counts = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(ranks))
        ranks = (sums / counts)[inverse]
    return ranks


def pearson(x: Tensor, y: Tensor) -> float:
    """Pearson correlation of two 1-D tensors (NaN if either is constant or has < 2 values)."""
    x, y = x.double().flatten(), y.double().flatten()
    if len(x) < 2:
        return float("nan")
    x, y = x - x.mean(), y - y.mean()
    den = x.norm() * y.norm()
    return float((x @ y) / den) if den > 0 else float("nan")


def spearman(x: Tensor, y: Tensor) -> float:
    """Spearman rank correlation (Pearson of the tie-averaged ranks)."""
    x, y = x.double().flatten(), y.double().flatten()
    return pearson(_ranks(x), _ranks(y)) if len(x) >= 2 else float("nan")
