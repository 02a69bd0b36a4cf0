"""Quantizing one matrix: round-to-nearest and HQQ's half-quadratic optimisation of the zero points.

Asymmetric affine quantization with one (scale s, zero z) per group of `group_size` contiguous weights
along in_features (`W.reshape(-1, group_size)` for W [out, in]):

    codes  W_q = clamp(round(W / s + z), 0, 2^b − 1)        dequantized  Ŵ = s · (W_q − z)

Round-to-nearest (`quantize_rtn`) uses the min-max initialisation s = (max − min)/(2^b − 1), z = −min/s
(a float zero). HQQ (`hqq_quantize`) keeps s and optimises only z, minimising an l_p (p < 1) norm of the
error with the half-quadratic splitting of the reference implementation (hqq 0.2.8's
`optimize_weights_proximal_legacy`):

    repeat `iters` times:
        W_r = s · (clamp(round(W/s + z)) − z)
        W_e = shrink_p(W − W_r)      with shrink_p(x) = sign(x) · relu(|x| − |x|^(p−1) / β)
        z   = mean_group(W_q − (W − W_e) / s);   β ← κ β
        stop once mean|W − W_r| no longer falls (the zero from that last update is kept, as in hqq)

On the reference matrices (`torch.manual_seed(0); torch.randn(out, in) * 0.02`, group 64) this gives
the relative Frobenius errors published for hqq (512x128 4-bit: RTN 0.0895 -> HQQ 0.0859).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from tinygpt.surgery.hqq.packing import check_bits, pack_codes, packed_nbytes
from tinygpt.surgery.targets import SurgeryError


def check_group_size(group_size: Any, in_features: int, what: str = "the matrix") -> int:
    """`group_size` (None = a whole row) must be a positive int dividing in_features."""
    if group_size is None:
        return in_features
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise SurgeryError(f"group_size must be a positive int (or None for whole rows), got {group_size!r}")
    if in_features % group_size:
        divisors = [d for d in (16, 32, 64, 128, 256) if in_features % d == 0]
        raise SurgeryError(
            f"group_size {group_size} does not divide in_features={in_features} of {what}; "
            f"choose a divisor of {in_features}" + (f" such as {', '.join(map(str, divisors))}" if divisors else "")
        )
    return group_size


def check_hqq_params(p: float, beta: float, kappa: float, iters: int) -> None:
    if not (isinstance(p, (int, float)) and 0 < p <= 1):
        raise SurgeryError(f"p (the l_p exponent) must be in (0, 1], got {p!r}")
    if not (isinstance(beta, (int, float)) and beta > 0):
        raise SurgeryError(f"beta must be > 0, got {beta!r}")
    if not (isinstance(kappa, (int, float)) and kappa >= 1):
        raise SurgeryError(f"kappa must be >= 1, got {kappa!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise SurgeryError(f"iters must be an int >= 0, got {iters!r}")


def _check_matrix(W: Tensor, bits: int, group_size: int | None) -> tuple[int, int]:
    if not isinstance(W, Tensor) or W.ndim != 2:
        raise SurgeryError(f"expected a matrix [out, in], got {getattr(W, 'shape', type(W).__name__)}")
    check_bits(bits)
    g = check_group_size(group_size, W.shape[1])
    if not torch.isfinite(W).all():
        raise SurgeryError("the matrix holds NaN or infinite values; they cannot be quantized")
    return W.shape[1], g


@dataclass
class QuantizedTensor:
    """A quantized matrix: `codes` uint8 [out, in] (values < 2^bits), `scale`/`zero` fp32 [out, in/group].

    Dequantize with `.dequantize()`: Ŵ = scale · (codes − zero) per group.
    """

    codes: Tensor
    scale: Tensor
    zero: Tensor
    shape: tuple[int, int]
    bits: int
    group_size: int
    iters_run: int | None = None  # HQQ zero updates made (None for RTN)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The dequantized matrix [out, in]."""
        out, inp = self.shape
        q = self.codes.reshape(out, inp // self.group_size, self.group_size).float()
        return ((q - self.zero[..., None]) * self.scale[..., None]).reshape(out, inp).to(dtype)

    def rel_error(self, W: Tensor) -> float:
        """||W − Ŵ||_F / ||W||_F."""
        W = W.detach().float()
        n = float(W.norm())
        return float((W - self.dequantize()).norm()) / n if n else float((W - self.dequantize()).norm())

    def pack(self) -> Tensor:
        """The codes bit-packed into uint8 [ceil(out·in·bits / 8)] (see `pack_codes`)."""
        return pack_codes(self.codes, self.bits)

    @property
    def nbytes(self) -> int:
        """Bytes when packed: codes + fp32 scales and zeros."""
        return packed_nbytes(self.codes.numel(), self.bits) + 4 * (self.scale.numel() + self.zero.numel())


def _groups(W: Tensor, group_size: int) -> Tensor:
    return W.detach().float().reshape(-1, group_size)


def _minmax(Wg: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Min-max scale and (float) zero per group [n_groups, 1]; a constant group gets s = 1."""
    qmax = 2**bits - 1
    mn, mx = Wg.amin(1, keepdim=True), Wg.amax(1, keepdim=True)
    s = (mx - mn) / qmax
    s = torch.where(s > 0, s, torch.ones_like(s))
    return s, -mn / s


def _finish(W: Tensor, Wg: Tensor, s: Tensor, z: Tensor, bits: int, g: int, iters_run=None) -> QuantizedTensor:
    out, inp = W.shape
    codes = torch.round(Wg / s + z).clamp(0, 2**bits - 1).to(torch.uint8).reshape(out, inp)
    return QuantizedTensor(codes, s.reshape(out, inp // g), z.reshape(out, inp // g), (out, inp), bits, g, iters_run)


@torch.no_grad()
def quantize_rtn(W: Tensor, bits: int = 4, group_size: int | None = 64) -> QuantizedTensor:
    """Round-to-nearest asymmetric quantization with min-max scale and zero per group.

    Args:
        W: [out, in] matrix (any float dtype; computed in fp32).
        bits: 1..8.
        group_size: contiguous weights along in_features sharing a scale/zero; must divide in; None = row.
    """
    _, g = _check_matrix(W, bits, group_size)
    Wg = _groups(W, g)
    s, z = _minmax(Wg, bits)
    return _finish(W, Wg, s, z, bits, g)


@torch.no_grad()
def hqq_quantize(
    W: Tensor,
    bits: int = 4,
    group_size: int | None = 64,
    p: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
    iters: int = 20,
) -> QuantizedTensor:
    """HQQ: min-max initialisation, then half-quadratic optimisation of the zero points (see module doc).

    Args:
        W: [out, in] matrix (computed in fp32).
        bits: 1..8.
        group_size: must divide in_features (None = whole rows).
        p: the l_p exponent of the error norm (< 1 is robust to outliers).
        beta: initial half-quadratic penalty; multiplied by `kappa` every iteration.
        iters: maximum number of iterations (stops early when mean|W − W_r| stops falling).
    """
    _, g = _check_matrix(W, bits, group_size)
    check_hqq_params(p, beta, kappa, iters)
    qmax = 2**bits - 1
    Wg = _groups(W, g)
    s, z = _minmax(Wg, bits)
    best = math.inf
    done = 0
    for _ in range(iters):
        Wq = torch.round(Wg / s + z).clamp(0, qmax)
        Wr = (Wq - z) * s
        x = Wg - Wr
        ax = x.abs()
        We = torch.sign(x) * F.relu(ax - ax.pow(p - 1) / beta)
        z = (Wq - (Wg - We) / s).mean(1, keepdim=True)
        beta *= kappa
        done += 1
        err = float(ax.mean())
        if err < best:
            best = err
        else:
            break
    return _finish(W, Wg, s, z, bits, g, done)
