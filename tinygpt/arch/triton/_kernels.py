"""Triton kernels of `tinygpt.arch.triton.attention` (FlashAttention-2 style, forward and backward).

Imported lazily, through `tinygpt.arch.triton.attention.kernels()` (this module imports triton). Whether the
kernels are compiled for the GPU or run by Triton's CPU interpreter is settled by `TRITON_INTERPRET` when
triton is first imported (`triton.jit` reads it; triton's own library functions are decorated then).

`SEQ_BUCKET` is unused by the kernels: it is the autotuner's key for the sequence length (a power of two),
so a new length within the same bucket reuses the tuned block sizes instead of re-tuning.

Layout: q [B, H, M, D_QK], k [B, H / GROUP, N, D_QK], v [B, H / GROUP, N, D_V], o [B, H, M, D_V], any strides;
GROUP > 1 is grouped-query attention: query head h reads key/value head h // GROUP (the dK/dV kernel writes one
gradient per query head, [B, H, N, D], which the caller sums over each group). Head dims
need not be powers of two: loads are masked up to the block dims `BLOCK_DQK`, `BLOCK_DV` (powers of two,
at least 16). Causal masking is bottom-right aligned, as with a KV cache: query `i` (of M) sees key `j`
(of N) iff `j <= i + N - M`; call `qpos = i + N - M` the query's key index. Two options refine it (both need
CAUSAL):

- `WINDOWED` (sliding window of `WINDOW` keys, YOCO's self-decoder): also `j > qpos - WINDOW`. Every key block a
  window can cut is masked, and key blocks wholly before the window are skipped.
- `HAS_QPOS` (queries at scattered positions, a Mixture-of-Depths routed block of YOCO's cross-decoder):
  `qpos` is read from `QPOS` [B, M] (int32, batch stride `sqpb`) instead; rows need not be sorted, so the
  dK/dV kernel visits every query block, masked.

A row may see no key of the first blocks it visits (a window starts later): the online softmax subtracts 0
instead of a running max of -inf, so such blocks contribute nothing.

`LSE` holds each row's log-sum-exp of the scaled scores in base 2 (`log2(sum_j 2^(s_ij * log2(e)))`), which
the backward pass uses to recompute the probabilities.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton import knobs

INTERPRET = bool(knobs.runtime.interpret)

LOG2E = 1.4426950408889634


@triton.jit
def _mm(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b in fp32 (UPCAST: operands converted to fp32 first; see `triton_attn`: the interpreter's bf16 dot)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _mma(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b (fp32 accumulator)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _key_range(qpos, row_ok, start_m, past, N, WINDOW, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, HAS_QPOS: tl.constexpr):  # fmt: skip
    """(lo, hi, full_end) for one query block: the key blocks in [lo, hi) are visited, those before `full_end`
    are visible to every row (no mask); blocks outside [lo, hi) are visible to none (skipped)."""
    if CAUSAL:
        if HAS_QPOS:
            q_first = tl.min(tl.where(row_ok, qpos, N), 0)
            q_last = tl.max(qpos, 0)
        else:
            q_first = past + start_m
            q_last = past + start_m + BLOCK_M - 1
        hi = tl.minimum(q_last + 1, N)
        full_end = q_first // BLOCK_N * BLOCK_N
        lo = full_end * 0
        if WINDOWED:  # keys before the first row's window are skipped; a window's lower edge can cut any block
            lo = tl.maximum(q_first - WINDOW + 1, 0) // BLOCK_N * BLOCK_N
            full_end = lo
    else:
        lo = 0
        hi = N
        full_end = N // BLOCK_N * BLOCK_N
    return lo, hi, full_end


@triton.jit
def _keep(cols, col_ok, qpos, WINDOW, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr):
    """[BLOCK_M, BLOCK_N] True where row (key index `qpos`) may attend to key `cols`."""
    keep = col_ok[None, :]
    if CAUSAL:
        keep = keep & (cols[None, :] <= qpos[:, None])
        if WINDOWED:
            keep = keep & (cols[None, :] > qpos[:, None] - WINDOW)
    return keep


@triton.jit(do_not_specialize=["SEQ_BUCKET"])
def attn_fwd(
    Q, K, V, Out, LSE, QPOS,
    sm_scale,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, som, sod,
    sqpb,
    H, GROUP, M, N, SEQ_BUCKET, WINDOW,
    D_QK: tl.constexpr, D_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, HAS_QPOS: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_M query rows of one (batch, head); online softmax over key blocks."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP  # the key/value head of query head h (grouped-query attention)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < M
    dk_ok = offs_dk < D_QK
    dv_ok = offs_dv < D_V
    past = N - M
    if HAS_QPOS:  # rows past M read 0: finite, never stored
        qpos = tl.load(QPOS + b * sqpb + offs_m, mask=row_ok, other=0)
    else:
        qpos = offs_m + past

    q = tl.load(
        Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_dk[None, :] * sqd,
        mask=row_ok[:, None] & dk_ok[None, :],
        other=0.0,
    )
    k_base = K + b * skb + hk * skh + offs_dk[:, None] * skd  # k^T tile: [BLOCK_DQK, BLOCK_N]
    v_base = V + b * svb + hk * svh + offs_dv[None, :] * svd  # v tile: [BLOCK_N, BLOCK_DV]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634  # exp(x) == exp2(x * log2(e))

    lo, hi, full_end = _key_range(qpos, row_ok, start_m, past, N, WINDOW, BLOCK_M, BLOCK_N, CAUSAL, WINDOWED,
                                  HAS_QPOS)  # fmt: skip
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < N
        kt = tl.load(k_base + cols[None, :] * skn, mask=dk_ok[:, None] & col_ok[None, :], other=0.0)
        qk = _mm(q, kt, PRECISION, UPCAST) * qk_scale  # [BLOCK_M, BLOCK_N]
        if start_n + BLOCK_N > full_end:  # a block on the diagonal, at a window's edge or at the end: mask it
            qk = tl.where(_keep(cols, col_ok, qpos, WINDOW, CAUSAL, WINDOWED), qk, float("-inf"))
        # A row that sees no key yet keeps m = -inf: subtract 0 instead (its p and alpha are then 0, not NaN).
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_sub)
        p = tl.exp2(qk - m_sub[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * svn, mask=col_ok[:, None] & dv_ok[None, :], other=0.0)
        acc = acc * alpha[:, None]
        acc = _mma(p.to(v.dtype), v, acc, PRECISION, UPCAST)
        m_i = m_new

    l_i = tl.where(l_i > 0, l_i, 1.0)  # only padding rows past M can see no key (never stored)
    acc = acc / l_i[:, None]
    tl.store(
        Out + b * sob + h * soh + offs_m[:, None] * som + offs_dv[None, :] * sod,
        acc.to(Out.dtype.element_ty),
        mask=row_ok[:, None] & dv_ok[None, :],
    )
    tl.store(LSE + pid_bh * M + offs_m, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def attn_bwd_preprocess(
    Out, DO, DELTA,
    sob, soh, som, sod,
    sdob, sdoh, sdom, sdod,
    H, M,
    D_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """delta[row] = sum_d dO[row, d] * O[row, d] (fp32), the softmax-gradient correction term."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_DV)
    mask = (offs_m < M)[:, None] & (offs_d < D_V)[None, :]
    o = tl.load(Out + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod, mask=mask, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdom + offs_d[None, :] * sdod, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + pid_bh * M + offs_m, delta, mask=offs_m < M)


