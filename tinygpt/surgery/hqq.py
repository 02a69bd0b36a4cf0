"""HQQ: half-quadratic quantization (Badri & Shaji 2023), our own implementation, plus round-to-nearest.

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

On a model, `hqq_` rewrites weights in place as dense tensors (a drop-in change), or with `packed=True`
replaces each `nn.Linear` by a `PackedQuantLinear` holding bit-packed codes (b bits per weight, any b in
1..8) plus fp32 scales and zeros; the weight is dequantized at forward time. Saved files then really
shrink (about b/32 of fp32 plus 64 bits per group).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from tinygpt.surgery.common import (
    LayerSpec,
    Restorer,
    SwappedLinear,
    TargetSpec,
    concrete_targets,
    layers_text,
    module_name,
    record,
    restoring,
    select_linears,
    sort_targets,
)


# ------------------------------------------------------------------------------------- validation
def check_bits(bits: Any) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int from 1 to 8, got {bits!r}")
    return bits


def check_group_size(group_size: Any, in_features: int, what: str = "the matrix") -> int:
    """`group_size` (None = a whole row) must be a positive int dividing in_features."""
    if group_size is None:
        return in_features
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int (or None for whole rows), got {group_size!r}")
    if in_features % group_size:
        divisors = [d for d in (16, 32, 64, 128, 256) if in_features % d == 0]
        raise ValueError(
            f"group_size {group_size} does not divide in_features={in_features} of {what}; "
            f"choose a divisor of {in_features}" + (f" such as {', '.join(map(str, divisors))}" if divisors else "")
        )
    return group_size


def check_hqq_params(p: float, beta: float, kappa: float, iters: int) -> None:
    if not (isinstance(p, (int, float)) and 0 < p <= 1):
        raise ValueError(f"p (the l_p exponent) must be in (0, 1], got {p!r}")
    if not (isinstance(beta, (int, float)) and beta > 0):
        raise ValueError(f"beta must be > 0, got {beta!r}")
    if not (isinstance(kappa, (int, float)) and kappa >= 1):
        raise ValueError(f"kappa must be >= 1, got {kappa!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be an int >= 0, got {iters!r}")


def _check_matrix(W: Tensor, bits: int, group_size: int | None) -> tuple[int, int]:
    if not isinstance(W, Tensor) or W.ndim != 2:
        raise ValueError(f"expected a matrix [out, in], got {getattr(W, 'shape', type(W).__name__)}")
    check_bits(bits)
    g = check_group_size(group_size, W.shape[1])
    if not torch.isfinite(W).all():
        raise ValueError("the matrix holds NaN or infinite values; they cannot be quantized")
    return W.shape[1], g


# ------------------------------------------------------------------------------------- tensors
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


# ------------------------------------------------------------------------------------- packing
def packed_nbytes(n_codes: int, bits: int) -> int:
    """Bytes holding `n_codes` codes of `bits` bits: ceil(n_codes · bits / 8)."""
    return -(-n_codes * bits // 8)


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Bit-pack integer codes (< 2^bits) into uint8, little-endian: code i occupies bits [i·b, (i+1)·b).

    Each run of 8 codes becomes `bits` bytes; the stream ends at the byte holding the last code (unused
    high bits are zero). For b in {1, 2, 4} this is the usual 8/b codes per byte, lowest bits first.

    Args:
        codes: integer tensor of any shape (flattened in row-major order).
        bits: 1..8.
    Returns:
        uint8 [packed_nbytes(codes.numel(), bits)].
    """
    check_bits(bits)
    flat = codes.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits - 1}] for {bits}-bit packing")
    flat = flat.to(torch.uint8)
    if bits == 8:
        return flat.clone()
    n = flat.numel()
    if n % 8:
        flat = torch.cat([flat, flat.new_zeros(8 - n % 8)])
    chunks = flat.view(-1, 8).long()  # [k, 8]
    value = (chunks << (torch.arange(8, device=flat.device) * bits)).sum(1)  # disjoint fields: sum == OR
    out = (value[:, None] >> (torch.arange(bits, device=flat.device) * 8)) & 0xFF
    return out.to(torch.uint8).reshape(-1)[: packed_nbytes(n, bits)]


