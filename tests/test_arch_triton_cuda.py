"""Our Triton kernel compiled for a CUDA GPU (not interpreted): the causal mask's options (YOCO's sliding
window, MoD's scattered queries) and whole YOCO models against the eager path. Skipped without a CUDA GPU.

tests/test_arch_triton.py checks the same kernels in Triton's CPU interpreter at tiny shapes; this file
checks the compiled kernels (autotuned block sizes, GPU-sized sequences). Slow to start: each new kernel
variant (dtype, head dim, mask options) is compiled and autotuned at its first call, about a minute on an
H100 with triton 3.6 (the first five cases below took 480 s together there). Triton settles interpreter versus
compiler at its first import, and test_arch_triton.py imports it in interpreter mode: when that happened
first in this process, this file re-runs itself in a fresh process (`test_in_a_fresh_process`).
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

if not torch.cuda.is_available() or importlib.util.find_spec("triton") is None:
    pytest.skip("needs a CUDA GPU and triton", allow_module_level=True)

from _triton_helpers import fresh_process_test  # noqa: E402

from tinygpt import GPT, GPTConfig  # noqa: E402
from tinygpt.arch import backends
from tinygpt.arch.triton import attention as triton_attn  # noqa: E402
from tinygpt.arch.triton.attention import flash_attention  # noqa: E402

COMPILED = not triton_attn.interpreting()
needs_compiled = pytest.mark.skipif(not COMPILED, reason="triton runs interpreted here: see test_in_a_fresh_process")
if not COMPILED:
    test_in_a_fresh_process = fresh_process_test(__file__, timeout=1200)


def reference(q, k, v, window=None, q_pos=None):
    """Eager attention in float64 with the mask of `backends.attn_mask`."""
    m, n = q.shape[2], k.shape[2]
    q, k, v = q.double(), k.double(), v.double()
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~backends.attn_mask(m, n, q.device, window=window, q_pos=q_pos), -math.inf)
    return s.softmax(-1) @ v


def outputs_and_grads(fn, tensors, do):
    out = fn(*tensors)
    return (out, *torch.autograd.grad(out, tensors, do.to(out.dtype)))


F32, BF16 = torch.float32, torch.bfloat16
CASES = [  # (b, h, m, n, d, window, scattered queries, dtype): each new kernel variant costs Triton's autotuning
    (2, 4, 1024, 1024, 64, None, False, F32),  # plain causal
    (1, 4, 300, 1324, 64, None, False, BF16),  # a chunk after a KV cache
    (2, 4, 1024, 1024, 64, 64, False, F32),  # YOCO's window, shorter than a block
    (2, 4, 1024, 1024, 128, 300, False, BF16),  # a window spanning several blocks
    (1, 4, 200, 263, 64, 64, False, F32),  # a chunk after a window cache
    (2, 4, 128, 1024, 64, None, True, F32),  # MoD routed queries over YOCO's shared keys
]


@needs_compiled
@pytest.mark.parametrize(("b", "h", "m", "n", "d", "window", "scattered", "dtype"), CASES)
def test_compiled_kernel_matches_float64(b, h, m, n, d, window, scattered, dtype, monkeypatch):
    """Outputs and gradients within a small multiple of SDPA's own error (same dtype, same mask)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # IEEE fp32 in the kernel
    g = torch.Generator(device="cuda").manual_seed(m + n + d)
    q, k, v = (torch.randn(b, h, x, d, device="cuda", generator=g) for x in (m, n, n))
    q_pos = None
    if scattered:  # sorted distinct positions per row, the last ones padding at earlier positions
        q_pos = torch.stack([torch.randperm(n, device="cuda", generator=g)[:m].sort().values for _ in range(b)])
        q_pos[:, -5:] = q_pos[:, :5]
    do = torch.randn(b, h, m, d, device="cuda", generator=g)
    tensors = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    ours = outputs_and_grads(lambda *t: flash_attention(*t, window=window, q_pos=q_pos), tensors, do)
    exact = outputs_and_grads(lambda *t: reference(*t, window, q_pos), tensors, do)
    sdpa = outputs_and_grads(lambda *t: backends.sdpa(*t, n - m, window=window, q_pos=q_pos), tensors, do)
    for name, o, x, s in zip(("out", "dq", "dk", "dv"), ours, exact, sdpa):
        assert o.dtype == dtype and torch.isfinite(o).all(), name
        err, sdpa_err = (o.double() - x).abs().max().item(), (s.double() - x).abs().max().item()
        tol = 4 * sdpa_err + (1e-5 if dtype == torch.float32 else 2e-2) * x.abs().max().item()
        assert err <= tol, (name, err, sdpa_err)


@needs_compiled
@pytest.mark.parametrize(
    "knobs",
    [dict(), dict(diff_attn=True), dict(mod=True, mod_capacity=0.25, mod_every=1)],
    ids=["yoco", "yoco+diff", "yoco+mod"],
)
def test_yoco_model_on_the_kernel_matches_eager(knobs, monkeypatch):
    """A YOCO model with attn_impl='triton' equals 'eager' (fp32): logits, gradients, cached decoding."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    cfg = GPTConfig(n_layers=4, d_model=128, n_heads=4, n_ctx=512, yoco=True, yoco_window=96, **knobs)
    tokens = torch.randint(0, 256, (2, 400), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    runs = {}
    for impl in ("triton", "eager"):
        torch.manual_seed(0)
        m = GPT(cfg.replace(attn_impl=impl)).cuda()
        logits, loss = m(tokens, return_type="both")
        loss.backward()
        runs[impl] = logits.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}
    torch.testing.assert_close(runs["triton"][0], runs["eager"][0], atol=1e-4, rtol=1e-4)
    for name, grad in runs["eager"][1].items():
        torch.testing.assert_close(runs["triton"][1][name], grad, atol=1e-4, rtol=1e-3, msg=name)
    torch.manual_seed(0)
    m = GPT(cfg.replace(attn_impl="triton")).cuda().eval()
    with torch.no_grad():
        full = m(tokens)
        cache = m.make_cache(2)
        steps = [m(tokens[:, :300], past_kv_cache=cache)]
        steps += [m(tokens[:, i : i + 1], past_kv_cache=cache) for i in range(300, 400)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)
