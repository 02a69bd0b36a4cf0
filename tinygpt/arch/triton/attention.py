"""Our own Triton flash-attention kernel (FlashAttention-2 style), forward and backward.

`flash_attention(q, k, v)` computes `softmax(q k^T * scale + causal mask) v` without materialising the
attention matrix:

- **forward**: one program per (block of `BLOCK_M` queries, batch·head); it walks the key/value blocks with
  an online softmax (running max and sum, rescaling the accumulator), skips the key blocks that lie wholly
  in the causal future, masks only the blocks on the diagonal and at the sequence end, and stores the
  output and each row's log-sum-exp (LSE).
- **backward**: the standard preprocess `delta = rowsum(dO * O)`, then one kernel computing dK and dV per
  key block (looping over the query blocks that see it) and one computing dQ per query block (looping over
  the key blocks it sees), recomputing the probabilities from the stored LSE. No atomics: deterministic.

Supports fp32, bf16 and fp16 (fp32 accumulation and softmax), head dims up to 128 (any size: loads are
masked up to the next power of two, at least 16), query and value head dims that differ (differential
attention's halves), a query block shorter than the keys (`M < N`: bottom-right aligned causal mask, as
with a KV cache), arbitrary strides, and two refinements of the causal mask for YOCO: a sliding window
(`window=w`: each query sees its last `w` keys; key blocks before the window are skipped) and queries at
scattered positions (`q_pos`, a Mixture-of-Depths routed block attending to YOCO's shared keys). fp32
matmuls use TF32 on tensor cores only when `torch.backends.cuda.matmul.allow_tf32` is set (PyTorch's own
rule), else IEEE fp32.

`diff_flash_attention(q1, k1, q2, k2, v, lam)` is differential attention's two maps: two kernel calls
sharing `v`, combined as `o1 - lam * o2`; autograd composes the two kernels' gradients (and λ's).

Triton is imported lazily (`import tinygpt` never imports it). On a machine without a CUDA GPU the kernels
run under Triton's CPU interpreter when `TRITON_INTERPRET=1` is set before triton is first imported (that is
how the tests check them: correct, but thousands of times slower than SDPA).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
import os
import sys
from types import ModuleType

import torch
from torch import Tensor

from tinygpt.errors import TinyGPTError, TinyGPTValueError

__all__ = [
    "BackendUnavailable",
    "KernelDTypeError",
    "KernelInputError",
    "MAX_HEAD_DIM",
    "diff_flash_attention",
    "flash_attention",
    "interpreting",
    "unavailable_reason",
]


class BackendUnavailable(TinyGPTError, RuntimeError):
    """The requested attention backend cannot run here (the message says which and why)."""


class KernelInputError(TinyGPTValueError):
    """Inputs the Triton kernel does not support (shapes, devices, mask options)."""


class KernelDTypeError(TinyGPTError, TypeError):
    """Inputs of a dtype the Triton kernel does not support."""


MAX_HEAD_DIM = 128
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_kernels: ModuleType | None = None


def _env_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _triton_interprets() -> bool | None:
    """Whether the imported triton runs its interpreter; None if triton is not imported yet.

    Triton settles this once, at its first import, from `TRITON_INTERPRET` (its own `triton.language` helpers
    are decorated then); changing the variable later does not switch it.
    """
    std = sys.modules.get("triton.language.standard")
    if std is None:
        return None
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(std.zeros, InterpretedFunction)


def interpreting() -> bool:
    """True when our kernels run in Triton's CPU interpreter: triton was imported with `TRITON_INTERPRET=1`
    (or, not imported yet, will be: the variable is set now)."""
    mode = _triton_interprets()
    return _env_interpret() if mode is None else mode


@contextlib.contextmanager
def _interpret_env(on: bool):
    """`TRITON_INTERPRET` agreeing with triton's mode while kernels are defined or launched."""
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if on else "0"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


def unavailable_reason(device: torch.device | str | None = None) -> str | None:
    """Why the Triton kernel cannot run on `device` (None when it can).

    It needs the `triton` package and either a CUDA device or Triton's CPU interpreter (`TRITON_INTERPRET=1`
    set before triton is first imported).
    """
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed (pip install triton; it ships with CUDA builds of PyTorch)"
    if interpreting():
        return None
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda":
        return None
    if dev is None and torch.cuda.is_available():
        return None
    where = f"the tensors are on {dev.type!r}" if dev is not None else "no CUDA device is available"
    late = " (TRITON_INTERPRET=1 is set, but only after triton was imported)" if _env_interpret() else ""
    return (
        f"{where}; the Triton kernel needs a CUDA GPU, or Triton's slow CPU interpreter for testing: "
        f"TRITON_INTERPRET=1 set before triton is first imported{late}"
    )