def unpack_codes(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of `pack_codes`: the first `n` codes, uint8 [n]."""
    check_bits(bits)
    if packed.numel() != packed_nbytes(n, bits):
        raise ValueError(f"{packed.numel()} packed bytes cannot hold {n} codes of {bits} bits")
    mask = 2**bits - 1
    if bits == 8:
        return packed[:n]
    if 8 % bits == 0:  # fast path in uint8: 8/b codes per byte
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        return ((packed[:, None] >> shifts) & mask).reshape(-1)[:n]
    if packed.numel() % bits:
        packed = torch.cat([packed, packed.new_zeros(bits - packed.numel() % bits)])
    by = packed.view(-1, bits).long()  # [k, bits] bytes of each 8-code run
    value = (by << (torch.arange(bits, device=packed.device) * 8)).sum(1)
    codes = (value[:, None] >> (torch.arange(8, device=packed.device) * bits)) & mask
    return codes.to(torch.uint8).reshape(-1)[:n]


class PackedQuantLinear(SwappedLinear):
    """A Linear layer whose weight is stored as bit-packed `bits`-bit codes plus per-group scale and zero.

    Buffers (saved in the state dict): `packed` uint8 [ceil(out·in·bits/8)], `scale` and `zero` fp32
    [out, in/group_size]; parameter `bias` [out]. The weight is dequantized at every forward; `weight`
    is a read-only property returning it [out, in]. `impl = "triton"` (4-bit layers, CUDA or Triton's
    interpreter) computes the forward with the fused kernel of `tinygpt.surgery.hqq_triton` instead.
    """

    kind = "packed_quant"
    spec_fields = ("bits", "group_size")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool = True,
        *,
        device=None,
        dtype=None,
    ):
        super().__init__()
        check_bits(bits)
        check_group_size(group_size, in_features)
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        self.dtype = dtype or torch.get_default_dtype()
        n_groups = in_features // group_size
        self.register_buffer(
            "packed", torch.zeros(packed_nbytes(in_features * out_features, bits), dtype=torch.uint8, device=device)
        )
        self.register_buffer("scale", torch.zeros(out_features, n_groups, dtype=torch.float32, device=device))
        self.register_buffer("zero", torch.zeros(out_features, n_groups, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self.impl = "torch"  # or "triton" (4-bit only; see `tinygpt.surgery.hqq_triton.use_triton`)

    @classmethod
    def from_quantized(cls, qt: QuantizedTensor, bias: Tensor | None = None, dtype=None) -> PackedQuantLinear:
        out, inp = qt.shape
        dev = qt.codes.device
        new = cls(
            inp,
            out,
            qt.bits,
            qt.group_size,
            bias is not None,
            device=dev,
            dtype=dtype or (bias.dtype if bias is not None else None),
        )
        with torch.no_grad():
            new.packed.copy_(qt.pack())
            new.scale.copy_(qt.scale)
            new.zero.copy_(qt.zero)
            if bias is not None:
                new.bias.copy_(bias)
        return new

    def quantized(self) -> QuantizedTensor:
        """The stored `QuantizedTensor` (codes unpacked)."""
        n = self.in_features * self.out_features
        codes = unpack_codes(self.packed, self.bits, n).reshape(self.out_features, self.in_features)
        return QuantizedTensor(
            codes, self.scale, self.zero, (self.out_features, self.in_features), self.bits, self.group_size
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        return self.quantized().dequantize(dtype or self.dtype)

    @property
    def weight(self) -> Tensor:  # [out, in]
        return self.dequantize()

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        if self.bias is not None:
            self.dtype = self.bias.dtype  # follow model.to(dtype)
        return out

    def forward(self, x: Tensor) -> Tensor:
        if self.impl == "triton":  # 4-bit only: dequantise-and-multiply in one kernel (tinygpt.surgery.hqq_triton)
            from tinygpt.surgery.hqq_triton import packed4_linear

            return packed4_linear(x, self)
        return F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
        )


# ------------------------------------------------------------------------------------- reports
@dataclass
class QuantEntry:
    """One quantized matrix: relative Frobenius errors of round-to-nearest and of HQQ."""

    layer: int
    target: str
    shape: tuple[int, int]
    rtn_error: float
    hqq_error: float | None  # None when optimize=False (RTN only)
    iters_run: int | None
    dense_bytes: int  # the original weight's storage
    packed_bytes: int  # codes + fp32 scales and zeros

    @property
    def name(self) -> str:
        return module_name(self.layer, self.target)

    @property
    def error(self) -> float:
        """The error of what was stored."""
        return self.rtn_error if self.hqq_error is None else self.hqq_error


@dataclass
class HQQReport:
    """What `hqq_` did: one `QuantEntry` per matrix."""

    bits: int
    group_size: int | None
    method: str  # "hqq" or "rtn"
    packed: bool
    entries: list[QuantEntry] = field(default_factory=list)

    @property
    def mean_rtn_error(self) -> float:
        return sum(e.rtn_error for e in self.entries) / max(1, len(self.entries))

    @property
    def mean_error(self) -> float:
        return sum(e.error for e in self.entries) / max(1, len(self.entries))

    def __str__(self) -> str:
        w = max([len(e.name) for e in self.entries] + [6])
        g = "row" if self.group_size is None else self.group_size
        lines = [
            f"{self.method.upper()} {self.bits}-bit, group {g} ({'packed' if self.packed else 'dense'})",
            f"{'matrix':<{w}}  {'shape':<12} {'RTN err':>8} {'HQQ err':>8} {'bytes':>22}",
        ]
        for e in self.entries:
            h = "-" if e.hqq_error is None else f"{e.hqq_error:.4f}"
            lines.append(
                f"{e.name:<{w}}  {str(list(e.shape)):<12} {e.rtn_error:>8.4f} {h:>8} "
                f"{e.dense_bytes:>9,} -> {e.packed_bytes:<9,}"
            )
        lines.append(f"mean relative error: RTN {self.mean_rtn_error:.4f}, stored {self.mean_error:.4f}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------- on a model
def _validate(model, bits, group_size, targets, layers, p, beta, kappa, iters):
    check_bits(bits)
    check_hqq_params(p, beta, kappa, iters)
    chosen = select_linears(model, targets, layers)
    for layer, target, lin in chosen:
        check_group_size(group_size, lin.in_features, module_name(layer, target))
    return chosen


@torch.no_grad()
def _apply(
    model, bits, group_size, targets, layers, p, beta, kappa, iters, optimize, packed, restorer: Restorer
) -> HQQReport:
    chosen = _validate(model, bits, group_size, targets, layers, p, beta, kappa, iters)
    report = HQQReport(bits, group_size, "hqq" if optimize else "rtn", packed)
    for layer, target, lin in chosen:
        W = lin.weight
        rtn = quantize_rtn(W, bits, group_size)
        qt = hqq_quantize(W, bits, group_size, p, beta, kappa, iters) if optimize else rtn
        report.entries.append(
            QuantEntry(
                layer,
                target,
                tuple(W.shape),
                rtn.rel_error(W),
                qt.rel_error(W) if optimize else None,
                qt.iters_run,
                W.numel() * W.element_size(),
                qt.nbytes,
            )
        )
        if packed:
            restorer.swap(module_name(layer, target), PackedQuantLinear.from_quantized(qt, lin.bias, dtype=W.dtype))
        else:
            restorer.write_weight(lin, qt.dequantize(W.dtype))
    record(
        model,
        {
            "op": report.method,
            "bits": bits,
            "group_size": group_size,
            "targets": sort_targets(t for _, t, _ in chosen),
            "layers": layers_text(x for x, _, _ in chosen),
            "p": p,
            "beta": beta,
            "kappa": kappa,
            "iters": iters,
            "packed": bool(packed),
        },
    )
    return report


def hqq_(
    model,
    bits: int = 4,
    group_size: int | None = 64,
    targets: TargetSpec = "all",
    layers: LayerSpec = None,
    *,
    p: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
    iters: int = 20,
    optimize: bool = True,
    packed: bool = False,
) -> HQQReport:
    """Quantize the selected matrices in place (HQQ, or round-to-nearest with `optimize=False`).

    Args:
        model: a `tinygpt.GPT`.
        bits: 1..8.
        group_size: weights per (scale, zero) group, contiguous along in_features; must divide the
            in_features of every selected matrix (None = whole rows).
        targets: "all" (default), "mlp", "attn", or names such as "mlp.fc_out" (list or comma-separated).
        layers: int, list, "0-11", "0,2,5" or None (all).
        p, beta, kappa, iters: HQQ hyperparameters (see `hqq_quantize`).
        optimize: False = round-to-nearest (min-max) only.
        packed: replace each Linear by a `PackedQuantLinear` (bit-packed codes; smaller files); otherwise
            the dequantized weights are written back into the dense `nn.Linear` (drop-in).
    Returns:
        An `HQQReport` with the RTN and HQQ relative error of every matrix.
    Raises:
        ValueError: bad bits, group size, targets, layers or hyperparameters; nothing is modified.
    """
    return _apply(
        model, bits, group_size, targets, layers, p, beta, kappa, iters, optimize, packed, Restorer(model, active=False)
    )


@contextlib.contextmanager
def hqq(
    model,
    bits: int = 4,
    group_size: int | None = 64,
    targets: TargetSpec = "all",
    layers: LayerSpec = None,
    *,
    p: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
    iters: int = 20,
    optimize: bool = True,
    packed: bool = False,
) -> Iterator[HQQReport]:
    """Context manager: quantized weights inside the block, the originals (bitwise) afterwards.

    Yields the `HQQReport`. Arguments as for `hqq_`.
    """
    with restoring(model) as restorer:
        yield _apply(model, bits, group_size, targets, layers, p, beta, kappa, iters, optimize, packed, restorer)


# ------------------------------------------------------------------------------------- error grids
_METHODS = ("rtn", "hqq")


def _check_method(method: str) -> str:
    if method not in _METHODS:
        raise ValueError(f"method must be 'rtn' or 'hqq', got {method!r}")
    return method


def _nanmean(values: list[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan


@dataclass
class HqqGridResult:
    """Relative Frobenius error ||W − Ŵ||_F / ||W||_F of every selected matrix, for RTN and HQQ, over a grid.

    `rtn[target][i][j][k]` (and `hqq[...]`) is the error of `blocks.{layers[i]}.{target}` at `bits[j]` and
    `group_sizes[k]`; NaN where that group size does not divide the matrix's in_features. The weights are
    kept (fp32 copies on the CPU, `weights[(layer, target)]`) so residuals can be recomputed for histograms.
    """

    targets: list[str]
    layers: list[int]
    bits: list[int]
    group_sizes: list[int | None]
    rtn: dict[str, list[list[list[float]]]]
    hqq: dict[str, list[list[list[float]]]]
    hqq_params: dict[str, Any] = field(default_factory=dict)
    weights: dict[tuple[int, str], Tensor] = field(default_factory=dict, repr=False)

    def _values(self, method: str) -> dict[str, list[list[list[float]]]]:
        return self.rtn if _check_method(method) == "rtn" else self.hqq

    def error(self, method: str, layer: int, target: str, bits: int, group_size: int | None) -> float:
        """The relative error of one matrix at one grid point."""
        return self._values(method)[target][self.layers.index(layer)][self.bits.index(bits)][
            self.group_sizes.index(group_size)
        ]

    def table(self, method: str = "hqq", layer: int | None = None, target: str | None = None) -> list[list[float]]:
        """[bits][group_size] errors of one matrix, or the mean over the matrices matching `layer` / `target`
        (None = all layers / all targets; NaN cells are left out of the mean)."""
        vals = self._values(method)
        tgts = self.targets if target is None else [target]
        lays = self.layers if layer is None else [layer]
        for t in tgts:
            if t not in self.targets:
                raise ValueError(f"target {t!r} is not in this grid ({', '.join(self.targets)})")
        for ly in lays:
            if ly not in self.layers:
                raise ValueError(f"layer {ly!r} is not in this grid ({self.layers})")
        return [
            [
                _nanmean([vals[t][self.layers.index(ly)][j][k] for t in tgts for ly in lays])
                for k in range(len(self.group_sizes))
            ]
            for j in range(len(self.bits))
        ]

    def rows(self) -> list[dict[str, Any]]:
        """One dict per (layer, target, bits, group_size): rtn_error, hqq_error."""
        return [
            {
                "layer": ly,
                "target": t,
                "bits": b,
                "group_size": g,
                "rtn_error": self.rtn[t][i][j][k],
                "hqq_error": self.hqq[t][i][j][k],
            }
            for t in self.targets
            for i, ly in enumerate(self.layers)
            for j, b in enumerate(self.bits)
            for k, g in enumerate(self.group_sizes)
        ]

    def quantized(
        self, layer: int, target: str, bits: int, group_size: int | None, method: str = "hqq"
    ) -> QuantizedTensor:
        """Quantize the stored copy of one matrix again (the same result as during the sweep)."""
        W = self._weight(layer, target)
        if _check_method(method) == "rtn":
            return quantize_rtn(W, bits, group_size)
        return hqq_quantize(W, bits, group_size, **self.hqq_params)

    def residual(self, layer: int, target: str, bits: int, group_size: int | None, method: str = "hqq") -> Tensor:
        """W − Ŵ [out, in] of one matrix."""
        return self._weight(layer, target) - self.quantized(layer, target, bits, group_size, method).dequantize()

    def residual_histogram(
        self, layer: int, target: str, bits: int, group_size: int | None, n_bins: int = 81
    ) -> dict[str, Any]:
        """Histogram counts of W − Ŵ for RTN and HQQ over shared bins.

        Returns:
            {"edges": [n_bins + 1], "centers": [n_bins], "rtn": counts [n_bins], "hqq": counts [n_bins],
             "rtn_error": float, "hqq_error": float}
        """
        with _one_thread():
            res = {m: self.residual(layer, target, bits, group_size, m).flatten() for m in _METHODS}
        big = max(float(r.abs().max()) for r in res.values()) or 1e-12
        edges = torch.linspace(-big, big, n_bins + 1, dtype=torch.float64)
        out: dict[str, Any] = {"edges": edges.tolist(), "centers": ((edges[1:] + edges[:-1]) / 2).tolist()}
        for m, r in res.items():
            out[m] = torch.histc(r.double(), bins=n_bins, min=-big, max=big).long().tolist()
            out[f"{m}_error"] = self.error(m, layer, target, bits, group_size)
        return out

    def _weight(self, layer: int, target: str) -> Tensor:
        if (layer, target) not in self.weights:
            raise ValueError(
                f"no stored weight for layer {layer} {target}; this grid holds layers {self.layers} and "
                f"targets {self.targets}"
            )
        return self.weights[(layer, target)]

    def figure(self, layer: int | None = None, target: str | None = None):
        """Two heatmaps, RTN and HQQ, of the error over bits × group size (one matrix, or the mean)."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        tables = {m: self.table(m, layer, target) for m in _METHODS}
        zmax = max((v for t in tables.values() for row in t for v in row if not math.isnan(v)), default=1.0)
        fig = make_subplots(rows=1, cols=2, subplot_titles=("round-to-nearest", "HQQ"), horizontal_spacing=0.08)
        for c, m in enumerate(_METHODS, start=1):
            fig.add_trace(
                go.Heatmap(
                    z=_json_safe(tables[m]),
                    x=[_group_label(g) for g in self.group_sizes],
                    y=[f"{b}-bit" for b in self.bits],
                    zmin=0,
                    zmax=zmax,
                    colorscale="Viridis",
                    texttemplate="%{z:.3f}",
                    showscale=c == 2,
                    colorbar={"title": "rel. error"},
                    hovertemplate=f"{m.upper()} %{{y}}, group %{{x}}: %{{z:.4f}}<extra></extra>",
                ),
                1,
                c,
            )
            fig.update_xaxes(title_text="group size", type="category", row=1, col=c)
            fig.update_yaxes(type="category", row=1, col=c)
        fig.update_layout(
            title=f"relative weight error ‖W − Ŵ‖/‖W‖: {_selection_label(layer, target)}",
            template="plotly_white",
            height=380,
        )
        return fig

    def layer_figure(self, bits: int, group_size: int | None, method: str = "hqq"):
        """Heatmap of the error of every matrix (layers × targets) at one (bits, group size)."""
        import plotly.graph_objects as go

        j, k = self.bits.index(bits), self.group_sizes.index(group_size)
        vals = self._values(method)
        z = [[vals[t][i][j][k] for t in self.targets] for i in range(len(self.layers))]
        fig = go.Figure(
            go.Heatmap(
                z=_json_safe(z),
                x=self.targets,
                y=[f"layer {ly}" for ly in self.layers],
                colorscale="Viridis",
                texttemplate="%{z:.3f}",
                colorbar={"title": "rel. error"},
            )
        )
        fig.update_yaxes(autorange="reversed", type="category")
        fig.update_layout(
            title=f"{method.upper()} {bits}-bit, group {_group_label(group_size)}: relative error per matrix",
            template="plotly_white",
            height=max(300, 40 * len(self.layers) + 150),
        )
        return fig

    def histogram(self, layer: int, target: str, bits: int, group_size: int | None, n_bins: int = 81):
        """Histogram of W − Ŵ for RTN and HQQ of one matrix (shared bins, overlaid)."""
        import plotly.graph_objects as go

        h = self.residual_histogram(layer, target, bits, group_size, n_bins)
        fig = go.Figure()
        for m, name in (("rtn", "round-to-nearest"), ("hqq", "HQQ")):
            fig.add_trace(
                go.Bar(x=h["centers"], y=h[m], name=f"{name} (rel. error {h[f'{m}_error']:.4f})", opacity=0.6)
            )
        fig.update_layout(
            barmode="overlay",
            bargap=0,
            title=f"W − Ŵ, layer {layer} {target}, {bits}-bit, group {_group_label(group_size)}",
            xaxis_title="W − Ŵ",
            yaxis_title="weights",
            template="plotly_white",
            height=380,
        )
        return fig

    def __repr__(self) -> str:
        return (
            f"HqqGridResult({len(self.layers)} layers x {len(self.targets)} targets, bits {self.bits}, "
            f"group sizes {self.group_sizes})"
        )


def _group_label(g: int | None) -> str:
    return "row" if g is None else str(g)


def _selection_label(layer: int | None, target: str | None) -> str:
    if layer is not None and target is not None:
        return f"layer {layer} {target}"
    if layer is None and target is None:
        return "mean over all matrices"
    return f"mean over {'all layers' if layer is None else f'layer {layer}'}, {target or 'all targets'}"


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run many small CPU tensor ops on one thread: intra-op threading of matrices this size is slower, and
    10-100x slower when the cores are shared with other processes (measured: 512x128 HQQ 18 ms vs 110 ms)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _json_safe(table: list[list[float]]) -> list[list[float | None]]:
    """NaN -> None (JSON has no NaN; plotly leaves such cells empty)."""
    return [[None if math.isnan(v) else v for v in row] for row in table]


def hqq_error_grid(
    model,
    bits: tuple[int, ...] | list[int] = (2, 3, 4, 8),
    group_sizes: tuple[int | None, ...] | list[int | None] = (32, 64, 128),
    targets: TargetSpec = "all",
    layers: LayerSpec = None,
    *,
    p: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
    iters: int = 20,
    progress: bool = True,
) -> HqqGridResult:
    """Relative reconstruction error of RTN and HQQ for every selected matrix and every (bits, group size).

    The model is not modified.

    Args:
        model: a `tinygpt.GPT`.
        bits: bit widths to try (each 1..8).
        group_sizes: group sizes to try (None = whole rows); a group size that does not divide a matrix's
            in_features gives NaN for that matrix (it must divide at least one selected matrix).
        targets, layers: which matrices (see `hqq_`).
        p, beta, kappa, iters: HQQ hyperparameters (see `hqq_quantize`).
        progress: show a tqdm progress bar.
    """
    from tqdm.auto import tqdm

    bits_l = list(dict.fromkeys(check_bits(b) for b in bits))
    groups = list(dict.fromkeys(group_sizes))
    if not bits_l or not groups:
        raise ValueError("bits and group_sizes must each hold at least one value, e.g. bits=(2, 3, 4, 8)")
    check_hqq_params(p, beta, kappa, iters)
    chosen = select_linears(model, targets, layers)
    in_features = sorted({lin.in_features for _, _, lin in chosen})
    for g in groups:
        if g is None:
            continue
        if isinstance(g, bool) or not isinstance(g, int) or g < 1:
            raise ValueError(f"group sizes must be positive ints (or None for whole rows), got {g!r}")
        if not any(n % g == 0 for n in in_features):
            raise ValueError(
                f"group size {g} divides none of the selected matrices (in_features {in_features}); "
                "choose divisors of those"
            )
    tgts, lays = concrete_targets(chosen)
    params = {"p": p, "beta": beta, "kappa": kappa, "iters": iters}
    shape = lambda: [[[math.nan] * len(groups) for _ in bits_l] for _ in lays]  # noqa: E731
    rtn = {t: shape() for t in tgts}
    hq = {t: shape() for t in tgts}
    weights: dict[tuple[int, str], Tensor] = {}
    bar = tqdm(total=len(chosen) * len(bits_l) * len(groups), desc="HQQ error grid", disable=not progress)
    try:
        with torch.no_grad(), _one_thread():
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
    finally:
        bar.close()
    return HqqGridResult(tgts, lays, bits_l, groups, rtn, hq, params, weights)


@dataclass
class HqqLossCurve:
    """Validation loss with every selected matrix quantized, per bit width, for RTN and HQQ.

    `rtn[j]` / `hqq[j]` is the loss at `bits[j]`; `rtn_error[j]` / `hqq_error[j]` the mean relative weight
    error over the quantized matrices.
    """

    base_loss: float
    bits: list[int]
    group_size: int | None
    rtn: list[float]
    hqq: list[float]
    rtn_error: list[float]
    hqq_error: list[float]
    targets: list[str]
    layers: list[int]
    n_tokens: int

    def rows(self) -> list[dict[str, Any]]:
        return [
            {"bits": b, "rtn_loss": r, "hqq_loss": h, "rtn_error": re, "hqq_error": he}
            for b, r, h, re, he in zip(self.bits, self.rtn, self.hqq, self.rtn_error, self.hqq_error)
        ]

    def figure(self):
        """Validation loss vs bits (RTN and HQQ) with the unquantized loss as a dashed line."""
        import plotly.graph_objects as go

        fig = go.Figure()
        for name, ys in (("round-to-nearest", self.rtn), ("HQQ", self.hqq)):
            fig.add_trace(go.Scatter(x=self.bits, y=ys, mode="lines+markers", name=name))
        fig.add_hline(y=self.base_loss, line_dash="dash", annotation_text=f"fp32 {self.base_loss:.4f}")
        fig.update_xaxes(title_text="bits", tickvals=self.bits)
        fig.update_yaxes(title_text="validation loss")
        fig.update_layout(
            title=f"validation loss vs bits (group {_group_label(self.group_size)}, {self.n_tokens:,} tokens)",
            template="plotly_white",
            height=380,
        )
        return fig

    def __repr__(self) -> str:
        pts = ", ".join(f"{b}b {r:.3f}/{h:.3f}" for b, r, h in zip(self.bits, self.rtn, self.hqq))
        return f"HqqLossCurve(base {self.base_loss:.4f}; RTN/HQQ: {pts})"


def hqq_loss_curve(
    model,
    tokens_or_corpus: Any = None,
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
    progress: bool = True,
) -> HqqLossCurve:
    """Validation loss vs bits with all selected matrices quantized (RTN and HQQ); the model is restored.

    Args:
        model: a `tinygpt.GPT`.
        tokens_or_corpus: validation data (see `tinygpt.surgery.laser_sweep`).
        bits: bit widths (each 1..8).
        group_size: one group size for every matrix (must divide their in_features; None = rows).
        targets, layers: which matrices (see `hqq_`).
        p, beta, kappa, iters: HQQ hyperparameters.
        ctx, n_windows, batch_size: how validation windows are cut from a stream.
        progress: show a tqdm progress bar.
    """
    from tqdm.auto import tqdm

    from tinygpt.surgery.common import eval_data, eval_loss

    bits_l = [check_bits(b) for b in bits]
    if not bits_l:
        raise ValueError("bits must hold at least one value, e.g. bits=(2, 3, 4, 8)")
    chosen = _validate(model, bits_l[0], group_size, targets, layers, p, beta, kappa, iters)
    data = eval_data(model, tokens_or_corpus, ctx=ctx, n_windows=n_windows, batch_size=batch_size)
    base = eval_loss(model, data)
    losses: dict[str, list[float]] = {m: [] for m in _METHODS}
    errors: dict[str, list[float]] = {m: [] for m in _METHODS}
    kw = {"p": p, "beta": beta, "kappa": kappa, "iters": iters}
    bar = tqdm(total=2 * len(bits_l), desc="HQQ loss vs bits", disable=not progress)
    try:
        for b in bits_l:
            for m in _METHODS:
                with hqq(model, b, group_size, targets, layers, optimize=m == "hqq", **kw) as report:
                    losses[m].append(eval_loss(model, data))
                    errors[m].append(report.mean_error)
                bar.update()
    finally:
        bar.close()
    tgts, lays = concrete_targets(chosen)
    return HqqLossCurve(
        base, bits_l, group_size, losses["rtn"], losses["hqq"], errors["rtn"], errors["hqq"], tgts, lays, data.n_tokens
    )


__all__ = [
    "QuantizedTensor",
    "PackedQuantLinear",
    "QuantEntry",
    "HQQReport",
    "quantize_rtn",
    "hqq_quantize",
    "hqq",
    "hqq_",
    "pack_codes",
    "unpack_codes",
    "packed_nbytes",
    "HqqGridResult",
    "hqq_error_grid",
    "HqqLossCurve",
    "hqq_loss_curve",
]
