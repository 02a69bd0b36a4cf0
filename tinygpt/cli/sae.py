"""`tinygpt sae`, `sae-eval`, `sae-export` and `sae-import`: sparse dictionaries from the command line.

tinygpt sae tiny.tinygpt --hook blocks.2.hook_resid_post --arch topk --k 32 --expansion 8 --tokens 2000000 \
    --out tiny-l2.sae                                        # trains, evaluates, prints EV | L0 | dead | loss rec.
tinygpt sae tiny.tinygpt --hook blocks.1.hook_resid_post --transcoder --arch relu --out tc.sae
tinygpt sae tiny.tinygpt --out tiny-l2.sae --resume          # after Ctrl-C: continues bit for bit
tinygpt sae tiny.tinygpt --hook blocks.1.hook_resid_post,blocks.2.hook_resid_post --expansion 4,8 --out saes/
tinygpt sae-eval tiny-l2.sae --model tiny.tinygpt [--corpus FILE]   # the evaluation table
tinygpt sae-export tiny-l2.sae --out tiny-l2-saelens/        # SAELens layout (cfg.json + sae_weights.safetensors)
tinygpt sae-import tiny-l2-saelens/ --model tiny.tinygpt --out back.sae

Thin layers over `tinygpt.dictionary` (`train_sae`, `evaluate_dictionary`, `export_saelens`, `import_saelens`).
Bad input (an unknown hook, k > d_sae, a dictionary for another model, an existing output without
--overwrite) is one line on stderr and exit code 2, before anything is written.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tinygpt.cli._command import CommandError, command
from tinygpt.cli._flags import add, add_corpus_flags, add_device_flags, corpus_arg, given, progress

# flag dest -> train_sae keyword, for the settings a --resume run takes from its files
_SETTINGS = {
    "hook": "hook",
    "out_hook": "out_hook",
    "arch": "arch",
    "k": "k",
    "expansion": "expansion",
    "d_sae": "d_sae",
    "batch": "batch_size",
    "ctx": "context",
    "lr": "lr",
    "l1_coef": "l1_coef",
    "l0_coef": "l0_coef",
    "aux_coef": "aux_coef",
    "dead_after": "dead_after",
    "b_dec_init": "b_dec_init",
    "val_split": "val_split",
    "seed": "seed",
}


def _list(kind: type):
    """An argparse type: one value or a comma-separated list of them (one dictionary per combination)."""

    def parse(text: str) -> Any:
        try:
            vals = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {kind.__name__} values separated by commas, got {text!r}"
            ) from None
        if not vals:
            raise argparse.ArgumentTypeError("give at least one value")
        return vals[0] if len(vals) == 1 else vals

    return parse


# ------------------------------------------------------------------------------------------------ sae
def _sae_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the .tinygpt file of the base model")
    p.add_argument("--hook", type=_list(str), default=None, help="hook(s) read (default blocks.2.hook_resid_post)")
    p.add_argument("--out-hook", type=_list(str), default=None, help="hook(s) written: a transcoder")
    p.add_argument(
        "--transcoder",
        action="store_true",
        help="a transcoder of block L's MLP (blocks.L.ln2.hook_normalized -> blocks.L.hook_mlp_out; L from --hook)",
    )
    p.add_argument("--skip", action="store_true", help="a transcoder with a linear skip connection")
    p.add_argument("--arch", type=_list(str), default=None, help="topk (default), batchtopk, jumprelu or relu")
    p.add_argument("--k", type=_list(int), default=None, help="active latents per token (default 32)")
    p.add_argument("--expansion", type=_list(float), default=None, help="d_sae = expansion * d_in (default 8)")
    p.add_argument("--d-sae", type=_list(int), default=None, help="number of latents (instead of --expansion)")
    add(p, "--tokens", default=None, help="training tokens (default 2,000,000; with --resume: extend the run)")
    add(p, "--batch", help="activations per step (default 1024)")
    add(p, "--ctx", help="tokens per window (default: the model's n_ctx)")
    add(p, "--lr", help="peak learning rate (default 2e-4 * sqrt(16384 / d_sae), at most 1e-3)")
    p.add_argument("--l1-coef", type=float, default=None, help="ReLU's L1 coefficient (default 5.0)")
    p.add_argument("--l0-coef", type=float, default=None, help="JumpReLU's L0 coefficient (default 0.1)")
    p.add_argument("--aux-coef", type=float, default=None, help="AuxK weight for TopK / BatchTopK (default 1.0)")
    p.add_argument("--dead-after", type=int, default=None, help="tokens without firing = dead (default 100,000)")
    p.add_argument("--b-dec-init", default=None, choices=["geometric_median", "mean", "zeros"], help="b_dec start")
    add(p, "--val-split", help="tail of the corpus held out for the evaluation (default 0.05)")
    p.add_argument("--eval-tokens", type=int, default=32_768, help="held-out tokens of the final evaluation")
    add(p, "--seed", help="initialisation, window order and shuffles (default 0)")
    add(p, "--save-every", help="also write the run's state every N steps (default: at the end and on Ctrl-C)")
    add_corpus_flags(p)
    add(p, "--out", help="the .sae file (one dictionary) or a directory (several)")
    add(p, "--overwrite", help="start a new run over existing files at --out (default: refuse; --resume continues)")
    add(p, "--resume", help="continue the run saved in --out with its own settings (--tokens may extend it)")
    add_device_flags(p, device="best available")


def _load_model(path: str, device: str | None):
    from tinygpt.checkpoint import load
    from tinygpt.training import default_device

    return load(path, device=device or default_device())


@command(
    "sae",
    "train sparse autoencoders or transcoders on a model's activations (TopK, BatchTopK, JumpReLU, ReLU)",
    flags=_sae_flags,
    description="Train sparse dictionaries on a hook point of a .tinygpt model (tinygpt.dictionary.train_sae), "
    "evaluate them on the held-out tail of the corpus and write .sae files pinned to the model. Lists "
    "(--hook a,b --expansion 4,8) train one dictionary per combination from one activation pass.",
)
def cmd_sae(a: argparse.Namespace) -> int:
    from tinygpt.dictionary import train_sae

    settings = given(a, _SETTINGS)
    if a.resume:
        extra = sorted("--" + k.replace("_", "-") for k in given(a, {d: d for d in _SETTINGS}))
        extra += [f for f, on in (("--transcoder", a.transcoder), ("--skip", a.skip)) if on]
        if extra:
            raise CommandError(
                f"--resume continues the run saved in {a.out} with its own settings; only --tokens may change "
                f"(given: {', '.join(extra)})"
            )
        if a.overwrite:
            raise CommandError("--resume continues the run in --out and --overwrite replaces it: give one of them")
    if a.tokens is not None and a.tokens < 1:
        raise CommandError(f"--tokens must be a positive integer, got {a.tokens}")
    model = _load_model(a.model, a.device)
    if not a.resume:
        settings.update(transcoder=a.transcoder, skip=a.skip)
    res = train_sae(
        model,
        corpus_arg(a, load=a.corpus is not None),
        tokens=a.tokens,
        eval_tokens=a.eval_tokens,
        out=a.out,
        resume=a.resume,
        overwrite=a.overwrite,
        save_every=a.save_every,
        progress=progress(a),
        **settings,
    )
    from tinygpt.dictionary.evaluate import dictionary_name

    for i, d in enumerate(res.dictionaries):
        if res.evals is not None:
            line = res.evals.summary(i)
        else:
            last = res.histories[i][-1] if res.histories[i] else {}
            line = f"explained variance {last.get('explained_variance', float('nan')):.3f} (last batch) | L0 " + (
                f"{last.get('l0', float('nan')):.1f}"
            )
        where = f" -> {res.paths[i]}" if res.paths else ""
        print(f"{dictionary_name(d)}: {line}{where}")
    state = "interrupted" if res.interrupted else "done"
    tail = "; continue with --resume" if res.interrupted and res.paths else ""
    print(f"{state}: step {res.step} | {res.tokens:,} tokens | {res.seconds:.1f}s{tail}")
    return 130 if res.interrupted else 0


# ------------------------------------------------------------------------------------------------ sae-eval
def _sae_eval_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "files",
        nargs="+",
        help="the .sae file(s) or SAELens directories to evaluate (a .tinygpt among them is the model)",
    )
    add(p, "--model", help="the base model (default: the model the dictionary was saved from)")
    add_corpus_flags(p)
    add(p, "--tokens", default=65_536, help="evaluation tokens (default 65,536)")
    add(p, "--ctx", help="window length (default: the model's n_ctx)")
    add(p, "--val-split", default=0.05, help="evaluate on this tail of the corpus, the part training held out")
    add(p, "--batch", default=8, help="windows per forward (default 8)")
    add_device_flags(p, device="cpu")


def _is_dictionary(path: Path) -> bool:
    return path.suffix == ".sae" or (path.is_dir() and (path / "cfg.json").is_file())


@command(
    "sae-eval",
    "evaluate sparse dictionaries: explained variance, L0, dead/dense latents, loss recovered, KL",
    flags=_sae_eval_flags,
)
def cmd_sae_eval(a: argparse.Namespace) -> int:
    from tinygpt.dictionary import evaluate_dictionary, import_saelens, load_sae
    from tinygpt.dictionary.files import read_sae_file

    paths = [Path(f) for f in a.files]
    dicts = [p for p in paths if _is_dictionary(p)]
    models = [p for p in paths if not _is_dictionary(p)] + ([Path(a.model)] if a.model else [])
    if not dicts:
        raise CommandError("give at least one .sae file (or SAELens directory) to evaluate")
    if len(models) > 1:
        raise CommandError(f"give one base model, got {len(models)}: {', '.join(map(str, models))}")
    if not models:
        source = None
        if dicts[0].suffix == ".sae":
            source = ((read_sae_file(dicts[0])[0].get("base_model")) or {}).get("source")
        if not source:
            raise CommandError(f"{dicts[0]} does not name the model it was trained on: give --model MODEL.tinygpt")
        models = [Path(source)]
    model = _load_model(str(models[0]), a.device or "cpu")
    saes = [load_sae(p, model) if p.suffix == ".sae" else import_saelens(p, model) for p in dicts]
    ev = evaluate_dictionary(
        model,
        saes,
        corpus_arg(a, load=a.corpus is not None),
        tokens=a.tokens,
        context=a.ctx,
        val_split=a.val_split,
        batch=a.batch,
        progress=progress(a),
    )
    print(ev.table())
    print(f"({ev.tokens:,} tokens of {a.corpus or 'the built-in corpus'}, model {models[0]})")
    return 0


# ------------------------------------------------------------------------------------------------ export / import
def _export_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="the .sae file")
    add(p, "--out", help="the directory to write cfg.json and sae_weights.safetensors into")
    add(p, "--overwrite", help="replace the files of a non-empty --out directory")
    p.add_argument("--model-name", default=None, help="cfg.json's metadata.model_name (default: the model's file)")


@command(
    "sae-export", "write a .sae dictionary in SAELens' on-disk layout (normalisation folded in)", flags=_export_flags
)
def cmd_sae_export(a: argparse.Namespace) -> int:
    from tinygpt.dictionary import export_saelens, load_sae
    from tinygpt.dictionary.files import _saelens_arch

    sae = load_sae(a.file)
    arch = _saelens_arch(sae)  # a TopK transcoder has no SAELens architecture: refused before writing
    out = export_saelens(sae, a.out, model_name=a.model_name)
    print(f"wrote {out}/cfg.json and {out}/sae_weights.safetensors: {arch}, d_in {sae.d_in}, d_sae {sae.d_sae}")
    return 0


def _import_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", help="an SAELens directory (cfg.json + sae_weights.safetensors)")
    add(p, "--out", help="the .sae file to write")
    add(p, "--overwrite")
    add(p, "--model", help="the base model: hooks checked, and an unpinned dictionary pinned")
    p.add_argument("--hook", default=None, help="the hook to use when cfg.json's hook_name is not one of the model's")


@command("sae-import", "read an SAELens directory into a .sae file (pinned to --model)", flags=_import_flags)
def cmd_sae_import(a: argparse.Namespace) -> int:
    from tinygpt.checkpoint import load
    from tinygpt.dictionary import import_saelens, save_sae
    from tinygpt.dictionary.files import model_pin

    model = load(a.model, device="cpu") if a.model else None
    sae = import_saelens(a.directory, model, hook=a.hook)
    if model is not None and not (sae.base or {}).get("fingerprint"):
        sae.base = model_pin(model)
    path = save_sae(sae.cpu(), a.out)
    pin = (sae.base or {}).get("fingerprint")
    pinned = f"pinned to {pin[:12]}" if pin else "unpinned"
    print(f"wrote {path}: {sae.cfg.arch}, d_sae {sae.d_sae}, {sae.hook}, {pinned}")
    return 0
