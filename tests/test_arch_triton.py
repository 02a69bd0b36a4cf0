"""Our Triton flash-attention kernel (`tinygpt.arch.triton.attention`), checked on CPU in Triton's interpreter.

Triton chooses between its CPU interpreter and the GPU compiler once, when it is first imported, from
`TRITON_INTERPRET`. So this module, when collected, sets `TRITON_INTERPRET=1`, imports triton and restores the
variable at once (`tests/_triton_helpers.import_triton_interpreted`): other tests never see it. Should triton
already have been imported in compiled mode, the file re-runs itself in a fresh process instead
(`test_in_a_fresh_process`). The interpreter is thousands of times slower than SDPA: shapes stay tiny
(T <= 64, batch 1-2).

The kernels' GPU build is checked too, without a GPU: Triton compiles them for an H100 (sm_90) down to a
cubin with the `ptxas` it ships (a subprocess, outside the interpreter).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from _triton_helpers import ROOT, compile_without_gpu, fresh_process_test, import_triton_interpreted

INTERPRETED = import_triton_interpreted()  # before anything imports triton

from tinygpt import GPT, GPTConfig  # noqa: E402
from tinygpt.arch.triton import attention as triton_attn  # noqa: E402
from tinygpt.arch.triton.attention import diff_flash_attention, flash_attention  # noqa: E402

needs_interpreter = pytest.mark.skipif(
    not INTERPRETED, reason="triton was imported in compiled mode first: checked by test_in_a_fresh_process"
)
if not INTERPRETED:  # only then: the checks below are skipped in this process and run in a fresh one
    test_in_a_fresh_process = fresh_process_test(__file__)


def reference(q, k, v, causal=True, dtype=torch.float64):
    """Eager attention in `dtype` (softmax in at least fp32), bottom-right aligned causal mask."""
    m, n = q.shape[2], k.shape[2]
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if causal:
        s = s.masked_fill(torch.arange(n)[None, :] > torch.arange(m)[:, None] + (n - m), float("-inf"))
    return s.softmax(-1, dtype=torch.promote_types(dtype, torch.float32)).to(dtype) @ v


def inputs(b, h, m, n, dqk, dv, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(b, h, m, dqk, generator=g), torch.randn(b, h, n, dqk, generator=g)
    v = torch.randn(b, h, n, dv, generator=g)
    return [t.to(dtype).requires_grad_() for t in (q, k, v)]


def outputs_and_grads(fn, tensors, do):
    out = fn(*tensors)
    return (out, *torch.autograd.grad(out, tensors, do))


@needs_interpreter
@pytest.mark.parametrize(
    ("b", "h", "m", "n", "d", "causal"),
    [
        (1, 2, 48, 48, 32, True),  # 3 blocks of 16
        (2, 2, 40, 40, 64, True),  # sequence not a multiple of the block
        (1, 2, 5, 37, 32, True),  # a query block after cached keys (KV cache): bottom-right causal mask
        (1, 1, 33, 33, 40, True),  # head dim not a power of two (masked up to 64)
        (1, 2, 30, 30, 32, False),
    ],
)
def test_fp32_outputs_and_gradients_match_eager(b, h, m, n, d, causal):
    q, k, v = inputs(b, h, m, n, d, d)
    do = torch.randn(b, h, m, d)
    got = outputs_and_grads(lambda *t: flash_attention(*t, causal=causal), (q, k, v), do)
    want = outputs_and_grads(lambda *t: reference(*t, causal=causal, dtype=torch.float32), (q, k, v), do)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.dtype == torch.float32 and g.shape == w.shape
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4, msg=name)


@needs_interpreter
@pytest.mark.parametrize(
    ("h", "hk", "m", "n", "window"), [(4, 2, 40, 40, None), (3, 1, 5, 37, None), (4, 1, 33, 33, 7)]
)
def test_grouped_query_attention_reads_each_kv_head_for_its_group(h, hk, m, n, window):
    """Keys/values with fewer heads (no copy): outputs and gradients equal eager attention over the keys repeated to
    the query heads (`repeat_interleave`: query head i reads key/value head i // (h / hk)), the gradients of each
    key/value head summed over its group."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, h, m, 32, generator=g).requires_grad_()
    k, v = (torch.randn(2, hk, n, 32, generator=g).requires_grad_() for _ in range(2))
    do = torch.randn(2, h, m, 32, generator=g)

    def ref(q, k, v):
        k, v = k.repeat_interleave(h // hk, 1), v.repeat_interleave(h // hk, 1)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(32)
        qpos, src = torch.arange(m)[:, None] + n - m, torch.arange(n)[None, :]
        bad = (src > qpos) | ((src <= qpos - window) if window else torch.zeros((), dtype=torch.bool))
        return s.masked_fill(bad, float("-inf")).softmax(-1) @ v

    got = outputs_and_grads(lambda *t: flash_attention(*t, window=window), (q, k, v), do)
    want = outputs_and_grads(ref, (q, k, v), do)
    for name, a, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.shape == w.shape, name
        torch.testing.assert_close(a, w, atol=1e-4, rtol=1e-4, msg=name)


@needs_interpreter
@pytest.mark.parametrize("blocks", [(32, 16), (16, 32)])
def test_unequal_query_and_key_blocks(blocks, monkeypatch):
    """The GPU configs use BLOCK_M != BLOCK_N (e.g. 32 x 128 for dK/dV): the masks and skipped blocks still fit."""
    monkeypatch.setattr(triton_attn, "_INTERPRET_BLOCKS", blocks)
    for m, n in ((40, 40), (7, 45)):
        q, k, v = inputs(1, 1, m, n, 16, 16, seed=m)
        do = torch.randn(1, 1, m, 16)
        got = outputs_and_grads(flash_attention, (q, k, v), do)
        want = outputs_and_grads(lambda *t: reference(*t, dtype=torch.float32), (q, k, v), do)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
        # YOCO's mask options with unequal blocks too: a window, and scattered query positions
        q_pos = torch.randperm(n, generator=torch.Generator().manual_seed(n))[:m].sort().values[None]
        for opts in (dict(window=6), dict(q_pos=q_pos)):
            got = outputs_and_grads(lambda *t, o=opts: flash_attention(*t, **o), (q, k, v), do)
            want = outputs_and_grads(lambda *t, o=opts: masked_reference(*t, **o), (q, k, v), do)
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


@needs_interpreter
def test_head_dims_may_differ_and_strided_views_work():
    """Differential attention's case: q/k of d/2, v of d, and q/k as column slices of wider tensors."""
    qw, kw, v = inputs(1, 2, 24, 24, 64, 64)
    do = torch.randn(1, 2, 24, 64)
    got = outputs_and_grads(lambda a, b, c: flash_attention(a[..., :32], b[..., 32:], c), (qw, kw, v), do)
    want = outputs_and_grads(
        lambda a, b, c: reference(a[..., :32], b[..., 32:], c, dtype=torch.float32), (qw, kw, v), do
    )
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    assert got[1][..., 32:].abs().max() == 0 and got[2][..., :32].abs().max() == 0


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_within_rounding_of_exact(dtype):
    """Within 2 ulps (of the largest value) of the float64 result; eager in the same dtype is as far off."""
    q, k, v = inputs(1, 2, 48, 48, 32, 32, dtype=dtype, seed=1)
    do = torch.randn(1, 2, 48, 32).to(dtype)
    got = outputs_and_grads(flash_attention, (q, k, v), do)
    exact = outputs_and_grads(lambda *t: reference(*t), (q, k, v), do.double())
    eager = outputs_and_grads(lambda *t: reference(*t, dtype=dtype), (q, k, v), do)
    eps = torch.finfo(dtype).eps
    for name, g, x, e in zip(("out", "dq", "dk", "dv"), got, exact, eager):
        assert g.dtype == dtype
        err, eager_err = (g.double() - x).abs().max().item(), (e.double() - x).abs().max().item()
        assert err <= 2 * eps * x.abs().max().item(), (name, err, eager_err)
        assert err <= 4 * eager_err + eps, (name, err, eager_err)


@needs_interpreter
def test_differential_attention_and_its_gradients():
    torch.manual_seed(0)
    q1, k1, q2, k2 = (torch.randn(1, 2, 20, 16, requires_grad=True) for _ in range(4))
    v = torch.randn(1, 2, 20, 32, requires_grad=True)
    lam = torch.tensor(0.37, requires_grad=True)
    do = torch.randn(1, 2, 20, 32)
    args = (q1, k1, q2, k2, v, lam)
    got = outputs_and_grads(diff_flash_attention, args, do)

    def eager(q1, k1, q2, k2, v, lam):
        mask = torch.ones(20, 20, dtype=torch.bool).tril()
        a1 = ((q1 @ k1.transpose(-1, -2)) / 4.0).masked_fill(~mask, float("-inf")).softmax(-1)
        a2 = ((q2 @ k2.transpose(-1, -2)) / 4.0).masked_fill(~mask, float("-inf")).softmax(-1)
        return (a1 - lam * a2) @ v

    want = outputs_and_grads(eager, args, do)
    for name, g, w in zip(("out", "dq1", "dk1", "dq2", "dk2", "dv", "dlambda"), got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4, msg=name)


def masked_reference(q, k, v, window=None, q_pos=None):
    """Eager attention with `backends.attn_mask` (the mask the eager and SDPA paths use), in fp32."""
    from tinygpt.arch.backends import attn_mask

    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return (
        s.masked_fill(~attn_mask(q.shape[2], k.shape[2], q.device, window=window, q_pos=q_pos), -math.inf).softmax(-1)
        @ v
    )


@needs_interpreter
@pytest.mark.parametrize(
    ("m", "n", "window"),
    [
        (40, 40, 5),  # window shorter than a block: blocks before it are skipped, its edge cuts blocks
        (40, 40, 20),  # window longer than a block
        (7, 45, 9),  # a chunk after a window cache; padding rows past M see no key at all
        (1, 6, 6),  # one decoding step
    ],
)
def test_sliding_window_outputs_and_gradients_match_eager(m, n, window):
    q, k, v = inputs(1, 2, m, n, 16, 16, seed=m + window)
    do = torch.randn(1, 2, m, 16)
    got = outputs_and_grads(lambda *t: flash_attention(*t, window=window), (q, k, v), do)
    want = outputs_and_grads(lambda *t: masked_reference(*t, window=window), (q, k, v), do)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4, msg=name)
    if n - m >= window:  # keys older than every query's window (skipped blocks included) get no gradient
        first_seen = n - m - window + 1
        assert got[2][..., :first_seen, :].abs().max() == 0 and got[3][..., :first_seen, :].abs().max() == 0
        assert got[2][..., first_seen, :].abs().max() > 0


@needs_interpreter
@pytest.mark.parametrize("window", [None, 6])
def test_scattered_query_positions_match_eager(window):
    """q_pos: routed queries at scattered (and, in padding, unsorted) positions of the key sequence."""
    q_pos = torch.tensor([[0, 3, 4, 9, 17, 30, 31, 2, 5], [1, 2, 3, 4, 5, 6, 7, 8, 39]])
    q, k, v = inputs(2, 2, 9, 40, 16, 24, seed=3)
    do = torch.randn(2, 2, 9, 24)
    got = outputs_and_grads(lambda *t: flash_attention(*t, window=window, q_pos=q_pos), (q, k, v), do)
    want = outputs_and_grads(lambda *t: masked_reference(*t, window=window, q_pos=q_pos), (q, k, v), do)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4, msg=name)
    assert got[2][0, :, 32:].abs().max() == 0  # no query of row 0 sits past key 31
    with pytest.raises(ValueError, match="q_pos must be an integer tensor"):
        flash_attention(q, k, v, q_pos=q_pos[:, :4])
    with pytest.raises(ValueError, match="need causal=True"):
        flash_attention(q, k, v, causal=False, window=3)


