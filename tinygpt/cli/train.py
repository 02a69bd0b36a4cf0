"""`tinygpt train`, `sample`, `inspect` and `tokenizer`: the core commands.

tinygpt train --preset tiny --steps 300 --out tiny.tinygpt
tinygpt train --out tiny.tinygpt --steps 600 --resume        # only the flags given override the saved run
tinygpt sample tiny.tinygpt --prompt "ROMEO:" --tokens 200 --temperature 0.8 --seed 1
tinygpt inspect tiny.tinygpt
tinygpt tokenizer --corpus FILE --vocab-size 4096 --out tok/
"""

from __future__ import annotations

import argparse
import sys

from tinygpt.cli._command import CommandError, command, report
from tinygpt.cli._flags import (
    add,
    add_corpus_flags,
    add_device_flags,
    add_training_flags,
    corpus_arg,
    progress,
    training_settings,
)
from tinygpt.config import PRESETS

# flag dest -> GPTConfig field of a new model (None / False: not given)
_ARCH_FLAGS = (
    "attn_impl",
    "tie_embeddings",
    "dropout",
    "diff_attn",
    "mod",
    "mod_capacity",
    "mod_every",
    "moe_experts",
    "moe_topk",
    "yoco",
    "yoco_window",
)


def _train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset", default=None, choices=list(PRESETS), help="model size (default tiny; with --resume: the run's)"
    )
    add(p, "--tokenizer", help="'byte' (default) or a tokenizer.json / HF tokenizer directory")
    add_corpus_flags(p)
    add_training_flags(p, ctx="the preset's n_ctx")
    add(p, "--resume")
    add(p, "--out", required=False, help="checkpoint path (default: PRESET.tinygpt)")
    add(p, "--overwrite", help="start a new run over an existing --out (default: refuse; --resume continues it)")
    add(p, "--strategy")
    add_device_flags(p)
    arch = p.add_argument_group("architecture (GPTConfig knobs of a new model)")
    arch.add_argument("--attn-impl", default=None, help="auto, eager, sdpa, triton (our kernel; CUDA) or mps (Apple)")
    arch.add_argument("--tie-embeddings", action="store_true")
    add(arch, "--dropout")
    arch.add_argument("--diff-attn", action="store_true", help="differential attention (Ye et al. 2024)")
    arch.add_argument("--mod", action="store_true", help="mixture-of-depths routing (Raposo et al. 2024)")
    arch.add_argument("--mod-capacity", type=float, default=None, help="fraction of tokens a routed block takes")
    arch.add_argument("--mod-every", type=int, default=None, help="route every N-th block (default 2)")
    arch.add_argument("--moe-experts", type=int, default=None, help="mixture-of-experts: experts per layer")
    arch.add_argument("--moe-topk", type=int, default=None, help="experts per token")
    arch.add_argument("--yoco", action="store_true", help="you-only-cache-once decoder (Sun et al. 2024)")
    arch.add_argument("--yoco-window", type=int, default=None, help="sliding window of the self-decoder")
    # the models people study (Llama / Qwen2 / Mistral / GPT-NeoX knobs); see _knob_config
    arch.add_argument("--rope", action="store_true", help="rotary position embeddings instead of learned positions")
    arch.add_argument("--rope-theta", type=float, default=None, help="rotary base (HF rope_theta; default 10000)")
    arch.add_argument("--rotary-pct", type=float, default=None, help="fraction of each head rotary rotates (NeoX)")
    arch.add_argument("--norm", choices=("ln", "rms"), default=None, help="LayerNorm (default) or RMSNorm")
    arch.add_argument("--mlp", choices=("gelu", "swiglu", "geglu"), default=None, help="feed-forward (default gelu)")
    arch.add_argument("--kv-heads", type=int, default=None, help="key/value heads (grouped-query attention)")
    arch.add_argument("--no-bias", action="store_true", help="linear layers without biases (Llama)")
    arch.add_argument("--parallel-residual", action="store_true", help="attention and MLP in parallel (GPT-NeoX)")


def _model_config(a: argparse.Namespace) -> dict:
    """GPTConfig overrides from the architecture flags that were given."""
    # with --resume, train() accepts the values equal to the run's and refuses a change, naming both values
    given = {k: getattr(a, k) for k in _ARCH_FLAGS if getattr(a, k) is not None and getattr(a, k) is not False}
    return {**given, **_knob_config(a)}


_MLPS = {"gelu": {}, "swiglu": {"gated_mlp": True, "act_fn": "silu"}, "geglu": {"gated_mlp": True, "act_fn": "gelu"}}


