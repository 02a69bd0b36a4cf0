"""Quality A/B of the architectures at matched parameter count (or matched training FLOPs) on Shakespeare.

GPT-2-style (the default `GPTConfig`), Llama-style (rotary, RMSNorm, SwiGLU, grouped-query attention with half
the heads as key/value heads, no biases), differential attention, Mixture-of-Depths (capacity 0.125, every other
block), Mixture-of-Experts (top-2 of 4) and YOCO models of one preset, each trained with the same settings on the
built-in Shakespeare (byte tokenizer) for several seeds. Every model is then scored on the same held-out text
(`tinygpt.eval.evaluate(model, None)`: the last 1% of the corpus, every token scored once, the end `train()`
holds out) in bits per byte.

Matching: each configuration's `d_mlp` (per expert for MoE) is set so that its total parameter count
(`--match params`, default), its non-embedding parameter count (`--match nonemb`) or its training FLOPs per token
(`--match flops`: forward + backward counted by `torch.utils.flop_counter.FlopCounterMode` at the training
shape, so MoD's routed blocks and MoE's top-k count what they compute) is as close as possible to the GPT-2-style
model's. Same steps, batch and context for all, so matched FLOPs per token is matched total training FLOPs.

Prints the matched shapes, one line per run, then a markdown table (mean ± standard deviation over seeds of the
validation bpb, training wall time and tokens/s, plus CPU seconds, which a shared machine disturbs less), and
writes one plotly figure as HTML (and PNG when kaleido is installed).

    python benchmarks/ab.py                                         # nano, 300 steps, 3 seeds (CPU, ~6 min)
    python benchmarks/ab.py --steps 100 --seeds 2 --configs gpt2 llama
    python benchmarks/ab.py --match flops --out runs/ab_flops
    python benchmarks/ab.py --configs gpt2 gpt2+rope gpt2+swiglu     # single Llama knobs on the GPT-2 model
    python benchmarks/ab.py --preset tiny --steps 2000 --batch 32 --ctx 256 --device cuda   # a bigger machine

Measured (docs/validation.md, "A/B at matched parameters"; shared 2-core CPU, 1 thread, defaults): held-out bpb
gpt2 3.559 ± 0.004, llama 3.289 ± 0.022, diff-attn 3.709 ± 0.019, mod 3.595 ± 0.005, moe 3.571 ± 0.020, yoco
3.552 ± 0.010 (3 seeds); the Llama gain is the rotary embedding's (gpt2+rope 3.314 ± 0.021).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import tinygpt
from tinygpt.eval import evaluate


def llama_style(base: tinygpt.GPTConfig) -> dict:
    """The Llama recipe on `base`'s shape: rotary, RMSNorm, SwiGLU, GQA (n_heads / 2 KV heads), no biases."""
    return dict(
        positional_embedding_type="rotary",
        normalization_type="RMS",
        gated_mlp=True,
        act_fn="silu",
        n_key_value_heads=max(1, base.n_heads // 2),
        bias=False,
    )


CONFIGS = {  # name -> GPTConfig overrides (a function of the base config where the shape matters)
    "gpt2": lambda b: {},
    "llama": llama_style,
    "diff-attn": lambda b: {"diff_attn": True},
    "mod": lambda b: {"mod": True, "mod_capacity": 0.125, "mod_every": 2},
    "moe": lambda b: {"moe_experts": 4, "moe_topk": 2},
    "yoco": lambda b: {"yoco": True, "yoco_window": max(1, b.n_ctx // 4)},
    # single Llama knobs on the GPT-2 model (not in the default set): which of them makes the difference
    "gpt2+rope": lambda b: {"positional_embedding_type": "rotary"},
    "gpt2+swiglu": lambda b: {"gated_mlp": True, "act_fn": "silu"},
}
DEFAULT_CONFIGS = ["gpt2", "llama", "diff-attn", "mod", "moe", "yoco"]
EMBEDDINGS = ("embed.", "pos_embed.")


def n_params(cfg: tinygpt.GPTConfig, nonemb: bool = False) -> int:
    """Parameters of a model built from `cfg` (without the token and position embeddings when `nonemb`)."""
    if not nonemb:
        return cfg.n_params()
    with torch.device("meta"):
        model = tinygpt.GPT(cfg)
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith(EMBEDDINGS))


def train_flops_per_token(cfg: tinygpt.GPTConfig, ctx: int, batch: int = 2) -> float:
    """Forward + backward FLOPs per token of a training step at context `ctx` (counted, not estimated)."""
    torch.manual_seed(0)
    model = tinygpt.GPT(cfg).train()
    x = torch.randint(0, cfg.d_vocab, (batch, ctx))
    with FlopCounterMode(display=False) as counter:
        model(x, return_type="loss").backward()
    return counter.get_total_flops() / x.numel()


def match_d_mlp(cfg: tinygpt.GPTConfig, target: float, measure) -> tuple[tinygpt.GPTConfig, float]:
    """The `cfg` whose `d_mlp` makes `measure(cfg)` (increasing in d_mlp) closest to `target` (bisection)."""
    lo, hi = 1, 16 * cfg.d_model
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if measure(cfg.replace(d_mlp=mid)) <= target:
            lo = mid
        else:
            hi = mid
    best = min((lo, hi), key=lambda d: (abs(measure(cfg.replace(d_mlp=d)) - target), d != cfg.d_mlp))
    if abs(measure(cfg) - target) <= abs(measure(cfg.replace(d_mlp=best)) - target):
        best = cfg.d_mlp  # the preset's own width when it is already as close
    out = cfg.replace(d_mlp=best)
    return out, measure(out)


def matched_configs(base: tinygpt.GPTConfig, names: list[str], match: str, ctx: int) -> dict[str, dict]:
    """name -> {"cfg", "overrides", "params", "nonemb", "flops"} with d_mlp matched to the GPT-2-style model."""

    def measure(c):
        if match == "flops":
            return train_flops_per_token(c, ctx)
        return n_params(c, nonemb=match == "nonemb")

    target = measure(base)
    out = {}
    for name in names:
        overrides = CONFIGS[name](base)
        cfg = base.replace(**overrides)
        if name != "gpt2":
            cfg, _ = match_d_mlp(cfg, target, measure)
        out[name] = {
            "cfg": cfg,
            "overrides": {**overrides, "d_mlp": cfg.d_mlp},
            "params": n_params(cfg),
            "nonemb": n_params(cfg, nonemb=True),
            "flops": train_flops_per_token(cfg, ctx),
        }
    return out


def run_one(name: str, spec: dict, seed: int, a: argparse.Namespace, size: dict) -> dict:
    """Train one configuration with one seed; its held-out bpb, wall / CPU time and tokens/s."""
    t, c = time.perf_counter(), time.process_time()
    res = tinygpt.train(
        corpus=None,
        preset=a.preset,
        model_config={**size, **spec["overrides"]},
        steps=a.steps,
        batch_size=a.batch,
        ctx=a.ctx,
        max_lr=a.lr,
        warmup=a.warmup,
        val_every=0,
        seed=seed,
        device=a.device,
        dtype=a.dtype,
        progress=False,
        log_every=0,
    )
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    ev = evaluate(res.model, None, ctx=a.ctx, batch_size=16, max_chars=a.eval_chars, progress=False)
    return {
        "config": name,
        "seed": seed,
        "bpb": ev.bpb,
        "val_loss": ev.loss,
        "train_loss": statistics.fmean(h["loss"] for h in res.history[-10:]),
        "wall_s": wall,
        "cpu_s": cpu,
        "tok_s": a.steps * a.batch * a.ctx / wall,
        "eval_tokens": ev.n_tokens if hasattr(ev, "n_tokens") else None,
    }


def mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan"))


def summarize(rows: list[dict], specs: dict[str, dict]) -> list[dict]:
    out = []
    for name, spec in specs.items():
        rs = [r for r in rows if r["config"] == name]
        if not rs:
            continue
        s = {"config": name, "d_mlp": spec["cfg"].d_mlp, "params": spec["params"], "nonemb": spec["nonemb"]}
        s["flops"] = spec["flops"]
        for k in ("bpb", "val_loss", "wall_s", "cpu_s", "tok_s"):
            s[k], s[k + "_sd"] = mean_sd([r[k] for r in rs])
        s["bpbs"] = [r["bpb"] for r in rs]
        out.append(s)
    return out


def markdown_table(summary: list[dict]) -> str:
    lines = [
        "| config | d_mlp | params | non-emb params | train MFLOP/token | val bpb (mean ± sd) | seeds' bpb "
        "| wall s / run | tokens/s | CPU s / run |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for s in summary:
        lines.append(
            f"| {s['config']} | {s['d_mlp']} | {s['params']:,} | {s['nonemb']:,} | {s['flops'] / 1e6:.3f} "
            f"| {s['bpb']:.4f} ± {s['bpb_sd']:.4f} | {', '.join(f'{b:.4f}' for b in s['bpbs'])} "
            f"| {s['wall_s']:.0f} ± {s['wall_s_sd']:.0f} | {s['tok_s']:,.0f} | {s['cpu_s']:.1f} |"
        )
    return "\n".join(lines)


def figure(rows: list[dict], summary: list[dict], title: str):
    """Validation bpb per configuration (each seed a dot, mean ± sd) beside training tokens/s."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("held-out bits per byte (lower is better)", "tokens/s"))
    names = [s["config"] for s in summary]
    fig.add_trace(
        go.Scatter(
            x=names,
            y=[s["bpb"] for s in summary],
            error_y=dict(type="data", array=[0 if math.isnan(s["bpb_sd"]) else s["bpb_sd"] for s in summary]),
            mode="markers",
            marker=dict(size=14, symbol="line-ew-open", line=dict(width=3)),
            name="mean ± sd",
        ),
        row=1,
        col=1,
    )
    fig.add_trace(
        go.Scatter(
            x=[r["config"] for r in rows],
            y=[r["bpb"] for r in rows],
            mode="markers",
            marker=dict(size=7, opacity=0.6),
            text=[f"seed {r['seed']}" for r in rows],
            name="one seed",
        ),
        row=1,
        col=1,
    )
    fig.add_trace(
        go.Bar(
            x=names,
            y=[s["tok_s"] for s in summary],
            error_y=dict(type="data", array=[0 if math.isnan(s["tok_s_sd"]) else s["tok_s_sd"] for s in summary]),
            name="tokens/s",
            showlegend=False,
        ),
        row=1,
        col=2,
    )
    fig.update_layout(title=title, height=450, width=1000)
    return fig


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, choices=list(CONFIGS))
    ap.add_argument("--preset", default="nano")
    ap.add_argument("--n-layers", type=int, default=None, help="override the preset's n_layers")
    ap.add_argument("--d-model", type=int, default=None, help="override the preset's d_model (d_mlp = 4 d_model)")
    ap.add_argument("--n-heads", type=int, default=None, help="override the preset's n_heads")
    ap.add_argument("--match", default="params", choices=["params", "nonemb", "flops"])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--seeds", type=int, default=3, help="seeds SEED_START .. SEED_START + N - 1")
    ap.add_argument("--seed-start", type=int, default=0, help="first seed (run seeds as parallel processes)")
    ap.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="JSON",
        help="only merge the OUT.json files of "
        "runs of the same settings (e.g. one process per seed) into one table and plot",
    )
    ap.add_argument("--eval-chars", type=int, default=None, help="score only this many held-out characters")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest per core on a shared box)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--out", default="runs/ab", help="writes OUT.html, OUT.json (and OUT.png with kaleido)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    size = {k: v for k, v in (("n_layers", a.n_layers), ("d_model", a.d_model), ("n_heads", a.n_heads)) if v}
    base = tinygpt.GPTConfig.preset(a.preset, **size)
    if a.ctx > base.n_ctx:
        ap.error(f"--ctx {a.ctx} is longer than the preset's n_ctx {base.n_ctx}")
    names = ["gpt2"] + [n for n in a.configs if n != "gpt2"]  # the reference the others are matched to
    if a.merge:
        return merge(a.merge, Path(a.out))

    specs = matched_configs(base, names, a.match, a.ctx)
    seeds = range(a.seed_start, a.seed_start + a.seeds)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {a.device}; preset {a.preset} "
        f"({base.n_layers}L d{base.d_model} {base.n_heads}h ctx {base.n_ctx}), matched {a.match}; "
        f"{a.steps} steps x batch {a.batch} x ctx {a.ctx}, lr {a.lr}, warmup {a.warmup}, seeds {list(seeds)}"
    )
    for name, s in specs.items():
        print(
            f"  {name:<10} d_mlp {s['cfg'].d_mlp:>5}  params {s['params']:>10,}  non-embedding {s['nonemb']:>10,}  "
            f"train FLOPs/token {s['flops']:>12,.0f}"
        )
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: v for k, v in vars(a).items()}

    def save(rows, summary=None):  # after every run, so a run cut short leaves its results
        record = {"args": meta, "runs": rows, "summary": summary or summarize(rows, specs)}
        out.with_suffix(".json").write_text(json.dumps(record, indent=1, default=str))

    rows = []
    for seed in seeds:  # seed-major: a cut-short run still has every configuration
        for name in names:
            r = run_one(name, specs[name], seed, a, size)
            rows.append(r)
            print(
                f"  {name:<10} seed {seed}: bpb {r['bpb']:.4f}  val loss {r['val_loss']:.4f}  train loss "
                f"{r['train_loss']:.4f}  {r['wall_s']:.0f} s  {r['tok_s']:,.0f} tok/s  cpu {r['cpu_s']:.0f} s",
                flush=True,
            )
            save(rows)
    summary = summarize(rows, specs)
    save(rows, summary)
    report(rows, summary, out, f"A/B at matched {a.match}: {a.preset}, {a.steps} steps, {len(seeds)} seeds")


def merge(paths: list[str], out: Path) -> None:
    """One table and plot from several OUT.json files (the same settings, different seeds)."""
    records = [json.loads(Path(p).read_text()) for p in paths]
    rows = [r for rec in records for r in rec["runs"]]
    by_name = {s["config"]: s for s in records[0]["summary"]}  # the matched shapes, identical in every file
    specs = {
        n: {"cfg": argparse.Namespace(d_mlp=s["d_mlp"]), "params": s["params"], "nonemb": s["nonemb"],
            "flops": s["flops"]}
        for n, s in by_name.items()
    }  # fmt: skip
    summary = summarize(rows, specs)
    args = records[0]["args"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(
        json.dumps({"args": args, "merged": paths, "runs": rows, "summary": summary}, indent=1, default=str)
    )
    n_seeds = len({r["seed"] for r in rows})
    report(rows, summary, out, f"A/B at matched {args['match']}: {args['preset']}, {args['steps']} steps, "
           f"{n_seeds} seeds")  # fmt: skip


def report(rows: list[dict], summary: list[dict], out: Path, title: str) -> None:
    """Print the markdown table; write the figure as OUT.html (and OUT.png when kaleido is installed)."""
    print()
    print(markdown_table(summary))
    fig = figure(rows, summary, title)
    fig.write_html(out.with_suffix(".html"), include_plotlyjs="cdn")
    written = [out.with_suffix(".json"), out.with_suffix(".html")]
    try:
        import kaleido  # noqa: F401

        fig.write_image(out.with_suffix(".png"))
        written.append(out.with_suffix(".png"))
    except ImportError:
        print("(kaleido is not installed: no PNG)")
    print("wrote", ", ".join(map(str, written)))


if __name__ == "__main__":
    main()
