"""The 4-bit dequantise-and-multiply Triton kernel (`tinygpt.surgery.hqq.triton`), in Triton's CPU interpreter.

Triton settles interpreter vs compiler once, at its first import, from `TRITON_INTERPRET`: this module imports
it in interpreter mode (unless another test file already did) with tests/_triton_helpers.py, as
tests/test_arch_triton.py does; if triton was already imported in compiled mode, the file re-runs itself in a
fresh process. Shapes stay tiny (the interpreter is thousands of times slower than a GPU).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _triton_helpers import compile_without_gpu, fresh_process_test, import_triton_interpreted

INTERPRETED = import_triton_interpreted()  # before anything imports triton

import tinygpt  # noqa: E402
from tinygpt.surgery import PackedQuantLinear, hqq_, hqq_quantize, quantize_rtn  # noqa: E402
from tinygpt.surgery.hqq.triton import packed4_linear, use_triton  # noqa: E402

needs_interpreter = pytest.mark.skipif(
    not INTERPRETED, reason="triton was imported in compiled mode first: checked by test_in_a_fresh_process"
)
if not INTERPRETED:  # only then: the checks below are skipped in this process and run in a fresh one
    test_in_a_fresh_process = fresh_process_test(__file__)


def test_the_old_module_path_is_the_same_module():
    from tinygpt.surgery import hqq_triton
    from tinygpt.surgery.hqq import triton as new
    from tinygpt.surgery.hqq_triton import use_triton as old_use_triton

    assert hqq_triton is new and old_use_triton is use_triton


def packed_layer(out: int, inp: int, group: int, *, hqq: bool = True, bias: bool = True, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g) * 0.02
    qt = hqq_quantize(W, 4, group) if hqq else quantize_rtn(W, 4, group)
    b = torch.randn(out, generator=g) * 0.1 if bias else None
    return PackedQuantLinear.from_quantized(qt, b)


@needs_interpreter
@pytest.mark.parametrize(
    "out,inp,group,lead,bias",
    [(24, 32, 16, (5,), True), (40, 64, 64, (2, 3), False), (16, 96, 32, (1,), True), (70, 48, 8, (33,), True)],
)
def test_kernel_matches_dequantise_then_linear(out, inp, group, lead, bias):
    layer = packed_layer(out, inp, group, bias=bias)
    x = torch.randn(*lead, inp, generator=torch.Generator().manual_seed(1))
    want = F.linear(x.double(), layer.dequantize(torch.float64), None if layer.bias is None else layer.bias.double())
    got = packed4_linear(x, layer)
    assert got.shape == (*lead, out) and got.dtype == x.dtype
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)  # blocks that do not divide are masked


@needs_interpreter
def test_bf16_input_and_errors():
    layer = packed_layer(32, 64, 32, hqq=False)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    got = packed4_linear(x, layer)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), F.linear(x.float(), layer.dequantize(), layer.bias), atol=2e-2, rtol=2e-2)
    three = PackedQuantLinear.from_quantized(quantize_rtn(torch.randn(8, 16), 3, 16))
    with pytest.raises(ValueError, match="handles 4-bit packed layers, this one has 3 bits"):
        packed4_linear(torch.randn(2, 16), three)
    with pytest.raises(ValueError, match="x has 63 features, the layer expects 64"):
        packed4_linear(torch.randn(2, 63), layer)


@needs_interpreter
def test_a_packed_model_computes_the_same_with_the_kernel(tokens):
    torch.manual_seed(0)
    model = tinygpt.GPT(tinygpt.GPTConfig(n_layers=1, d_model=32, n_heads=2, n_ctx=64, moe_experts=2)).eval()
    hqq_(model, 4, 16, packed=True)
    x = tokens[:1, :8]
    with torch.no_grad():
        want = model(x)
        assert use_triton(model) == 4 + 2 * 2  # attention + both experts' matrices
        got = model(x)
        use_triton(model, on=False)
        assert torch.equal(model(x), want)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


COMPILE_FOR_H100 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tinygpt.surgery.hqq import triton as hqq_triton

fn = hqq_triton.kernels().packed4_linear_kernel
for dt, precision in (("fp32", "tf32"), ("bf16", "ieee"), ("fp16", "ieee")):
    for has_bias in (True, False):
        consts = dict(HAS_BIAS=has_bias, PRECISION=precision, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64)
        ptrs = {"X": dt, "Y": dt, "B": dt, "P": "u8", "S": "fp32", "Z": "fp32"}
        sig = {a: "constexpr" if a in consts else "*" + ptrs[a] if a in ptrs else "i32" for a in fn.arg_names}
        src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=2))
        assert len(compiled.asm["cubin"]) > 1000
        print(dt, has_bias, "ok")
"""


@pytest.mark.slow
def test_kernel_compiles_for_an_h100_without_a_gpu(tmp_path):
    """The compiled (not interpreted) kernel builds for sm_90 with triton's own ptxas: no GPU needed."""
    stdout = compile_without_gpu(COMPILE_FOR_H100, tmp_path)
    assert stdout.count(" ok") == 6, stdout
