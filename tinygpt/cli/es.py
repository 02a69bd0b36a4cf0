"""`tinygpt es`: evolution strategies on a .tinygpt model (gradient-free; see `tinygpt.training.es`).

    tinygpt es tiny.tinygpt --corpus FILE --steps 50 --population 40 --sigma 0.02 --lr 0.01 --out tiny-es.tinygpt
    tinygpt es tiny.tinygpt --word-list words.txt --prompt "ROMEO:" --samples 8 --tokens 48 \\
        --sigma 0.01 --lr 0.001 --population 16 --steps 40 --out tiny-words.tinygpt

The reward is the negative next-token loss on a batch of the corpus (default: the built-in Shakespeare), or,
with --word-list, the fraction of generated words (3+ letters) found in a word file. Options left out keep
`ESConfig`'s defaults.
"""

from __future__ import annotations

import argparse

from tinygpt.cli._command import CommandError, command
from tinygpt.cli._flags import add, add_corpus_flags, add_device_flags, add_training_flags, corpus_arg, given, progress

# flag dest -> es() keyword (None: not given, ESConfig's default)
_ES_FLAGS = {
    "steps": "steps",
    "population": "population",
    "sigma": "sigma",
    "lr": "lr",
    "weight_decay": "weight_decay",
    "params": "params",
    "batch": "batch_size",
    "ctx": "ctx",
    "val_split": "val_split",
    "val_every": "val_every",
    "samples": "samples",
    "tokens": "max_new_tokens",
    "temperature": "temperature",
    "top_k": "top_k",
    "member_batch": "member_batch",
    "seed": "seed",
    "log_every": "log_every",
}


def _es_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the .tinygpt file to start from")
    add_corpus_flags(p)
    p.add_argument(
        "--word-list",
        default=None,
        help="reward generated text instead: the fraction of its words (3+ letters) found in this file of words",
    )
    p.add_argument(
        "--distinct", action="store_true", help="with --word-list: count each listed word once per text (no repeats)"
    )
    p.add_argument("--population", type=int, default=None, help="members per step (even: antithetic pairs; 40)")
    p.add_argument("--sigma", type=float, default=None, help="noise scale (default 0.02)")
    add(p, "--lr", help="step size: θ += lr/(N·σ)·Σ F_i ε_i (default 0.01)")
    p.add_argument(
        "--params", default=None, help="parameters to evolve: name patterns, e.g. 'blocks.*.mlp.*,ln_final.*' (all)"
    )
    add_training_flags(
        p,
        only=("steps", "weight_decay", "batch", "ctx", "val_split", "val_every", "seed", "log_every"),
        steps="50",
        weight_decay="0",
        batch="8; the windows every member is scored on",
        val_every="10",
        seed="0",
    )
    add(p, "--prompt", action="append", default=None, help="generation prompt (repeatable; default newline)")
    p.add_argument("--samples", type=int, default=None, help="completions per prompt per member (text reward; 4)")
    add(p, "--tokens", default=None, help="tokens per completion (text reward; default 32)")
    add(p, "--temperature", help="sampling temperature (default 1)")
    add(p, "--top-k")
    p.add_argument(
        "--batched",
        default="auto",
        choices=["auto", "yes", "no"],
        help="vmap members through one forward (auto: on CUDA only; loss reward)",
    )
    p.add_argument("--member-batch", type=int, default=None, help="members per vmapped forward (default 8)")
    add(p, "--out", help="the evolved model to write (.tinygpt)")
    add(p, "--overwrite")
    add_device_flags(p, device="cpu")


@command("es", "evolution strategies: optimise a .tinygpt model without gradients", flags=_es_flags)
def cmd_es(a: argparse.Namespace) -> int:
    from tinygpt.training.es import es, word_list_reward

    if a.word_list is not None and a.corpus is not None:
        raise CommandError("give either --corpus (loss reward) or --word-list (text reward), not both")
    objective = word_list_reward(a.word_list, distinct=a.distinct) if a.word_list is not None else corpus_arg(a)
    res = es(
        a.model,
        objective,
        prompts=a.prompt or ["\n"],
        batched={"auto": None, "yes": True, "no": False}[a.batched],
        out=a.out,
        overwrite=a.overwrite,
        device=a.device,
        progress=progress(a),
        **given(a, _ES_FLAGS),
    )
    parts = [f"step {res.step}"]
    if res.history:
        h0, h1 = res.history[0], res.history[-1]
        if res.objective == "loss":
            parts.append(f"loss {h0['loss']:.3f} -> {h1['loss']:.3f}")
        else:
            end = res.final_reward if res.final_reward is not None else h1["reward"]
            parts.append(f"reward {h0['reward']:.3f} -> {end:.3f}")
    if res.final_val_loss is not None:
        parts.append(f"val loss {res.final_val_loss:.3f}")
    parts += [f"{res.n_params:,} parameters evolved", f"{res.elapsed:.1f}s", f"saved {res.path}"]
    print(("interrupted: " if res.interrupted else "done: ") + " | ".join(parts))
    return 130 if res.interrupted else 0
