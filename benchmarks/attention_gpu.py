"""Our Triton flash-attention kernel against PyTorch's `scaled_dot_product_attention`, on a CUDA GPU.

Causal attention, [batch, heads, T, d] inputs with batch·T fixed (`--tokens`), for several T, head dims and
dtypes; forward alone and forward+backward. For each case it first checks that the two agree (max abs
difference of the outputs and of dq, dk, dv), then times both (CUDA events, median of `--reps` after
warm-up, which includes the Triton autotuning) and prints tokens/s, TFLOP/s and the ratio ours/SDPA
(> 1: ours is faster).

FLOP counts (the FlashAttention convention): forward `4·b·h·T²·d · 0.5` (two matmuls of 2·T²·d each; the
causal mask halves them); forward+backward 3.5× the forward (the backward does 2.5× the forward's matmuls).
With `--diff` it also times differential attention (two maps with q/k of d/2 sharing v of d: ours calls
the kernel twice, SDPA likewise), whose forward counts `2 · 2·b·h·T²·(d/2 + d) · 0.5`.

    python benchmarks/attention_gpu.py                       # T 512..4096, d 64 and 128, bf16 and fp16
    python benchmarks/attention_gpu.py --seqs 1024 --dims 64 --dtypes bfloat16 --diff --json out.json

Needs a CUDA device and triton; exits with a message otherwise. Record results in docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
import torch.nn.functional as F

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def timed(fn, reps: int, warmup: int = 3) -> float:
    """Median milliseconds of `fn()` over `reps` runs (CUDA events), after `warmup` runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def make_fns(diff: bool):
    """(ours, sdpa): callables of (q, k, v) -> out; for `diff`, q/k hold [Q1 | Q2], [K1 | K2]."""
    from tinygpt.arch.triton.attention import diff_flash_attention, flash_attention

    if not diff:
        return (
            lambda q, k, v: flash_attention(q, k, v, causal=True),
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        )
    lam = 0.5

    def ours(q, k, v):
        h = q.shape[-1] // 2
        return diff_flash_attention(q[..., :h], k[..., :h], q[..., h:], k[..., h:], v, lam)

    def sdpa(q, k, v):
        h = q.shape[-1] // 2
        o1 = F.scaled_dot_product_attention(q[..., :h], k[..., :h], v, is_causal=True)
        return o1 - lam * F.scaled_dot_product_attention(q[..., h:], k[..., h:], v, is_causal=True)

    return ours, sdpa


def max_diffs(ours, sdpa, q, k, v, do) -> list[float]:
    """Max |ours - sdpa| of the output and of dq, dk, dv."""
    res = []
    for fn in (ours, sdpa):
        qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
        out = fn(qq, kk, vv)
        out.backward(do)
        res.append([out.detach(), qq.grad, kk.grad, vv.grad])
    return [(a.float() - b.float()).abs().max().item() for a, b in zip(*res)]


def time_mode(fn, q, k, v, do, mode: str, reps: int) -> float:
    """Median ms of the forward ("fwd", no grad) or forward+backward ("fwd+bwd") of `fn`."""
    if mode == "fwd":
        with torch.no_grad():
            return timed(lambda: fn(q, k, v), reps)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    return timed(lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), do), reps)


def bench_case(T: int, d: int, dtype: torch.dtype, args, diff: bool) -> list[dict]:
    b = max(1, args.tokens // T)
    h = args.heads
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(b, h, T, d, device="cuda", dtype=dtype, generator=g) for _ in range(4))
    ours, sdpa = make_fns(diff)
    diffs = max_diffs(ours, sdpa, q, k, v, do)
    per_map = 2 * b * h * T * T * ((d // 2 + d) if diff else 2 * d) * 0.5  # causal
    fwd_flops = per_map * (2 if diff else 1)
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        ms = {name: time_mode(fn, q, k, v, do, mode, args.reps) for name, fn in (("ours", ours), ("sdpa", sdpa))}
        flops = fwd_flops * (1 if mode == "fwd" else 3.5)
        rows.append(
            dict(
                kind="diff" if diff else "attn",
                T=T,
                d=d,
                dtype=str(dtype).removeprefix("torch."),
                batch=b,
                heads=h,
                mode=mode,
                ours_ms=ms["ours"],
                sdpa_ms=ms["sdpa"],
                ours_tflops=flops / ms["ours"] / 1e9,
                sdpa_tflops=flops / ms["sdpa"] / 1e9,
                ours_tok_s=b * T / ms["ours"] * 1e3,
                sdpa_tok_s=b * T / ms["sdpa"] * 1e3,
                ratio=ms["sdpa"] / ms["ours"],
                max_abs_diff=dict(zip(("out", "dq", "dk", "dv"), diffs)),
            )
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqs", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"], choices=list(DTYPES))
    p.add_argument("--tokens", type=int, default=16384, help="batch·T per case (default 16384)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--diff", action="store_true", help="also time differential attention (two maps)")
    p.add_argument("--json", default=None, help="write the rows to this file")
    args = p.parse_args(argv)

    if not torch.cuda.is_available():
        print("attention_gpu.py needs a CUDA GPU: torch.cuda.is_available() is False here. Run it on a machine "
              "with an NVIDIA GPU and triton installed.", file=sys.stderr)  # fmt: skip
        return 2
    from tinygpt.arch.triton import attention as triton_attn

    reason = triton_attn.unavailable_reason("cuda")
    if reason is not None:
        print(f"attention_gpu.py cannot run our Triton kernel: {reason}", file=sys.stderr)
        return 2

    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, batch·T = {args.tokens}, {args.heads} heads")
    head = (f"{'kind':5} {'T':>5} {'d':>4} {'dtype':9} {'mode':8} {'ours ms':>8} {'sdpa ms':>8} "
            f"{'ours TF/s':>9} {'sdpa TF/s':>9} {'ours tok/s':>11} {'sdpa tok/s':>11} {'ours/sdpa':>9}  "
            "max|diff| out/dq/dk/dv")  # fmt: skip
    print(head)
    rows = []
    for dt in args.dtypes:
        for d in args.dims:
            for T in args.seqs:
                for diff in (False, True) if args.diff else (False,):
                    for r in bench_case(T, d, DTYPES[dt], args, diff):
                        rows.append(r)
                        md = "/".join(f"{x:.1e}" for x in r["max_abs_diff"].values())
                        print(f"{r['kind']:5} {T:>5} {d:>4} {r['dtype']:9} {r['mode']:8} {r['ours_ms']:>8.3f} "
                              f"{r['sdpa_ms']:>8.3f} {r['ours_tflops']:>9.1f} {r['sdpa_tflops']:>9.1f} "
                              f"{r['ours_tok_s']:>11.3g} {r['sdpa_tok_s']:>11.3g} {r['ratio']:>9.2f}  {md}",
                              flush=True)  # fmt: skip
    for mode in ("fwd", "fwd+bwd"):
        ratios = [r["ratio"] for r in rows if r["mode"] == mode]
        print(f"# {mode}: ours/sdpa speed ratio, geometric mean {statistics.geometric_mean(ratios):.2f} "
              f"(min {min(ratios):.2f}, max {max(ratios):.2f})")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
