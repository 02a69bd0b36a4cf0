"""`tinygpt sft`, `tinygpt finetune` and `tinygpt magpie`.

    tinygpt sft base.tinygpt --data data/sft_small.jsonl --template chatml --steps 300 --out chat.tinygpt
    tinygpt sft base.tinygpt --data FILE.jsonl --min-length 20 --max-repetition 0.5 --near-dedup 0.8 --packing \\
        --out chat.tinygpt
    tinygpt sft base.tinygpt --out chat.tinygpt --steps 600 --resume          # data and template from the run
    tinygpt finetune base.tinygpt --corpus sonnets.txt --steps 300 --out sonnets.tinygpt
    tinygpt magpie chat.tinygpt --count 500 --template chatml --temperature 0.9 --out magpie.jsonl
    tinygpt sft base.tinygpt --data magpie.jsonl --out chat2.tinygpt          # Magpie's output feeds sft

Training options left out keep the function's defaults (`SFT_DEFAULTS`, `FINETUNE_DEFAULTS`) or, with
--resume, the saved run's. Under torchrun, sft and finetune run data-parallel like `train` (--strategy).
"""

from __future__ import annotations

import argparse

from tinygpt.cli._command import CommandError, command, report
from tinygpt.cli._flags import (
    add,
    add_corpus_flags,
    add_device_flags,
    add_run_flags,
    add_training_flags,
    corpus_arg,
    given,
    progress,
    run_options,
)

# flag dest -> sft() keyword, for the data options (None: not given)
_SFT_FLAGS = {
    "template": "template",
    "packing": "packing",
    "min_length": "min_length",
    "max_repetition": "max_repetition",
    "dedup": "dedup",
    "near_dedup": "near_dedup",
    "train_on_prompt": "train_on_prompt",
}


def _training_tail(p: argparse.ArgumentParser, steps: str) -> None:
    add_training_flags(p, steps=steps, max_lr="3e-4")
    add_run_flags(p, out="checkpoint to write (.tinygpt)")


def _sft_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the .tinygpt model to fine-tune (ignored with --resume)")
    p.add_argument("--data", default=None, help='JSONL: {"instruction", "response"} or {"messages": [...]} per line')
    add(p, "--template", help="chat template: chatml (default), alpaca, or a .json file")
    p.add_argument("--packing", action="store_true", default=None, help="pack conversations into rows (no padding)")
    p.add_argument("--min-length", type=int, default=None, help="drop replies shorter than this many characters")
    p.add_argument("--max-repetition", type=float, default=None, help="drop replies repeating more (e.g. 0.5)")
    p.add_argument("--no-dedup", dest="dedup", action="store_false", default=None, help="keep exact duplicates")
    p.add_argument("--near-dedup", type=float, default=None, help="drop near duplicates at this Jaccard (e.g. 0.8)")
    p.add_argument(
        "--train-on-prompt", action="store_true", default=None, help="loss on user/system turns too, not only replies"
    )
    _training_tail(p, "200")


@command("sft", "supervised fine-tuning on instruction/chat JSONL with a chat template", flags=_sft_flags)
def cmd_sft(a: argparse.Namespace) -> int:
    from tinygpt.training import sft

    if a.data is None and not a.resume:
        raise CommandError("--data is required (a .jsonl file of instruction/response or messages records)")
    res = sft(a.model, a.data, **given(a, _SFT_FLAGS), **run_options(a))
    extra = (f"template {res.template.name}", f"saved {res.path}")
    return report(res, ("loss",), extra, before=(f"data: {res.describe_data()}",))


def _finetune_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the .tinygpt model to fine-tune (ignored with --resume)")
    add_corpus_flags(p)
    _training_tail(p, "500")


@command("finetune", "continue next-token training of a .tinygpt model on new text", flags=_finetune_flags)
def cmd_finetune(a: argparse.Namespace) -> int:
    from tinygpt.training import finetune

    res = finetune(a.model, corpus_arg(a), **run_options(a))  # on resume the library checks it is the run's base
    return report(res, ("loss",), (f"saved {res.path}",))


def _magpie_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a chat .tinygpt file (after sft) or a local Hugging Face chat model directory")
    p.add_argument("--count", type=int, required=True, help="records to keep")
    add(p, "--template", default="chatml", help="the model's chat template (default chatml)")
    add(p, "--temperature", default=1.0, help="instruction sampling temperature (default 1)")
    add(p, "--top-p", default=1.0)
    add(p, "--top-k")
    p.add_argument("--response-temperature", type=float, default=0.0, help="response temperature (default 0: greedy)")
    p.add_argument("--response-top-p", type=float, default=1.0)
    p.add_argument("--response-top-k", type=int, default=None)
    p.add_argument("--max-instruction-tokens", type=int, default=128)
    p.add_argument("--max-response-tokens", type=int, default=256)
    p.add_argument("--system", default=None, help="system message in the pre-query prefix")
    add(p, "--seed", default=0, help="random seed (default 0)")
    add(p, "--batch", default=16, help="instructions sampled at once (default 16)")
    p.add_argument(
        "--max-attempts", type=int, default=None, help="instructions to try at most (default 4 x count + 16)"
    )
    add(p, "--out", help="JSONL to write (settings go to NAME.meta.json beside it)")
    add(p, "--overwrite")
    add_device_flags(p)


@command("magpie", "synthesise instruction data from a chat model's template (Magpie)", flags=_magpie_flags)
def cmd_magpie(a: argparse.Namespace) -> int:
    import warnings

    from tinygpt.training.magpie import STATUSES, magpie

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="magpie kept")  # reported below
        res = magpie(
            a.model,
            count=a.count,
            template=a.template,
            temperature=a.temperature,
            top_p=a.top_p,
            top_k=a.top_k,
            response_temperature=a.response_temperature,
            response_top_p=a.response_top_p,
            response_top_k=a.response_top_k,
            max_instruction_tokens=a.max_instruction_tokens,
            max_response_tokens=a.max_response_tokens,
            system=a.system,
            seed=a.seed,
            batch_size=a.batch,
            max_attempts=a.max_attempts,
            out=a.out,
            device=a.device,
            progress=progress(a),
        )
    s = res.stats
    dropped = ", ".join(f"{k} {s[k]}" for k in STATUSES)
    print(
        f"done: {s['kept']} records from {s['attempts']} attempts (dropped: {dropped}) | {res.elapsed:.1f}s | "
        f"saved {res.path} (settings in {res.meta_path})"
    )
    if s["kept"] < a.count:
        print(f"warning: only {s['kept']} of {a.count} records; raise --max-attempts or the token budgets")
    return 0 if s["kept"] else 1