@needs_interpreter
def test_unsupported_inputs_raise_clear_errors():
    q, k, v = inputs(1, 1, 8, 8, 160, 160)
    with pytest.raises(ValueError, match="head dims up to 128"):
        flash_attention(q, k, v)
    q, k, v = inputs(1, 1, 8, 8, 16, 16, dtype=torch.float64)
    with pytest.raises(TypeError, match="float32, bfloat16 and float16"):
        flash_attention(q, k, v)
    q, k, v = inputs(1, 1, 9, 8, 16, 16)
    with pytest.raises(ValueError, match="at least as many keys as queries"):
        flash_attention(q, k, v)


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layers=2, d_model=64, n_heads=2, n_ctx=64, **kw))


LLAMA = dict(
    positional_embedding_type="rotary", normalization_type="RMS", gated_mlp=True, act_fn="silu", n_key_value_heads=1,
    bias=False,
)  # fmt: skip


@needs_interpreter
@pytest.mark.parametrize("knobs", [{}, {"diff_attn": True}, LLAMA], ids=["plain", "diff", "llama+gqa"])
def test_model_with_triton_backend_matches_eager(knobs):
    """attn_impl='triton' (interpreted) == 'eager': logits, loss gradients of every parameter, and KV-cache decoding;
    grouped-query attention too (the kernel reads each key/value head once per query head of its group)."""
    tokens = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    runs = {}
    for impl in ("triton", "eager"):
        m = tiny(attn_impl=impl, **knobs)
        logits, loss = m(tokens, return_type="both")
        loss.backward()
        runs[impl] = logits.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}
    torch.testing.assert_close(runs["triton"][0], runs["eager"][0], atol=1e-5, rtol=1e-5)
    for name, g in runs["eager"][1].items():
        torch.testing.assert_close(runs["triton"][1][name], g, atol=1e-5, rtol=1e-4, msg=name)

    m = tiny(attn_impl="triton", **knobs).eval()
    with torch.no_grad():
        full = m(tokens[:, :12])
        cache = m.make_cache(1)
        steps = [m(tokens[:, :9], past_kv_cache=cache)]  # prefill, then one token at a time
        steps += [m(tokens[:, i : i + 1], past_kv_cache=cache) for i in range(9, 12)]
        inc = torch.cat(steps, 1)
    torch.testing.assert_close(inc, full, atol=1e-5, rtol=1e-5)