def kernels() -> ModuleType:
    """The kernel module (imports triton on first use; compiled or interpreted as triton itself is)."""
    global _kernels
    if _kernels is None:
        import triton.language  # noqa: F401  (the first import settles interpreter vs compiler)

        with _interpret_env(bool(_triton_interprets())):
            _kernels = importlib.import_module("tinygpt.arch.triton._kernels")
    return _kernels


def _block_dim(d: int) -> int:
    return max(16, 1 << (d - 1).bit_length())


def check_inputs(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, window: int | None = None, q_pos: Tensor | None = None
) -> None:
    """Raise a clear error for inputs the kernel does not support."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        shapes = f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        raise KernelInputError(f"flash_attention expects [batch, heads, pos, d] tensors, got {shapes}")
    b, h, m, dqk = q.shape
    n, hk = k.shape[2], k.shape[1]
    if k.shape != (b, hk, n, dqk) or v.shape[:3] != (b, hk, n) or hk < 1 or h % hk:
        raise KernelInputError(
            f"mismatched q/k/v shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)} (keys and values need "
            "the queries' batch, the same positions, and a number of heads dividing the queries')"
        )
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise KernelDTypeError(f"the Triton kernel supports float32, bfloat16 and float16 (all alike), got "
                        f"{q.dtype}, {k.dtype}, {v.dtype}")  # fmt: skip
    if max(dqk, v.shape[3]) > MAX_HEAD_DIM:
        raise KernelInputError(
            f"the Triton kernel supports head dims up to {MAX_HEAD_DIM}, got d_qk={dqk}, d_v={v.shape[3]}; "
            "use attn_impl='sdpa'"
        )
    if causal and m > n:
        raise KernelInputError(f"causal attention needs at least as many keys as queries, got {m} queries and {n} keys")
    if not (q.device == k.device == v.device):
        raise KernelInputError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    if (window is not None or q_pos is not None) and not causal:
        raise KernelInputError("window and q_pos refine the causal mask: they need causal=True")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise KernelInputError(f"window must be a positive integer, got {window!r}")
    if q_pos is not None:
        if tuple(q_pos.shape) != (b, m) or q_pos.dtype.is_floating_point or q_pos.device != q.device:
            raise KernelInputError(f"q_pos must be an integer tensor [batch, M] = {[b, m]} on {q.device}, got "
                             f"{q_pos.dtype} {list(q_pos.shape)} on {q_pos.device}")  # fmt: skip


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not interpreting():
        return "tf32"
    return "ieee"


def _upcast(dtype: torch.dtype) -> bool:
    """Convert bf16 dot operands to fp32 inside the kernel: only under the interpreter, whose `tl.dot`
    multiplies bf16 tensors' raw bit patterns (triton 3.9). Exact: bf16 products are exact in fp32, as on
    tensor cores; only the summation order differs."""
    return dtype == torch.bfloat16 and kernels().INTERPRET


# Block sizes (BLOCK_M, BLOCK_N, num_warps, num_stages) for the GPU: a small menu per kernel, timed by Triton's
# autotuner at the first call for each (sequence-length bucket, head dims, causal, precision, dtypes); configs
# that do not fit in shared memory are skipped by the autotuner. The first entries follow Triton's
# fused-attention tutorial (queries x keys of 128 x 64 forward, 32 x 128 for dK/dV, 128 x 32 for dQ).
_GPU_CONFIGS = {
    "fwd": [(128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3)],
    "dkdv": [(32, 128, 4, 3), (64, 64, 4, 3), (32, 64, 4, 4)],
    "dq": [(128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 4)],
}
_INTERPRET_BLOCKS = (16, 16)  # small, so the tests' short sequences span several blocks
_tuned: dict[tuple[str, int], object] = {}


def _launcher(name: str):
    """The kernel `name` ready to launch: the autotuned wrapper on a GPU, the plain kernel when interpreting."""
    mod = kernels()
    fn = getattr(mod, {"fwd": "attn_fwd", "dkdv": "attn_bwd_dkdv", "dq": "attn_bwd_dq"}[name])
    if mod.INTERPRET:
        return fn, {"BLOCK_M": _INTERPRET_BLOCKS[0], "BLOCK_N": _INTERPRET_BLOCKS[1]}
    key = (name, id(fn))
    if key not in _tuned:
        import triton

        configs = [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in _GPU_CONFIGS[name]
        ]
        keys = ["SEQ_BUCKET", "D_QK", "D_V", "CAUSAL", "WINDOWED", "HAS_QPOS", "PRECISION"]
        _tuned[key] = triton.autotune(configs, key=keys)(fn)
    return _tuned[key], {}


def _bucket(m: int, n: int) -> int:
    """Autotuning key of a sequence length: the next power of two (at least 64)."""
    return max(64, 1 << (max(m, n) - 1).bit_length())


def _strides(t: Tensor) -> tuple[int, int, int, int]:
    return tuple(t.stride())  # type: ignore[return-value]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class _Mask:
    """The causal mask's options as kernel arguments: (QPOS pointer, its batch stride, WINDOW) and constexprs."""

    def __init__(self, causal: bool, window: int | None, q_pos: Tensor | None, device: torch.device):
        self.causal, self.window = causal, window
        if q_pos is not None:
            self.qpos = q_pos.to(torch.int32).contiguous()
        else:  # never read (HAS_QPOS=False); a real int32 tensor keeps the kernel signature alike
            self.qpos = torch.zeros(1, dtype=torch.int32, device=device)
        self.has_qpos = q_pos is not None

    def args(self) -> tuple:
        return self.qpos, self.qpos.stride(0), self.window or 0

    def flags(self) -> dict:
        return dict(CAUSAL=self.causal, WINDOWED=self.window is not None, HAS_QPOS=self.has_qpos)