def _knob_config(a: argparse.Namespace) -> dict:
    """GPTConfig fields of the Llama / NeoX flags that were given (--rope, --norm rms, --mlp swiglu, ...)."""
    out: dict = {}
    if a.rope:
        out["positional_embedding_type"] = "rotary"
    elif a.rope_theta is not None or a.rotary_pct is not None:
        raise CommandError("--rope-theta and --rotary-pct need --rope")
    if a.rope_theta is not None:
        out["rotary_base"] = a.rope_theta
    if a.rotary_pct is not None:
        if not 0 < a.rotary_pct <= 1:
            raise CommandError(f"--rotary-pct must be in (0, 1], got {a.rotary_pct}")
        if a.resume and a.preset is None:
            raise CommandError("--rotary-pct with --resume needs the run's --preset (it sets rotary_dim from d_head)")
        from tinygpt.config import GPTConfig

        d_head = GPTConfig.preset(a.preset or "tiny").d_head
        dim = int(d_head * a.rotary_pct)  # as GPT-NeoX / HF: int(head_dim * rotary_pct)
        if dim < 2 or dim % 2:
            raise CommandError(f"--rotary-pct {a.rotary_pct} gives {dim} of d_head={d_head} dims; it must be even")
        out["rotary_dim"] = dim if dim < d_head else None
    if a.norm is not None:
        out["normalization_type"] = a.norm.upper()
    if a.mlp is not None:
        out.update(_MLPS[a.mlp])
    if a.kv_heads is not None:
        out["n_key_value_heads"] = a.kv_heads
    if a.no_bias:
        out["bias"] = False
    if a.parallel_residual:
        out["parallel_attn_mlp"] = True
    return out


@command("train", "train a model (built-in Shakespeare and bytes by default)", flags=_train_flags)
def cmd_train(a: argparse.Namespace) -> int:
    from tinygpt.training import train

    # the training flags default to None: only those given reach train(), whose defaults (TrainConfig's) or,
    # with --resume, the saved run's settings stand for the rest
    res = train(
        corpus=corpus_arg(a),
        tokenizer=a.tokenizer,
        preset=a.preset,
        model_config=_model_config(a),
        out=a.out or f"{a.preset or 'tiny'}.tinygpt",
        overwrite=a.overwrite,
        resume=a.resume,
        device=a.device,
        progress=progress(a),
        strategy=a.strategy,
        **training_settings(a),
    )
    return report(res, ("loss",), (f"saved {res.path}",))  # under torchrun, rank 0 reports


def _sample_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("file")
    add(p, "--prompt")
    add(p, "--tokens")
    add(p, "--temperature", default=0.8, help="sampling temperature (default 0.8; 0: greedy)")
    add(p, "--top-k")
    add(p, "--top-p")
    add(p, "--seed", help="random seed (sample i uses seed + i)")
    p.add_argument("--num-samples", type=int, default=1, help="samples to print (>= 1)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context every token")
    add(p, "--device", help="cuda, mps or cpu (default: cpu)")


@command("sample", "generate text from a .tinygpt file", flags=_sample_flags)
def cmd_sample(a: argparse.Namespace) -> int:
    from tinygpt.checkpoint import load
    from tinygpt.sampling import stream

    if a.num_samples < 1:
        raise CommandError(f"--num-samples must be >= 1, got {a.num_samples}")
    if a.tokens < 0:
        raise CommandError(f"--tokens must be >= 0, got {a.tokens}")
    model = load(a.file, device=a.device)
    for i in range(a.num_samples):
        seed = None if a.seed is None else a.seed + i
        sys.stdout.write(a.prompt)
        pieces = stream(
            model,
            a.prompt,
            a.tokens,
            temperature=a.temperature,
            top_k=a.top_k,
            top_p=a.top_p,
            seed=seed,
            use_cache=not a.no_cache,
        )
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n" if a.num_samples == 1 else "\n---\n")
    return 0


def _inspect_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("file")


@command("inspect", "print config, tokenizer and every tensor of a .tinygpt file", flags=_inspect_flags)
def cmd_inspect(a: argparse.Namespace) -> int:
    from tinygpt.checkpoint import describe

    print(describe(a.file))
    return 0


def _tokenizer_flags(p: argparse.ArgumentParser) -> None:
    add(p, "--corpus", help="default: built-in Shakespeare")
    p.add_argument("--vocab-size", type=int, required=True)
    add(p, "--out", help="directory to write tokenizer.json into")
    add(p, "--overwrite", help="replace an existing tokenizer.json there")
    add(p, "--no-progress")


@command("tokenizer", "train a byte-level BPE tokenizer on a corpus", flags=_tokenizer_flags)
def cmd_tokenizer(a: argparse.Namespace) -> int:
    from tinygpt.data import train_bpe

    tok = train_bpe(a.corpus, a.vocab_size, out=a.out, overwrite=a.overwrite, progress=progress(a))
    print(f"trained BPE tokenizer, vocab {tok.vocab_size}, saved {tok.source}")
    return 0
