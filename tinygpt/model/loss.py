"""Linear + cross-entropy in chunks of tokens: the next-token loss without the `[tokens, d_vocab]` logits.

    loss = linear_cross_entropy(hidden, model.unembed.weight, targets)            # = F.cross_entropy(hidden @ W.T, ...)
    per_token = linear_cross_entropy(hidden, W, targets, reduction="none")        # [N], 0 where ignored

With a 49,152-token vocabulary and 2,048 tokens per micro-batch the fp32 logits are 400 MB, and the unfused
path holds them several times over (the bf16 matmul output, its fp32 copy, the log-softmax saved for backward,
its gradient and that gradient's bf16 copy). Here the tokens are cut into chunks of `chunk` rows; each chunk's
logits `[chunk, d_vocab]` are computed, reduced to its losses and, when a gradient is wanted, straight away to
its share of the gradients of the hidden states `[chunk, d_model]` and of the unembedding `[d_vocab, d_model]`
(accumulated in fp32), and dropped. So at most one chunk's logits and one chunk's logit gradient exist at any time.

Two autograd modes, chosen per call:

- a scalar loss (`reduction="mean"` or `"sum"`, the training path): the gradients are computed in the forward,
  chunk by chunk, and backward only scales them by the incoming scalar gradient. No matmul is repeated: the
  cost is the unfused path's (one logits matmul, two gradient matmuls), minus its memory traffic.
- a per-token loss (`reduction="none"`, whose incoming gradient is a different weight per token): forward keeps
  only its inputs; backward recomputes each chunk's logits (one extra logits matmul).

Without a gradient (evaluation, `torch.no_grad()`), only the losses are computed. Each chunk's logits go into one
reused buffer, are soft-maxed in place (the loss is `log-sum-exp - z_target`, read from the target's
probability; rows whose target probability underflows fp32 take theirs from recomputed logits), and the logit
gradient `softmax - onehot` is formed in the same buffer. On the CPU the buffers (about 225 MB at V = 49,152,
512 tokens per chunk) are kept for the next call: a fresh buffer costs its page faults at every call.

The dtypes follow the unfused path exactly: the matmuls run in the autocast dtype when autocast is on (else in
the weight's dtype), the softmax and the loss in fp32, and each gradient comes back in its input's dtype, so the
result equals `F.cross_entropy(F.linear(hidden, weight).float(), targets)` to float rounding (tests/test_model_loss.py
checks loss and gradients, fp32 and bf16, with ignored targets, tied embeddings and per-token losses).

Why our own and not a library's:
- `torch.nn.functional.linear_cross_entropy` (PyTorch 2.13's chunked path, `options=LinearCrossEntropyOptions()`)
  precomputes the gradients in the forward too, but on this CPU it ran 8x slower than the unfused loss at the
  reference shape (fp32, 2,048 x 256 x 49,152, default options), its backward consumes its buffers in place (a
  second backward raises unless `allow_retain_graph`), and it is a custom op outside autograd's usual contract
  (no `torch.func`, eager under `torch.compile`). We also need exactly the unfused path's dtypes under autocast.
- Liger's `LigerFusedLinearCrossEntropyLoss` and Apple's `cut-cross-entropy` are Triton (GPU) kernels: neither
  runs on the CPU, where most tinygpt training happens, and both would add a dependency for the GPU alone.
  Liger's design (gradients in the forward, chunked over tokens) is the one used here.

Hooks: `GPT.forward` uses this only when nothing can see the logits (the unembedding is a plain `nn.Linear`
without hooks or a patched forward, `return_type="loss"`); `ln_final.hook_normalized` (the input here) fires as
usual. See `tinygpt.model.gpt.GPT.forward`.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor

__all__ = ["DEFAULT_CHUNK_ELEMENTS", "chunk_rows", "free_workspace", "linear_cross_entropy"]

#: logits elements per chunk when `chunk` is not given (V = 49,152: 512 tokens, 100 MB of fp32 logits)
DEFAULT_CHUNK_ELEMENTS = 512 * 49152
#: a target probability below this (a loss above ~69 nats) has lost its precision in fp32: such rows take their
#: log-sum-exp from recomputed logits
_TINY = 1e-30


def chunk_rows(n_tokens: int, d_vocab: int, elements: int = DEFAULT_CHUNK_ELEMENTS) -> int:
    """Tokens per chunk: as many as keep one chunk's logits under `elements` (a multiple of 16, >= 16)."""
    rows = max(16, (elements // max(1, d_vocab)) // 16 * 16)
    return max(1, min(n_tokens, rows))


def _compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype the unfused `F.linear` would compute in: autocast's when it is on here, else the weight's."""
    kind = hidden.device.type
    if kind in ("cpu", "cuda", "mps", "xpu") and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return torch.promote_types(hidden.dtype, weight.dtype)


class _Workspace:
    """The buffers every chunk reuses: logits `z` [rows, V] (compute dtype; a bf16 one then holds the chunk's
    logit gradient), probabilities `p` [rows, V] fp32 (`z` itself in fp32), and a bf16 unembedding-gradient
    chunk `gw` [V, d]. On the CPU the last workspace is kept for the next call (a fresh 100 MB buffer costs
    its page faults every time; CUDA's caching allocator already reuses memory)."""

    def __init__(self, rows: int, v: int, d: int, dtype: torch.dtype, device: torch.device):
        self.z = torch.empty(rows, v, dtype=dtype, device=device)
        self.p = self.z if dtype == torch.float32 else torch.empty(rows, v, dtype=torch.float32, device=device)
        self.gw = None if dtype == torch.float32 else torch.empty(v, d, dtype=dtype, device=device)


_LOCK = threading.Lock()
_CACHE: dict[tuple, _Workspace] = {}


@contextmanager
def _workspace(rows: int, v: int, d: int, dtype: torch.dtype, device: torch.device) -> Iterator[_Workspace]:
    if device.type != "cpu" or not _LOCK.acquire(blocking=False):  # (another thread holds the cached one)
        yield _Workspace(rows, v, d, dtype, device)
        return
    try:
        key = (rows, v, d, dtype)
        ws = _CACHE.get(key)
        if ws is None:
            _CACHE.clear()
            ws = _CACHE[key] = _Workspace(rows, v, d, dtype, device)
        yield ws
    finally:
        _LOCK.release()


def free_workspace() -> None:
    """Drop the cached CPU workspace (up to ~225 MB at V = 49,152); the next call allocates a new one."""
    with _LOCK:
        _CACHE.clear()


def _chunk(ws, h, w, t, valid, *, losses=True, grads=None, row_weight=None):
    """One chunk: hidden rows `h` [m, d] (compute dtype) against `w` [V, d] with targets `t` [m].

    Args:
        ws: the `_Workspace`.
        losses: return the per-token losses [m] (fp32, 0 where not `valid`).
        grads: `(grad_h_rows [m, d] or None, grad_w [V, d] fp32 or None)` to write / accumulate the gradients
            of `sum(row_weight * loss)` into (row_weight: 1 when None; scale afterwards for a mean).
        row_weight: per-row weights [m] fp32 (per-token upstream gradients).
    """
    m = h.shape[0]
    z = ws.z[:m]
    torch.mm(h, w.t(), out=z)
    tt = t.clamp_min(0)
    zt = z.gather(1, tt[:, None]).squeeze(1).float() if losses else None
    p = ws.p[:m]
    if p is not z:
        p.copy_(z)
    torch._softmax(p, 1, False, out=p)  # in place: exp(z - max) / sum
    loss = None
    if losses:
        pt = p.gather(1, tt[:, None]).squeeze(1)
        lse = zt - torch.log(pt)  # log p_t = z_t - lse
        low = (pt < _TINY).nonzero().squeeze(1)
        if low.numel():  # p_t underflowed: the exact log-sum-exp of those rows from their logits
            lse[low] = torch.logsumexp(torch.mm(h[low], w.t()).float(), dim=1)
        loss = torch.where(valid, lse - zt, torch.zeros_like(lse))
    if grads is None:
        return loss
    grad_h, grad_w = grads
    rows = torch.arange(m, device=p.device)
    p.index_put_((rows, tt), torch.full((m,), -1.0, device=p.device), accumulate=True)  # softmax - onehot
    if row_weight is not None:
        p.mul_(row_weight[:, None])
    else:
        invalid = (~valid).nonzero().squeeze(1)
        if invalid.numel():
            p.index_fill_(0, invalid, 0.0)
    g = p
    if ws.gw is not None:  # the gradient in the compute dtype, in z's buffer
        g = z
        g.copy_(p)
    if grad_h is not None:
        if grad_h.dtype == g.dtype:
            torch.mm(g, w, out=grad_h)
        else:
            grad_h.copy_(torch.mm(g, w))
    if grad_w is not None:
        if ws.gw is None:
            grad_w.addmm_(g.t(), h)
        else:  # a bf16 / fp16 matmul, accumulated across chunks in fp32
            torch.mm(g.t(), h, out=ws.gw)
            grad_w.add_(ws.gw)
    return loss


def _run(hidden, weight, targets, ignore_index, chunk, dtype, *, losses=True, grad_h=None, grad_w=None, weights=None):
    """Every chunk of a call; returns the per-token losses [N] (fp32) when `losses`."""
    n, d = hidden.shape
    w = weight.to(dtype)
    valid_all = targets != ignore_index
    loss = torch.empty(n, dtype=torch.float32, device=hidden.device) if losses else None
    want = grad_h is not None or grad_w is not None
    with _workspace(min(chunk, n), w.shape[0], d, dtype, hidden.device) as ws:
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            out = _chunk(
                ws,
                hidden[s:e].to(dtype),
                w,
                targets[s:e],
                valid_all[s:e],
                losses=losses,
                grads=(grad_h[s:e] if grad_h is not None else None, grad_w) if want else None,
                row_weight=weights[s:e] if weights is not None else None,
            )
            if losses:
                loss[s:e] = out
    return loss


class _LinearCrossEntropy(torch.autograd.Function):
    """Chunked `cross_entropy(hidden @ weight.T, targets)`; see the module docstring for the two modes."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, reduction, chunk, dtype):
        ctx.reduction, ctx.chunk, ctx.dtype, ctx.ignore_index = reduction, chunk, dtype, ignore_index
        ctx.weight_dtype = weight.dtype
        if reduction == "none":  # backward recomputes
            ctx.save_for_backward(hidden, weight, targets)
            return _run(hidden, weight, targets, ignore_index, chunk, dtype)
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        )
        loss = _run(hidden, weight, targets, ignore_index, chunk, dtype, grad_h=grad_h, grad_w=grad_w)
        total = loss.sum()
        if reduction == "mean":
            n_valid = (targets != ignore_index).sum().float()
            scale = 1.0 / n_valid.clamp_min(1)
            if grad_h is not None:
                grad_h.mul_(scale.to(grad_h.dtype))
            if grad_w is not None:
                grad_w.mul_(scale)
            total = total / n_valid
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        none = (None,) * 5
        if ctx.reduction != "none":  # scale the gradients the forward computed
            grad_h, grad_w = ctx.saved_tensors
            gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
            gw = (grad_w * grad_out.float()).to(ctx.weight_dtype) if grad_w is not None else None
            return gh, gw, *none
        hidden, weight, targets = ctx.saved_tensors  # recompute each chunk's logits
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        valid = targets != ctx.ignore_index
        weights = grad_out.float() * valid
        _run(
            hidden, weight, targets, ctx.ignore_index, ctx.chunk, ctx.dtype,
            losses=False, grad_h=grad_h, grad_w=grad_w, weights=weights,
        )  # fmt: skip
        return grad_h, grad_w.to(ctx.weight_dtype) if grad_w is not None else None, *none


def _no_grad_loss(hidden, weight, targets, ignore_index, reduction, chunk, dtype) -> Tensor:
    """The losses alone (no autograd graph)."""
    loss = _run(hidden, weight, targets, ignore_index, chunk, dtype)
    if reduction == "none":
        return loss
    total = loss.sum()
    return total / (targets != ignore_index).sum().float() if reduction == "mean" else total


def _eager_even_when_compiled(fn):
    """`torch.compiler.disable(fn)` (chunk loops, a lock and data-dependent rows: eager even inside a compiled
    forward), applied at the first call or by `.prepare()`: applying it imports torch._dynamo, and with it triton
    where installed, which `import tinygpt` must not do (`compiled_forward` calls `.prepare()` before compiling)."""
    impl: list = []

    def prepare() -> None:
        if not impl:
            impl.append(torch.compiler.disable(fn))

    @functools.wraps(fn)
    def run(*args, **kwargs):
        prepare()
        return impl[0](*args, **kwargs)

    run.prepare = prepare
    return run


@_eager_even_when_compiled
def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk: int | None = None,
) -> Tensor:
    """`F.cross_entropy(F.linear(hidden, weight).float(), targets)` without holding the logits.

    Args:
        hidden: [..., d_model] the final hidden states (e.g. `ln_final`'s output).
        weight: [d_vocab, d_model] the unembedding (`model.unembed.weight`; tied to the embedding or not).
        targets: [...] token ids (int64); `ignore_index` marks positions without a loss.
        ignore_index: the target value that is ignored (no loss, no gradient).
        reduction: "mean" (over the non-ignored targets; NaN when there are none, as `F.cross_entropy`),
            "sum", or "none" (per-token losses [...], 0 where ignored).
        chunk: tokens per chunk (default `chunk_rows`: about 32 MiB of fp32 logits per chunk).

    Returns:
        the loss in fp32: a scalar, or [...] (targets' shape) with `reduction="none"`.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    shape = targets.shape
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    if h.shape[0] != t.shape[0]:
        raise ValueError(f"hidden has {h.shape[0]} rows but targets {t.shape[0]}")
    if torch._C._functorch.peek_interpreter_stack() is not None:  # under vmap / grad (ES's batched members)
        logits = torch.nn.functional.linear(h, weight).float()
        out = torch.nn.functional.cross_entropy(logits, t, ignore_index=ignore_index, reduction=reduction)
        return out.view(shape) if reduction == "none" else out
    dtype = _compute_dtype(h, weight)
    n = h.shape[0]
    chunk = chunk_rows(n, weight.shape[0]) if chunk is None else max(1, int(chunk))
    if n == 0:
        out = torch.zeros(0, dtype=torch.float32, device=h.device)
        return out.view(shape) if reduction == "none" else (out.sum() / 0.0 if reduction == "mean" else out.sum())
    with torch.autocast(h.device.type, enabled=False) if h.device.type in ("cpu", "cuda") else nullcontext():
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            out = _LinearCrossEntropy.apply(h, weight, t, ignore_index, reduction, chunk, dtype)
        else:
            out = _no_grad_loss(h, weight, t, ignore_index, reduction, chunk, dtype)
    return out.view(shape) if reduction == "none" else out
