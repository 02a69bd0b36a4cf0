"""Throughput of the routed architectures against the dense model of the same shape.

Mixture-of-Depths at capacity 0.125 (routing every other block, the default, and every block) and
Mixture-of-Experts (top-2 of 4 experts) against the dense GPT of the same preset: forward tokens/s and
training tokens/s (forward + backward + AdamW), all models interleaved in one process, round by round, so
machine noise hits every model alike. Ratios are medians of per-round paired ratios (variant / dense). The
CPU-time ratio (process CPU seconds instead of wall seconds) is printed as a cross-check that is less
sensitive to other processes competing for the cores on a shared machine.

MoD forwards are timed with top-k routing (the training-time computation at exactly `capacity` of the tokens;
in eval mode the causal predictor decides instead, whose routed fraction depends on training). MoE top-2
computes two expert MLPs per token, so it is *slower* than dense per token; its point is N times the MLP
parameters at k/N of their compute.

    python benchmarks/arch_throughput.py                     # tiny preset, 2 threads
    python benchmarks/arch_throughput.py --threads 1 --rounds 7 --steps 1   # steadier on a busy machine

Measured on the shared 2-core CPU box (tiny, batch 8 x 256, 1 thread, 7 rounds, load average ~10, so absolute
tokens/s are low; the ratios are reproducible): MoD every 2nd block forward 1.61x / training 1.67x the dense
model, MoD every block 4.7x / 5.0x, MoE top-2 of 4 0.69x / 0.62x (2.8x the parameters).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import tinygpt
from tinygpt.arch.mod import routing

VARIANTS = {
    "dense": {},
    "mod c=0.125 every 2": {"mod": True, "mod_capacity": 0.125, "mod_every": 2},
    "mod c=0.125 every 1": {"mod": True, "mod_capacity": 0.125, "mod_every": 1},
    "moe top-2 of 4": {"moe_experts": 4, "moe_topk": 2},
}


def time_it(fn, n: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) per call."""
    t, c = time.perf_counter(), time.process_time()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n, (time.process_time() - c) / n


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=None, help="sequence length (default: the preset's n_ctx)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="timed calls per model per round")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    names = ["dense"] + [v for v in a.variants if v != "dense"]

    base = tinygpt.GPTConfig.preset(a.preset)
    T = a.ctx or base.n_ctx
    x = torch.randint(0, base.d_vocab, (a.batch, T))
    models, opts = {}, {}
    for name in names:
        torch.manual_seed(0)
        models[name] = tinygpt.GPT(base.replace(**VARIANTS[name])).train()
        opts[name] = torch.optim.AdamW(models[name].parameters(), lr=1e-4, fused=True)

    def fwd(name):
        m = models[name].eval()
        with torch.inference_mode(), routing(m, "topk"):
            m(x)
        m.train()

    def train_step(name):
        m, opt = models[name], opts[name]
        loss = m(x, return_type="loss")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for name in names:  # warm-up
        fwd(name)
        train_step(name)
    times = {(kind, n): [] for kind in ("fwd", "train") for n in names}
    for r in range(a.rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            times["fwd", name].append(time_it(lambda n=name: fwd(n), a.steps))
            times["train", name].append(time_it(lambda n=name: train_step(n), a.steps))

    tok = a.batch * T
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, preset {a.preset} "
        f"({base.n_layers}L d{base.d_model}), batch {a.batch} x ctx {T}, {a.rounds} rounds x {a.steps} calls"
    )
    print(
        f"{'model':<22} {'params':>10} {'fwd tok/s':>10} {'ratio':>6} {'cpu ratio':>9} "
        f"{'train tok/s':>11} {'ratio':>6} {'cpu ratio':>9}"
    )
    for name in names:
        row = [f"{name:<22}", f"{models[name].n_params():>10,}"]
        for kind in ("fwd", "train"):
            t, dense = times[kind, name], times[kind, "dense"]
            wall = statistics.median(d[0] / v[0] for d, v in zip(dense, t, strict=True))
            cpu = statistics.median(d[1] / v[1] for d, v in zip(dense, t, strict=True))
            width = 10 if kind == "fwd" else 11
            row += [f"{tok / statistics.median(v[0] for v in t):>{width},.0f}", f"{wall:>6.2f}", f"{cpu:>9.2f}"]
        print(" ".join(row))


if __name__ == "__main__":
    main()
