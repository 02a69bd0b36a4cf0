"""`PackedQuantLinear`: a Linear layer holding bit-packed codes, dequantized at every forward."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from tinygpt.checkpoint import register_swap
from tinygpt.surgery.hqq.packing import check_bits, packed_nbytes, unpack_codes
from tinygpt.surgery.hqq.quantize import QuantizedTensor, check_group_size
from tinygpt.surgery.restore import SwappedLinear


class PackedQuantLinear(SwappedLinear):
    """A Linear layer whose weight is stored as bit-packed `bits`-bit codes plus per-group scale and zero.

    Buffers (saved in the state dict): `packed` uint8 [ceil(out·in·bits/8)], `scale` and `zero` fp32
    [out, in/group_size]; parameter `bias` [out]. The weight is dequantized at every forward; `weight`
    is a read-only property returning it [out, in]. `impl = "triton"` (4-bit layers, CUDA or Triton's
    interpreter) computes the forward with the fused kernel of `tinygpt.surgery.hqq.triton` instead.
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
        self.impl = "torch"  # or "triton" (4-bit only; see `tinygpt.surgery.hqq.triton.use_triton`)

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
        if self.impl == "triton":  # 4-bit only: dequantise-and-multiply in one kernel (surgery.hqq.triton)
            from tinygpt.surgery.hqq.triton import packed4_linear

            return packed4_linear(x, self)
        return F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
        )


register_swap(PackedQuantLinear.kind, PackedQuantLinear)
