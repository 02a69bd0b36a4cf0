"""LASER: layer-selective rank reduction (Sharma, Ash & Misra 2023, "The Truth is in There").

A LASER intervention (layer ℓ, matrix τ, fraction ρ) replaces one weight matrix W [out, in] by its best
rank-r approximation in Frobenius norm (Eckart–Young, via an exact SVD in fp32), with

    r = floor(ρ · min(out, in)),  at least 1,

so ρ is the fraction of the maximal rank that is *kept* (ρ = 0.01 removes 99% of the rank). The paper
sweeps ρ ∈ `PAPER_GRID` and composes the best interventions greedily from the last layer down.

    with tinygpt.surgery.laser(model, "mlp.fc_in", layers="8-11", rank_fraction=0.1):
        loss = model(tokens, return_type="loss")          # weights restored exactly afterwards
    report = laser_(model, "mlp.fc_out", layers=[5], rank_fraction=0.05, factored=True)
    sweep = laser_sweep(model, None, targets="mlp")        # validation loss for every (target, layer, ρ)
    sweep.figure().show()

`factored=True` stores the reduced matrix as two factors (`LowRankLinear`: `A` [r, in], `B` [out, r]),
which really removes parameters when r·(in + out) < in·out; such models save and load like any other.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from tinygpt.surgery.common import (
    EvalData,
    LayerSpec,
    Restorer,
    TargetSpec,
    eval_data,
    eval_loss,
    layers_text,
    module_name,
    record,
    resolve_layers,
    resolve_targets,
    select_linears,
    set_module,
)

#: The paper's rank fractions ρ (fraction of the maximal rank kept): reductions of 10%, 20%, 40%, 60%,
#: 80%, 90%, 95% and 99%.
PAPER_GRID: tuple[float, ...] = (0.9, 0.8, 0.6, 0.4, 0.2, 0.1, 0.05, 0.01)


def kept_rank(shape: Sequence[int], rank_fraction: float) -> int:
    """r = floor(ρ · min(out, in)), at least 1 (a 1e-9 slack absorbs float error, e.g. 0.29 · 100)."""
    _check_fraction(rank_fraction)
    return max(1, math.floor(rank_fraction * min(shape[-2:]) + 1e-9))


def _check_fraction(rank_fraction: float) -> None:
    if isinstance(rank_fraction, bool) or not isinstance(rank_fraction, (int, float)):
        raise ValueError(f"rank_fraction must be a number in (0, 1], got {rank_fraction!r}")
    if not 0.0 < float(rank_fraction) <= 1.0:
        raise ValueError(
            f"rank_fraction must be in (0, 1] (the fraction of the rank kept; 0.1 keeps 10%), got {rank_fraction}"
        )


def _svd(W: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Exact thin SVD in fp32: U [m, k], S [k], Vh [k, n].

    On CPU, matrices up to 1024x1024 are decomposed on one thread: multi-threaded LAPACK SVD of small
    matrices is slower, and 10-1000x slower when the cores are shared with other processes (measured).
    """
    W = W.detach().float()
    if W.device.type != "cpu" or W.numel() > 1 << 20 or torch.get_num_threads() == 1:
        return torch.linalg.svd(W, full_matrices=False)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.linalg.svd(W, full_matrices=False)
    finally:
        torch.set_num_threads(n)


