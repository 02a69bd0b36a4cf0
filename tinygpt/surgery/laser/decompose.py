"""The LASER math: ranks, truncated SVDs and the factored layer `LowRankLinear`.

A LASER intervention at fraction ρ replaces a weight matrix W [out, in] by its best rank-r approximation in
Frobenius norm (Eckart–Young, via an exact SVD in fp32), with

    r = floor(ρ · min(out, in)),  at least 1,

so ρ is the fraction of the maximal rank that is *kept* (ρ = 0.01 removes 99% of the rank).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from tinygpt.checkpoint import register_swap
from tinygpt.surgery.restore import SwappedLinear, one_thread
from tinygpt.surgery.targets import SurgeryError

#: The paper's rank fractions ρ (fraction of the maximal rank kept): reductions of 10%, 20%, 40%, 60%,
#: 80%, 90%, 95% and 99%.
PAPER_GRID: tuple[float, ...] = (0.9, 0.8, 0.6, 0.4, 0.2, 0.1, 0.05, 0.01)


def check_fraction(rank_fraction: float) -> None:
    """Raise `SurgeryError` unless `rank_fraction` is a number in (0, 1]."""
    if isinstance(rank_fraction, bool) or not isinstance(rank_fraction, (int, float)):
        raise SurgeryError(f"rank_fraction must be a number in (0, 1], got {rank_fraction!r}")
    if not 0.0 < float(rank_fraction) <= 1.0:
        raise SurgeryError(
            f"rank_fraction must be in (0, 1] (the fraction of the rank kept; 0.1 keeps 10%), got {rank_fraction}"
        )


def check_fractions(fractions: Sequence[float]) -> list[float]:
    """The fractions of a sweep as floats, each checked; at least one."""
    fr = list(fractions)
    if not fr:
        raise SurgeryError("fractions is empty; e.g. use PAPER_GRID")
    for f in fr:
        check_fraction(f)
    return [float(f) for f in fr]


def kept_rank(shape: Sequence[int], rank_fraction: float) -> int:
    """r = floor(ρ · min(out, in)), at least 1 (a 1e-9 slack absorbs float error, e.g. 0.29 · 100)."""
    check_fraction(rank_fraction)
    return max(1, math.floor(rank_fraction * min(shape[-2:]) + 1e-9))


def svd(W: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Exact thin SVD in fp32: U [m, k], S [k], Vh [k, n].

    On CPU, matrices up to 1024x1024 are decomposed on one thread: multi-threaded LAPACK SVD of small
    matrices is slower, and 10-1000x slower when the cores are shared with other processes (measured).
    """
    W = W.detach().float()
    with one_thread(W.device.type == "cpu" and W.numel() <= 1 << 20):
        return torch.linalg.svd(W, full_matrices=False)


def truncate(U: Tensor, S: Tensor, Vh: Tensor, r: int) -> Tensor:
    """U_r diag(S_r) Vh_r [m, n] (fp32)."""
    return (U[:, :r] * S[:r]) @ Vh[:r]


def truncations(W: Tensor) -> Callable[[float], Tensor]:
    """`f(ρ)`: the rank-`kept_rank(ρ)` truncation of W [out, in] (fp32), from one SVD of W."""
    U, S, Vh = svd(W)
    shape = tuple(W.shape)
    return lambda rank_fraction: truncate(U, S, Vh, kept_rank(shape, rank_fraction))


def factors(U: Tensor, S: Tensor, Vh: Tensor, r: int) -> tuple[Tensor, Tensor]:
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
        raise SurgeryError(f"low_rank expects a matrix [out, in], got shape {tuple(W.shape)}")
    r = _rank_arg(W.shape, rank_fraction, rank)
    U, S, Vh = svd(W)
    return truncate(U, S, Vh, r).to(W.dtype)


def _rank_arg(shape, rank_fraction, rank) -> int:
    if (rank is None) == (rank_fraction is None):
        raise SurgeryError("give exactly one of rank_fraction and rank")
    if rank is None:
        return kept_rank(shape, rank_fraction)
    k = min(shape)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= k:
        raise SurgeryError(f"rank must be an int in 1..{k} for a {tuple(shape)} matrix, got {rank!r}")
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
    def from_linear(cls, lin: nn.Linear, rank: int, usv: tuple[Tensor, Tensor, Tensor] | None = None) -> LowRankLinear:
        """The rank-`rank` truncation of `lin` (bias copied); `usv` is its SVD when already computed."""
        w = lin.weight
        new = cls(lin.in_features, lin.out_features, rank, lin.bias is not None, device=w.device, dtype=w.dtype)
        A, B = factors(*(usv or svd(w)), rank)
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


register_swap(LowRankLinear.kind, LowRankLinear)
