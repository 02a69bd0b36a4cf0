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
from collections.abc import Callable, Iterator, Sequence
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
    SwappedLinear,
    TargetSpec,
    concrete_targets,
    eval_data,
    eval_loss,
    layers_text,
    module_name,
    record,
    resolve_layers,
    resolve_targets,
    restoring,
    select_linears,
    select_modules,
    sort_targets,
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


def _truncate(U: Tensor, S: Tensor, Vh: Tensor, r: int) -> Tensor:
    """U_r diag(S_r) Vh_r [m, n] (fp32)."""
    return (U[:, :r] * S[:r]) @ Vh[:r]


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
    return _truncate(U, S, Vh, r).to(W.dtype)


def _rank_arg(shape, rank_fraction, rank) -> int:
    if (rank is None) == (rank_fraction is None):
        raise ValueError("give exactly one of rank_fraction and rank")
    if rank is None:
        return kept_rank(shape, rank_fraction)
    k = min(shape)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= k:
        raise ValueError(f"rank must be an int in 1..{k} for a {tuple(shape)} matrix, got {rank!r}")
    return rank


class LowRankLinear(SwappedLinear):
    """A Linear layer stored as two factors: y = x Aᵀ Bᵀ + bias, with A [rank, in] and B [out, rank].

    `weight` is a read-only property giving the dense product B @ A [out, in], so TransformerLens-style
    views (`W_in`, `W_Q`, ...) keep working. The state dict holds `A`, `B` and `bias`.
    """

    kind = "low_rank"
    spec_fields = ("rank",)

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
def _apply(model, targets, layers, rank_fraction, factored, restorer: Restorer) -> LaserReport:
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
            restorer.swap(module_name(layer, target), new)
            after = new.A.numel() + new.B.numel()
            if after >= before:
                warnings.warn(
                    f"{module_name(layer, target)}: rank {r} factors hold {after:,} parameters, not fewer than the "
                    f"dense {m}x{n} matrix ({before:,}); factored storage only saves space below rank "
                    f"{m * n // (m + n)}",
                    stacklevel=3,
                )
        else:
            restorer.write_weight(lin, _truncate(U, S, Vh, r))
            after = before
        report.entries.append(LaserEntry(layer, target, (m, n), numerical_rank(S, (m, n)), r, energy, before, after))
    record(
        model,
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
    return _apply(model, target, layers, rank_fraction, factored, Restorer(model, active=False))


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
    with restoring(model) as restorer:
        yield _apply(model, target, layers, rank_fraction, factored, restorer)


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

    `losses[target][i][j]` is the loss with layer `layers[i]` reduced to fraction `fractions[j]`; NaN where
    block `layers[i]` has no such matrix (e.g. `attn.k_proj` in a YOCO cross-decoder block). Targets are
    concrete block-relative paths: on MoE models one per expert matrix ("moe.experts.2.fc_out").
    With a task `metric`, `metrics[target][i][j]` holds its value for the same intervention and `base_metric`
    its value on the unmodified model (both None without one).
    """

    base_loss: float
    targets: list[str]
    layers: list[int]
    fractions: list[float]
    losses: dict[str, list[list[float]]]
    n_tokens: int
    base_metric: float | None = None
    metrics: dict[str, list[list[float]]] | None = None

    def loss(self, target: str, layer: int, rank_fraction: float) -> float:
        return self.losses[target][self.layers.index(layer)][self.fractions.index(rank_fraction)]

    def swept(self) -> list[tuple[str, int, list[float]]]:
        """(target, layer, losses over `fractions`) of every matrix that was swept (blocks lacking one are left out)."""
        return [
            (t, layer, row)
            for t in self.targets
            for layer, row in zip(self.layers, self.losses[t])
            if not all(math.isnan(v) for v in row)
        ]

    def rows(self) -> list[dict[str, Any]]:
        """One dict per intervention: target, layer, rank_fraction, loss, delta (loss − base), and `metric`
        when the sweep had one."""
        out = []
        for t, layer, row in self.swept():
            for j, (f, v) in enumerate(zip(self.fractions, row)):
                r = {"target": t, "layer": layer, "rank_fraction": f, "loss": v, "delta": v - self.base_loss}
                if self.metrics is not None:
                    r["metric"] = self.metrics[t][self.layers.index(layer)][j]
                out.append(r)
        return out

    def best(self, target: str | None = None, layer: int | None = None, by: str = "loss") -> tuple[Intervention, float]:
        """The best intervention (optionally for one target and/or layer) and its score.

        Args:
            by: "loss" (the lowest validation loss) or "metric" (the highest task metric).
        """
        if by not in ("loss", "metric") or (by == "metric" and self.metrics is None):
            raise ValueError(f"by must be 'loss' or (for a sweep run with metric=) 'metric', got {by!r}")
        rows = [
            r
            for r in self.rows()
            if (target is None or r["target"] == target) and (layer is None or r["layer"] == layer)
        ]
        if not rows:
            raise ValueError(f"no sweep results for target={target!r}, layer={layer!r}")
        r = min(rows, key=lambda r: r["loss"]) if by == "loss" else max(rows, key=lambda r: r["metric"])
        return Intervention(r["layer"], r["target"], r["rank_fraction"]), r[by]

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
        swept = self.swept()
        for t, layer, row in swept:
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
        labels = [f"L{layer} {t}" for t, layer, _ in swept]
        z = [[v - self.base_loss for v in row] for _, _, row in swept]
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
                colorbar={  # horizontal, under the heatmap: a vertical one collides with the legend
                    "title": {"text": "Δloss", "side": "top"},
                    "orientation": "h",
                    "x": 0.785,
                    "xanchor": "center",
                    "y": -0.28,
                    "yanchor": "top",
                    "len": 0.4,
                    "thickness": 12,
                },
                hovertemplate="%{y} ρ=%{x}<br>Δloss=%{z:.4f}<extra></extra>",
            ),
            1,
            2,
        )
        fig.update_xaxes(title_text="ρ", type="category", row=1, col=2)
        fig.update_yaxes(autorange="reversed", row=1, col=2)
        fig.update_layout(
            title=f"LASER sweep (base loss {self.base_loss:.4f}, {self.n_tokens:,} tokens)",
            height=max(450, 18 * len(labels) + 200),
            margin={"b": 140},
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
    metric: Callable[[Any], float] | None = None,
    progress: bool = True,
) -> LaserSweepResult:
    """Validation loss (and optionally a task metric) for every single LASER intervention; the model is left
    exactly as it was.

    Args:
        model: a `tinygpt.GPT`.
        tokens_or_corpus: validation data: tokens [batch, pos], a 1-D token stream, text, a corpus path,
            or None (the last 1% of the built-in Shakespeare). See `tinygpt.surgery.common.eval_data`.
        targets, layers: which matrices to try (see `laser_`).
        fractions: ρ values to try (default: the paper's `PAPER_GRID`).
        ctx, n_windows, batch_size: how validation windows are cut from a stream.
        metric: an optional task metric, `metric(model) -> float` (higher is better, e.g. accuracy on a probe
            set), called once on the unmodified model and once per intervention (the model in eval mode,
            under `torch.no_grad`); `result.best(by="metric")` ranks by it.
        progress: show a tqdm progress bar.
    """
    fr, chosen, data, base = _sweep_setup(
        model, tokens_or_corpus, targets, layers, fractions, ctx, n_windows, batch_size
    )
    tgts, lays = concrete_targets(chosen)
    losses = {t: [[math.nan] * len(fr) for _ in lays] for t in tgts}
    metrics = None if metric is None else {t: [[math.nan] * len(fr) for _ in lays] for t in tgts}
    base_metric = None if metric is None else _score(model, metric)
    with restoring(model) as restorer, _bar(len(chosen) * len(fr), "LASER sweep", progress) as bar:
        for layer, target, lin in chosen:
            U, S, Vh = _svd(lin.weight)
            for j, f in enumerate(fr):
                restorer.write_weight(lin, _truncate(U, S, Vh, kept_rank(lin.weight.shape, f)))
                losses[target][lays.index(layer)][j] = eval_loss(model, data)
                if metrics is not None:
                    metrics[target][lays.index(layer)][j] = _score(model, metric)
                bar.update()
            restorer.write_weight(lin, restorer.original(lin))
    return LaserSweepResult(base, tgts, lays, fr, losses, data.n_tokens, base_metric, metrics)


def _score(model, metric: Callable[[Any], float]) -> float:
    """`metric(model)` as a float, in eval mode and without gradients (the mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return float(metric(model))
    finally:
        model.train(was_training)


def _sweep_setup(model, tokens_or_corpus, targets, layers, fractions, ctx, n_windows, batch_size):
    """Validated (fractions, selected matrices, validation windows, base loss) of a sweep."""
    fr = _check_fractions(fractions)
    chosen = select_linears(model, targets, layers)
    data = eval_data(model, tokens_or_corpus, ctx=ctx, n_windows=n_windows, batch_size=batch_size)
    return fr, chosen, data, eval_loss(model, data)


@contextlib.contextmanager
def _bar(total: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, disable=not progress)
    try:
        yield bar
    finally:
        bar.close()


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
    fr, chosen, data, base = _sweep_setup(
        model, tokens_or_corpus, targets, layers, fractions, ctx, n_windows, batch_size
    )
    order = sorted(chosen, key=lambda c: -c[0])  # last layer first; targets in selection order within a layer
    current = base
    kept: list[Intervention] = []
    steps: list[dict[str, Any]] = []
    with restoring(model) as restorer, _bar(len(chosen) * len(fr), "LASER greedy", progress) as bar:
        for layer, target, lin in order:
            U, S, Vh = _svd(lin.weight)
            trials = []
            for f in fr:
                restorer.write_weight(lin, _truncate(U, S, Vh, kept_rank(lin.weight.shape, f)))
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
                restorer.write_weight(lin, _truncate(U, S, Vh, kept_rank(lin.weight.shape, f)))
                kept.append(Intervention(layer, target, f))
                current = loss
            else:
                restorer.write_weight(lin, restorer.original(lin))
    return LaserGreedyResult(base, current, kept, steps)


# ------------------------------------------------------------------------------------- spectra
@dataclass
class SpectrumResult:
    """Singular values of the selected matrices, largest first.

    `spectra[target][i]` holds the σ of `blocks.{layers[i]}.{target}` (min(out, in) values; an empty list
    where that block has no such matrix, e.g. `attn.k_proj` in a YOCO cross-decoder block); `shapes[target]`
    is that matrix's [out, in]. Targets are concrete block-relative paths: on MoE models one per expert
    matrix ("moe.experts.2.fc_in"). Keeping the first r = floor(ρ · min(out, in)) values is what LASER at
    fraction ρ does, so the figures put ρ-like x coordinates (i + 1) / min(out, in) on the x axis.
    """

    targets: list[str]
    layers: list[int]
    spectra: dict[str, list[list[float]]]
    shapes: dict[str, tuple[int, int]]

    def spectrum(self, target: str, layer: int) -> list[float]:
        """σ of one matrix, descending."""
        return self.spectra[target][self.layers.index(layer)]

    def layers_of(self, target: str) -> list[int]:
        """The layers whose block has `target`."""
        return [ly for ly, s in zip(self.layers, self.spectra[target]) if s]

    def rank_fractions(self, target: str) -> list[float]:
        """x coordinates of the spectrum of `target`: (i + 1) / min(out, in) for i = 0 .. min(out, in) − 1."""
        k = min(self.shapes[target])
        return [(i + 1) / k for i in range(k)]

    def energy_kept(self, target: str, layer: int, rank_fraction: float) -> float:
        """Σ_{i<r} σ_i² / Σ σ_i² at LASER fraction ρ (= 1 − relative Frobenius error²)."""
        values = self.spectrum(target, layer)
        if not values:
            raise ValueError(f"block {layer} has no {target} (the spectra hold it for layers {self.layers_of(target)})")
        s = torch.tensor(values, dtype=torch.float64)
        total = float((s**2).sum())
        if total == 0.0:
            return 1.0
        r = kept_rank(self.shapes[target], rank_fraction)
        return float((s[:r] ** 2).sum()) / total

    def traces(self, layer: int | None = None, target: str | None = None, normalize: bool = False) -> list[dict]:
        """Line data for plotting: one dict (name, x, y) per target of `layer`, or per layer of `target`.

        A matrix the block does not have gives empty x and y (so the lines keep their positions).
        """
        if (layer is None) == (target is None):
            raise ValueError("give exactly one of layer (one line per target) and target (one line per layer)")
        pairs = [(t, layer) for t in self.targets] if layer is not None else [(target, ly) for ly in self.layers]
        out = []
        for t, ly in pairs:
            s = self.spectrum(t, ly)
            top = s[0] if s and s[0] > 0 else 1.0
            y = [v / top for v in s] if normalize else list(s)
            x = self.rank_fractions(t) if s else []
            out.append({"name": t if layer is not None else f"layer {ly}", "x": x, "y": y})
        return out

    def figure(self, layer: int | None = None, normalize: bool = False):
        """Plotly figure of the spectra (log–log).

        Args:
            layer: one panel with a line per target for this layer; None: one panel per target with a line
                per layer.
            normalize: divide each spectrum by its largest singular value.
        """
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        ylabel = "σ / σ_max" if normalize else "singular value σ"
        if layer is not None:
            fig = go.Figure()
            for tr in self.traces(layer=layer, normalize=normalize):
                fig.add_trace(go.Scatter(x=tr["x"], y=tr["y"], mode="lines", name=tr["name"]))
            fig.update_layout(title=f"singular values, layer {layer}")
            fig.update_xaxes(type="log", title_text="(i + 1) / min(out, in)  (ρ keeping σ_i)")
            fig.update_yaxes(type="log", title_text=ylabel)
        else:
            n = len(self.targets)
            cols = min(n, 3)
            rows = -(-n // cols)
            fig = make_subplots(rows=rows, cols=cols, subplot_titles=self.targets)
            for k, t in enumerate(self.targets):
                r, c = k // cols + 1, k % cols + 1
                for j, tr in enumerate(self.traces(target=t, normalize=normalize)):
                    fig.add_trace(
                        go.Scatter(
                            x=tr["x"],
                            y=tr["y"],
                            mode="lines",
                            name=tr["name"],
                            legendgroup=tr["name"],
                            showlegend=k == 0,
                            line={"color": _palette(j)},
                        ),
                        r,
                        c,
                    )
                fig.update_xaxes(type="log", row=r, col=c)
                fig.update_yaxes(type="log", row=r, col=c)
            fig.update_yaxes(title_text=ylabel, col=1)
            fig.update_layout(title="singular values per layer", height=320 * rows + 80)
        fig.update_layout(template="plotly_white", hovermode="x unified")
        return fig

    def __repr__(self) -> str:
        return f"SpectrumResult({len(self.targets)} targets x {len(self.layers)} layers: {self.targets})"


def _palette(i: int) -> str:
    import plotly.colors

    colors = plotly.colors.qualitative.Plotly
    return colors[i % len(colors)]


def singular_values(
    model,
    targets: TargetSpec = "all",
    layers: LayerSpec = None,
    *,
    progress: bool = False,
) -> SpectrumResult:
    """Singular values (exact SVD in fp32) of every selected weight matrix.

    Works on dense layers and on layers already factored (`LowRankLinear`) or packed
    (`PackedQuantLinear`): their effective `weight` is decomposed.

    Args:
        model: a `tinygpt.GPT`.
        targets, layers: which matrices (see `laser_`).
        progress: show a tqdm progress bar.
    Returns:
        A `SpectrumResult`; `.figure()` plots it.
    """
    chosen = select_modules(model, targets, layers, dense_only=False)
    tgts, lays = concrete_targets(chosen)
    spectra: dict[str, list[list[float]]] = {t: [[] for _ in lays] for t in tgts}
    shapes: dict[str, tuple[int, int]] = {}
    with torch.no_grad(), _bar(len(chosen), "singular values", progress) as bar:
        for layer, t, mod in chosen:
            W = mod.weight
            shapes[t] = (int(W.shape[0]), int(W.shape[1]))
            spectra[t][lays.index(layer)] = torch.linalg.svdvals(W.detach().float().cpu()).tolist()
            bar.update()
    return SpectrumResult(tgts, lays, spectra, shapes)


# ------------------------------------------------------------------------------------- before / after
@dataclass
class LaserComparison:
    """One intervention previewed: validation loss and a seeded sample, before and after."""

    intervention: Intervention
    loss_before: float
    loss_after: float
    prompt: str
    sample_before: str
    sample_after: str
    report: LaserReport
    n_tokens: int

    @property
    def delta(self) -> float:
        """loss_after − loss_before (negative: the intervention helps)."""
        return self.loss_after - self.loss_before

    def to_html(self) -> str:
        """An HTML summary: the losses and the two samples side by side."""
        import html

        iv, entries = self.intervention, self.report.entries
        pre = "white-space:pre-wrap;font-family:monospace;font-size:12px;margin:0"
        if len(entries) == 1:
            e = entries[0]
            what = f"rank {e.rank_before} → {e.rank_kept}, relative error {e.rel_error:.4f}"
        else:  # e.g. mlp.fc_in of a MoE block: every expert's matrix
            err = sum(e.rel_error for e in entries) / len(entries)
            what = f"{len(entries)} matrices, rank kept {entries[0].rank_kept}, mean relative error {err:.4f}"

        def col(title: str, text: str) -> str:
            return f"<div style='flex:1;min-width:0'><b>{title}</b><pre style='{pre}'>{html.escape(text)}</pre></div>"

        return (
            f"<div><b>layer {iv.layer} {iv.target}, ρ = {iv.rank_fraction}</b> ({what})<br>validation loss "
            f"{self.loss_before:.4f} → "
            f"{self.loss_after:.4f} (Δ {self.delta:+.4f}, {self.n_tokens:,} tokens)</div>"
            f"<div style='display:flex;gap:16px'>{col('before', self.sample_before)}"
            f"{col('after', self.sample_after)}</div>"
        )

    def _repr_html_(self) -> str:
        return self.to_html()

    def __str__(self) -> str:
        iv = self.intervention
        return (
            f"LASER layer {iv.layer} {iv.target} ρ={iv.rank_fraction}: loss {self.loss_before:.4f} -> "
            f"{self.loss_after:.4f} ({self.delta:+.4f})\n"
            f"--- before\n{self.sample_before}\n--- after\n{self.sample_after}"
        )


def laser_compare(
    model,
    target: str,
    layer: int,
    rank_fraction: float,
    tokens_or_corpus: Any = None,
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
        model: a `tinygpt.GPT` with a tokenizer.
        target: one matrix name ("mlp.fc_in", "moe.experts.2.fc_out", ...; on a MoE block "mlp.fc_in" reduces
            every expert's fc_in together); layer: one layer; rank_fraction: ρ.
        tokens_or_corpus: validation data (see `laser_sweep`); an `EvalData` is used as it is.
        prompt, max_new_tokens, temperature, seed: the sample (the same seed before and after).
    """
    from tinygpt.sampling import generate

    tgts = resolve_targets(target)
    if len(tgts) != 1:
        raise ValueError(f"laser_compare takes one target, got {target!r} ({', '.join(tgts)})")
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ValueError(f"laser_compare takes one layer (an int), got {layer!r}")
    _check_fraction(rank_fraction)
    select_linears(model, tgts, [layer])  # validates before any work
    data = eval_data(model, tokens_or_corpus, ctx=ctx, n_windows=n_windows, batch_size=batch_size)
    kw = {"temperature": temperature, "seed": seed}
    before = eval_loss(model, data)
    sample_before = generate(model, prompt, max_new_tokens, **kw)
    with laser(model, tgts, [layer], rank_fraction) as report:
        after = eval_loss(model, data)
        sample_after = generate(model, prompt, max_new_tokens, **kw)
    iv = Intervention(resolve_layers(layer, len(model.blocks))[0], tgts[0], float(rank_fraction))
    return LaserComparison(iv, before, after, prompt, sample_before, sample_after, report, data.n_tokens)


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
    "SpectrumResult",
    "singular_values",
    "LaserComparison",
    "laser_compare",
    "EvalData",
]
