"""Interpretability overheads: a full `run_with_cache` against a plain forward, and a full (layer x position)
resid_pre activation-patching sweep, ours (batched) against `transformer_lens.patching.get_act_patch_resid_pre`
on the same model in the same run (which runs one forward per cell). The two sweeps' values are compared too.
Each prompt length runs twice: prompts that differ in one token (a name swap; tinygpt skips the cells that
patch identical activations) and prompts that differ in every token (no cell can be skipped: the worst case).

    python benchmarks/interp.py                          # tiny preset, 2 threads
    python benchmarks/interp.py --preset small --prompt-len 48,128 --rounds 5

Targets: full cache <= 1.6x the forward; batched sweep >= 5x faster than TransformerLens'.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # TransformerLens' sweep always draws a progress bar

import torch  # noqa: E402
import transformer_lens.patching as tlp  # noqa: E402

from tinygpt import GPT, GPTConfig  # noqa: E402
from tinygpt.interp import logit_diff, patch_resid_pre  # noqa: E402


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, rounds: int) -> tuple[float, object]:
    out, times = None, []
    for _ in range(rounds):
        _sync()
        t0 = time.perf_counter()
        out = fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=8, help="batch for the cache benchmark")
    p.add_argument("--ctx", type=int, default=None, help="sequence length for the cache benchmark (default n_ctx)")
    p.add_argument("--prompt-len", default="24,64", help="tokens in the patching prompts (comma-separated)")
    p.add_argument("--prompts", type=int, default=1, help="clean/corrupted pairs in the patching batch")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset(args.preset)).to(args.device).eval()
    cfg = model.cfg
    ctx = args.ctx or cfg.n_ctx
    print(
        f"model {args.preset}: {cfg.n_layers}L d{cfg.d_model} {cfg.n_heads}H n_ctx {cfg.n_ctx}, "
        f"{model.n_params():,} params; torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads"
    )

    # ---------------------------------------------------------------- full cache vs forward
    x = torch.randint(0, cfg.d_vocab, (args.batch, ctx), device=args.device)
    with torch.no_grad():
        for _ in range(2):  # warm up both paths
            model(x)
            model.run_with_cache(x)
        fwd, cache_t = [], []
        for _ in range(args.rounds):  # interleaved, so machine noise hits both alike
            fwd.append(timed(lambda: model(x), 1)[0])
            cache_t.append(timed(lambda: model.run_with_cache(x), 1)[0])
        _, cache = model.run_with_cache(x)
    f, c = statistics.median(fwd), statistics.median(cache_t)
    mib = sum(v.numel() * v.element_size() for v in cache.values()) / 2**20
    print(f"\nforward {args.batch}x{ctx}:           {f * 1e3:8.1f} ms")
    print(
        f"run_with_cache (full, {len(cache)} hooks, {mib:.0f} MiB): {c * 1e3:8.1f} ms   "
        f"ratio {c / f:.2f}x  (target <= 1.6x)"
    )
    del cache

    # ---------------------------------------------------------------- patching sweep
    for prompt_len in [int(x) for x in str(args.prompt_len).split(",")]:
        for differ in ("one", "all"):
            sweep(model, prompt_len, args.prompts, args.rounds, differ)


def sweep(model, prompt_len: int, prompts: int, rounds: int, differ: str) -> None:
    """`differ="one"`: the prompts differ in one token a third of the way in (a name swap; the cells before it
    and layer 0's other cells patch identical activations, which tinygpt skips); "all": every token differs
    (no cell can be skipped: the worst case)."""
    cfg = model.cfg
    gen = torch.Generator().manual_seed(1)
    clean = torch.randint(0, cfg.d_vocab, (prompts, prompt_len), generator=gen).to(model.W_E.device)
    corrupted = clean.clone()
    if differ == "one":
        corrupted[:, prompt_len // 3] = (clean[:, prompt_len // 3] + 1) % cfg.d_vocab
    else:
        corrupted = (clean + torch.randint(1, cfg.d_vocab, clean.shape, generator=gen).to(clean.device)) % cfg.d_vocab
    correct, incorrect = 11, 17

    def metric(logits):
        return logit_diff(logits, correct, incorrect)

    def ours():
        return patch_resid_pre(model, clean, corrupted, correct=correct, incorrect=incorrect, progress=False).values

    def theirs():
        _, clean_cache = model.run_with_cache(clean)
        return tlp.get_act_patch_resid_pre(model, corrupted, clean_cache, metric)

    with torch.no_grad():
        ours()
        theirs()  # warm up
        t_ours, t_tl = [], []
        for _ in range(rounds):  # interleaved
            t, v_ours = timed(ours, 1)
            t_ours.append(t)
            t, v_tl = timed(theirs, 1)
            t_tl.append(t)
    o, t = statistics.median(t_ours), statistics.median(t_tl)
    cells = cfg.n_layers * prompt_len
    diff = float((v_ours - v_tl.float().cpu()).abs().max())
    what = "one token differs" if differ == "one" else "every token differs"
    print(
        f"\nresid_pre patching sweep, {cfg.n_layers} layers x {prompt_len} positions = {cells} cells, batch {prompts}, "
        f"{what}:"
    )
    print(f"  transformer_lens get_act_patch_resid_pre (+ clean cache): {t * 1e3:8.1f} ms  ({cells} forwards)")
    print(f"  tinygpt patch_resid_pre (batched):                        {o * 1e3:8.1f} ms")
    print(f"  speed-up {t / o:.1f}x  (target >= 5x); max |difference| {diff:.2e}")


if __name__ == "__main__":
    main()
