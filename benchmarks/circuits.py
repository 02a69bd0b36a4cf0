"""Circuit tools, timed against references in the same run.

AtP part (helper `atp`): attribution patching of a full head sweep (`site="head"`, every head at every position)
and a full (layer x position) resid_pre sweep, against
- tinygpt's exact batched sweeps (`patch_heads`, `patch_resid_pre`), and
- TransformerLens' one-forward-per-cell sweeps (`transformer_lens.patching.get_act_patch_attn_head_out_all_pos`,
  `get_act_patch_resid_pre`) on the same model,
with the estimate's agreement with the exact values (Pearson / Spearman) printed beside the times.

    python benchmarks/circuits.py                                  # tiny preset, 2 threads, 24-token prompts
    python benchmarks/circuits.py --preset small --prompt-len 64 --rounds 3

(Helper `edges` adds the EAP row below the AtP part.)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # TransformerLens' sweeps always draw a progress bar

import torch  # noqa: E402
import transformer_lens.patching as tlp  # noqa: E402

from tinygpt import GPT, GPTConfig  # noqa: E402
from tinygpt.interp import attribution_patch, compare_attribution, logit_diff, patch_heads, patch_resid_pre  # noqa: E402
from tinygpt.interp.circuits import edge_attribution_patch  # noqa: E402


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> tuple[float, object]:
    _sync()
    t0 = time.perf_counter()
    out = fn()
    _sync()
    return time.perf_counter() - t0, out


def interleaved(fns: dict, rounds: int) -> tuple[dict, dict]:
    """Median time of each function over `rounds` interleaved rounds (machine noise hits all alike), after one
    warm-up call each; and each one's last output."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    outs = {}
    for _ in range(rounds):
        for k, fn in fns.items():
            t, outs[k] = timed(fn)
            times[k].append(t)
    return {k: statistics.median(v) for k, v in times.items()}, outs


def atp_part(model, prompt_len: int, prompts: int, rounds: int) -> None:
    cfg = model.cfg
    gen = torch.Generator().manual_seed(1)
    dev = model.W_E.device
    clean = torch.randint(0, cfg.d_vocab, (prompts, prompt_len), generator=gen).to(dev)
    corrupted = clean.clone()
    k = prompt_len // 3  # a name swap: one token a third of the way in
    corrupted[:, k] = (clean[:, k] + 1) % cfg.d_vocab
    correct, incorrect = 11, 17

    def metric(logits):
        return logit_diff(logits, correct, incorrect)

    answers = dict(correct=correct, incorrect=incorrect)
    for site, exact_fn, tl_fn, cells in [
        ("head", patch_heads, tlp.get_act_patch_attn_head_out_all_pos, cfg.n_layers * cfg.n_heads),
        ("resid_pre", patch_resid_pre, tlp.get_act_patch_resid_pre, cfg.n_layers * prompt_len),
    ]:

        def tl(tl_fn=tl_fn):
            with torch.no_grad():
                _, clean_cache = model.run_with_cache(clean)
                return tl_fn(model, corrupted, clean_cache, metric)

        fns = {
            "atp": lambda site=site: attribution_patch(model, clean, corrupted, site=site, **answers),
            "exact": lambda f=exact_fn: f(model, clean, corrupted, progress=False, **answers),
            "tl": tl,
        }
        t, out = interleaved(fns, rounds)
        cmp = compare_attribution(out["atp"], out["exact"])
        diff = float((out["exact"].values - out["tl"].float().cpu()).abs().max())
        print(f"\n{site} sweep, {cells} cells, {prompts} prompt pair(s) of {prompt_len} tokens (one token differs):")
        print(f"  TransformerLens, one forward per cell (+ clean cache): {t['tl'] * 1e3:9.1f} ms")
        exact_ms = t["exact"] * 1e3
        print(f"  tinygpt exact batched sweep:                           {exact_ms:9.1f} ms  (|diff| vs TL {diff:.0e})")
        print(f"  tinygpt attribution_patch (AtP):                       {t['atp'] * 1e3:9.1f} ms")
        print(
            f"  AtP speed-up: {t['exact'] / t['atp']:.1f}x vs the exact batched sweep, {t['tl'] / t['atp']:.1f}x vs "
            f"TransformerLens; agreement with exact: Pearson {cmp.pearson:.3f}, Spearman {cmp.spearman:.3f}"
        )


