"""`train()`: next-token training as a plain function returning a `TrainResult`.

AdamW with weight-decay groups (fused where available), cosine or constant LR with warmup and a
minimum LR, gradient clipping and accumulation, fp32 or bf16 autocast, a validation split, atomic
checkpoints that resume exactly, sampling during training, and callbacks that receive each step's
metrics (the live dashboard uses them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tinygpt.checkpoint import CheckpointError, load, optimizer_state_dict, read_checkpoint, save
from tinygpt.config import GPTConfig
from tinygpt.data import (
    Corpus,
    CorpusError,
    TokenData,
    batch_starts,
    load_corpus,
    tokenize_corpus,
    val_starts,
    windows,
)
from tinygpt.model import GPT
from tinygpt.tokenizer import Tokenizer, load_tokenizer
from tinygpt.training import distributed


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint was kept."""


@dataclass
class TrainConfig:
    """Hyper-parameters of a run (saved in every checkpoint; `resume` reuses them).

    Attributes:
        steps: total optimizer steps of the run.
        batch_size: sequences per micro-batch.
        accum: micro-batches per optimizer step (gradient accumulation). The global batch is
            `batch_size × accum` sequences whatever the number of processes: under torchrun each of W
            processes takes `batch_size × accum / W` of them (see docs/distributed.md).
        ctx: sequence length (default: the model's n_ctx).
        max_lr, min_lr: peak and final learning rate (min_lr defaults to max_lr / 10).
        lr_schedule: "cosine" (warmup, then cosine decay to min_lr) or "constant" (warmup, then max_lr).
        warmup: linear warmup steps.
        weight_decay, betas, eps: AdamW; no decay on biases, LayerNorm and other 1-D parameters.
        grad_clip: max global gradient norm (0 disables).
        dtype: "float32" or "bfloat16" (autocast).
        val_split: fraction of the tokens held out for validation.
        val_every, val_batches: validate every N steps on `val_batches` fixed batches (0 disables).
        save_every: write the checkpoint every N steps (and at the end) when `out` is set.
        sample_every, sample_prompt, sample_tokens: print a sample every N steps.
        seed: seeds initialisation, batches and dropout.
    """

    steps: int = 500
    batch_size: int = 8
    accum: int = 1
    ctx: int | None = None
    max_lr: float = 6e-4
    min_lr: float | None = None
    lr_schedule: str = "cosine"
    warmup: int = 50
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    dtype: str = "float32"
    val_split: float = 0.01
    val_every: int = 100
    val_batches: int = 8
    save_every: int = 0
    sample_every: int = 0
    sample_prompt: str = "\n"
    sample_tokens: int = 200
    seed: int = 1337

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        if self.min_lr is None:
            self.min_lr = self.max_lr / 10
        checks = {
            "steps": self.steps >= 1,
            "batch_size": self.batch_size >= 1,
            "accum": self.accum >= 1,
            "warmup": self.warmup >= 0,
            "max_lr": self.max_lr > 0,
            "min_lr": 0 <= self.min_lr <= self.max_lr,
            "grad_clip": self.grad_clip >= 0,
            "val_batches": self.val_batches >= 1,
            "ctx": self.ctx is None or self.ctx >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"invalid training setting {name}={getattr(self, name)!r}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")

    def lr_at(self, step: int) -> float:
        """Learning rate for optimizer step `step` (0-based)."""
        if step < self.warmup:
            return self.max_lr * (step + 1) / self.warmup
        if self.lr_schedule == "constant":
            return self.max_lr
        span = max(1, self.steps - self.warmup)
        ratio = min(1.0, (step - self.warmup) / span)
        return self.min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (self.max_lr - self.min_lr)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training setting(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


@dataclass
class TrainResult:
    """What `train()` returns: the model, the metric history and where it was saved."""

    model: GPT
    config: TrainConfig
    history: list[dict[str, float]] = field(default_factory=list)
    path: Path | None = None
    elapsed: float = 0.0
    interrupted: bool = False

    @property
    def step(self) -> int:
        return int(self.history[-1]["step"]) if self.history else 0

    @property
    def losses(self) -> list[float]:
        return [h["loss"] for h in self.history]

    @property
    def val_losses(self) -> list[tuple[int, float]]:
        return [(int(h["step"]), h["val_loss"]) for h in self.history if "val_loss" in h]

    @property
    def final_loss(self) -> float | None:
        return self.history[-1]["loss"] if self.history else None

    @property
    def final_val_loss(self) -> float | None:
        v = self.val_losses
        return v[-1][1] if v else None

    def figure(self):
        """Plotly figure: train loss, validation loss and learning rate against step."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        fig = make_subplots(specs=[[{"secondary_y": True}]])
        steps = [h["step"] for h in self.history]
        fig.add_trace(go.Scatter(x=steps, y=self.losses, name="train loss", mode="lines"))
        if self.val_losses:
            vs, vl = zip(*self.val_losses)
            fig.add_trace(go.Scatter(x=vs, y=vl, name="val loss", mode="lines+markers"))
        fig.add_trace(
            go.Scatter(x=steps, y=[h["lr"] for h in self.history], name="lr", line=dict(dash="dot")), secondary_y=True
        )
        fig.update_layout(title="training", xaxis_title="step", template="plotly_white")
        fig.update_yaxes(title_text="loss", secondary_y=False)
        fig.update_yaxes(title_text="learning rate", secondary_y=True)
        return fig

    def __repr__(self) -> str:
        v = f", val loss {self.final_val_loss:.3f}" if self.final_val_loss is not None else ""
        loss = f"loss {self.final_loss:.3f}" if self.final_loss is not None else "no steps"
        return f"TrainResult(step {self.step}, {loss}{v}, {self.elapsed:.1f}s, path={self.path})"


def default_device() -> str:
    """cuda, then mps, then cpu."""
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with decay on matrices and embeddings only; fused where the device supports it."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kw = dict(lr=cfg.max_lr, betas=cfg.betas, eps=cfg.eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **kw)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, **kw)


def train(
    model: GPT | None = None,
    corpus: Any = None,
    tokenizer: Tokenizer | str | os.PathLike | None = None,
    *,
    preset: str = "tiny",
    model_config: dict[str, Any] | None = None,
    config: TrainConfig | None = None,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    callbacks: Sequence[Callable[[dict[str, float]], Any]] = (),
    device: str | None = None,
    progress: bool = True,
    cache_dir: str | os.PathLike | None = None,
    strategy: str = "ddp",
    **settings: Any,
) -> TrainResult:
    """Train a GPT on a corpus.

    Args:
        model: a model to train; None builds `preset` sized for the tokenizer.
        corpus: a path (text file, directory, .jsonl) or None for the built-in Shakespeare.
        tokenizer: for a new model: "byte" (default), a tokenizer.json path / directory, or an object.
        preset: preset name used when `model` is None.
        model_config: `GPTConfig` overrides for a new model, e.g. `{"diff_attn": True, "n_layers": 6}`.
        config: a `TrainConfig`; keyword `settings` (e.g. `steps=200, max_lr=1e-3`) override fields.
        out: checkpoint path (`.tinygpt`), written atomically every `save_every` steps and at the end.
        resume: continue from `out` (weights, optimizer, step, history); the run's saved settings are
            reused except those given explicitly.
        callbacks: functions called with each step's metrics dict (`step, loss, lr, grad_norm,
            tokens_per_sec, tokens_seen, elapsed`, plus `val_loss` when validated).
        device: "cuda", "mps" or "cpu" (default: the best available).
        progress: show a progress bar.
        strategy: under torchrun, "ddp" (default) or "fsdp" (fully sharded); see `fit`.
    Returns:
        TrainResult with the model, the history and the checkpoint path.
    Raises:
        TrainingDiverged: the loss became NaN/inf (the last checkpoint is left untouched).
    """
    device = device or default_device()
    out = Path(out) if out is not None else None
    run = resume_run(out, config, settings) if resume else None
    if run is not None:
        cfg, model = run.config, run.model
        corpus = corpus if corpus is not None else _corpus_from_record(run.train_state.get("corpus"))
    else:
        cfg = dataclasses.replace(config, **settings) if config else TrainConfig(**settings)
    torch.manual_seed(cfg.seed)
    if model is None:
        tok = load_tokenizer(tokenizer)
        overrides = {"d_vocab": tok.vocab_size, **(model_config or {})}
        if cfg.ctx and cfg.ctx > GPTConfig.preset(preset).n_ctx:
            overrides["n_ctx"] = cfg.ctx
        model = GPT(GPTConfig.preset(preset, **overrides), tokenizer=tok)
    elif tokenizer is not None and run is None:
        model.tokenizer = load_tokenizer(tokenizer)
    tok = model._require_tokenizer()
    if tok.vocab_size > model.cfg.d_vocab:
        raise ValueError(f"tokenizer has {tok.vocab_size} tokens but the model's d_vocab is {model.cfg.d_vocab}")
    corpus_obj = load_corpus(corpus)
    data = tokenize_corpus(corpus_obj, tok, cache_dir=cache_dir, progress=progress)
    batches = TokenBatches(data, cfg, model.cfg.n_ctx)
    return fit(
        model,
        cfg,
        batches,
        out=out,
        run=run,
        callbacks=callbacks,
        device=device,
        progress=progress,
        state={"corpus": _corpus_record(corpus, corpus_obj)},
        strategy=strategy,
    )


def next_token_loss(model: GPT, batch: tuple[Tensor, ...]) -> Tensor:
    """The default objective: mean next-token cross-entropy of x -> y."""
    x, y = batch
    return model(x, return_type="loss", targets=y)


class TokenBatches:
    """Micro-batches of random windows of a token array, a pure function of (seed, step).

    Other objectives (distillation, SFT) supply their own object with the same two methods:
    `train(step) -> list of micro-batches` and `val() -> iterable of batches`; `train_shard(step, rank,
    world)` is optional (without it, data-parallel processes split `train(step)`'s micro-batches).
    """

    def __init__(self, data: TokenData, cfg: TrainConfig, n_ctx: int):
        ctx = cfg.ctx or n_ctx
        if ctx > n_ctx:
            raise ValueError(f"ctx={ctx} exceeds the model's n_ctx={n_ctx}")
        cfg.ctx = ctx
        self.cfg, self.ctx = cfg, ctx
        self.train_tokens, self.val_tokens = data.split(cfg.val_split)
        if len(self.train_tokens) <= ctx + 1:
            raise ValueError(
                f"the corpus has {len(self.train_tokens)} training tokens, too few for ctx={ctx}; lower --ctx"
            )
        self.has_val = cfg.val_every > 0 and cfg.val_split > 0
        self.v_starts = (
            val_starts(len(self.val_tokens), ctx, cfg.val_batches * cfg.batch_size) if self.has_val else None
        )
        self.device = None
        self.tokens_per_step = cfg.batch_size * cfg.accum * ctx

    def train(self, step: int) -> list[tuple[Tensor, Tensor]]:
        """The `accum` micro-batches (x, y) [batch_size, ctx] of optimizer step `step`."""
        return self.train_shard(step, 0, 1)

    def train_shard(self, step: int, rank: int, world: int) -> list[tuple[Tensor, Tensor]]:
        """Process `rank`'s share of step `step`'s global batch of `batch_size × accum` windows.

        The global batch's window starts are a pure function of (seed, step); process r takes the r-th of
        `world` contiguous slices and cuts it into micro-batches of at most `batch_size` windows.
        """
        b = self.cfg.batch_size
        total = b * self.cfg.accum
        if total % world:
            raise ValueError(
                f"the global batch of {total} sequences (batch {b} x accum {self.cfg.accum}) cannot be split "
                f"evenly across {world} processes; choose --batch and --accum with a product divisible by {world}"
            )
        n = total // world
        starts = batch_starts(len(self.train_tokens), self.ctx, total, self.cfg.seed, step)[rank * n : (rank + 1) * n]
        return [windows(self.train_tokens, starts[i : i + b], self.ctx, self.device) for i in range(0, n, b)]

    def val(self) -> Iterator[tuple[Tensor, Tensor]]:
        b = self.cfg.batch_size
        for i in range(0, len(self.v_starts), b):
            yield windows(self.val_tokens, self.v_starts[i : i + b], self.ctx, self.device)


@dataclass
class ResumedRun:
    """What `resume_run` recovers from a training checkpoint."""

    checkpoint: Any
    config: TrainConfig
    model: GPT
    step: int
    history: list[dict[str, float]]

    @property
    def train_state(self) -> dict[str, Any]:
        return self.checkpoint.train_state


def resume_run(out: Path | None, config: TrainConfig | None, settings: dict[str, Any]) -> ResumedRun:
    """Read a training checkpoint: its model, settings (overridden by those given), step and history."""
    if out is None:
        raise ValueError("resume=True needs out= (the checkpoint to continue)")
    if not out.exists():
        raise CheckpointError(f"cannot resume: {out} does not exist (drop --resume to start a new run)")
    ckpt = read_checkpoint(out)
    state = ckpt.train_state
    if "train_config" not in state:
        raise CheckpointError(f"cannot resume from {out}: it holds no training state")
    saved = TrainConfig.from_dict(state["train_config"])
    cfg = dataclasses.replace(saved, **{**(dataclasses.asdict(config) if config else {}), **settings})
    _warn_changed(saved, cfg, settings)
    return ResumedRun(ckpt, cfg, load(ckpt), int(state["step"]), list(state.get("history", [])))


def fit(
    model: GPT,
    cfg: TrainConfig,
    batches: Any,
    *,
    loss_fn: Callable[[GPT, tuple[Tensor, ...]], Tensor] = next_token_loss,
    val_loss_fn: Callable[[GPT, tuple[Tensor, ...]], Tensor] = next_token_loss,
    out: Path | None = None,
    run: ResumedRun | None = None,
    callbacks: Sequence[Callable[[dict[str, float]], Any]] = (),
    device: str = "cpu",
    progress: bool = True,
    state: dict[str, Any] | None = None,
    desc: str = "train",
    strategy: str = "ddp",
) -> TrainResult:
    """The training loop shared by `train`, distillation and fine-tuning.

    Under torchrun (WORLD_SIZE > 1) the same loop runs data-parallel on `torch.distributed` (see
    `tinygpt.distributed` and docs/distributed.md): every process takes its share of each step's global
    batch, gradients are averaged by DDP or FSDP, the logged loss and the validation loss are averaged over
    all processes (they equal a single-process run's up to floating-point reduction order), and rank 0 alone
    shows progress, prints samples, calls `callbacks` and writes the checkpoint.

    Args:
        model: the model to optimise (moved to `device`; sharded in place under FSDP).
        cfg: schedule, accumulation, clipping, validation, saving and sampling settings.
        batches: an object with `train(step) -> list of micro-batches`, `val() -> iterable of batches`,
            `has_val`, `tokens_per_step` and a settable `device` (see `TokenBatches`); optionally
            `train_shard(step, rank, world)` for this process's share of the global batch.
        loss_fn: `(model, micro_batch) -> scalar loss` to minimise (a mean over the micro-batch).
        val_loss_fn: the loss reported as `val_loss`.
        out: checkpoint path (atomic saves every `cfg.save_every` steps and at the end).
        run: a `ResumedRun` to continue (optimizer, RNG, step and history are restored).
        state: extra JSON-serialisable entries for the checkpoint's training state.
        strategy: under torchrun, "ddp" or "fsdp" (ignored in a single process).
    """
    from tqdm.auto import tqdm

    par = distributed.wrap_model(model, strategy, device=device, mixed_precision=cfg.dtype)
    device, main, rank, world = par.device, par.is_main, par.rank, par.world
    progress = progress and main
    batches.device = device
    history = list(run.history) if run else []
    start_step = run.step if run else 0
    opt = make_optimizer(model, cfg)
    if run is not None:
        par.load_optimizer(opt, optimizer_state_dict(run.checkpoint, type(opt).__name__))
        if "torch" in run.checkpoint.rng:
            torch.set_rng_state(run.checkpoint.rng["torch"])
    if rank:  # dropout differs across processes; rank 0 keeps the single-process stream
        torch.manual_seed((cfg.seed * 1_000_003 + rank * 7919 + start_step) % 2**63)
    autocast = (
        torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
        if cfg.dtype == "bfloat16"
        else contextlib.nullcontext()
    )
    tokens_per_step = batches.tokens_per_step
    train_model = par.train_model

    def checkpoint(step: int) -> None:
        if out is None:
            return
        weights, opt_state = par.full_state(opt)  # under FSDP every process gathers; rank 0 writes
        if not main:
            return
        last = history[-1] if history else {}
        train_state = {
            "step": step,
            "train_config": cfg.to_dict(),
            **(state or {}),
            "loss": last.get("loss"),
            "val_loss": _last_val(history),
            "tokens_seen": step * tokens_per_step,
            "history": history,
        }
        if world > 1:
            train_state["world_size"], train_state["strategy"] = world, par.strategy
        save(
            model,
            out,
            optimizer=opt,
            train_state=train_state,
            include_rng=True,
            weights=weights,
            optimizer_state=opt_state,
        )

    def evaluate() -> float:
        # each process evaluates every world-th batch; under FSDP all run the same number of forwards
        # (a process short of batches repeats one with weight 0), since each forward all-gathers
        par.train(False)
        total, count, first, slots = 0.0, 0, None, 0
        with torch.no_grad(), autocast:
            for i, b in enumerate(batches.val()):
                first = b if first is None else first
                if i % world == rank:
                    total += val_loss_fn(model, b).item()
                    count += 1
                slots = i // world + 1
            if par.sharded:
                for _ in range(slots - count):
                    val_loss_fn(model, first)
        par.train(True)
        total, count = distributed.all_reduce_sum([total, count], device)
        return total / count

    par.train(True)
    bar = tqdm(total=cfg.steps, initial=start_step, desc=desc, disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    tps_ema = None
    step = start_step
    interrupted = False
    in_update = False
    try:
        while step < cfg.steps:
            distributed.fault_injection(step + 1)
            t_step = time.perf_counter()
            lr = cfg.lr_at(step)
            for g in opt.param_groups:
                g["lr"] = lr
            micro = distributed.shard_micro_batches(batches, step, rank, world)
            share = _micro_shares(micro)  # None: equal micro-batches, each weighs 1 / len(micro)
            loss_sum = 0.0
            for i, b in enumerate(micro):
                with par.sync_gradients(last=i == len(micro) - 1):
                    with autocast:
                        loss = loss_fn(train_model, b)
                    (loss / len(micro) if share is None else loss * share[i]).backward()
                loss_sum += loss.item() if share is None else loss.item() * share[i]
            loss_val = loss_sum / len(micro) if share is None else loss_sum
            if world > 1:
                loss_val = distributed.all_reduce_mean(loss_val, device)
            par.drop_unused_grads()  # FSDP: parameters no process used get no gradient, as in one process
            grad_norm = par.grad_norm(cfg.grad_clip)
            if not (math.isfinite(loss_val) and math.isfinite(grad_norm)):
                where = (
                    f"; the last good checkpoint {out} (step {_saved_step(out)}) was kept"
                    if out and out.exists()
                    else ""
                )
                raise TrainingDiverged(
                    f"loss became {loss_val} (grad norm {grad_norm}) at step {step + 1}{where}. "
                    "Lower --max-lr, raise --warmup, or keep --grad-clip on."
                )
            in_update = True
            opt.step()
            opt.zero_grad(set_to_none=True)
            in_update = False
            step += 1
            dt = time.perf_counter() - t_step
            tps = tokens_per_step / dt if dt > 0 else float("nan")
            tps_ema = tps if tps_ema is None else 0.9 * tps_ema + 0.1 * tps
            rec = {
                "step": step,
                "loss": loss_val,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_sec": tps,
                "tokens_seen": step * tokens_per_step,
                "elapsed": time.perf_counter() - t0,
            }
            rec.update(model.arch_metrics())  # e.g. expert load entropy of MoE layers (rank 0's micro-batches)
            if batches.has_val and (step % cfg.val_every == 0 or step == cfg.steps):
                rec["val_loss"] = evaluate()
            history.append(rec)
            msg = f"loss {loss_val:.3f}" + (f" | val loss {rec['val_loss']:.3f}" if "val_loss" in rec else "")
            bar.set_postfix_str(f"{msg} | lr {lr:.2e} | {tps_ema:,.0f} tok/s", refresh=False)
            bar.update(1)
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                checkpoint(step)
            if cfg.sample_every and step % cfg.sample_every == 0 and (main or par.sharded):
                from tinygpt.sampling import generate

                # under FSDP every process samples (each forward all-gathers); rank 0 prints
                text = generate(model, cfg.sample_prompt, cfg.sample_tokens, seed=cfg.seed)
                if main:
                    bar.write(f"--- sample at step {step} ---\n{text}\n---")
                par.train(True)
            if world == 1:
                for cb in callbacks:
                    cb(rec)
            else:  # callbacks run on rank 0; a KeyboardInterrupt there stops every process at this step
                stop = False
                if main:
                    try:
                        for cb in callbacks:
                            cb(rec)
                    except KeyboardInterrupt:
                        stop = True
                if distributed.any_process(stop, device):
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        interrupted = True
        if in_update:  # weights may be half-updated: keep the previous checkpoint
            model.eval()
            return TrainResult(
                model, cfg, history, out if out and out.exists() else None, time.perf_counter() - t0, interrupted=True
            )
    finally:
        bar.close()
    checkpoint(step)
    distributed.barrier()  # the file is complete before any process returns
    model.train_state = {"step": step, "train_config": cfg.to_dict(), "loss": history[-1]["loss"] if history else None}
    model.eval()
    return TrainResult(model, cfg, history, out, time.perf_counter() - t0, interrupted=interrupted)


def _micro_shares(micro: list) -> list[float] | None:
    """Each micro-batch's fraction of this step's sequences, or None when they all hold as many (the loss
    of a step is the mean over its sequences; a micro-batch's loss is the mean over its own)."""
    sizes = [b[0].shape[0] if isinstance(b, (tuple, list)) and isinstance(b[0], Tensor) else 1 for b in micro]
    if len(set(sizes)) <= 1:
        return None
    return [n / sum(sizes) for n in sizes]


def _corpus_record(corpus: Any, corpus_obj: Corpus) -> str | dict[str, Any] | None:
    """What a checkpoint records so `resume` finds the corpus again: the path given, or a `Corpus`'s fields."""
    if corpus is None or isinstance(corpus, (str, os.PathLike)):
        return None if corpus is None else str(corpus)
    return {
        "name": corpus_obj.name,
        "files": [str(f) for f in corpus_obj.files],
        "kind": corpus_obj.kind,
        "text_field": corpus_obj.text_field,
    }


def _corpus_from_record(rec: Any) -> Any:
    if not isinstance(rec, dict):
        return rec  # a path, or None for the built-in corpus
    files = [Path(f) for f in rec["files"]]
    if missing := [str(f) for f in files if not f.exists()]:
        raise CorpusError(f"cannot resume: corpus file(s) {missing[:3]} no longer exist; pass corpus= / --corpus")
    return Corpus(name=rec["name"], files=files, kind=rec["kind"], text_field=rec["text_field"])


def _last_val(history: list[dict[str, float]]) -> float | None:
    vals = [h["val_loss"] for h in history if "val_loss" in h]
    return vals[-1] if vals else None


def _saved_step(path: Path) -> int | str:
    try:
        return read_checkpoint(path, verify=False).train_state.get("step", "?")
    except CheckpointError:
        return "?"


def _warn_changed(saved: TrainConfig, new: TrainConfig, explicit: dict[str, Any]) -> None:
    harmless = {"steps", "val_every", "save_every", "sample_every", "sample_prompt", "sample_tokens", "val_batches"}
    changed = [k for k in explicit if k not in harmless and getattr(saved, k) != getattr(new, k)]
    if changed:
        warnings.warn(
            f"resuming with changed settings {changed}: the run will not reproduce an uninterrupted one",
            stacklevel=3,
        )
