"""Evolution strategies: gradient-free optimisation of a model's weights for any reward (Salimans et al. 2017).

    import tinygpt
    from tinygpt.training.es import es, word_list_reward

    model = tinygpt.load("tiny.tinygpt")
    res = es(model, "corpus.txt", steps=50, population=40, sigma=0.02, lr=0.01)     # reward = -loss on a batch
    res = es(model, word_list_reward(["love", "night", "king"]), steps=30, population=16,
             prompts="\\n", samples=4, max_new_tokens=32)                           # a non-differentiable reward
    res.figure()                                                                  # reward / loss per step

## Algorithm
At step t the population holds N members (N even) in antithetic pairs: for each pair j a Gaussian direction ε_j
(one standard-normal tensor per parameter tensor) gives the members θ + σ ε_j and θ − σ ε_j. Every member is
scored; the rewards R_i are replaced by their **centred ranks** F_i = rank(R_i) / (N − 1) − 0.5 (ranks 0..N−1,
ties share their average rank), which makes the update invariant to any monotone change of the reward and
immune to outliers. The update is

    θ ← θ + lr / (N σ) · Σ_i F_i ε_i        (ε_i = ±ε_j; optionally − lr · weight_decay · θ on matrices)

i.e. `lr / (N σ) · Σ_j (F_j+ − F_j−) ε_j`, plain SGD on the smoothed-objective gradient estimate.

Scale: since the centred ranks have variance 1/12, each weight moves by about `lr / (σ √(12 N))` (root mean
square) per step whatever the reward, and mostly in random directions (the estimate's signal-to-noise ratio is
about √(N / parameters)). Keep that well below the weights' own scale (≈ 0.02 at initialisation): `lr=0.01,
sigma=0.02, population=40` moves each weight by ≈ 0.023 per step, fine from a random initialisation but enough
to wreck a trained model in a few steps; fine-tuning a trained model wants e.g. `sigma=0.01, lr=0.001`
(≈ 0.007 per step at N = 16), or fewer parameters (`params=`).

## Noise from seeds
ε_j of parameter tensor k at step t is drawn from a `torch.Generator` seeded with a hash of (seed, t, j, k) (numpy
`SeedSequence`), on the parameter's device. The noise is never stored: it is drawn again for the update, one
tensor at a time, so ES needs one copy of the weights (the centre θ) and one member's noise, whatever N is
(the vmapped path holds `member_batch` members' weights at a time). The same seed gives the same run on the same
device.

## Exactness
A member is evaluated by writing `θ ± σ ε` into the parameters and, afterwards, **copying the saved centre back**
(`ESParams.perturbed`, a context manager that restores also on an exception or Ctrl-C). Subtracting the noise
again would not give the original bits back in floating point. Outside an evaluation the parameters are bitwise
the centre, so `es(..., lr=0)` leaves the model bitwise unchanged (tested).

## What is evaluated together
- Loss reward (a corpus, or a token stream): every member and the centre are scored on the **same** batch of
  windows, drawn per step as `train()` draws them (common random numbers: members differ only by their weights,
  so batch-to-batch noise does not drown their differences). With `batched=True` (the default on CUDA) a chunk of
  `member_batch` members runs as one forward through `torch.func.vmap` over stacked weights
  (`functional_call`; the model's own parameters are not touched). Measured on one H100 (population 40, whole ES
  steps including noise generation and the update): `nano` 8×128 140 → 343 member evaluations/s (vmap, 20 per
  forward), `tiny` 8×256 97 → 182 (8 per forward), `small` 8×256 56 → 136 (40), with the same losses to 4
  decimals. On the CPU the default is one member after another: measured on 2 cores, the vmapped forward was
  1.3-2x slower than the loop (`scaled_dot_product_attention` has no CPU batching rule, and batched matmuls of
  small matrices gain nothing). A model whose forward vmap cannot trace (e.g. data-dependent routing) falls back
  to the loop with a warning.
- Text reward (a callable): each member generates all its texts in one batched `generate` call (prompts ×
  `samples` rows with the KV cache), with the same sampling seed for every member of a step; members run one
  after another (a KV cache belongs to one set of weights). The callable scores each completion (the generated
  text without its prompt); a member's reward is the mean.

## The run
`es` takes the shared keyword tail of every training function (`tinygpt.training.settings`): `ESConfig` fields as
settings, and `config`, `out`, `resume`, `callbacks`, `device`, `progress`, `cache_dir`, `strategy`. `out` is
written every `save_every` steps and at the end (also after an interrupt); `resume=True` continues the run saved
there exactly (noise, batches and sampling seeds are functions of (seed, step), and the file holds the centre
bitwise). ES runs in one process: `strategy` is accepted for the shared signature and ignored, and `device=None`
leaves the model where it is.

## Layout
`tinygpt.training.es.params` (the search space: `ESParams`, `centered_ranks`, `noise_seed`),
`.rewards` (`word_list_reward`), `.objectives` (loss and text rewards), `.result` (`ESConfig`, `ESResult`).

## Which parameters
By default every parameter with `requires_grad=True`, so a model with LoRA adapters (`add_lora` freezes the base)
evolves only its adapters. `params="blocks.*.mlp.*,unembed.weight"` chooses by name (fnmatch patterns on
`model.named_parameters()` names). Fewer dimensions give ES a less noisy gradient estimate.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from tinygpt.checkpoint import CheckpointError, as_model, load, read_checkpoint, save
from tinygpt.inputs import model_device, progress_enabled
from tinygpt.training.es.objectives import LossObjective, TextObjective
from tinygpt.training.es.params import ESParams, centered_ranks, noise_seed, select_parameters
from tinygpt.training.es.result import ESConfig, ESResult
from tinygpt.training.es.rewards import Reward, word_list_reward, words_of
from tinygpt.training.logline import LogLines
from tinygpt.training.run import check_run_output, corpus_from_record, warn_changed
from tinygpt.training.settings import RunOptions, SettingError, given, make_config


def es(
    model: Any,
    objective: Reward | Any = None,
    steps: int | None = None,
    population: int | None = None,
    sigma: float | None = None,
    lr: float | None = None,
    **options: Any,
) -> ESResult:
    """Optimise a model's weights with antithetic evolution strategies (see the module docstring).

    Args:
        model: a `GPT`, or a `.tinygpt` path (loaded). Updated in place. Ignored with `resume=True`.
        objective: what to maximise: a callable `reward(text) -> float` scored on generated completions
            (non-differentiable rewards welcome), or data whose negative next-token loss is the reward: a corpus
            path (text file, directory, .jsonl), a `Corpus`, None (the built-in Shakespeare; on resume, the run's
            corpus) or a 1-D token tensor / array.
        steps, population, sigma, lr: ES steps (default 50), members per step (even; default 40), noise scale
            (default 0.02) and step size (default 0.01); None keeps `config`'s value or the default.
        **options: the shared keyword tail: `ESConfig` fields (`params`, `weight_decay`, `batch_size`, `ctx`,
            `val_every`, `prompts`, `samples`, `max_new_tokens`, `temperature`, `batched`, `member_batch`,
            `save_every`, `seed`) and the run options `config` (an `ESConfig`), `out` (the evolved model,
            `.tinygpt`, with the run in its train state), `resume` (continue the run saved in `out`),
            `callbacks` (called with each step's history dict; raising KeyboardInterrupt stops the run cleanly),
            `device` (move the model there first; default: leave it where it is), `progress`, `cache_dir` (token
            cache, loss objective), `strategy` (ignored: ES runs in one process).
    Returns:
        `ESResult` (`.history`, `.rewards`, `.losses`, `.figure()`).
    """
    opts, settings = RunOptions.split(options, what="es", settings=ESConfig, own=("steps", "population", "sigma", "lr"))
    explicit = {**given(steps=steps, population=population, sigma=sigma, lr=lr), **settings}
    out = Path(opts.out) if opts.out is not None else None
    inputs = [model] if isinstance(model, (str, os.PathLike)) else []
    check_run_output(out, overwrite=opts.overwrite, resume=opts.resume, inputs=inputs)  # before any work
    history: list[dict[str, float]] = []
    if opts.resume:
        model, cfg, history, saved_corpus = _resume(out, opts.config, explicit)
        if objective is None:
            if saved_corpus is None:
                raise SettingError("the run's objective was a reward function or tokens in memory; pass it to resume")
            objective = corpus_from_record(saved_corpus)
    else:
        cfg = make_config(ESConfig, opts.config, explicit)
        model = as_model(model)
    if opts.device is not None:
        model.to(opts.device)
    progress = progress_enabled(opts.progress)
    dev = model_device(model)
    if callable(objective) and not isinstance(objective, torch.nn.Module):
        obj: Any = TextObjective(model, objective, cfg)
    else:
        obj = LossObjective(model, objective, cfg, opts.cache_dir, progress)
    obj.device = dev
    space = ESParams(model, cfg.params, cfg.seed)
    batched = (dev.type == "cuda") if cfg.batched is None else bool(cfg.batched)
    batched = batched and obj.kind == "loss"
    n = cfg.population
    model.eval()  # no dropout while members are compared; left in eval mode, as train() leaves it
    t0 = time.perf_counter()
    interrupted = False
    rate = ("evals_per_sec", "evals/s")
    lines = LogLines(cfg.log_every, cfg.steps, progress=progress, rate=rate, start_step=len(history))
    bar = tqdm(total=cfg.steps, initial=len(history), desc="es", disable=not lines.bar, dynamic_ncols=True)

    def score_members(step: int, data: Any) -> list[float]:
        nonlocal batched
        if batched:
            try:
                stacked: list[float] = []
                for i in range(0, n, cfg.member_batch):
                    members = list(range(i, min(n, i + cfg.member_batch)))
                    stacked.extend(obj.score_stacked(model, space.stacked(step, members, cfg.sigma), data))
                return stacked
            except (RuntimeError, NotImplementedError, ValueError) as e:
                warnings.warn(
                    f"ES could not vmap this model's forward ({type(e).__name__}: {str(e)[:200]}); "
                    "evaluating members one after another",
                    stacklevel=3,
                )
                batched = False
        scores = []
        for m in range(n):
            with space.perturbed(step, m, cfg.sigma):
                scores.append(obj.score(model, data))
        return scores

    def checkpoint() -> Path | None:
        if out is None:
            return None
        model.train_state = {
            "es": {**cfg.to_dict(), "objective": obj.kind, "source": obj.source, "params_evolved": space.names},
            **obj.record,
            "step": len(history),
            "reward": history[-1]["reward"] if history else None,
            "history": history,
        }
        return save(model, out)

    try:
        for step in range(len(history), cfg.steps):
            t_step = time.perf_counter()
            data = obj.batch(step)
            centre = obj.score(model, data)
            rewards = np.asarray(score_members(step, data), dtype=np.float64)
            if not np.all(np.isfinite(rewards)):
                raise SettingError(f"non-finite rewards at step {step + 1}: {rewards[~np.isfinite(rewards)][:3]}")
            fitness = centered_ranks(rewards)
            norm = space.update(step, fitness, cfg.sigma, cfg.lr, cfg.weight_decay)
            dt = time.perf_counter() - t_step
            rec: dict[str, float] = {
                "step": step + 1,
                "reward": centre,
                "pop_mean": float(rewards.mean()),
                "pop_std": float(rewards.std()),
                "pop_max": float(rewards.max()),
                "pop_min": float(rewards.min()),
                "update_norm": norm,
                "update_rms": norm / math.sqrt(max(1, space.numel)),
                "evals_per_sec": (n + 1) / dt if dt > 0 else float("nan"),
                "elapsed": time.perf_counter() - t0,
            }
            if obj.kind == "loss":
                rec["loss"] = -centre
                if cfg.val_every and ((step + 1) % cfg.val_every == 0 or step + 1 == cfg.steps):
                    v = obj.val_loss(model)
                    if v is not None:
                        rec["val_loss"] = v
            history.append(rec)
            shown = f"loss {-centre:.3f}" if obj.kind == "loss" else f"reward {centre:.3f}"
            bar.set_postfix_str(f"{shown} | pop {rec['pop_mean']:.3f} | {rec['evals_per_sec']:.1f} evals/s")
            bar.update(1)
            lines.update(rec, step_time=dt, units=n + 1, write=bar.write if lines.bar else None)
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
                checkpoint()
            for cb in opts.callbacks:
                cb(rec)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
        space.restore()  # the centre, bitwise (after an interrupt too)
    res = ESResult(
        model,
        cfg,
        history,
        elapsed=time.perf_counter() - t0,
        interrupted=interrupted,
        objective=obj.kind,
        n_params=space.numel,
    )
    if not interrupted:
        res.final_reward = obj.score(model, obj.batch(len(history)))
        if obj.kind == "reward":
            res.samples = list(obj.last_texts)
    res.path = checkpoint()
    return res


def _resume(
    out: Path | None, config: ESConfig | None, explicit: dict[str, Any]
) -> tuple[Any, ESConfig, list[dict[str, float]], Any]:
    """The model, settings (the saved ones, overridden by those given), history and corpus record of an ES run."""
    if out is None:
        raise SettingError("resume=True needs out= (the evolved model to continue)")
    if not out.exists():
        raise CheckpointError(f"cannot resume: {out} does not exist (drop --resume to start a new run)")
    ckpt = read_checkpoint(out)
    state = ckpt.train_state
    if not isinstance(state.get("es"), dict):
        raise CheckpointError(f"cannot resume es from {out}: it was not written by es() (no 'es' record)")
    saved = ESConfig.from_record(state["es"])
    cfg = dataclasses.replace(saved, **{**(dataclasses.asdict(config) if config else {}), **explicit})
    warn_changed(saved, cfg, explicit)
    return load(ckpt), cfg, list(state.get("history", [])), state.get("corpus")


__all__ = [
    "ESConfig",
    "ESParams",
    "ESResult",
    "Reward",
    "centered_ranks",
    "es",
    "noise_seed",
    "select_parameters",
    "word_list_reward",
    "words_of",
]
