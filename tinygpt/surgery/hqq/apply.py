"""HQQ / round-to-nearest on a model: `hqq_` (in place) and `hqq` (a context manager restoring it exactly).

`hqq_` rewrites weights in place as dense tensors (a drop-in change), or with `packed=True` replaces each
`nn.Linear` by a `PackedQuantLinear` holding bit-packed codes (b bits per weight, any b in 1..8) plus fp32
scales and zeros; the weight is dequantized at forward time. Saved files then really shrink (about b/32 of
fp32 plus 64 bits per group).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch

from tinygpt.surgery.hqq.layer import PackedQuantLinear
from tinygpt.surgery.hqq.packing import check_bits
from tinygpt.surgery.hqq.quantize import check_group_size, check_hqq_params, hqq_quantize, quantize_rtn
from tinygpt.surgery.restore import Restorer, in_place, signature_of, temporarily
from tinygpt.surgery.targets import LayerSpec, TargetSpec, layers_text, module_name, select_linears, sort_targets


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

    def figure(self):
        """Plotly bar chart: the RTN and (when optimised) HQQ relative error of every quantized matrix."""
        import plotly.graph_objects as go

        names = [e.name for e in self.entries]
        fig = go.Figure(go.Bar(x=names, y=[e.rtn_error for e in self.entries], name="round-to-nearest"))
        if self.method == "hqq":
            fig.add_trace(go.Bar(x=names, y=[e.error for e in self.entries], name="HQQ"))
        g = "row" if self.group_size is None else self.group_size
        fig.update_layout(
            barmode="group",
            title=f"{self.method.upper()} {self.bits}-bit, group {g}: relative error ‖W − Ŵ‖/‖W‖ per matrix",
            yaxis_title="relative error",
            template="plotly_white",
            height=380,
        )
        return fig


def _validate(model, bits, group_size, targets, layers, p, beta, kappa, iters):
    check_bits(bits)
    check_hqq_params(p, beta, kappa, iters)
    chosen = select_linears(model, targets, layers)
    for layer, target, lin in chosen:
        check_group_size(group_size, lin.in_features, module_name(layer, target))
    return chosen


@torch.no_grad()
def _apply(
    restorer: Restorer, model, bits, group_size, targets, layers, p, beta, kappa, iters, optimize, packed
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
    restorer.record(
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
        SurgeryError: bad bits, group size, targets, layers or hyperparameters; nothing is modified.
    """
    return in_place(_apply, model, bits, group_size, targets, layers, p, beta, kappa, iters, optimize, packed)


@signature_of(hqq_)
def hqq(model, *args, **kwargs) -> AbstractContextManager[HQQReport]:
    """Context manager: quantized weights inside the block, the originals (bitwise) afterwards.

    Takes the arguments of `hqq_` and yields its `HQQReport`.
    """
    return temporarily(hqq_, model, *args, **kwargs)


__all__ = ["HQQReport", "QuantEntry", "hqq", "hqq_"]
