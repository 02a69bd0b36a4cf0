"""Triton kernel of `tinygpt.surgery.hqq.triton`: y = x · dequant(W)ᵀ + b for bit-packed 4-bit weights.

Imported lazily, through `tinygpt.surgery.hqq.triton.kernels()` (this module imports triton), compiled for
the GPU or run by Triton's CPU interpreter as triton itself was imported (`TRITON_INTERPRET`).

Layout (`tinygpt.surgery.hqq.packing.pack_codes` with 4 bits): the codes of W [N, K] in row-major order, two per
byte, code k of a row in the low nibble of byte k // 2 when k is even, the high nibble when odd; K is even,
so row n's codes are bytes [n·K/2, (n+1)·K/2). Scales and zeros are fp32 [N, K / G], one per group of G
consecutive weights of a row: w[n, k] = scale[n, k // G] · (code[n, k] − zero[n, k // G]).

One program computes a [BLOCK_M, BLOCK_N] tile of y; it walks K in blocks of BLOCK_K, loading x's tile and
the packed bytes of W's tile (each byte is read for both of its codes), dequantising to fp32 in registers and
accumulating x · wᵀ in fp32. The dense weight is never written to memory.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def packed4_linear_kernel(
    X, P, S, Z, B, Y,
    M, N, K, G,
    sxm, sxk, sym, syn,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    n_groups = K // G
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(X + offs_m[:, None] * sxm + offs_k[None, :] * sxk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w_ok = n_ok[:, None] & k_ok[None, :]
        byte = tl.load(P + offs_n[:, None] * (K // 2) + offs_k[None, :] // 2, mask=w_ok, other=0).to(tl.int32)
        code = (byte >> ((offs_k[None, :] % 2) * 4)) & 0xF
        g = offs_n[:, None] * n_groups + offs_k[None, :] // G
        scale = tl.load(S + g, mask=w_ok, other=0.0)
        zero = tl.load(Z + g, mask=w_ok, other=0.0)
        w = scale * (code.to(tl.float32) - zero)  # [BLOCK_N, BLOCK_K], fp32
        acc = tl.dot(x.to(tl.float32), tl.trans(w), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(B + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = Y + offs_m[:, None] * sym + offs_n[None, :] * syn
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
