"""The chunked linear + cross-entropy (`tinygpt.model.loss`) against the unfused loss: time and peak memory.

One training micro-batch's loss at the reference run's shape (2,048 tokens, d_model 256, vocabulary 49,152):
`F.cross_entropy(F.linear(h, W).float(), t)` then backward, against `linear_cross_entropy(h, W, t)` then
backward, interleaved in one process for fp32 weights, bf16 weights and fp32 weights under bf16 autocast.
Peak memory is the resident-set high-water mark of each call over the RSS before it (Linux; the mark is reset
first, and the chunked path's cached workspace is dropped, so it counts).

    python benchmarks/chunked_loss.py                     # 2 threads, 3 rounds
    python benchmarks/chunked_loss.py --tokens 4096 --vocab 32768
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import peak_rss_of  # noqa: E402

from tinygpt.model.loss import chunk_rows, free_workspace, linear_cross_entropy  # noqa: E402

MODES = {  # name -> (weight dtype, autocast)
    "fp32": (torch.float32, False),
    "bf16 weights": (torch.bfloat16, False),
    "bf16 autocast": (torch.float32, True),
}


def bench_mode(mode: str, h0, w0, t, rounds: int):
    """(median unfused ms, median chunked ms, paired speed-ups, {path: step MiB over the RSS before it})."""
    wd, ac = MODES[mode]

    def step(fn):
        h, w = h0.to(wd, copy=True).requires_grad_(), w0.to(wd, copy=True).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=ac):
            loss = fn(h, w)
        loss.backward()

    fns = {
        "unfused": lambda h, w: F.cross_entropy(F.linear(h, w).float(), t),
        "chunked": lambda h, w: linear_cross_entropy(h, w, t),
    }
    for f in fns.values():
        step(f)
    times = {k: [] for k in fns}
    for r in range(rounds):
        for k in fns if r % 2 == 0 else list(fns)[::-1]:
            t0 = time.perf_counter()
            step(fns[k])
            times[k].append(time.perf_counter() - t0)
    ratios = [u / c for u, c in zip(times["unfused"], times["chunked"])]
    mem = {}
    for k in fns:
        free_workspace()
        mem[k] = peak_rss_of(lambda: step(fns[k]))[1]  # noqa: B023 (called at once)
    tu, tc = (statistics.median(times[k]) * 1e3 for k in ("unfused", "chunked"))
    return tu, tc, ratios, mem


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    n, d, v = a.tokens, a.d_model, a.vocab
    h0, w0, t = torch.randn(n, d), torch.randn(v, d) * 0.02, torch.randint(0, v, (n,))
    print(
        f"torch {torch.__version__}, {a.threads} threads; {n} tokens x d_model {d} x vocab {v} "
        f"(fp32 logits {n * v * 4 / 2**20:,.0f} MiB; chunks of {chunk_rows(n, v)} tokens)"
    )
    print(f"{'mode':<14} {'unfused ms':>11} {'chunked ms':>11} {'speed-up':>9} {'unfused MiB':>12} {'chunked MiB':>12}")
    for mode in a.modes:
        tu, tc, ratios, mem = bench_mode(mode, h0, w0, t, a.rounds)
        print(
            f"{mode:<14} {tu:>11,.0f} {tc:>11,.0f} {statistics.median(ratios):>8.2f}x "
            f"{mem['unfused']:>12,.0f} {mem['chunked']:>12,.0f}   (paired: {', '.join(f'{x:.2f}' for x in ratios)})"
        )


if __name__ == "__main__":
    main()
