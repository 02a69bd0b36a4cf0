"""A Triton dequantise-and-multiply kernel for 4-bit packed HQQ / round-to-nearest layers.

`packed4_linear(x, layer)` computes `x · Ŵᵀ + b` for a 4-bit `PackedQuantLinear` straight from its packed
codes, scales and zeros: the dense weight Ŵ is dequantised tile by tile in registers and never written to
memory (the PyTorch path of `PackedQuantLinear.forward` materialises it per call). Accumulation is fp32; fp32
matmuls use TF32 on tensor cores only when `torch.backends.cuda.matmul.allow_tf32` is set (PyTorch's rule).

    from tinygpt.surgery import hqq_
    from tinygpt.surgery.hqq.triton import use_triton  # also importable as tinygpt.surgery.hqq_triton
    hqq_(model, bits=4, group_size=64, packed=True)
    use_triton(model)          # every 4-bit packed layer of the model computes with the kernel

Triton is imported lazily (importing this module does not import it). The kernel needs a CUDA GPU, or
Triton's CPU interpreter for testing (`TRITON_INTERPRET=1` set before triton is first imported; correct but
thousands of times slower). Layout and algorithm: `tinygpt/surgery/hqq/_triton_kernels.py`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch
from torch import Tensor

from tinygpt.arch.backends import BackendUnavailable
from tinygpt.errors import TinyGPTError
from tinygpt.surgery.targets import SurgeryError


class KernelInputError(TinyGPTError, TypeError):
    """An input dtype the Triton kernel does not take."""


__all__ = ["KernelInputError", "packed4_linear", "use_triton"]

_kernels: ModuleType | None = None


def kernels() -> ModuleType:
    """The kernel module (imports triton on first use; compiled or interpreted as triton itself is)."""
    global _kernels
    if _kernels is None:
        import triton.language  # noqa: F401  (the first import settles interpreter vs compiler)

        from tinygpt.arch.triton import attention as triton_attn

        with triton_attn._interpret_env(bool(triton_attn._triton_interprets())):
            _kernels = importlib.import_module("tinygpt.surgery.hqq._triton_kernels")
    return _kernels


def _block(n: int, lo: int, hi: int) -> int:
    return min(hi, max(lo, 1 << (max(n, 1) - 1).bit_length()))


def packed4_linear(x: Tensor, layer) -> Tensor:
    """`F.linear(x, layer.dequantize(x.dtype), layer.bias)` for a 4-bit `PackedQuantLinear`, in one kernel.

    Args:
        x: [..., in_features], fp32, bf16 or fp16, on the layer's device.
        layer: a `tinygpt.surgery.PackedQuantLinear` with `bits == 4`.
    Returns:
        [..., out_features] in x's dtype.
    Raises:
        SurgeryError: not 4-bit, or mismatched shapes / devices; KernelInputError: an unsupported dtype;
        BackendUnavailable (a RuntimeError): no CUDA device and no interpreter.
    """
    from tinygpt.arch.triton import attention as triton_attn

    if layer.bits != 4:
        raise SurgeryError(f"the Triton kernel handles 4-bit packed layers, this one has {layer.bits} bits")
    n, k = layer.out_features, layer.in_features
    if x.shape[-1] != k:
        raise SurgeryError(f"x has {x.shape[-1]} features, the layer expects {k}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise KernelInputError(f"the Triton kernel supports float32, bfloat16 and float16 inputs, got {x.dtype}")
    if x.device != layer.packed.device:
        raise SurgeryError(f"x is on {x.device}, the layer on {layer.packed.device}")
    if (why := triton_attn.unavailable_reason(x.device)) is not None:
        raise BackendUnavailable(why)
    kern = kernels()
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*x.shape[:-1], n)
    bm, bn, bk = _block(m, 16, 64), _block(n, 16, 64), _block(k, 16, 64)
    bias = layer.bias
    precision = "tf32" if x.is_cuda and torch.backends.cuda.matmul.allow_tf32 else "ieee"
    import triton

    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    with triton_attn._interpret_env(triton_attn.interpreting()):
        kern.packed4_linear_kernel[grid](
            x2, layer.packed, layer.scale.contiguous(), layer.zero.contiguous(),
            bias if bias is not None else y, y,
            m, n, k, layer.group_size,
            x2.stride(0), x2.stride(1), y.stride(0), y.stride(1),
            HAS_BIAS=bias is not None, PRECISION=precision, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        )  # fmt: skip
    return y.reshape(*x.shape[:-1], n)


def use_triton(model: torch.nn.Module, on: bool = True) -> int:
    """Make every 4-bit `PackedQuantLinear` of `model` compute with the Triton kernel (`on=False`: with PyTorch
    again). Returns the number of layers switched."""
    from tinygpt.surgery.hqq.layer import PackedQuantLinear

    layers = [m for m in model.modules() if isinstance(m, PackedQuantLinear) and m.bits == 4]
    for m in layers:
        m.impl = "triton" if on else "torch"
    return len(layers)