@needs_interpreter
@pytest.mark.parametrize(
    "knobs",
    [
        dict(),
        dict(diff_attn=True),
        dict(mod=True, mod_capacity=0.5, mod_every=1),  # routed self-decoder (window) and cross-decoder (q_pos)
    ],
    ids=["yoco", "yoco+diff", "yoco+mod"],
)
def test_yoco_with_triton_backend_matches_eager(knobs, monkeypatch):
    """YOCO's sliding-window and cross-decoder attention on the kernel (interpreted) == 'eager': logits, the
    gradients of every parameter, and window + global cache decoding (prefill, then token by token)."""
    calls = []
    real = triton_attn.flash_attention

    def spy(*a, **kw):
        calls.append((kw.get("window"), kw.get("q_pos") is not None))
        return real(*a, **kw)

    monkeypatch.setattr(triton_attn, "flash_attention", spy)
    kw = dict(yoco=True, yoco_window=10, **knobs)  # window < sequence: the window cuts the 16-key blocks
    tokens = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    runs = {}
    for impl in ("triton", "eager"):
        m = tiny(attn_impl=impl, **kw)
        logits, loss = m(tokens, return_type="both")
        loss.backward()
        runs[impl] = logits.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}
    torch.testing.assert_close(runs["triton"][0], runs["eager"][0], atol=1e-5, rtol=1e-5)
    for name, g in runs["eager"][1].items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(runs["triton"][1][name], g, atol=1e-5, rtol=1e-4, msg=name)

    m = tiny(attn_impl="triton", **kw).eval()
    with torch.no_grad():
        full = m(tokens)
        cache = m.make_cache(1)
        steps = [m(tokens[:, :13], past_kv_cache=cache)]  # prefill longer than the window, then one at a time
        steps += [m(tokens[:, i : i + 1], past_kv_cache=cache) for i in range(13, 24)]
        inc = torch.cat(steps, 1)
    torch.testing.assert_close(inc, full, atol=1e-5, rtol=1e-5)
    assert (10, False) in calls  # the self-decoder's window ran on the kernel
    # the cross-decoder: every query in order, or (MoD routes every block here) routed queries at their positions
    assert (None, bool(knobs.get("mod"))) in calls and (None, not knobs.get("mod")) not in calls