def _factors(U: Tensor, S: Tensor, Vh: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """Balanced factors with B @ A = U_r diag(S_r) Vh_r: A [r, n], B [m, r]."""
    root = S[:r].sqrt()
    return root[:, None] * Vh[:r], U[:, :r] * root[None, :]


def numerical_rank(S: Tensor, shape: Sequence[int]) -> int:
    """Rank as `torch.linalg.matrix_rank` counts it: singular values above max(S) · max(m, n) · eps."""
    if S.numel() == 0 or float(S[0]) == 0.0:
        return 0
    tol = float(S[0]) * max(shape) * torch.finfo(torch.float32).eps
    return int((S > tol).sum())


def low_rank(W: Tensor, rank_fraction: float | None = None, *, rank: int | None = None) -> Tensor:
    """Best rank-r approximation of a matrix (truncated SVD, computed in fp32).

    Args:
        W: [out, in] matrix.
        rank_fraction: ρ in (0, 1]; r = floor(ρ · min(out, in)), at least 1. ρ = 1 reproduces W.
        rank: use exactly this rank instead (1 ≤ rank ≤ min(out, in)).
    Returns:
        [out, in] tensor of W's dtype and device.
    """
    if W.ndim != 2:
        raise ValueError(f"low_rank expects a matrix [out, in], got shape {tuple(W.shape)}")
    r = _rank_arg(W.shape, rank_fraction, rank)
    U, S, Vh = _svd(W)
    return ((U[:, :r] * S[:r]) @ Vh[:r]).to(W.dtype)


def _rank_arg(shape, rank_fraction, rank) -> int:
    if (rank is None) == (rank_fraction is None):
        raise ValueError("give exactly one of rank_fraction and rank")
    if rank is None:
        return kept_rank(shape, rank_fraction)
    k = min(shape)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= k:
        raise ValueError(f"rank must be an int in 1..{k} for a {tuple(shape)} matrix, got {rank!r}")
    return rank


class LowRankLinear(nn.Module):
    """A Linear layer stored as two factors: y = x Aᵀ Bᵀ + bias, with A [rank, in] and B [out, rank].

    `weight` is a read-only property giving the dense product B @ A [out, in], so TransformerLens-style
    views (`W_in`, `W_Q`, ...) keep working. The state dict holds `A`, `B` and `bias`.
    """

    kind = "low_rank"

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, *, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.A = nn.Parameter(torch.zeros(rank, in_features, **kw))
        self.B = nn.Parameter(torch.zeros(out_features, rank, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None

    @classmethod
    def from_linear(cls, lin: nn.Linear, rank: int, svd: tuple[Tensor, Tensor, Tensor] | None = None) -> LowRankLinear:
        """The rank-`rank` truncation of `lin` (bias copied)."""
        w = lin.weight
        new = cls(lin.in_features, lin.out_features, rank, lin.bias is not None, device=w.device, dtype=w.dtype)
        A, B = _factors(*(svd or _svd(w)), rank)
        with torch.no_grad():
            new.A.copy_(A)
            new.B.copy_(B)
            if lin.bias is not None:
                new.bias.copy_(lin.bias)
        return new

    @classmethod
    def from_spec(cls, spec: dict[str, Any], like: nn.Linear) -> LowRankLinear:
        """An empty module shaped by a manifest `spec`, in the dtype/device of the Linear it replaces."""
        w = like.weight
        if (spec.get("in_features"), spec.get("out_features")) != (like.in_features, like.out_features):
            raise ValueError(f"low-rank record {spec} does not match a Linear {like.in_features}->{like.out_features}")
        return cls(
            like.in_features,
            like.out_features,
            int(spec["rank"]),
            like.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )

    def surgery_spec(self) -> dict[str, Any]:
        return {
            "type": self.kind,
            "rank": self.rank,
            "in_features": self.in_features,
            "out_features": self.out_features,
        }

    @property
    def weight(self) -> Tensor:  # [out, in]
        return self.B @ self.A

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.A), self.B, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.bias is not None}"
        )


# ------------------------------------------------------------------------------------- reports
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


