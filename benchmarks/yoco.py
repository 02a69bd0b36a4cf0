"""YOCO against the vanilla model of the same size: KV-cache memory and decode speed at ctx 1024 and 2048.

For each context length `ctx`, both models get a cache of `ctx` positions (`model.make_cache(1, ctx)`, what
`generate` allocates for a model with `n_ctx = ctx`), are prefilled with a random prompt of `ctx - N`
tokens, then decode `N` tokens greedily at batch 1; decode tokens/s is timed over those N steps only
(prefill is timed separately). Measurements are interleaved (vanilla, YOCO, vanilla, YOCO, ...) in one
process so machine noise hits both alike; we report medians and the ratios YOCO / vanilla.

Memory is the bytes of the cache tensors: vanilla `KVCache` holds `2 · n_layers · ctx` key/value rows,
`YocoCache` holds `2 · (n_layers/2 · window + ctx)` (window ring buffers for the self-decoder plus one
global cache for the cross-decoder), each row `n_heads · d_head` values.

The default model is `huge`-like (12 layers, d_model 256, 8 heads of 32) with n_ctx 2048 and the byte
vocabulary (256), so the layer stack, not a 49k-row unembedding, dominates decoding.

Architecture knobs (`--diff-attn`, `--mod`, `--moe-experts N`) apply to both models, so YOCO is compared with
the vanilla model of the same variant; with `--mod`, the routed layers' own caches are counted too. `--device
cuda` times on a GPU (synchronising around each timed region), with `--attn-impl` choosing the backend.

    python benchmarks/yoco.py                          # 12 layers, window 64, ctx 1024 and 2048, 2 threads
    python benchmarks/yoco.py --layers 6 --window 256 --new-tokens 32 --rounds 3 --threads 1
    python benchmarks/yoco.py --diff-attn --mod --device cuda --attn-impl triton
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tinygpt import GPT, GPTConfig


def cache_bytes(cache) -> int:
    """Bytes of every tensor the cache object holds (Mixture-of-Depths' routed-layer caches included)."""
    tensors = [t for t in vars(cache).values() if isinstance(t, torch.Tensor)]
    for st in getattr(cache, "routed_layers", {}).values():
        tensors += [t for t in (st.k, st.v) if t is not None]
    return sum(t.numel() * t.element_size() for t in tensors)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def decode(model: GPT, ctx: int, new_tokens: int, seed: int) -> tuple[float, float, int]:
    """(prefill seconds, decode tokens/s, cache bytes) for a prompt of ctx - new_tokens tokens at batch 1."""
    g = torch.Generator().manual_seed(seed)
    device = model.embed.weight.device
    prompt = torch.randint(0, model.cfg.d_vocab, (1, ctx - new_tokens), generator=g).to(device)
    cache = model.make_cache(1, ctx)
    sync(device)
    t0 = time.perf_counter()
    logits = model(prompt, past_kv_cache=cache)[:, -1]
    sync(device)
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        nxt = logits.argmax(-1, keepdim=True)
        logits = model(nxt, past_kv_cache=cache)[:, -1]
    sync(device)
    t2 = time.perf_counter()
    assert cache.length == ctx
    return t1 - t0, new_tokens / (t2 - t1), cache_bytes(cache)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--window", type=int, default=64, help="yoco_window of the self-decoder")
    ap.add_argument("--ctx", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--new-tokens", type=int, default=64, help="decoded tokens timed per measurement")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--attn-impl", default="auto")
    ap.add_argument("--diff-attn", action="store_true", help="differential attention in both models")
    ap.add_argument("--mod", action="store_true", help="mixture-of-depths routing in both models")
    ap.add_argument("--moe-experts", type=int, default=0, help="mixture-of-experts in both models")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    knobs = dict(diff_attn=a.diff_attn, mod=a.mod, moe_experts=a.moe_experts, attn_impl=a.attn_impl)
    cfg = GPTConfig(n_layers=a.layers, d_model=a.d_model, n_heads=a.heads, d_vocab=a.vocab, n_ctx=max(a.ctx), **knobs)
    models = {"vanilla": GPT(cfg), "yoco": GPT(cfg.replace(yoco=True, yoco_window=a.window))}
    models = {name: m.to(a.device).eval() for name, m in models.items()}
    print(
        f"torch {torch.__version__}, {a.threads} thread(s), {a.device}, attn_impl={a.attn_impl}; n_layers={a.layers} "
        f"d_model={a.d_model} n_heads={a.heads} vocab={a.vocab} n_ctx={cfg.n_ctx}; yoco_window={a.window}; "
        f"variants {cfg.variants or 'none'}; "
        f"params vanilla {models['vanilla'].n_params():,}, yoco {models['yoco'].n_params():,}; "
        f"{a.new_tokens} decoded tokens, batch 1, {a.rounds} interleaved rounds (medians)"
    )
    for m in models.values():  # warm-up
        decode(m, min(a.ctx), min(8, a.new_tokens), seed=0)
    header = (
        f"{'ctx':>5} {'model':>8} {'cache MiB':>10} {'mem ratio':>9} {'prefill s':>10} "
        f"{'decode tok/s':>13} {'speed ratio':>11}"
    )
    print(header)
    print("-" * len(header))
    for ctx in a.ctx:
        res: dict[str, dict[str, list]] = {n: {"prefill": [], "tps": [], "bytes": []} for n in models}
        for r in range(a.rounds):
            order = list(models) if r % 2 == 0 else list(reversed(models))
            for name in order:
                pre, tps, nbytes = decode(models[name], ctx, a.new_tokens, seed=r + 1)
                res[name]["prefill"].append(pre)
                res[name]["tps"].append(tps)
                res[name]["bytes"].append(nbytes)
        base_bytes = res["vanilla"]["bytes"][0]
        base_tps = statistics.median(res["vanilla"]["tps"])
        for name in models:
            nbytes, tps = res[name]["bytes"][0], statistics.median(res[name]["tps"])
            print(
                f"{ctx:>5} {name:>8} {nbytes / 2**20:>10.2f} {base_bytes / nbytes:>8.1f}x "
                f"{statistics.median(res[name]['prefill']):>10.3f} {tps:>13.1f} {tps / base_tps:>10.2f}x"
            )
    print("mem ratio = vanilla cache bytes / this cache's bytes; speed ratio = decode tok/s / vanilla's")


if __name__ == "__main__":
    main()
