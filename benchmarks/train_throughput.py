"""Training / forward / sampling throughput of tinygpt against a plain-torch GPT of the same shapes.

The reference is a nanoGPT-class model (fused qkv projection, nn.LayerNorm, SDPA, no hooks, logits then
cross-entropy). Both run a training step (forward + loss, backward, grad clip 1.0, fused AdamW), interleaved in
one process, so machine noise hits both alike; we report tokens/s, the ratio ours/reference, MFU against a
matmul peak measured in the same run (flops/token = 6N + 12·L·d·T, N = non-embedding params) and each step's
peak resident memory (RSS; Linux: the high-water mark is reset before each measured step).

tinygpt's step is the one `train()` runs: `model(x, targets=y, return_type="loss")` (the chunked linear +
cross-entropy, never the full logits), and with `--dtype bfloat16` by default bf16 weights with fp32 master
copies in the optimizer (`--param-dtype bfloat16`, `tinygpt.training.precision.MasterWeights`); the reference
then runs bf16 autocast under `torch.compile` (its best: `--ref eager` for the plain one).

    python benchmarks/train_throughput.py                                   # tiny and huge, fp32, 2 threads
    python benchmarks/train_throughput.py --presets huge --dtype bfloat16   # the issue-17 row
    python benchmarks/train_throughput.py --presets huge --dtype bfloat16 --param-dtype float32   # ours: autocast
"""

from __future__ import annotations

import argparse
import contextlib
import re
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import tinygpt
from tinygpt.model.loss import free_workspace
from tinygpt.sampling import generate_tokens
from tinygpt.training.precision import MasterWeights, compiled_forward

SHAPES = {  # batch, vocab (the issue's reference settings)
    "tiny": (8, 256),
    "huge": (4, 49152),
}


class RefBlock(nn.Module):
    def __init__(self, d: int, h: int):
        super().__init__()
        self.h = h
        self.ln_1 = nn.LayerNorm(d)
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.c_fc = nn.Linear(d, 4 * d)
        self.mlp_proj = nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.h, d // self.h).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.c_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class RefGPT(nn.Module):
    """nanoGPT-class reference: same shapes as tinygpt's GPT, no hooks."""

    def __init__(self, cfg: tinygpt.GPTConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.d_vocab, cfg.d_model)
        self.wpe = nn.Embedding(cfg.n_ctx, cfg.d_model)
        self.blocks = nn.ModuleList(RefBlock(cfg.d_model, cfg.n_heads) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.d_vocab, bias=False)
        for p in self.parameters():
            if p.ndim >= 2:
                nn.init.normal_(p, 0, 0.02)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for blk in self.blocks:
            x = blk(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), targets.reshape(-1))


def matmul_peak(dtype=torch.float32, n: int = 1024, reps: int = 20) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t))
    return best


