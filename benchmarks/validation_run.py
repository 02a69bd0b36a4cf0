"""The architecture validation run: the `huge`-shaped model with differential attention and Mixture-of-Depths.

Trains a byte-level BPE tokenizer on the built-in Shakespeare, then the `huge` preset (12 layers, d_model 256,
8 heads, ctx 512) with `diff_attn=True, mod=True` (capacity 0.125, every other block routed) for `--steps`
steps with warmup, a cosine schedule, validation every `--val-every` steps and atomic saves; checks that the
loss has no NaN and no spike, reloads the checkpoint (logits must equal the trained model's) and samples from
it. Prints the loss table (steps 1, 50, 100 ... ), the wall time and the parameter count as markdown, for
docs/validation.md; `--json` also writes them to a file.

    python benchmarks/validation_run.py                          # cuda when available, 500 steps
    python benchmarks/validation_run.py --device cpu --steps 20 --batch 4 --vocab 1024   # a quick CPU check

The reference run at full size on the CPU (issue 17: the SmolLM2-sized output layer of 49,152 logits, bf16
weights with fp32 masters, batch 4 x accum 4 x 512). The built-in corpus yields at most a 29,658-token BPE
(every word of it is then one token), so the model's output layer is padded to 49,152 (`--d-vocab`): the
compute is the reference's, the ids above the tokenizer's are never targets.

    python benchmarks/validation_run.py --device cpu --vocab 49152 --d-vocab 49152 --batch 4 --accum 4 \
        --dtype bfloat16 --param-dtype bfloat16 --threads 2

The same run from the command line:

    tinygpt tokenizer --vocab-size 4096 --out runs/bpe4096
    tinygpt train --preset huge --diff-attn --mod --tokenizer runs/bpe4096 --steps 500 --batch 16 \\
        --warmup 50 --lr-schedule cosine --val-every 50 --save-every 100 --out runs/huge-diff-mod.tinygpt
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

import tinygpt


def _peak_rss_mib() -> float:
    """The process's peak resident memory so far (MiB; NaN where unknown)."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    except (ImportError, OSError):
        return float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per step (global batch: batch x accum)")
    ap.add_argument("--d-vocab", type=int, default=None, help="the model's output size (default: the tokenizer's)")
    ap.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16"], help="bf16 weights")
    ap.add_argument("--compile", action="store_true", help="torch.compile the forward")
    ap.add_argument("--log-every", type=int, default=None, help="plain progress lines (default: automatic)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary size")
    ap.add_argument("--max-lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--val-every", type=int, default=50)
    ap.add_argument("--table-every", type=int, default=50, help="loss table rows: step 1 and every N steps")
    ap.add_argument("--device", default=None, help="default: the best available")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: bf16 on cuda")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="checkpoint path (default: a temporary directory)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or tinygpt.default_device()
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    work = Path(tempfile.mkdtemp(prefix="tinygpt-validation-"))
    out = Path(args.out) if args.out else work / "huge-diff-mod.tinygpt"

    t0 = time.perf_counter()
    tok = tinygpt.train_bpe(None, args.vocab, out=work / "bpe", progress=False)
    t_tok = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = tinygpt.train(
        corpus=None,
        tokenizer=tok,
        preset="huge",
        model_config={"diff_attn": True, "mod": True, **({"d_vocab": args.d_vocab} if args.d_vocab else {})},
        steps=args.steps,
        batch_size=args.batch,
        accum=args.accum,
        param_dtype=args.param_dtype,
        compile=args.compile,
        log_every=args.log_every,
        ctx=args.ctx,
        max_lr=args.max_lr,
        min_lr=args.max_lr / 10,
        lr_schedule="cosine",
        warmup=args.warmup,
        val_every=args.val_every,
        save_every=100,
        sample_every=0,
        dtype=dtype,
        out=out,
        device=device,
    )
    wall = time.perf_counter() - t0

    losses = res.losses
    vals = dict(res.val_losses)
    finite = all(math.isfinite(x) for x in losses)
    # a spike: a step's loss more than 1.0 nat above the running minimum after warmup
    floor, spikes = float("inf"), []
    for i, x in enumerate(losses, 1):
        if i > args.warmup and x > floor + 1.0:
            spikes.append((i, x))
        floor = min(floor, x)
    reloaded = tinygpt.load(out, device=device)
    probe = torch.randint(0, tok.vocab_size, (1, 64), device=device)
    res.model.eval()
    with torch.no_grad():
        same = torch.allclose(res.model(probe).float(), reloaded(probe).float(), atol=1e-4, rtol=1e-4)
    sample = tinygpt.generate(reloaded, "ROMEO:", 60, seed=0, temperature=0.8, top_k=50)

    rows = [1] + list(range(args.table_every, args.steps + 1, args.table_every))
    table = [{"step": s, "loss": losses[s - 1], "val_loss": vals.get(s)} for s in rows if s <= len(losses)]
    n_params = sum(p.numel() for p in res.model.parameters())
    dev_name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    tokens = args.steps * args.batch * args.accum * args.ctx
    peak = _peak_rss_mib()
    print(
        f"\n## huge + diff_attn + mod, BPE {tok.vocab_size} (asked {args.vocab}), d_vocab {res.model.cfg.d_vocab}, "
        f"{args.steps} steps ({dev_name}, torch {torch.__version__}, {torch.get_num_threads()} threads)"
    )
    print(f"params {n_params:,}; batch {args.batch} x accum {args.accum} x ctx {args.ctx}; {dtype}, weights "
          f"{args.param_dtype}{', compiled' if args.compile else ''}; max_lr {args.max_lr}, warmup {args.warmup}, "
          f"cosine; tokenizer {t_tok:.1f} s; training wall time {wall:.1f} s ({tokens / wall:,.0f} tokens/s; "
          f"{wall / args.steps:.2f} s/step, 500 steps: {wall / args.steps * 500 / 60:.1f} min); peak RSS "
          f"{peak:,.0f} MiB")  # fmt: skip
    print("\n| step | train loss | val loss |\n|---:|---:|---:|")
    for r in table:
        v = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else ""
        print(f"| {r['step']} | {r['loss']:.4f} | {v} |")
    print(f"\nfinite losses: {finite}; spikes (> +1.0 nat over the running minimum after warmup): {spikes or 'none'}")
    print(f"checkpoint {out} reloads with equal logits: {same}")
    print(f"sample: {sample!r}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                dict(
                    device=dev_name,
                    torch=torch.__version__,
                    params=n_params,
                    wall_s=wall,
                    peak_rss_mib=peak,
                    tokenizer_vocab=tok.vocab_size,
                    tokenizer_s=t_tok,
                    settings=vars(args) | {"dtype": dtype, "device": device},
                    table=table,
                    losses=losses,
                    val_losses=res.val_losses,
                    finite=finite,
                    spikes=spikes,
                    reload_equal=same,
                    sample=sample,
                ),
                indent=1,
            )
        )
    return 0 if finite and not spikes and same else 1


if __name__ == "__main__":
    sys.exit(main())
