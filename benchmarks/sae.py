"""Sparse-dictionary benchmarks: training throughput against plain torch, and the quality targets of issue 14.

Throughput (default): `train_sae` (TopK, 8x, k=32 at blocks.2.hook_resid_post of the `tiny` preset, batch 1024)
against a plain-torch TopK SAE of the same shape trained in the same process, interleaved, on the same corpus:

- `ref-trunc`: activations from a plain forward of the blocks up to the hook (no hooks, no streaming buffer),
  then a dense TopK step (scatter, `acts @ W_dec`), Adam, decoder rows renormalised;
- `ref-cache`: the same step, activations from `model.run_with_cache(tokens, names_filter=hook)` (what most
  notebooks write: a full forward).

It reports tokens/s, the ratios ours / reference, and the share of our time in the model's forward and in the
dictionary step (`SAETrainResult.timing`). Throughput does not depend on the weights: a fresh `tiny` model is
used unless `--model` is given.

Quality (`--quality --model tiny.tinygpt`): the issue's target run, TopK 8x k=32 on a middle layer's resid_post
from 2M tokens (explained variance, dead %, loss recovered, wall time), the other architectures at a matched
L0, and the speaker-tag latent search (AUROC).

    python benchmarks/sae.py                         # throughput, 3 rounds of 262,144 tokens
    python benchmarks/sae.py --quality --model runs/tiny.tinygpt --archs topk,batchtopk,jumprelu,relu
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import tinygpt
from tinygpt.dictionary import evaluate_dictionary, find_separating_latents, train_sae

HOOK_LAYER = 2


class RefTopK(torch.nn.Module):
    """A plain TopK SAE: `recon = TopK(ReLU((x - b_dec) @ W_enc + b_enc)) @ W_dec + b_dec`."""

    def __init__(self, d: int, m: int, k: int):
        super().__init__()
        w = torch.randn(m, d)
        self.W_dec = torch.nn.Parameter(w / w.norm(dim=-1, keepdim=True))
        self.W_enc = torch.nn.Parameter(self.W_dec.detach().T.clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(m))
        self.b_dec = torch.nn.Parameter(torch.zeros(d))
        self.k = k

    def forward(self, x):
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        top = pre.topk(self.k, dim=-1)
        acts = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
        return acts @ self.W_dec + self.b_dec


def _windows(tokens: np.ndarray, ctx: int, n: int, seed: int) -> torch.Tensor:
    g = np.random.default_rng(seed)
    starts = g.integers(0, len(tokens) - ctx, n)
    return torch.from_numpy(np.stack([tokens[s : s + ctx] for s in starts]).astype(np.int64))


@torch.no_grad()
def _trunc_acts(model, toks: torch.Tensor, layer: int) -> torch.Tensor:
    pos = torch.arange(toks.shape[1])
    x = model.embed(toks) + model.pos_embed(pos)[None]
    for block in model.blocks[: layer + 1]:
        x = block(x)
    return x


def reference(
    model,
    tokens: np.ndarray,
    n_tokens: int,
    *,
    cache: bool,
    d_sae: int,
    k: int,
    batch: int,
    ctx: int,
    lr: float,
    model_batch: int = 16,
) -> dict[str, float]:
    """A plain loop: a forward over `model_batch` random windows, then its activations in order, `batch` rows
    a step (the same forward batch as `train_sae`'s default, no shuffle buffer)."""
    sae = RefTopK(model.cfg.d_model, d_sae, k)
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    hook = f"blocks.{HOOK_LAYER}.hook_resid_post"
    fwd = step_s = 0.0
    t0 = time.perf_counter()
    steps, acts, s = n_tokens // batch, torch.empty(0, model.cfg.d_model), 0
    for _ in range(steps):
        if acts.shape[0] < batch:
            toks = _windows(tokens, ctx, model_batch, s)
            s += 1
            t1 = time.perf_counter()
            if cache:
                with torch.no_grad():
                    x = model.run_with_cache(toks, names_filter=hook)[1][hook]
            else:
                x = _trunc_acts(model, toks, HOOK_LAYER)
            acts = x.reshape(-1, x.shape[-1])
            fwd += time.perf_counter() - t1
        x, acts = acts[:batch], acts[batch:]
        t2 = time.perf_counter()
        loss = (sae(x) - x).pow(2).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            sae.W_dec /= sae.W_dec.norm(dim=-1, keepdim=True)
        step_s += time.perf_counter() - t2
    wall = time.perf_counter() - t0
    return {"tok_s": steps * batch / wall, "forward_share": fwd / wall, "step_share": step_s / wall}


def ours(model, tokens: np.ndarray, n_tokens: int, *, d_sae: int, k: int, batch: int, ctx: int) -> dict[str, float]:
    res = train_sae(
        model,
        torch.from_numpy(tokens.astype(np.int64)),
        hook=f"blocks.{HOOK_LAYER}.hook_resid_post",
        arch="topk",
        k=k,
        d_sae=d_sae,
        tokens=n_tokens,
        batch_size=batch,
        context=ctx,
        val_split=0.0,
        evaluate=False,
        progress=False,
    )
    wall = res.seconds
    return {
        "tok_s": res.tokens / wall,
        "forward_share": res.timing["forward_s"] / wall,
        "step_share": res.timing["dictionary_s"] / wall,
    }


def throughput(args) -> None:
    model = tinygpt.load(args.model) if args.model else tinygpt.GPT("tiny").eval()
    toks = tinygpt.tokenize_corpus(None, model.tokenizer, progress=False).tokens
    toks = np.asarray(toks[:4_000_000])
    d_sae, k, batch, ctx = 8 * model.cfg.d_model, 32, 1024, model.cfg.n_ctx
    runs: dict[str, list[dict[str, float]]] = {"ours": [], "ref-trunc": [], "ref-cache": []}
    lr = min(1e-3, 2e-4 * (16384 / d_sae) ** 0.5)
    # warm-up (lazy imports of the optimizer's first step, allocator): not timed
    ours(model, toks, batch, d_sae=d_sae, k=k, batch=batch, ctx=ctx)
    reference(model, toks, batch, cache=False, d_sae=d_sae, k=k, batch=batch, ctx=ctx, lr=lr)
    for r in range(args.rounds):
        runs["ours"].append(ours(model, toks, args.tokens, d_sae=d_sae, k=k, batch=batch, ctx=ctx))
        runs["ref-trunc"].append(
            reference(model, toks, args.tokens, cache=False, d_sae=d_sae, k=k, batch=batch, ctx=ctx, lr=lr)
        )
        runs["ref-cache"].append(
            reference(model, toks, args.tokens, cache=True, d_sae=d_sae, k=k, batch=batch, ctx=ctx, lr=lr)
        )
        print(f"round {r + 1}: " + ", ".join(f"{n} {v[-1]['tok_s']:,.0f} tok/s" for n, v in runs.items()), flush=True)
    med = {n: {key: statistics.median(x[key] for x in v) for key in v[0]} for n, v in runs.items()}
    print(
        f"\nTopK SAE d_in={model.cfg.d_model} d_sae={d_sae} k={k} batch={batch} at blocks.{HOOK_LAYER}.hook_resid_post "
        f"({args.tokens:,} tokens a round, median of {args.rounds}, {torch.get_num_threads()} threads)"
    )
    print(f"{'':10} {'tokens/s':>10} {'forward':>8} {'dict step':>9}")
    for n, m in med.items():
        print(f"{n:10} {m['tok_s']:>10,.0f} {m['forward_share']:>8.0%} {m['step_share']:>9.0%}")
    for n in ("ref-trunc", "ref-cache"):
        print(f"ratio ours / {n}: {med['ours']['tok_s'] / med[n]['tok_s']:.2f}")


def quality(args) -> None:
    model = tinygpt.load(args.model)
    hook = args.hook or f"blocks.{model.cfg.n_layers // 2}.hook_resid_post"
    archs = args.archs.split(",")
    extra = {"batchtopk": {}, "jumprelu": {"l0_coef": args.l0_coef}, "relu": {"l1_coef": args.l1_coef}}
    rows = []
    for arch in archs:
        t0 = time.perf_counter()
        res = train_sae(
            model,
            hook=hook,
            arch=arch,
            k=args.k,
            expansion=args.expansion,
            tokens=args.tokens,
            evaluate=False,
            progress=args.progress,
            **extra.get(arch, {}),
        )
        wall = time.perf_counter() - t0
        ev = evaluate_dictionary(model, res.dictionary, tokens=args.eval_tokens, progress=False)[0]
        sep = find_separating_latents(model, res.dictionary, progress=False) if arch == archs[0] else None
        rows.append((arch, ev, wall, res.timing, sep))
        print(
            f"{arch:9} EV {ev['explained_variance']:.3f} | L0 {ev['l0']:.1f} | dead {100 * ev['dead_fraction']:.1f}% "
            f"| loss recovered {ev['loss_recovered']:.3f} | KL {ev['kl_spliced']:.4f} | {wall:.0f} s "
            f"(forward {res.timing['forward_s']:.0f} s, dictionary {res.timing['dictionary_s']:.0f} s)",
            flush=True,
        )
        if sep is not None:
            print(f"          speaker-tag latents (AUROC): {', '.join(f'{f}: {a:.3f}' for f, a in sep.best[:5])}")
    print(
        "\n| arch | L0 | explained variance | dead | loss recovered | KL | wall time |\n|---|---|---|---|---|---|---|"
    )
    for arch, ev, wall, _, _ in rows:
        print(
            f"| {arch} | {ev['l0']:.1f} | {ev['explained_variance']:.3f} | {100 * ev['dead_fraction']:.1f}% | "
            f"{ev['loss_recovered']:.3f} | {ev['kl_spliced']:.4f} | {wall:.0f} s |"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a .tinygpt file (throughput: default a fresh tiny preset)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=None, help="tokens per round (262,144) / per run (2,000,000)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quality", action="store_true", help="the quality targets (needs --model)")
    p.add_argument("--hook", default=None)
    p.add_argument("--archs", default="topk,batchtopk,jumprelu,relu")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--expansion", type=float, default=8)
    p.add_argument("--l0-coef", type=float, default=0.1)
    p.add_argument("--l1-coef", type=float, default=5.0)
    p.add_argument("--eval-tokens", type=int, default=131_072)
    p.add_argument("--progress", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.quality:
        if not args.model:
            p.error("--quality needs --model (a trained .tinygpt)")
        args.tokens = args.tokens or 2_000_000
        quality(args)
    else:
        args.tokens = args.tokens or 262_144
        throughput(args)


if __name__ == "__main__":
    main()