def step_fn(model, opt, x, y, ours: bool, autocast, master: MasterWeights | None = None, forward=None):
    with autocast:
        loss = model(x, return_type="loss", targets=y) if ours else (model if forward is None else forward)(x, y)
    loss.backward()
    if master is not None:  # bf16 weights: fp32 gradients onto the masters, clip and step them, refresh
        master.grads_to_masters()
        master.grad_norm(1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        master.masters_to_params()
    else:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss.item()


_STATUS = Path("/proc/self/status")


def rss_mib() -> float:
    """Resident memory now (MiB; 0 where /proc is missing)."""
    m = re.search(r"VmRSS:\s+(\d+)", _STATUS.read_text()) if _STATUS.exists() else None
    return int(m.group(1)) / 1024 if m else 0.0


def peak_rss_of(fn) -> tuple[float, float]:
    """(peak RSS during `fn()`, peak minus the RSS before it), MiB: the high-water mark is reset first
    (`/proc/self/clear_refs` 5, Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return float("nan"), float("nan")
    before = rss_mib()
    fn()
    m = re.search(r"VmHWM:\s+(\d+)", _STATUS.read_text())
    peak = int(m.group(1)) / 1024 if m else float("nan")
    return peak, peak - before


def time_steps(fn, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return time.perf_counter() - t


def bench_preset(
    name: str, dtype: str, rounds: int, steps: int, peak: float, *, param_dtype: str, ref_compile: bool,
    compile_ours: bool,
) -> dict:  # fmt: skip
    batch, vocab = SHAPES[name]
    cfg = tinygpt.GPTConfig.preset(name, d_vocab=vocab)
    T = cfg.n_ctx
    torch.manual_seed(0)
    ours = tinygpt.GPT(cfg).train()
    ref = RefGPT(cfg).train()
    x = torch.randint(0, vocab, (batch, T))
    y = torch.randint(0, vocab, (batch, T))
    bf16 = dtype == "bfloat16"
    master = MasterWeights(ours) if bf16 and param_dtype == "bfloat16" else None
    ours_autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16 and master is None)
    ref_autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    opt_ours = torch.optim.AdamW(
        master.optimizer_groups(0.0) if master is not None else ours.parameters(), lr=1e-4, fused=True
    )
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-4, fused=True)
    ref_forward = torch.compile(ref) if ref_compile else ref
    stack = contextlib.ExitStack()
    stack.enter_context(compiled_forward(ours, compile_ours))
    fns = {
        "ours": lambda: step_fn(ours, opt_ours, x, y, True, ours_autocast, master),
        "ref": lambda: step_fn(ref, opt_ref, x, y, False, ref_autocast, forward=ref_forward),
    }
    t_warm = {}
    for k, f in fns.items():  # warm-up (and compilation)
        t_warm[k] = time_steps(f, 2)
    # ours' loss keeps a workspace between calls: drop it first, so its step's RSS counts it
    rss = {"ours": peak_rss_of(lambda: (free_workspace(), fns["ours"]())), "ref": peak_rss_of(fns["ref"])}
    times = {"ours": [], "ref": []}
    for r in range(rounds):
        order = ("ours", "ref") if r % 2 == 0 else ("ref", "ours")
        for k in order:
            times[k].append(time_steps(fns[k], steps) / steps)
    tok = batch * T
    n_nonemb = sum(p.numel() for n_, p in ours.named_parameters() if not n_.startswith(("embed", "pos_embed")))
    flops_per_token = 6 * n_nonemb + 12 * cfg.n_layers * cfg.d_model * T
    res = {k: tok / statistics.median(v) for k, v in times.items()}
    # per-round paired ratio is more robust to drift than ratio of medians
    ratios = [times["ref"][i] / times["ours"][i] for i in range(rounds)]
    out = {
        "preset": name,
        "tok_s_ours": res["ours"],
        "tok_s_ref": res["ref"],
        "ratio": statistics.median(ratios),
        "ratios": ratios,
        "mfu_ours": res["ours"] * flops_per_token / peak,
        "mfu_ref": res["ref"] * flops_per_token / peak,
        "rss": rss,
        "warmup_s": t_warm,
    }
    stack.close()
    if master is not None:
        master.restore()
    # forward throughput (inference mode)
    ours.eval()
    ref.eval()
    with torch.inference_mode():
        fwd = lambda: ours(x)  # noqa: E731
        time_steps(fwd, 2)
        out["fwd_tok_s"] = tok * 5 / time_steps(fwd, 5)
    return out


def bench_sampling(name: str, n_new: int = 200) -> dict:
    batch, vocab = SHAPES[name]
    cfg = tinygpt.GPTConfig.preset(name, d_vocab=vocab)
    torch.manual_seed(0)
    model = tinygpt.GPT(cfg).eval()
    prompt = torch.randint(0, vocab, (1, 16))
    res = {}
    for use_cache in (False, True):
        list(generate_tokens(model, prompt, 8, seed=0, use_cache=use_cache))
        t = time.perf_counter()
        list(generate_tokens(model, prompt, n_new, seed=0, use_cache=use_cache))
        res["cache" if use_cache else "no_cache"] = n_new / (time.perf_counter() - t)
    res["speedup"] = res["cache"] / res["no_cache"]
    return res


def alone(name: str, dtype: str, who: str, *, param_dtype: str, ref_compile: bool, compile_ours: bool) -> float:
    """Peak RSS (MiB, `ru_maxrss`) of a process that builds one of the two models and runs 3 training steps:
    the memory comparison, free of the other model's and of the other compiler's memory. (`ru_maxrss` survives
    `execve`, so a child of a big process would report its parent's peak: the high-water mark is reset first.)"""
    import resource

    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    batch, vocab = SHAPES[name]
    cfg = tinygpt.GPTConfig.preset(name, d_vocab=vocab)
    torch.manual_seed(0)
    x = torch.randint(0, vocab, (batch, cfg.n_ctx))
    y = torch.randint(0, vocab, (batch, cfg.n_ctx))
    bf16 = dtype == "bfloat16"
    if who == "ours":
        model = tinygpt.GPT(cfg).train()
        master = MasterWeights(model) if bf16 and param_dtype == "bfloat16" else None
        params = master.optimizer_groups(0.0) if master is not None else model.parameters()
        opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16 and master is None)
        with compiled_forward(model, compile_ours):
            for _ in range(3):
                step_fn(model, opt, x, y, True, autocast, master)
    else:
        model = RefGPT(cfg).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        forward = torch.compile(model) if ref_compile else None
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
        for _ in range(3):
            step_fn(model, opt, x, y, False, autocast, forward=forward)
    m = re.search(r"VmHWM:\s+(\d+)", _STATUS.read_text()) if _STATUS.exists() else None
    return int(m.group(1)) / 1024 if m else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_in_subprocesses(argv: list[str], name: str) -> dict[str, float]:
    """{"ours", "ref"}: peak RSS of each model trained alone in its own process (`--alone`)."""
    import subprocess
    import sys

    out = {}
    for who in ("ours", "ref"):
        args = [a for a in argv if a not in ("--rss",)]
        cmd = [sys.executable, __file__, *args, "--presets", name, "--alone", who]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[who] = float(re.search(r"peak RSS ([\d.]+) MiB", res.stdout).group(1))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "huge"], choices=list(SHAPES))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="training steps per timed round")
    ap.add_argument("--no-sampling", action="store_true")
    ap.add_argument(
        "--param-dtype",
        default=None,
        choices=["float32", "bfloat16"],
        help="ours with --dtype bfloat16: bf16 weights + fp32 masters (default) or float32 (autocast)",
    )
    ap.add_argument("--ref", default=None, choices=["eager", "compile"], help="default: compile with bf16")
    ap.add_argument("--compile", action="store_true", help="ours: torch.compile the forward (compile=True)")
    ap.add_argument("--rss", action="store_true", help="also: each model's peak RSS trained alone in a subprocess")
    ap.add_argument("--alone", default=None, choices=["ours", "ref"], help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    param_dtype = a.param_dtype or ("bfloat16" if a.dtype == "bfloat16" else "float32")
    ref_compile = (a.ref or ("compile" if a.dtype == "bfloat16" else "eager")) == "compile"
    torch.set_num_threads(a.threads)
    if a.alone:
        kw = dict(param_dtype=param_dtype, ref_compile=ref_compile, compile_ours=a.compile)
        print(f"peak RSS {alone(a.presets[0], a.dtype, a.alone, **kw):.1f} MiB")
        return
    peak = matmul_peak(torch.bfloat16 if a.dtype == "bfloat16" else torch.float32)
    print(f"torch {torch.__version__}, {a.threads} threads, {a.dtype}; matmul peak {peak / 1e9:.0f} GFLOP/s")
    ours_desc = "bf16 weights + fp32 masters" if param_dtype == "bfloat16" and a.dtype == "bfloat16" else a.dtype
    print(
        f"ours: {ours_desc}{', compiled' if a.compile else ''}, chunked loss | reference: "
        f"{'torch.compile' if ref_compile else 'eager'}{', bf16 autocast' if a.dtype == 'bfloat16' else ''}"
    )
    print(
        f"{'preset':<6} {'ours tok/s':>11} {'ref tok/s':>10} {'ratio':>6} {'MFU ours':>9} {'MFU ref':>8} "
        f"{'fwd tok/s':>10} {'peak RSS ours/ref MiB':>22} {'step RSS ours/ref':>18}"
    )
    for name in a.presets:
        r = bench_preset(
            name, a.dtype, a.rounds, a.steps, peak, param_dtype=param_dtype, ref_compile=ref_compile,
            compile_ours=a.compile,
        )  # fmt: skip
        (po, so), (pr, sr) = r["rss"]["ours"], r["rss"]["ref"]
        print(
            f"{name:<6} {r['tok_s_ours']:>11,.0f} {r['tok_s_ref']:>10,.0f} {r['ratio']:>6.3f} "
            f"{r['mfu_ours']:>9.1%} {r['mfu_ref']:>8.1%} {r['fwd_tok_s']:>10,.0f} {po:>10,.0f} / {pr:>9,.0f} "
            f"{so:>8,.0f} / {sr:>7,.0f}"
        )
        print(
            f"       paired ratios per round: {', '.join(f'{x:.3f}' for x in r['ratios'])}; warm-up (2 steps, incl. "
            f"compilation) ours {r['warmup_s']['ours']:.1f} s, ref {r['warmup_s']['ref']:.1f} s; peak RSS ratio "
            f"{po / pr:.2f}, step RSS ratio {so / max(sr, 1e-9):.2f}"
        )
        if a.rss:
            import sys

            alone_rss = rss_in_subprocesses(list(sys.argv[1:] if argv is None else argv), name)
            print(
                f"       trained alone (own process, 3 steps): peak RSS ours {alone_rss['ours']:,.0f} MiB, ref "
                f"{alone_rss['ref']:,.0f} MiB, ratio {alone_rss['ours'] / alone_rss['ref']:.2f}"
            )
    if not a.no_sampling:
        print("\nsampling 200 tokens, batch 1:")
        for name in a.presets:
            s = bench_sampling(name)
            print(
                f"{name:<6} no cache {s['no_cache']:>7,.0f} tok/s | KV cache {s['cache']:>7,.0f} tok/s | "
                f"speed-up {s['speedup']:.2f}x (target > 3x)"
            )


if __name__ == "__main__":
    main()