def eap_part(model, prompt_len: int, prompts: int, rounds: int) -> None:
    """EAP and EAP-IG over every edge of the model's graph (helper `edges`), against a plain forward + backward of
    the same batch and against exact edge patching (one patched run per edge, tinygpt's batched faithfulness
    engine, timed on a sample of edges and scaled to all of them)."""
    from tinygpt.interp.circuits.edges import sender_stack
    from tinygpt.interp.circuits.faithfulness import patched_edges_run
    from tinygpt.interp.circuits.graph import edge_graph, edge_hooks

    cfg = model.cfg
    gen = torch.Generator().manual_seed(2)
    dev = model.W_E.device
    clean = torch.randint(0, cfg.d_vocab, (prompts, prompt_len), generator=gen).to(dev)
    corrupted = clean.clone()
    k = prompt_len // 3
    corrupted[:, k] = (clean[:, k] + 1) % cfg.d_vocab
    answers = dict(correct=11, incorrect=17)
    graph = edge_graph(model)
    sample = min(64, graph.n_edges)
    with torch.no_grad(), edge_hooks(model, ("use_attn_result",)):
        replacement = sender_stack(graph, model.run_with_cache(corrupted, names_filter=graph.sender_hooks())[1])
    idx = graph.mask.nonzero()[:sample]
    masks = torch.zeros(sample, *graph.mask.shape, dtype=torch.bool)
    masks[torch.arange(sample), idx[:, 0], idx[:, 1]] = True

    def metric(logits):
        return logit_diff(logits, 11, 17)

    def exact_sample():
        with edge_hooks(model):
            return patched_edges_run(model, graph, clean, replacement, masks, metric)

    def fwd_bwd():
        with torch.enable_grad():
            metric(model(corrupted)).backward()
        model.zero_grad(set_to_none=True)

    fns = {
        "eap": lambda: edge_attribution_patch(model, clean, corrupted, **answers),
        "eap-ig": lambda: edge_attribution_patch(
            model, clean, corrupted, method="eap-ig", steps=5, progress=False, **answers
        ),
        "fwd_bwd": fwd_bwd,
        "exact": exact_sample,
    }
    t, _ = interleaved(fns, rounds)
    exact_all = t["exact"] * graph.n_edges / sample
    print(f"\nEAP over every edge: {graph.n_edges} edges, {prompts} prompt pair(s) of {prompt_len} tokens:")
    print(f"  one plain forward + backward (reference):           {t['fwd_bwd'] * 1e3:9.1f} ms")
    print(f"  exact edge patching, one run per edge (batched):    {exact_all * 1e3:9.1f} ms  (from {sample} edges)")
    print(f"  edge_attribution_patch (EAP):                       {t['eap'] * 1e3:9.1f} ms")
    print(f"  edge_attribution_patch (EAP-IG, steps=5):           {t['eap-ig'] * 1e3:9.1f} ms")
    print(
        f"  EAP = {t['eap'] / t['fwd_bwd']:.1f}x a forward + backward, {exact_all / t['eap']:.0f}x faster than "
        f"exact edge patching; {t['eap']:.2f} s for every edge of this model"
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=24)
    p.add_argument("--prompts", type=int, default=2, help="clean/corrupted pairs in the batch")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset(args.preset)).to(args.device).eval()
    cfg = model.cfg
    print(
        f"model {args.preset}: {cfg.n_layers}L d{cfg.d_model} {cfg.n_heads}H, {model.n_params():,} params; "
        f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads"
    )
    atp_part(model, args.prompt_len, args.prompts, args.rounds)
    eap_part(model, args.prompt_len, args.prompts, args.rounds)  # helper `edges`


if __name__ == "__main__":
    main()
