"""LASER on a model: `laser_` (in place) and `laser` (a context manager restoring the model exactly)."""

from __future__ import annotations

import math
import warnings
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch

from tinygpt.surgery.laser.decompose import LowRankLinear, check_fraction, kept_rank, numerical_rank, svd, truncate
from tinygpt.surgery.restore import Restorer, in_place, signature_of, temporarily
from tinygpt.surgery.targets import LayerSpec, TargetSpec, layers_text, module_name, select_linears, sort_targets


@dataclass
class LaserEntry:
    """One reduced matrix. `rank_before` is the numerical rank (as `torch.linalg.matrix_rank`)."""

    layer: int
    target: str
    shape: tuple[int, int]
    rank_before: int
    rank_kept: int
    energy_kept: float  # Σ_{i<r} σ_i² / Σ σ_i²  (1 − relative Frobenius error²)
    params_before: int
    params_after: int

    @property
    def name(self) -> str:
        return module_name(self.layer, self.target)

    @property
    def rel_error(self) -> float:
        """||W − W_r||_F / ||W||_F."""
        return math.sqrt(max(0.0, 1.0 - self.energy_kept))


@dataclass
class LaserReport:
    """What `laser_` did: one `LaserEntry` per matrix."""

    rank_fraction: float
    factored: bool
    entries: list[LaserEntry] = field(default_factory=list)

    @property
    def params_removed(self) -> int:
        return sum(e.params_before - e.params_after for e in self.entries)

    def figure(self):
        """Plotly bar chart: the relative Frobenius error of every reduced matrix (rank before → kept on hover)."""
        import plotly.graph_objects as go

        fig = go.Figure(
            go.Bar(
                x=[e.name for e in self.entries],
                y=[e.rel_error for e in self.entries],
                customdata=[[e.rank_before, e.rank_kept] for e in self.entries],
                hovertemplate="%{x}<br>rank %{customdata[0]} → %{customdata[1]}<br>rel. error %{y:.4f}<extra></extra>",
            )
        )
        fig.update_layout(
            title=f"LASER ρ={self.rank_fraction}: relative error ‖W − W_r‖/‖W‖ per matrix",
            yaxis_title="relative error",
            template="plotly_white",
            height=380,
        )
        return fig

    def __str__(self) -> str:
        w = max([len(e.name) for e in self.entries] + [6])
        lines = [
            f"LASER ρ={self.rank_fraction} ({'factored' if self.factored else 'dense'})",
            f"{'matrix':<{w}}  {'shape':<12} {'rank':>5} -> {'kept':<5} {'rel.err':>8} {'params':>20}",
        ]
        for e in self.entries:
            lines.append(
                f"{e.name:<{w}}  {str(list(e.shape)):<12} {e.rank_before:>5} -> {e.rank_kept:<5} "
                f"{e.rel_error:>8.4f} {e.params_before:>8,} -> {e.params_after:<8,}"
            )
        lines.append(f"parameters removed: {self.params_removed:,}")
        return "\n".join(lines)


@torch.no_grad()
def _apply(restorer: Restorer, model, targets, layers, rank_fraction, factored) -> LaserReport:
    check_fraction(rank_fraction)
    chosen = select_linears(model, targets, layers)  # validates everything before any change
    report = LaserReport(rank_fraction=float(rank_fraction), factored=factored)
    for layer, target, lin in chosen:
        m, n = lin.weight.shape
        U, S, Vh = svd(lin.weight)
        r = kept_rank((m, n), rank_fraction)
        energy = float((S[:r] ** 2).sum() / (S**2).sum()) if float(S[0]) > 0 else 1.0
        before = lin.weight.numel()
        if factored:
            new = LowRankLinear.from_linear(lin, r, (U, S, Vh))
            restorer.swap(module_name(layer, target), new)
            after = new.A.numel() + new.B.numel()
            if after >= before:
                warnings.warn(
                    f"{module_name(layer, target)}: rank {r} factors hold {after:,} parameters, not fewer than the "
                    f"dense {m}x{n} matrix ({before:,}); factored storage only saves space below rank "
                    f"{m * n // (m + n)}",
                    stacklevel=4,
                )
        else:
            restorer.write_weight(lin, truncate(U, S, Vh, r))
            after = before
        report.entries.append(LaserEntry(layer, target, (m, n), numerical_rank(S, (m, n)), r, energy, before, after))
    restorer.record(
        {
            "op": "laser",
            "targets": sort_targets(t for _, t, _ in chosen),
            "layers": layers_text(x for x, _, _ in chosen),
            "rank_fraction": float(rank_fraction),
            "factored": bool(factored),
        },
    )
    return report


def laser_(
    model,
    target: TargetSpec,
    layers: LayerSpec = None,
    rank_fraction: float = 0.1,
    *,
    factored: bool = False,
) -> LaserReport:
    """Apply LASER in place.

    Args:
        model: a `tinygpt.GPT`.
        target: matrix name(s) relative to a block: "mlp.fc_in", "mlp.fc_out", "attn.q_proj", ..., or a
            group "mlp", "attn", "all" (a list or comma-separated string combines them; see
            `tinygpt.surgery.targets`).
        layers: int, list, "8-11", "0,2,5" or None (all).
        rank_fraction: ρ in (0, 1], the fraction of min(out, in) kept.
        factored: replace each `nn.Linear` by a `LowRankLinear` holding the two factors (fewer parameters);
            otherwise the dense weight is overwritten by its low-rank approximation (a drop-in change).
    Returns:
        A `LaserReport` (per matrix: shape, rank before, rank kept, energy kept).
    Raises:
        SurgeryError: bad target, layer or fraction; nothing is modified in that case.
    """
    return in_place(_apply, model, target, layers, rank_fraction, factored)


@signature_of(laser_)
def laser(model, *args, **kwargs) -> AbstractContextManager[LaserReport]:
    """Context manager: LASER inside the block, the original weights (bitwise) and modules afterwards.

    Takes the arguments of `laser_` and yields its `LaserReport`.
    """
    return temporarily(laser_, model, *args, **kwargs)


__all__ = ["LaserEntry", "LaserReport", "laser", "laser_"]