def _forward(q: Tensor, k: Tensor, v: Tensor, mask: _Mask, sm_scale: float) -> tuple[Tensor, Tensor]:
    if kernels().INTERPRET:
        with _interpret_env(True):
            return _forward_launch(q, k, v, mask, sm_scale)
    return _forward_launch(q, k, v, mask, sm_scale)


def _forward_launch(q: Tensor, k: Tensor, v: Tensor, mask: _Mask, sm_scale: float) -> tuple[Tensor, Tensor]:
    b, h, m, dqk = q.shape
    n, dv = k.shape[2], v.shape[3]
    o = torch.empty((b, h, m, dv), device=q.device, dtype=q.dtype)
    lse = torch.empty((b * h, m), device=q.device, dtype=torch.float32)
    fn, blocks = _launcher("fwd")
    grid = lambda meta: (_cdiv(m, meta["BLOCK_M"]), b * h)  # noqa: E731
    qpos, sqpb, window = mask.args()
    fn[grid](
        q, k, v, o, lse, qpos, sm_scale,
        *_strides(q), *_strides(k), *_strides(v), *_strides(o), sqpb,
        h, h // k.shape[1], m, n, _bucket(m, n), window,
        D_QK=dqk, D_V=dv, BLOCK_DQK=_block_dim(dqk), BLOCK_DV=_block_dim(dv),
        **mask.flags(), PRECISION=_precision(q.dtype), UPCAST=_upcast(q.dtype), **blocks,
    )  # fmt: skip
    return o, lse


