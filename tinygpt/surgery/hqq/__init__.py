"""HQQ: half-quadratic quantization (Badri & Shaji 2023), our own implementation, plus round-to-nearest.

Asymmetric affine quantization with one (scale s, zero z) per group of `group_size` contiguous weights
along in_features: codes W_q = clamp(round(W / s + z), 0, 2^b − 1), dequantized Ŵ = s · (W_q − z).
Round-to-nearest (`quantize_rtn`) uses the min-max scale and zero; HQQ (`hqq_quantize`) then optimises the
zeros with the half-quadratic splitting of the reference implementation (see `tinygpt.surgery.hqq.quantize`).

    report = hqq_(model, bits=4, group_size=64, packed=True)     # per-matrix RTN vs HQQ error
    with hqq(model, bits=3):                                      # restored exactly on exit
        ...
    grid = hqq_error_grid(model)                                  # every matrix over bits x group size

On a model, `hqq_` rewrites weights in place as dense tensors (a drop-in change), or with `packed=True`
replaces each `nn.Linear` by a `PackedQuantLinear` holding bit-packed codes (b bits per weight, any b in
1..8) plus fp32 scales and zeros; the weight is dequantized at forward time. Saved files then really
shrink (about b/32 of fp32 plus 64 bits per group). 4-bit packed layers can compute with a Triton kernel
(`tinygpt.surgery.hqq.triton.use_triton`).

Modules: `packing` (bit-packing), `quantize` (RTN, HQQ, `QuantizedTensor`), `layer` (`PackedQuantLinear`),
`apply` (`hqq_`, `hqq`), `analysis` (error grid, loss curve), `results` (what they return, with `.figure()`),
`triton` (the optional kernel; `_triton_kernels` holds its source).
"""

from tinygpt.surgery.hqq.analysis import hqq_error_grid, hqq_loss_curve
from tinygpt.surgery.hqq.apply import HQQReport, QuantEntry, hqq, hqq_
from tinygpt.surgery.hqq.layer import PackedQuantLinear
from tinygpt.surgery.hqq.packing import check_bits, pack_codes, packed_nbytes, unpack_codes
from tinygpt.surgery.hqq.quantize import QuantizedTensor, check_group_size, check_hqq_params, hqq_quantize, quantize_rtn
from tinygpt.surgery.hqq.results import HqqGridResult, HqqLossCurve, group_label, selection_label

__all__ = [
    "QuantizedTensor",
    "PackedQuantLinear",
    "QuantEntry",
    "HQQReport",
    "check_bits",
    "check_group_size",
    "check_hqq_params",
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
    "group_label",
    "selection_label",
]