@needs_interpreter
def test_triton_backend_refuses_pattern_hooks_and_dropout():
    m = tiny(attn_impl="triton").eval()
    tokens = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(RuntimeError, match="attn_impl='triton' cannot expose"):
        m.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_pattern", lambda t, hook: t)])
    m = tiny(attn_impl="triton", dropout=0.1).train()
    with pytest.raises(RuntimeError, match="attn_impl='triton' is not available: .*dropout"):
        m(tokens)


@needs_interpreter
def test_interpreter_is_used_and_kernels_follow_it():
    assert "TRITON_INTERPRET" not in os.environ or os.environ["TRITON_INTERPRET"] != "1"  # restored
    assert triton_attn.unavailable_reason("cpu") is None  # triton itself stays in interpreter mode
    assert triton_attn.kernels().INTERPRET


def test_import_tinygpt_does_not_import_triton():
    code = textwrap.dedent(
        """
        import sys, torch
        import tinygpt
        from tinygpt import GPT, GPTConfig
        m = GPT(GPTConfig(n_layers=1, d_model=32, n_heads=2, n_ctx=16, diff_attn=True))
        m(torch.zeros(1, 4, dtype=torch.long))
        assert "triton" not in sys.modules, "triton was imported"
        # triton imported in compiled mode: setting TRITON_INTERPRET afterwards is named in the error
        import os, triton.language
        os.environ["TRITON_INTERPRET"] = "1"
        m = GPT(GPTConfig(n_layers=1, d_model=32, n_heads=2, n_ctx=16, attn_impl="triton"))
        try:
            m(torch.zeros(1, 4, dtype=torch.long))
        except RuntimeError as e:
            assert "attn_impl='triton' is not available" in str(e) and "only after triton was imported" in str(e), e
        else:
            raise AssertionError("no error")
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


COMPILE_FOR_H100 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tinygpt.arch.triton import _kernels as K
from tinygpt.arch.triton.attention import _GPU_CONFIGS

assert not K.INTERPRET
names = {"fwd": "attn_fwd", "dkdv": "attn_bwd_dkdv", "dq": "attn_bwd_dq", "pre": "attn_bwd_preprocess"}
# plain; differential halves; YOCO's sliding window; queries at scattered positions (MoD in YOCO's cross-decoder)
variants = (("bf16", 64, 64, "ieee", False, False), ("fp32", 32, 64, "tf32", False, False),
            ("bf16", 64, 64, "ieee", True, False), ("fp32", 32, 32, "tf32", False, True))
for dt, dqk, dv, precision, windowed, has_qpos in variants:
    for kind, name in names.items():
        if kind == "pre" and (windowed or has_qpos):
            continue  # no mask in the preprocess kernel
        fn = getattr(K, name)
        bm, bn, warps, stages = _GPU_CONFIGS.get(kind, [(64, 0, 4, 1)])[0]
        consts = dict(D_QK=dqk, D_V=dv, BLOCK_DQK=dqk, BLOCK_DV=dv, CAUSAL=True, WINDOWED=windowed,
                      HAS_QPOS=has_qpos, PRECISION=precision, UPCAST=False, BLOCK_M=bm, BLOCK_N=bn)
        consts = {k: v for k, v in consts.items() if k in fn.arg_names}
        ptrs = {**dict.fromkeys(("Q", "K", "V", "Out", "DO", "DQ", "DK", "DV"), dt), "LSE": "fp32", "DELTA": "fp32",
                "QPOS": "i32"}
        sig = {a: "constexpr" if a in consts else "*" + ptrs[a] if a in ptrs else "fp32" if a == "sm_scale" else "i32"
               for a in fn.arg_names}
        src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
        options = dict(num_warps=warps, num_stages=stages)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
        assert len(compiled.asm["cubin"]) > 1000, name
        print(dt, name, "ok")
"""


@pytest.mark.slow
def test_kernels_compile_for_an_h100_without_a_gpu(tmp_path):
    """The compiled (not interpreted) kernels build for sm_90 with triton's own ptxas: no GPU needed."""
    stdout = compile_without_gpu(COMPILE_FOR_H100, tmp_path)
    assert stdout.count(" ok") == 14, stdout
