"""How well attribution patching estimates the exact sweep: correlations, top-k agreement and a scatter plot.

    est = attribution_patch(model, clean, corrupted, site="resid_pre")
    exact = patch_resid_pre(model, clean, corrupted)
    cmp = compare_attribution(est, exact, min_effect=0.05)   # cells whose exact effect > 5% of the gap
    cmp.pearson, cmp.spearman, cmp.top_k_overlap, cmp.same_top
    cmp.figure()                                             # estimate vs exact, one point per cell

Both results are compared as *effects*: each cell's value minus the run it patched (the corrupted metric when
denoising, the clean one when noising), so normalised and raw sweeps compare alike. A GradDrop estimate is a
magnitude, so the exact effects are compared by absolute value then.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from tinygpt.interp.circuits._common import CircuitError, pearson, spearman
from tinygpt.interp.patching.api import PatchingResult

__all__ = ["AttributionComparison", "compare_attribution"]


@dataclass
class AttributionComparison:
    """An estimate against the exact sweep, cell by cell.

    Attributes:
        pearson, spearman: correlations of the estimated and exact effects over the compared cells.
        top_k_overlap: the fraction of the exact sweep's k largest |effects| among the estimate's k largest.
        same_top: the cell of largest |effect| is the same in both.
        k: the k of the overlap; n_cells: cells compared (those whose exact |effect| >= min_effect * |gap|).
        estimated, exact: the compared effects [n_cells]; cells: their labels ("L1H3", "L0 pos 4", ...).
        min_effect: the threshold, as a fraction of |clean - corrupted|.
        absolute: effects were compared by absolute value (a magnitude estimate).
    """

    pearson: float
    spearman: float
    top_k_overlap: float
    same_top: bool
    k: int
    n_cells: int
    estimated: Tensor
    exact: Tensor
    cells: list[str]
    min_effect: float = 0.0
    absolute: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return (
            f"AttributionComparison({self.meta.get('site', '')}: {self.n_cells} cells; Pearson {self.pearson:.3f}, "
            f"Spearman {self.spearman:.3f}, top-{self.k} overlap {self.top_k_overlap:.2f}, "
            f"same top cell {self.same_top})"
        )

    def figure(self, title: str | None = None):
        """Plotly scatter: the estimated effect of each cell against its exact effect, with the diagonal."""
        import plotly.graph_objects as go

        x, y = self.exact.tolist(), self.estimated.tolist()
        lo = min(x + y + [0.0])
        hi = max(x + y + [0.0])
        fig = go.Figure()
        fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="y = x", line=dict(dash="dot")))
        fig.add_trace(
            go.Scatter(
                x=x,
                y=y,
                mode="markers",
                name="cells",
                text=self.cells,
                hovertemplate="%{text}<br>exact %{x:.4f}<br>estimate %{y:.4f}<extra></extra>",
            )
        )
        what = "|effect|" if self.absolute else "effect"
        fig.update_layout(
            title=title
            or f"{self.meta.get('method', 'AtP')} vs exact patching ({self.meta.get('site', '')}): Pearson "
            f"{self.pearson:.2f}, Spearman {self.spearman:.2f}",
            xaxis_title=f"exact {what}",
            yaxis_title=f"estimated {what}",
            template="plotly_white",
            width=560,
            height=520,
        )
        return fig


def _effects(r: PatchingResult) -> Tensor:
    """A sweep's values minus the value of the run it patched (0 = no effect)."""
    base = r.clean_metric if r.meta.get("direction") == "noising" else r.corrupted_metric
    if r.normalized:
        span = r.clean_metric - r.corrupted_metric
        base = (base - r.corrupted_metric) / span
    return r.values.double() - base


def _cell_labels(r: PatchingResult) -> list[str]:
    axes, shape = r.axes, r.values.shape
    out = []
    for i in range(r.values.numel()):
        idx = torch.unravel_index(torch.tensor(i), shape)
        parts = []
        for a, j in zip(axes, idx):
            j = int(j)
            names = r.labels.get(a)
            if a == "layer":
                parts.append(f"L{names[j] if names else j}")
            elif a == "head":
                parts.append(names[j] if names else f"H{j}")
            elif a == "pos":
                parts.append(f"pos {j}")
            else:
                parts.append(names[j] if names else f"{a} {j}")
        out.append(" ".join(parts))
    return out


def compare_attribution(
    estimate: PatchingResult, exact: PatchingResult, *, k: int = 5, min_effect: float = 0.0
) -> AttributionComparison:
    """Compare an attribution-patching estimate with the exact sweep of the same site.

    Args:
        estimate: `attribution_patch(...)`'s result.
        exact: the exact sweep (`patch_sweep` / `patch_heads` / ..., or TransformerLens' values wrapped in a
            `PatchingResult`) with the same prompts, metric, site and layers.
        k: the top-k overlap's k (capped at the number of compared cells).
        min_effect: compare only the cells whose exact |effect| is at least this fraction of the clean-corrupted
            gap (e.g. 0.05); 0 compares every cell.

    Returns:
        An `AttributionComparison` (`.figure()` is the scatter plot).
    """
    if tuple(estimate.values.shape) != tuple(exact.values.shape) or estimate.axes != exact.axes:
        raise CircuitError(
            f"the estimate ({estimate.site}, {tuple(estimate.values.shape)}) and the exact sweep ({exact.site}, "
            f"{tuple(exact.values.shape)}) do not cover the same cells; run both on the same site and layers"
        )
    est, ex = _effects(estimate).flatten(), _effects(exact).flatten()
    absolute = bool(estimate.meta.get("magnitude"))
    if absolute:
        ex = ex.abs()
    gap = abs(exact.clean_metric - exact.corrupted_metric)
    if exact.normalized:
        gap = 1.0
    keep = ex.abs() >= min_effect * gap if min_effect > 0 else torch.ones_like(ex, dtype=torch.bool)
    labels = [c for c, m in zip(_cell_labels(exact), keep.tolist()) if m]
    est, ex = est[keep], ex[keep]
    n = int(keep.sum())
    if n == 0:
        raise CircuitError(f"no cell's exact effect reaches {min_effect:.0%} of the gap; lower min_effect")
    kk = max(1, min(k, n))
    top_est = set(torch.argsort(est.abs(), descending=True)[:kk].tolist())
    top_ex = set(torch.argsort(ex.abs(), descending=True)[:kk].tolist())
    meta = dict(site=estimate.site, method=estimate.meta.get("method", "atp"), direction=estimate.meta.get("direction"))
    return AttributionComparison(
        pearson=pearson(est, ex),
        spearman=spearman(est, ex),
        top_k_overlap=len(top_est & top_ex) / kk,
        same_top=int(est.abs().argmax()) == int(ex.abs().argmax()),
        k=kk,
        n_cells=n,
        estimated=est.float(),
        exact=ex.float(),
        cells=labels,
        min_effect=min_effect,
        absolute=absolute,
        meta=meta,
    )
