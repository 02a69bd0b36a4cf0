"""Next-token training on a corpus: `train` (a new or given model) and `finetune` (continue an existing one).

    import tinygpt
    res = tinygpt.train(preset="tiny", steps=300, out="tiny.tinygpt")            # built-in Shakespeare, bytes
    res = tinygpt.train(tinygpt.GPT(cfg), "corpus.txt", steps=200, max_lr=1e-3)  # a model and a corpus
    res = tinygpt.finetune("tiny.tinygpt", "new_text.txt", steps=100, out="tiny-ft.tinygpt")
    res.figure()                                                                  # loss, val loss, lr

Both are `tinygpt.training.loop.fit` over `TokenBatches` of the corpus, and take the shared keyword tail
(`tinygpt.training.settings`: `TrainConfig` fields and the run options `out`, `resume`, `callbacks`, `device`,
`progress`, `cache_dir`, `strategy`).
"""

from __future__ import annotations

import os
from typing import Any

from tinygpt.checkpoint import as_model
from tinygpt.config import PRESETS, GPTConfig
from tinygpt.io import same_file
from tinygpt.model import GPT
from tinygpt.tokenizer import Tokenizer, describe_tokenizer, load_tokenizer, vocab_mismatch
from tinygpt.training.loop import TrainResult, fit
from tinygpt.training.run import corpus_batches, start_run
from tinygpt.training.settings import RunOptions, SettingError

FINETUNE_DEFAULTS: dict[str, Any] = {"max_lr": 3e-4, "warmup": 20}


def train(
    model: GPT | str | os.PathLike | None = None,
    corpus: Any = None,
    tokenizer: Tokenizer | str | os.PathLike | None = None,
    *,
    preset: str | None = None,
    model_config: dict[str, Any] | None = None,
    **options: Any,
) -> TrainResult:
    """Train a GPT on a corpus.

    Args:
        model: a model to train (a `GPT` or a `.tinygpt` path); None builds `preset` sized for the tokenizer.
            Ignored with `resume=True`.
        corpus: a path (text file, directory, .jsonl), a `Corpus`, or None for the built-in Shakespeare (on
            resume: the run's).
        tokenizer: "byte" (default for a new model), a tokenizer.json path / directory, or an object.
        preset: preset name used when `model` is None (default "tiny"). On resume, a preset given must match the
            run's model (`SettingError` otherwise).
        model_config: `GPTConfig` overrides for a new model, e.g. `{"diff_attn": True, "n_layers": 6}`. On
            resume, values equal to the run's are accepted; a change is a `SettingError` naming both values.
        **options: the shared keyword tail (`tinygpt.training.settings`): `TrainConfig` fields (`steps=200,
            max_lr=1e-3, ...`) and the run options `config`, `out` (the `.tinygpt` checkpoint, written atomically
            every `save_every` steps and at the end), `resume` (continue from `out`: weights, optimizer, step,
            history; the saved settings are reused except those given), `callbacks` (called with each step's
            metrics: `step, loss, lr, grad_norm, tokens_per_sec, tokens_seen, elapsed`, plus `val_loss` when
            validated), `device`, `progress`, `cache_dir`, `strategy` (under torchrun: "ddp" or "fsdp").
    Returns:
        TrainResult with the model, the history and the checkpoint path.
    Raises:
        TrainingDiverged: the loss became NaN/inf (the last checkpoint is left untouched).
        UnknownSettingError: a keyword that is neither a setting nor a run option.
    """
    opts, settings = RunOptions.split(options, what="train", own=("tokenizer", "preset", "model_config"))
    run = start_run(opts, settings, what="train")
    cfg = run.config
    corpus = run.corpus(corpus)
    run.seed()
    if run.resumed is not None:
        model = run.resumed.model
        check_resumed_architecture(model.cfg, preset, model_config, run.out)
        if tokenizer is not None:  # the run's tokenizer is in its file; another one would change the data
            why = vocab_mismatch(load_tokenizer(tokenizer), model._require_tokenizer())
            if why:
                raise SettingError(
                    f"cannot resume {run.out} with tokenizer {tokenizer}: the run was tokenized with "
                    f"{describe_tokenizer(model._require_tokenizer())} ({why}); drop --tokenizer to continue it, or "
                    "start a new run in another file"
                )
    elif model is None:
        preset = preset or "tiny"
        tok = load_tokenizer(tokenizer)
        overrides = {"d_vocab": tok.vocab_size, **(model_config or {})}
        if cfg.ctx and cfg.ctx > GPTConfig.preset(preset).n_ctx:
            overrides["n_ctx"] = cfg.ctx
        model = GPT(GPTConfig.preset(preset, **overrides), tokenizer=tok)
    else:
        model = as_model(model)
        if tokenizer is not None:
            model.tokenizer = load_tokenizer(tokenizer)
    tok = model._require_tokenizer()
    if tok.vocab_size > model.cfg.d_vocab:
        raise SettingError(f"tokenizer has {tok.vocab_size} tokens but the model's d_vocab is {model.cfg.d_vocab}")
    batches, corpus_rec = corpus_batches(model, corpus, cfg, run=run)
    return fit(model, cfg, batches, **run.fit_options(), state={"corpus": corpus_rec})