@triton.jit(do_not_specialize=["SEQ_BUCKET"])
def attn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, QPOS,
    sm_scale,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdob, sdoh, sdom, sdod,
    sdkb, sdkh, sdkn, sdkd,
    sdvb, sdvh, sdvn, sdvd,
    sqpb,
    H, GROUP, M, N, SEQ_BUCKET, WINDOW,
    D_QK: tl.constexpr, D_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, HAS_QPOS: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """One program: dK, dV of BLOCK_N keys of one (batch, head), looping over the query blocks that see them."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_dk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_ok = offs_n < N
    dk_ok = offs_dk < D_QK
    dv_ok = offs_dv < D_V
    past = N - M

    k = tl.load(
        K + b * skb + hk * skh + offs_n[:, None] * skn + offs_dk[None, :] * skd,
        mask=col_ok[:, None] & dk_ok[None, :],
        other=0.0,
    )
    v = tl.load(
        V + b * svb + hk * svh + offs_n[:, None] * svn + offs_dv[None, :] * svd,
        mask=col_ok[:, None] & dv_ok[None, :],
        other=0.0,
    )
    q_base = Q + b * sqb + h * sqh + offs_dk[:, None] * sqd  # q^T tile: [BLOCK_DQK, BLOCK_M]
    do_base = DO + b * sdob + h * sdoh + offs_dv[None, :] * sdod  # dO tile: [BLOCK_M, BLOCK_DV]
    lse_base = LSE + pid_bh * M
    delta_base = DELTA + pid_bh * M

    dk = tl.zeros([BLOCK_N, BLOCK_DQK], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634

    hi = M
    if CAUSAL:
        # Query rows before start_n - past see none of these keys (skipped); rows at or after
        # start_n + BLOCK_N - 1 - past see all of them (without a window).
        lo = tl.maximum(start_n - past, 0) // BLOCK_M * BLOCK_M
        full_start = start_n + BLOCK_N - 1 - past
        if WINDOWED:  # rows from start_n + BLOCK_N - 1 - past + WINDOW on see none of them; mask every block
            hi = tl.minimum(start_n + BLOCK_N - 1 - past + WINDOW, M)
            full_start = M
        if HAS_QPOS:  # scattered rows: visit every query block, masked
            lo = 0
            hi = M
            full_start = M
    else:
        lo = 0
        full_start = 0
    full_m = M // BLOCK_M * BLOCK_M  # query blocks past this one hold padding rows
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < M
        if HAS_QPOS:
            qpos = tl.load(QPOS + b * sqpb + rows, mask=row_ok, other=0)
        else:
            qpos = rows + past
        qt = tl.load(q_base + rows[None, :] * sqm, mask=dk_ok[:, None] & row_ok[None, :], other=0.0)
        lse = tl.load(lse_base + rows, mask=row_ok, other=0.0)
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        do = tl.load(do_base + rows[:, None] * sdom, mask=row_ok[:, None] & dv_ok[None, :], other=0.0)
        st = _mm(k, qt, PRECISION, UPCAST) * qk_scale  # scores^T: [BLOCK_N, BLOCK_M]
        pt = tl.exp2(st - lse[None, :])
        if (start_m < full_start) | (start_m + BLOCK_M > full_m):
            keep = row_ok[None, :] & col_ok[:, None]
            if CAUSAL:
                keep = keep & (offs_n[:, None] <= qpos[None, :])
                if WINDOWED:
                    keep = keep & (offs_n[:, None] > qpos[None, :] - WINDOW)
            pt = tl.where(keep, pt, 0.0)
        dv = _mma(pt.to(do.dtype), do, dv, PRECISION, UPCAST)
        dpt = _mm(v, tl.trans(do), PRECISION, UPCAST)  # (dO V^T)^T: [BLOCK_N, BLOCK_M]
        dst = pt * (dpt - delta[None, :])
        dk = _mma(dst.to(qt.dtype), tl.trans(qt), dk, PRECISION, UPCAST)

    dk = dk * sm_scale
    tl.store(
        DK + b * sdkb + h * sdkh + offs_n[:, None] * sdkn + offs_dk[None, :] * sdkd,
        dk.to(DK.dtype.element_ty),
        mask=col_ok[:, None] & dk_ok[None, :],
    )
    tl.store(
        DV + b * sdvb + h * sdvh + offs_n[:, None] * sdvn + offs_dv[None, :] * sdvd,
        dv.to(DV.dtype.element_ty),
        mask=col_ok[:, None] & dv_ok[None, :],
    )


@triton.jit(do_not_specialize=["SEQ_BUCKET"])
def attn_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, QPOS,
    sm_scale,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdob, sdoh, sdom, sdod,
    sdqb, sdqh, sdqm, sdqd,
    sqpb,
    H, GROUP, M, N, SEQ_BUCKET, WINDOW,
    D_QK: tl.constexpr, D_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, HAS_QPOS: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """One program: dQ of BLOCK_M query rows of one (batch, head), looping over the key blocks they see."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < M
    dk_ok = offs_dk < D_QK
    dv_ok = offs_dv < D_V
    past = N - M
    if HAS_QPOS:
        qpos = tl.load(QPOS + b * sqpb + offs_m, mask=row_ok, other=0)
    else:
        qpos = offs_m + past

    q = tl.load(
        Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_dk[None, :] * sqd,
        mask=row_ok[:, None] & dk_ok[None, :],
        other=0.0,
    )
    do = tl.load(
        DO + b * sdob + h * sdoh + offs_m[:, None] * sdom + offs_dv[None, :] * sdod,
        mask=row_ok[:, None] & dv_ok[None, :],
        other=0.0,
    )
    lse = tl.load(LSE + pid_bh * M + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + pid_bh * M + offs_m, mask=row_ok, other=0.0)
    k_base = K + b * skb + hk * skh + offs_dk[None, :] * skd  # k tile: [BLOCK_N, BLOCK_DQK]
    vt_base = V + b * svb + hk * svh + offs_dv[:, None] * svd  # v^T tile: [BLOCK_DV, BLOCK_N]

    dq = tl.zeros([BLOCK_M, BLOCK_DQK], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    lo, hi, full_end = _key_range(qpos, row_ok, start_m, past, N, WINDOW, BLOCK_M, BLOCK_N, CAUSAL, WINDOWED,
                                  HAS_QPOS)  # fmt: skip
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < N
        k = tl.load(k_base + cols[:, None] * skn, mask=col_ok[:, None] & dk_ok[None, :], other=0.0)
        vt = tl.load(vt_base + cols[None, :] * svn, mask=dv_ok[:, None] & col_ok[None, :], other=0.0)
        s = _mm(q, tl.trans(k), PRECISION, UPCAST) * qk_scale
        p = tl.exp2(s - lse[:, None])
        if start_n + BLOCK_N > full_end:
            keep = _keep(cols, col_ok, qpos, WINDOW, CAUSAL, WINDOWED) & row_ok[:, None]
            p = tl.where(keep, p, 0.0)
        dp = _mm(do, vt, PRECISION, UPCAST)  # [BLOCK_M, BLOCK_N]
        ds = p * (dp - delta[:, None])
        dq = _mma(ds.to(k.dtype), k, dq, PRECISION, UPCAST)

    dq = dq * sm_scale
    tl.store(
        DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqm + offs_dk[None, :] * sdqd,
        dq.to(DQ.dtype.element_ty),
        mask=row_ok[:, None] & dk_ok[None, :],
    )