def _backward(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, mask: _Mask, sm_scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    if kernels().INTERPRET:
        with _interpret_env(True):
            return _backward_launch(do, q, k, v, o, lse, mask, sm_scale)
    return _backward_launch(do, q, k, v, o, lse, mask, sm_scale)


def _backward_launch(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, mask: _Mask, sm_scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    b, h, m, dqk = q.shape
    n, dv = k.shape[2], v.shape[3]
    mod = kernels()
    delta = torch.empty((b * h, m), device=q.device, dtype=torch.float32)
    pre_m = 16 if mod.INTERPRET else 64
    mod.attn_bwd_preprocess[(_cdiv(m, pre_m), b * h)](
        o, do, delta, *_strides(o), *_strides(do), h, m, D_V=dv, BLOCK_M=pre_m, BLOCK_DV=_block_dim(dv)
    )
    group = h // k.shape[1]  # grouped-query attention: one dK/dV per query head, summed over each group below
    dq = torch.empty_like(q)
    dk = torch.empty((b, h, n, dqk), device=k.device, dtype=k.dtype) if group > 1 else torch.empty_like(k)
    dvv = torch.empty((b, h, n, dv), device=v.device, dtype=v.dtype) if group > 1 else torch.empty_like(v)
    common = dict(D_QK=dqk, D_V=dv, BLOCK_DQK=_block_dim(dqk), BLOCK_DV=_block_dim(dv), **mask.flags(),
                  PRECISION=_precision(q.dtype), UPCAST=_upcast(q.dtype))  # fmt: skip
    qpos, sqpb, window = mask.args()
    fn, blocks = _launcher("dkdv")
    fn[lambda meta: (_cdiv(n, meta["BLOCK_N"]), b * h)](
        q, k, v, do, lse, delta, dk, dvv, qpos, sm_scale,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dvv), sqpb,
        h, group, m, n, _bucket(m, n), window, **common, **blocks,
    )  # fmt: skip
    fn, blocks = _launcher("dq")
    fn[lambda meta: (_cdiv(m, meta["BLOCK_M"]), b * h)](
        q, k, v, do, lse, delta, dq, qpos, sm_scale,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq), sqpb,
        h, group, m, n, _bucket(m, n), window, **common, **blocks,
    )  # fmt: skip
    if group > 1:  # fp32 sums of the group's gradients, as autograd through a repeat_interleave would give
        dk = dk.view(b, h // group, group, n, dqk).float().sum(2).to(k.dtype)
        dvv = dvv.view(b, h // group, group, n, dv).float().sum(2).to(v.dtype)
    return dq, dk, dvv


class FlashAttention(torch.autograd.Function):
    """`softmax(q k^T * sm_scale [+ causal mask]) v` by the Triton kernels; see `flash_attention`."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, mask: _Mask, sm_scale: float) -> Tensor:
        o, lse = _forward(q, k, v, mask, sm_scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.mask, ctx.sm_scale = mask, sm_scale
        return o

    @staticmethod
    def backward(ctx, do: Tensor):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, o, lse, ctx.mask, ctx.sm_scale)
        return dq, dk, dv, None, None


def flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    sm_scale: float | None = None,
    window: int | None = None,
    q_pos: Tensor | None = None,
) -> Tensor:
    """Attention by our Triton kernel, differentiable.

    Args:
        q: queries [batch, heads, M, d_qk].
        k: keys [batch, kv_heads, N, d_qk], N >= M when causal (the last M keys are the queries' own
            positions; the N - M before them are a cache every query sees). kv_heads divides heads: grouped-query
            attention when fewer, query head h reading key/value head h // (heads / kv_heads), without a copy.
        v: values [batch, kv_heads, N, d_v] (d_v may differ from d_qk).
        causal: mask the future (bottom-right aligned).
        sm_scale: score scale, default `1 / sqrt(d_qk)`.
        window: sliding window (needs `causal`): query `i` sees keys `i + N - M - window < j <= i + N - M`.
        q_pos: [batch, M] integer key index of each query (needs `causal`): query `i` of row `b` sees keys
            `j <= q_pos[b, i]` (and, with `window`, `j > q_pos[b, i] - window`) instead.

    Returns:
        [batch, heads, M, d_v], in the inputs' dtype.
    """
    reason = unavailable_reason(q.device)
    if reason is not None:
        raise BackendUnavailable(f"attn_impl='triton' is not available: {reason}")
    check_inputs(q, k, v, causal, window, q_pos)
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(q.shape[-1])
    if q.shape[2] == 0:
        return q.new_empty((*q.shape[:3], v.shape[3]))
    return FlashAttention.apply(q, k, v, _Mask(causal, window, q_pos, q.device), float(sm_scale))


def diff_flash_attention(
    q1: Tensor,
    k1: Tensor,
    q2: Tensor,
    k2: Tensor,
    v: Tensor,
    lam: Tensor | float,
    *,
    causal: bool = True,
    window: int | None = None,
    q_pos: Tensor | None = None,
) -> Tensor:
    """Differential attention `(softmax(q1 k1^T / sqrt(d)) - lam * softmax(q2 k2^T / sqrt(d))) v`.

    Two calls of the kernel sharing `v` (d = q1's head dim), combined; autograd handles the rest (λ too).
    Shapes and the mask options as in `flash_attention`; `lam` is a scalar (tensor) or broadcasts against
    [batch, heads, 1, 1].
    """
    o1 = flash_attention(q1, k1, v, causal=causal, window=window, q_pos=q_pos)
    o2 = flash_attention(q2, k2, v, causal=causal, window=window, q_pos=q_pos)
    return o1 - lam * o2