# ------------------------------------------------------------------------------------- on a model
@torch.no_grad()
def _apply(model, targets, layers, rank_fraction, factored, restorer: Restorer | None) -> LaserReport:
    _check_fraction(rank_fraction)
    chosen = select_linears(model, targets, layers)  # validates everything before any change
    report = LaserReport(rank_fraction=float(rank_fraction), factored=factored)
    for layer, target, lin in chosen:
        m, n = lin.weight.shape
        U, S, Vh = _svd(lin.weight)
        r = kept_rank((m, n), rank_fraction)
        energy = float((S[:r] ** 2).sum() / (S**2).sum()) if float(S[0]) > 0 else 1.0
        before = lin.weight.numel()
        if factored:
            new = LowRankLinear.from_linear(lin, r, (U, S, Vh))
            if restorer is not None:
                restorer.swap(module_name(layer, target), new)
            else:
                set_module(model, module_name(layer, target), new)
            after = new.A.numel() + new.B.numel()
            if after >= before:
                warnings.warn(
                    f"{module_name(layer, target)}: rank {r} factors hold {after:,} parameters, not fewer than the "
                    f"dense {m}x{n} matrix ({before:,}); factored storage only saves space below rank "
                    f"{m * n // (m + n)}",
                    stacklevel=3,
                )
        else:
            if restorer is not None:
                restorer.save_weight(lin)
            lin.weight.copy_(((U[:, :r] * S[:r]) @ Vh[:r]).to(lin.weight.dtype))
            after = before
        report.entries.append(LaserEntry(layer, target, (m, n), numerical_rank(S, (m, n)), r, energy, before, after))
    record(
        model,
        {
            "op": "laser",
            "targets": sorted({t for _, t, _ in chosen}),
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
            group "mlp", "attn", "all" (a list or comma-separated string combines them).
        layers: int, list, "8-11", "0,2,5" or None (all).
        rank_fraction: ρ in (0, 1], the fraction of min(out, in) kept.
        factored: replace each `nn.Linear` by a `LowRankLinear` holding the two factors (fewer parameters);
            otherwise the dense weight is overwritten by its low-rank approximation (a drop-in change).
    Returns:
        A `LaserReport` (per matrix: shape, rank before, rank kept, energy kept).
    Raises:
        ValueError: bad target, layer or fraction; nothing is modified in that case.
    """
    return _apply(model, target, layers, rank_fraction, factored, None)


@contextlib.contextmanager
def laser(
    model,
    target: TargetSpec,
    layers: LayerSpec = None,
    rank_fraction: float = 0.1,
    *,
    factored: bool = False,
) -> Iterator[LaserReport]:
    """Context manager: LASER inside the block, the original weights (bitwise) and modules afterwards.

    Yields the `LaserReport`. Arguments as for `laser_`.
    """
    restorer = Restorer(model)
    try:
        report = _apply(model, target, layers, rank_fraction, factored, restorer)
        yield report
    finally:
        restorer.restore()


# ------------------------------------------------------------------------------------- sweeps
@dataclass(frozen=True)
class Intervention:
    """One LASER intervention (ℓ, τ, ρ)."""

    layer: int
    target: str
    rank_fraction: float


@dataclass
class LaserSweepResult:
    """Validation loss of every single intervention (target, layer, ρ), and of the unmodified model.

    `losses[target][i][j]` is the loss with layer `layers[i]` reduced to fraction `fractions[j]`.
    """

    base_loss: float
    targets: list[str]
    layers: list[int]
    fractions: list[float]
    losses: dict[str, list[list[float]]]
    n_tokens: int

    def loss(self, target: str, layer: int, rank_fraction: float) -> float:
        return self.losses[target][self.layers.index(layer)][self.fractions.index(rank_fraction)]

    def rows(self) -> list[dict[str, Any]]:
        """One dict per intervention: target, layer, rank_fraction, loss, delta (loss − base)."""
        return [
            {"target": t, "layer": layer, "rank_fraction": f, "loss": v, "delta": v - self.base_loss}
            for t in self.targets
            for layer, row in zip(self.layers, self.losses[t])
            for f, v in zip(self.fractions, row)
        ]

    def best(self, target: str | None = None, layer: int | None = None) -> tuple[Intervention, float]:
        """The intervention with the lowest validation loss (optionally for one target and/or layer)."""
        rows = [
            r
            for r in self.rows()
            if (target is None or r["target"] == target) and (layer is None or r["layer"] == layer)
        ]
        if not rows:
            raise ValueError(f"no sweep results for target={target!r}, layer={layer!r}")
        r = min(rows, key=lambda r: r["loss"])
        return Intervention(r["layer"], r["target"], r["rank_fraction"]), r["loss"]

    def figure(self):
        """Plotly figure: loss-vs-ρ curves (one per target and layer) and a heatmap of loss − base."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        fig = make_subplots(
            rows=1,
            cols=2,
            column_widths=[0.5, 0.5],
            horizontal_spacing=0.14,
            subplot_titles=("validation loss vs ρ (rank kept)", "loss − base"),
        )
        for t in self.targets:
            for layer, row in zip(self.layers, self.losses[t]):
                fig.add_trace(
                    go.Scatter(
                        x=self.fractions,
                        y=row,
                        mode="lines+markers",
                        name=f"L{layer} {t}",
                        legendgroup=t,
                        hovertemplate="ρ=%{x}<br>loss=%{y:.4f}",
                    ),
                    1,
                    1,
                )
        fig.add_hline(y=self.base_loss, line_dash="dash", annotation_text="base", row=1, col=1)
        fig.update_xaxes(type="log", title_text="ρ (fraction of rank kept)", row=1, col=1)
        fig.update_yaxes(title_text="loss", row=1, col=1)
        labels = [f"L{layer} {t}" for t in self.targets for layer in self.layers]
        z = [[v - self.base_loss for v in row] for t in self.targets for row in self.losses[t]]
        big = max((abs(v) for row in z for v in row), default=1.0) or 1.0
        fig.add_trace(
            go.Heatmap(
                z=z,
                x=[str(f) for f in self.fractions],
                y=labels,
                colorscale="RdBu_r",
                zmid=0,
                zmin=-big,
                zmax=big,
                colorbar={"title": "Δloss", "x": 1.02},
                hovertemplate="%{y} ρ=%{x}<br>Δloss=%{z:.4f}<extra></extra>",
            ),
            1,
            2,
        )
        fig.update_xaxes(title_text="ρ", type="category", row=1, col=2)
        fig.update_yaxes(autorange="reversed", row=1, col=2)
        fig.update_layout(
            title=f"LASER sweep (base loss {self.base_loss:.4f}, {self.n_tokens:,} tokens)",
            height=max(400, 18 * len(labels) + 150),
        )
        return fig

    def __repr__(self) -> str:
        (iv, loss) = self.best()
        return (
            f"LaserSweepResult(base_loss={self.base_loss:.4f}, {len(self.targets)} targets x "
            f"{len(self.layers)} layers x {len(self.fractions)} fractions; best {iv} -> {loss:.4f})"
        )


def _check_fractions(fractions: Sequence[float]) -> list[float]:
    fr = list(fractions)
    if not fr:
        raise ValueError("fractions is empty; e.g. use PAPER_GRID")
    for f in fr:
        _check_fraction(f)
    return [float(f) for f in fr]


def laser_sweep(
    model,
    tokens_or_corpus: Any = None,
    targets: TargetSpec = "all",
    layers: LayerSpec = None,
    fractions: Sequence[float] = PAPER_GRID,
    *,
    ctx: int | None = None,
    n_windows: int = 16,
    batch_size: int = 8,
    progress: bool = True,
) -> LaserSweepResult:
    """Validation loss for every single LASER intervention; the model is left exactly as it was.

    Args:
        model: a `tinygpt.GPT`.
        tokens_or_corpus: validation data: tokens [batch, pos], a 1-D token stream, text, a corpus path,
            or None (the last 1% of the built-in Shakespeare). See `tinygpt.surgery.common.eval_data`.
        targets, layers: which matrices to try (see `laser_`).
        fractions: ρ values to try (default: the paper's `PAPER_GRID`).
        ctx, n_windows, batch_size: how validation windows are cut from a stream.
        progress: show a tqdm progress bar.
    """
    from tqdm.auto import tqdm

    fr = _check_fractions(fractions)
    chosen = select_linears(model, targets, layers)
    data = eval_data(model, tokens_or_corpus, ctx=ctx, n_windows=n_windows, batch_size=batch_size)
    tgts = resolve_targets(targets)
    lays = resolve_layers(layers, len(model.blocks))
    base = eval_loss(model, data)
    losses = {t: [[math.nan] * len(fr) for _ in lays] for t in tgts}
    bar = tqdm(total=len(chosen) * len(fr), desc="LASER sweep", disable=not progress)
    try:
        for layer, target, lin in chosen:
            U, S, Vh = _svd(lin.weight)
            orig = lin.weight.detach().clone()
            try:
                for j, f in enumerate(fr):
                    r = kept_rank(lin.weight.shape, f)
                    with torch.no_grad():
                        lin.weight.copy_(((U[:, :r] * S[:r]) @ Vh[:r]).to(orig.dtype))
                    losses[target][lays.index(layer)][j] = eval_loss(model, data)
                    bar.update()
            finally:
                with torch.no_grad():
                    lin.weight.copy_(orig)
    finally:
        bar.close()
    return LaserSweepResult(base, tgts, lays, fr, losses, data.n_tokens)


@dataclass
class LaserGreedyResult:
    """Greedy composition: the interventions kept and the trace of every decision."""

    base_loss: float
    loss: float
    interventions: list[Intervention]
    steps: list[dict[str, Any]]

    def apply(self, model, *, factored: bool = False) -> list[LaserReport]:
        """Apply the kept interventions to `model` in place."""
        return [laser_(model, iv.target, [iv.layer], iv.rank_fraction, factored=factored) for iv in self.interventions]

    @contextlib.contextmanager
    def applied(self, model, *, factored: bool = False) -> Iterator[list[LaserReport]]:
        """Context manager version of `apply` (restores the model exactly)."""
        with contextlib.ExitStack() as stack:
            yield [
                stack.enter_context(laser(model, iv.target, [iv.layer], iv.rank_fraction, factored=factored))
                for iv in self.interventions
            ]

    def __repr__(self) -> str:
        ivs = ", ".join(f"(L{i.layer} {i.target} ρ={i.rank_fraction})" for i in self.interventions) or "none"
        return f"LaserGreedyResult(base_loss={self.base_loss:.4f} -> loss={self.loss:.4f}; kept {ivs})"


def laser_greedy(
    model,
    tokens_or_corpus: Any = None,
    targets: TargetSpec = "all",
    layers: LayerSpec = None,
    fractions: Sequence[float] = PAPER_GRID,
    *,
    ctx: int | None = None,
    n_windows: int = 16,
    batch_size: int = 8,
    progress: bool = True,
) -> LaserGreedyResult:
    """Compose LASER interventions greedily from the last layer down, as in the paper.

    For each layer, from the last selected one to the first, and each target in it, every ρ in
    `fractions` is tried on top of the interventions kept so far; the best one is kept only if it lowers
    the validation loss. The model is restored exactly at the end: call `result.apply(model)` to keep
    the composition.

    Args: as for `laser_sweep`.
    """
    from tqdm.auto import tqdm

    fr = _check_fractions(fractions)
    chosen = select_linears(model, targets, layers)
    data = eval_data(model, tokens_or_corpus, ctx=ctx, n_windows=n_windows, batch_size=batch_size)
    order = sorted(chosen, key=lambda c: -c[0])  # last layer first; targets in TARGETS order within a layer
    current = base = eval_loss(model, data)
    kept: list[Intervention] = []
    steps: list[dict[str, Any]] = []
    saved = [(lin, lin.weight.detach().clone()) for _, _, lin in chosen]
    bar = tqdm(total=len(chosen) * len(fr), desc="LASER greedy", disable=not progress)
    try:
        with torch.no_grad():
            for layer, target, lin in order:
                U, S, Vh = _svd(lin.weight)
                orig = lin.weight.detach().clone()
                trials = []
                for f in fr:
                    r = kept_rank(lin.weight.shape, f)
                    lin.weight.copy_(((U[:, :r] * S[:r]) @ Vh[:r]).to(orig.dtype))
                    trials.append((eval_loss(model, data), f))
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
                    r = kept_rank(lin.weight.shape, f)
                    lin.weight.copy_(((U[:, :r] * S[:r]) @ Vh[:r]).to(orig.dtype))
                    kept.append(Intervention(layer, target, f))
                    current = loss
                else:
                    lin.weight.copy_(orig)
    finally:
        bar.close()
        with torch.no_grad():
            for lin, w in saved:
                lin.weight.copy_(w)
    return LaserGreedyResult(base, current, kept, steps)


__all__ = [
    "PAPER_GRID",
    "LowRankLinear",
    "LaserEntry",
    "LaserReport",
    "LaserSweepResult",
    "LaserGreedyResult",
    "Intervention",
    "kept_rank",
    "low_rank",
    "numerical_rank",
    "laser",
    "laser_",
    "laser_sweep",
    "laser_greedy",
    "EvalData",
]
