"""`tinygpt es`: evolution strategies on a .tinygpt model (gradient-free; see `tinygpt.es`).

    tinygpt es tiny.tinygpt --corpus FILE --steps 50 --population 40 --sigma 0.02 --lr 0.01 --out tiny-es.tinygpt
    tinygpt es tiny.tinygpt --word-list words.txt --prompt "ROMEO:" --samples 8 --tokens 48 \\
        --sigma 0.01 --lr 0.001 --population 16 --steps 40 --out tiny-words.tinygpt

The reward is the negative next-token loss on a batch of the corpus (default: the built-in Shakespeare), or,
with --word-list, the fraction of generated words (3+ letters) found in a word file.
"""

from __future__ import annotations

import argparse


def add_parsers(sub) -> None:
    """Register the `es` subcommand on an argparse subparsers object."""
    p = sub.add_parser("es", help="evolution strategies: optimise a .tinygpt model without gradients")
    p.add_argument("model", help="the .tinygpt file to start from")
    p.add_argument("--corpus", default=None, help="text file, directory or .jsonl (default: built-in Shakespeare)")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text")
    p.add_argument(
        "--word-list",
        default=None,
        help="reward generated text instead: the fraction of its words (3+ letters) found in this file of words",
    )
    p.add_argument(
        "--distinct", action="store_true", help="with --word-list: count each listed word once per text (no repeats)"
    )
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--population", type=int, default=40, help="members per step (even: antithetic pairs)")
    p.add_argument("--sigma", type=float, default=0.02, help="noise scale")
    p.add_argument("--lr", type=float, default=0.01, help="step size: θ += lr/(N·σ)·Σ F_i ε_i")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument(
        "--params", default=None, help="parameters to evolve: name patterns, e.g. 'blocks.*.mlp.*,ln_final.*' (all)"
    )
    p.add_argument("--batch", type=int, default=8, help="windows per step every member is scored on (loss reward)")
    p.add_argument("--ctx", type=int, default=None, help="window length (default: the model's n_ctx)")
    p.add_argument("--val-split", type=float, default=0.01)
    p.add_argument("--val-every", type=int, default=10, help="held-out loss every N steps (0: never)")
    p.add_argument("--prompt", action="append", default=None, help="generation prompt (repeatable; default newline)")
    p.add_argument("--samples", type=int, default=4, help="completions per prompt per member (text reward)")
    p.add_argument("--tokens", type=int, default=32, help="tokens per completion (text reward)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument(
        "--batched",
        default="auto",
        choices=["auto", "yes", "no"],
        help="vmap members through one forward (auto: on CUDA only; loss reward)",
    )
    p.add_argument("--member-batch", type=int, default=8, help="members per vmapped forward")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", required=True, help="the evolved model to write (.tinygpt)")
    p.add_argument("--no-progress", action="store_true")


def cmd_es(a: argparse.Namespace) -> int:
    from tinygpt.training.es import es, word_list_reward

    if a.word_list is not None and a.corpus is not None:
        raise ValueError("give either --corpus (loss reward) or --word-list (text reward), not both")
    if a.word_list is not None:
        objective = word_list_reward(a.word_list, distinct=a.distinct)
    elif a.corpus is not None and a.text_field != "text":
        from tinygpt.data import load_corpus

        objective = load_corpus(a.corpus, text_field=a.text_field)
    else:
        objective = a.corpus
    res = es(
        a.model,
        objective,
        a.steps,
        a.population,
        a.sigma,
        a.lr,
        weight_decay=a.weight_decay,
        params=a.params,
        batch_size=a.batch,
        ctx=a.ctx,
        val_split=a.val_split,
        val_every=a.val_every,
        prompts=a.prompt or ["\n"],
        samples=a.samples,
        max_new_tokens=a.tokens,
        temperature=a.temperature,
        top_k=a.top_k,
        batched={"auto": None, "yes": True, "no": False}[a.batched],
        member_batch=a.member_batch,
        seed=a.seed,
        out=a.out,
        device=a.device,
        progress=not a.no_progress,
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
    parts.append(f"{res.n_params:,} parameters evolved")
    parts.append(f"{res.elapsed:.1f}s")
    parts.append(f"saved {res.path}")
    print(("interrupted: " if res.interrupted else "done: ") + " | ".join(parts))
    return 130 if res.interrupted else 0


COMMANDS = {"es": cmd_es}
