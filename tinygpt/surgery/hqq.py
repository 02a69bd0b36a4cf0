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
    TargetSpec,
    layers_text,
    module_name,
    record,
    select_linears,
    set_module,
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


class PackedQuantLinear(nn.Module):
    """A Linear layer whose weight is stored as bit-packed `bits`-bit codes plus per-group scale and zero.

    Buffers (saved in the state dict): `packed` uint8 [ceil(out·in·bits/8)], `scale` and `zero` fp32
    [out, in/group_size]; parameter `bias` [out]. The weight is dequantized at every forward; `weight`
    is a read-only property returning it [out, in].
    """

    kind = "packed_quant"

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

    @classmethod
    def from_spec(cls, spec: dict[str, Any], like: nn.Linear) -> PackedQuantLinear:
        """An empty module shaped by a manifest `spec`, in the dtype/device of the Linear it replaces."""
        if (spec.get("in_features"), spec.get("out_features")) != (like.in_features, like.out_features):
            raise ValueError(f"packed record {spec} does not match a Linear {like.in_features}->{like.out_features}")
        w = like.weight
        return cls(
            like.in_features,
            like.out_features,
            int(spec["bits"]),
            int(spec["group_size"]),
            like.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )

    def surgery_spec(self) -> dict[str, Any]:
        return {
            "type": self.kind,
            "bits": self.bits,
            "group_size": self.group_size,
            "in_features": self.in_features,
            "out_features": self.out_features,
        }

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
        return F.linear(x, self.dequantize(x.dtype), self.bias)

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
    model, bits, group_size, targets, layers, p, beta, kappa, iters, optimize, packed, restorer: Restorer | None
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
        name = module_name(layer, target)
        if packed:
            new = PackedQuantLinear.from_quantized(qt, lin.bias, dtype=W.dtype)
            if restorer is not None:
                restorer.swap(name, new)
            else:
                set_module(model, name, new)
        else:
            if restorer is not None:
                restorer.save_weight(lin)
            W.copy_(qt.dequantize(W.dtype))
    record(
        model,
        {
            "op": report.method,
            "bits": bits,
            "group_size": group_size,
            "targets": sorted({t for _, t, _ in chosen}),
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
    return _apply(model, bits, group_size, targets, layers, p, beta, kappa, iters, optimize, packed, None)


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
    restorer = Restorer(model)
    try:
        yield _apply(model, bits, group_size, targets, layers, p, beta, kappa, iters, optimize, packed, restorer)
    finally:
        restorer.restore()


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
]