def check_resumed_architecture(cfg: GPTConfig, preset: str | None, model_config: dict[str, Any] | None, out) -> None:
    """A resumed run keeps its model: a preset or architecture value given must equal the run's (repeating the
    command that started the run, plus `resume=True`, works); a change is refused naming old and new values."""
    wanted: dict[str, Any] = {}
    if preset is not None:
        GPTConfig.preset(preset)  # an unknown name: ConfigError with a did-you-mean
        wanted.update({k: v for k, v in PRESETS[preset].items() if k not in ("n_ctx", "d_vocab")})
    for k, v in (model_config or {}).items():
        if not hasattr(cfg, k):
            raise SettingError(f"model_config has no GPTConfig field {k!r}")
        wanted[k] = v
    changed = [f"{k} {getattr(cfg, k)!r} -> {v!r}" for k, v in wanted.items() if getattr(cfg, k) != v]
    if changed:
        what = f"preset {preset!r}" if preset is not None else "architecture"
        raise SettingError(
            f"cannot resume {out} with a different model ({what}: {', '.join(changed)}); the run's model is kept on "
            "resume: drop those flags, or start a new run in another file"
        )


def finetune(model: GPT | str | os.PathLike | None, corpus: Any = None, **options: Any) -> TrainResult:
    """Continue next-token training of an existing model on new text (all weights train).

    Args:
        model: a `GPT` (trained in place) or a `.tinygpt` path. With `resume=True` it may be None; a path given
            must be the run's base (`SettingError` otherwise).
        corpus: a text file, directory, `.jsonl` or `Corpus` (None: the built-in Shakespeare); on resume, the
            run's unless given.
        **options: the shared keyword tail, as for `train()`; the setting defaults are `train()`'s except
            `FINETUNE_DEFAULTS` (max_lr 3e-4, warmup 20).
    Returns:
        `TrainResult`; the checkpoint's training state records the base model's path under "finetune" (and
        keeps the model's SFT record, so a fine-tuned chat model still knows its template).
    """
    opts, settings = RunOptions.split(options, what="finetune")
    run = start_run(opts, settings, what="finetune", record="finetune", defaults=FINETUNE_DEFAULTS)
    if run.resumed is not None:
        check_resumed_base(model, run.record, run.out)
        model, rec, state = run.resumed.model, run.record, run.resumed.train_state
    else:
        base = str(model) if isinstance(model, (str, os.PathLike)) else getattr(model, "source_path", None)
        model = run.model(model)
        run.seed()
        state = model.train_state or {}
        rec = {"base": base, "base_step": state.get("step")}
    kept = {k: v for k, v in state.items() if k == "sft"}
    batches, corpus_rec = corpus_batches(model, run.corpus(corpus), run.config, run=run)
    res = fit(
        model,
        run.config,
        batches,
        **run.fit_options(),
        state={"corpus": corpus_rec, "finetune": rec, **kept},
        desc="finetune",
    )
    res.model.train_state.update({"finetune": rec, **kept})
    return res


def check_resumed_base(model: Any, record: dict[str, Any] | None, out) -> None:
    """On resume, a base model given (a path, or a GPT loaded from one) must be the one the run started from."""
    given = str(model) if isinstance(model, (str, os.PathLike)) else getattr(model, "source_path", None)
    base = (record or {}).get("base")
    if given is None or base is None:
        return
    if not same_file(given, base):
        raise SettingError(
            f"cannot resume {out}: that run fine-tunes {base}, not {given}; pass its base (or no model), or start "
            "a new run in another file"
        )


__all__ = ["FINETUNE_DEFAULTS", "check_resumed_architecture", "check_resumed_base", "finetune", "train"]
