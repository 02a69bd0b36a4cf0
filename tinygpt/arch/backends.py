"""Attention backends: which kernel computes `softmax(q k^T / sqrt(d) + causal mask) v`.

`GPTConfig.attn_impl` chooses:

- `"auto"` (default): the fastest path available: our Triton kernel on CUDA when triton is installed and
  the call suits it (no dropout, head dims <= 128, a prefill or training-sized query block: at least
  `TRITON_MIN_QUERIES` queries), else `torch.nn.functional.scaled_dot_product_attention` (SDPA; on CPU,
  MPS or CUDA). Whenever a hook needs the attention pattern, the eager path instead (see `use_eager`).
- `"eager"`: always the explicit `scores -> mask -> softmax -> pattern @ v` (every hook point called).
- `"sdpa"`: always SDPA; a hook on the pattern is an error.
- `"triton"`: always our Triton kernel (`tinygpt.arch.triton.attention`); a hook on the pattern is an error, and
  so is a machine or call it cannot serve (no CUDA device, triton missing, dropout, head dim > 128): the
  error names the backend and the reason. Under `TRITON_INTERPRET=1` it runs on CPU in Triton's interpreter
  (for tests: slow).
- `"mps"`: SDPA on Apple's Metal (`mps` device): an error unless the model is on `mps`. Like `"auto"`, it
  runs eager (still on the `mps` device) when a hook needs the pattern.

`attend` is the non-eager path of every attention module (plain, differential, and YOCO's sliding-window
and cross-decoder attention); `use_eager` is the fast/eager rule; `attn_mask` is the boolean mask the eager
paths (and SDPA, when it needs one) apply. Neither imports triton unless the Triton kernel is used.

Which keys a query sees. Keys are aligned bottom-right with the queries: the `t` queries are the last `t`
positions of the `n` keys (the keys before them are a cache), so query `i` sits at key index `i + n - t` and
sees the keys `j <= i + n - t` (causal). Two options refine this:

- `window=w` (YOCO's self-decoder): also `j > i + n - t - w`, the last `w` keys, itself included;
- `q_pos` [batch, t] (a Mixture-of-Depths routed block in YOCO's cross-decoder): the queries are scattered
  positions of the sequence, query `i` of row `b` sits at key index `q_pos[b, i]` and sees `j <= q_pos[b, i]`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tinygpt.arch.triton import attention as triton_attn
from tinygpt.arch.triton.attention import BackendUnavailable
from tinygpt.errors import TinyGPTError, TinyGPTValueError

__all__ = [
    "IMPLS",
    "BackendUnavailable",
    "PatternUnavailable",
    "attend",
    "attn_mask",
    "backend_for",
    "check_backend",
    "observed",
    "use_eager",
]

IMPLS = ("auto", "eager", "sdpa", "triton", "mps")
FUSED_ONLY = ("sdpa", "triton")  # backends that never materialise the pattern
TRITON_MIN_QUERIES = 16  # `auto` leaves shorter query blocks (token-by-token decoding) to SDPA
# Whether `auto` on CUDA prefers our Triton kernel over SDPA. Off until benchmarks/attention_gpu.py has been run
# on a GPU (the kernel is verified under TRITON_INTERPRET=1 only); `attn_impl="triton"` selects it explicitly.
AUTO_PREFERS_TRITON = False

_triton_ok: bool | None = None  # cached: is triton importable (checked once, without importing it)


class PatternUnavailable(TinyGPTError, RuntimeError):
    """A hook needs the attention pattern but the chosen backend never materialises it."""


def observed(hp: nn.Module) -> bool:
    """True if anything (a TransformerLens hook, a torch hook, a patched forward) watches `hp`: the test of every
    fast path (fused attention, fused norms, the chunked loss), which runs only where nobody looks."""
    if (
        hp._forward_hooks
        or hp._forward_pre_hooks
        or hp._backward_hooks
        or hp._backward_pre_hooks
        or nn.modules.module._global_forward_hooks
        or nn.modules.module._global_forward_pre_hooks
    ):
        return True
    fwd = hp.__dict__.get("forward")
    if fwd is None:
        return False
    # nnsight installs a controller as the instance forward, inert outside a trace: it only observes
    # while one of its traces is running.
    active = getattr(getattr(fwd, "state", None), "active", None)
    return active is None or active()[0] is not None


def use_eager(impl: str, pattern_observed: bool, device: torch.device | None = None) -> bool:
    """The fast/eager rule: True if attention must materialise the pattern.

    Args:
        impl: `cfg.attn_impl`.
        pattern_observed: something observes the module's attention scores or pattern hooks.
        device: where the attention runs (checked for "mps").

    Raises:
        PatternUnavailable: a hook needs the pattern but `impl` is a fused-only backend ("sdpa", "triton").
        BackendUnavailable: `impl` is "mps" and `device` is not an mps device.
    """
    if impl == "eager":
        return True
    if impl == "mps" and device is not None and device.type != "mps":
        raise BackendUnavailable(f"attn_impl='mps' is not available: {_mps_reason(device)}")
    if pattern_observed:
        if impl in FUSED_ONLY:
            raise PatternUnavailable(
                f"attn_impl={impl!r} cannot expose attention scores/pattern to hooks; "
                "use attn_impl='auto' (falls back to eager when a hook needs the pattern) or 'eager'"
            )
        return True
    return False


def _triton_installed() -> bool:
    global _triton_ok
    if _triton_ok is None:
        import importlib.util

        _triton_ok = importlib.util.find_spec("triton") is not None
    return _triton_ok


def _mps_reason(device: torch.device) -> str | None:
    if device.type == "mps":
        return None
    mps = getattr(torch.backends, "mps", None)
    if mps is None or not mps.is_available():
        return "MPS is not available on this machine (it needs Apple silicon and a macOS build of PyTorch)"
    return f"the model is on {device.type!r}; move it with model.to('mps')"


def _triton_reason(q: Tensor, k: Tensor, v: Tensor, dropout_p: float) -> str | None:
    reason = triton_attn.unavailable_reason(q.device)
    if reason is not None:
        return reason
    if dropout_p:
        return f"the Triton kernel has no attention dropout (dropout={dropout_p}); set dropout=0 or use 'sdpa'"
    if q.dtype not in triton_attn.DTYPES:
        return f"the Triton kernel supports float32, bfloat16 and float16, not {q.dtype}"
    d = max(q.shape[-1], v.shape[-1])
    if d > triton_attn.MAX_HEAD_DIM:
        return f"the Triton kernel supports head dims up to {triton_attn.MAX_HEAD_DIM}, got {d}"
    return None


def backend_for(impl: str, q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0) -> str:
    """The kernel the non-eager path uses for this call: "sdpa" or "triton".

    Raises:
        BackendUnavailable: `impl` is "triton" or "mps" and cannot run here.
    """
    if impl == "triton":
        reason = _triton_reason(q, k, v, dropout_p)
        if reason is not None:
            raise BackendUnavailable(f"attn_impl='triton' is not available: {reason}")
        return "triton"
    if impl == "mps":
        reason = _mps_reason(q.device)
        if reason is not None:
            raise BackendUnavailable(f"attn_impl='mps' is not available: {reason}")
        return "sdpa"
    if (
        impl == "auto"
        and AUTO_PREFERS_TRITON
        and q.is_cuda
        and q.shape[-2] >= TRITON_MIN_QUERIES
        and _triton_installed()
        and _triton_reason(q, k, v, dropout_p) is None
    ):
        return "triton"
    return "sdpa"


def check_backend(impl: str, device: torch.device | str) -> None:
    """Raise `BackendUnavailable` now if `impl` cannot run on `device` at all (e.g. before training)."""
    device = torch.device(device)
    if impl == "triton":
        reason = triton_attn.unavailable_reason(device)
        if reason is not None:
            raise BackendUnavailable(f"attn_impl='triton' is not available: {reason}")
    elif impl == "mps":
        reason = _mps_reason(device)
        if reason is not None:
            raise BackendUnavailable(f"attn_impl='mps' is not available: {reason}")


def causal_mask(t: int, past: int, device: torch.device) -> Tensor:
    """[t, past + t] bool, True where query `i` (at position past + i) may attend to key `j`."""
    src = torch.arange(past + t, device=device)
    return src[None, :] <= (past + torch.arange(t, device=device))[:, None]


def attn_mask(
    t: int, n: int, device: torch.device, *, window: int | None = None, q_pos: Tensor | None = None
) -> Tensor:
    """Which of `n` keys each of `t` queries sees (see the module docstring), True where it may attend.

    Args:
        t: queries; n: keys (n >= t: the queries are the last t key positions unless `q_pos` is given).
        device: where to build the mask.
        window: sliding window: a query sees at most the last `window` keys, itself included.
        q_pos: [batch, t] key index of each query (scattered queries); the keys start at index 0.

    Returns:
        [t, n] bool, or [batch, 1, t, n] with `q_pos` (broadcasts over heads).
    """
    src = torch.arange(n, device=device)
    dest = (n - t + torch.arange(t, device=device))[:, None] if q_pos is None else q_pos[:, None, :, None]
    mask = src <= dest
    if window is not None:
        mask = mask & (src > dest - window)
    return mask


def sdpa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    past: int = 0,
    dropout_p: float = 0.0,
    *,
    window: int | None = None,
    q_pos: Tensor | None = None,
) -> Tensor:
    """Causal SDPA for `t` new queries after `past` earlier keys: [b, H, t, d] -> [b, H, t, d_v].

    An explicit mask only when one is needed: none for a single query that sees every key, `is_causal` when
    the keys are the queries' own positions (and a window does not cut in), `attn_mask(...)` otherwise. Keys and
    values with fewer heads than the queries (grouped-query attention, [b, n_kv, n, d]) go to SDPA as they are
    (`enable_gqa`): each serves `H / n_kv` consecutive query heads.
    """
    t, n = q.shape[-2], k.shape[-2]
    gqa = {"enable_gqa": True} if k.shape[-3] != q.shape[-3] else {}
    if q_pos is None and (window is None or (t == 1 and n <= window) or (past == 0 and t <= window)):
        if past == 0:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, **gqa)
        if t == 1:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, **gqa)
    mask = attn_mask(t, n, q.device, window=window, q_pos=q_pos)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, **gqa)


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    past: int = 0,
    dropout_p: float = 0.0,
    impl: str = "auto",
    *,
    window: int | None = None,
    q_pos: Tensor | None = None,
) -> Tensor:
    """Causal attention without materialising the pattern, by the backend `impl` selects.

    Args:
        q: queries [batch, n_heads, t, d_qk] of the `t` new positions.
        k: keys [batch, n_kv, past + t, d_qk] (earlier keys first; see the module docstring); n_kv divides
            n_heads (grouped-query attention when smaller: key/value head j serves query heads
            j * n_heads / n_kv .. (j + 1) * n_heads / n_kv - 1).
        v: values [batch, n_kv, past + t, d_v].
        past: number of keys before the new ones (`n - t`; ignored with `q_pos`).
        dropout_p: attention-probability dropout (training only; SDPA only).
        impl: `cfg.attn_impl` ("eager" is treated as "auto": the caller handles the eager path).
        window: sliding window (YOCO's self-decoder): a query sees its last `window` keys only.
        q_pos: [batch, t] key index of each query, for queries at scattered positions (int64).

    Returns:
        [batch, n_heads, t, d_v].
    """
    if q_pos is None and past != k.shape[-2] - q.shape[-2]:
        raise TinyGPTValueError(f"past={past} but the keys hold {k.shape[-2]} positions for {q.shape[-2]} queries")
    if impl == "sdpa" or (impl == "auto" and not q.is_cuda):  # the common CPU case, kept cheap
        return sdpa(q, k, v, past, dropout_p, window=window, q_pos=q_pos)
    if backend_for(impl, q, k, v, dropout_p) == "triton":  # serves grouped-query attention natively
        return triton_attn.flash_attention(q, k, v, causal=True, window=window, q_pos=q_pos)
    return sdpa(q, k, v, past, dropout_p, window=window, q_pos=q_pos)
