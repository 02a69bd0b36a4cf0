"""The training loop every objective shares (`fit`), the batches of next-token training and the result.

`fit(model, cfg, batches, loss_fn=...)` is AdamW with weight-decay groups (fused where available), cosine or
constant LR with warmup and a minimum LR, gradient clipping and accumulation, fp32 or bf16 autocast, a
validation split, atomic checkpoints that resume exactly, sampling during training, data parallelism under
torchrun, and callbacks that receive each step's metrics (the live dashboard uses them). `train`, `finetune`
(`tinygpt.training.pretrain`), `distill`, `sft` and `lora_finetune` are `fit` with their own batches and loss;
each returns a `TrainResult` (or a subclass) with `.figure()`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from tinygpt.checkpoint import CheckpointError, optimizer_state_dict, read_checkpoint, save
from tinygpt.data import TokenData, batch_starts, val_starts, windows
from tinygpt.errors import TinyGPTError
from tinygpt.inputs import progress_enabled
from tinygpt.model import GPT
from tinygpt.training import distributed
from tinygpt.training.logline import LogLines
from tinygpt.training.precision import MasterWeights, compiled_forward
from tinygpt.training.settings import SettingError, TrainConfig

if TYPE_CHECKING:
    from tinygpt.training.run import ResumedRun


class TrainingDiverged(TinyGPTError, RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint was kept."""


@dataclass
class TrainResult:
    """What every training function returns: the model, the metric history and where it was saved.

    Subclasses (`SFTResult`, `ESResult`, ...) add their own fields; `TrainResult.extend(result, ...)` builds one
    from `fit`'s result.

    Attributes:
        model: the trained model (in eval mode).
        config: the run's settings (`TrainConfig`, or the objective's own settings class).
        history: one metrics dict per step (`step`, `loss`, `lr`, ..., `val_loss` when validated).
        path: the checkpoint written (None without `out`).
        elapsed: seconds.
        interrupted: stopped early by Ctrl-C or a callback raising KeyboardInterrupt.
    """

    model: GPT
    config: Any
    history: list[dict[str, float]] = field(default_factory=list)
    path: Path | None = None
    elapsed: float = 0.0
    interrupted: bool = False

    @classmethod
    def extend(cls, result: TrainResult, **extra: Any) -> Any:
        """A `cls` (a subclass) holding every `TrainResult` field of `result` plus the subclass's `extra` ones."""
        return cls(**{f.name: getattr(result, f.name) for f in dataclasses.fields(TrainResult)}, **extra)

    @property
    def step(self) -> int:
        return int(self.history[-1]["step"]) if self.history else 0

    @property
    def losses(self) -> list[float]:
        return [h["loss"] for h in self.history if "loss" in h]

    @property
    def val_losses(self) -> list[tuple[int, float]]:
        return [(int(h["step"]), h["val_loss"]) for h in self.history if "val_loss" in h]

    @property
    def final_loss(self) -> float | None:
        return self.history[-1].get("loss") if self.history else None

    @property
    def final_val_loss(self) -> float | None:
        v = self.val_losses
        return v[-1][1] if v else None

    def figure(self, *, smoothing: float = 0.6, log_y: bool = False, title: str | None = None):
        """Plotly figure against step: train loss (raw and smoothed), validation loss, and the learning rate in a
        row below (traces in that order; `tinygpt.training.curves.training_figure`).

        Args:
            smoothing: EMA factor of the smoothed train-loss line, in [0, 1) (0 = the raw loss).
            log_y: a log-scale loss axis.
            title: the figure's title (default "training").
        """
        from tinygpt.training.curves import training_figure

        return training_figure(self.history, smoothing=smoothing, log_y=log_y, title=title)

    def __repr__(self) -> str:
        v = f", val loss {self.final_val_loss:.3f}" if self.final_val_loss is not None else ""
        loss = f"loss {self.final_loss:.3f}" if self.final_loss is not None else "no steps"
        name = type(self).__name__
        return f"{name}(step {self.step}, {loss}{v}, {self.elapsed:.1f}s, path={self.path})"


def default_device() -> str:
    """cuda, then mps, then cpu."""
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, master: MasterWeights | None = None) -> torch.optim.AdamW:
    """AdamW with decay on matrices and embeddings only; fused where the device supports it. With `master`
    (bf16 weights) it updates the fp32 master copies, in the same order, so its state dict has the same layout."""
    if master is not None:
        groups = master.optimizer_groups(cfg.weight_decay)
    else:
        params = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kw = dict(lr=cfg.max_lr, betas=cfg.betas, eps=cfg.eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **kw)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, **kw)


def next_token_loss(model: GPT, batch: tuple[Tensor, ...]) -> Tensor:
    """The default objective: mean next-token cross-entropy of x -> y."""
    x, y = batch
    return model(x, return_type="loss", targets=y)


def check_global_batch(total: int, cfg: TrainConfig, world: int) -> None:
    """The global batch of `total` sequences must split evenly across `world` processes."""
    if total % world:
        raise SettingError(
            f"the global batch of {total} sequences (batch {cfg.batch_size} x accum {cfg.accum}) cannot be split "
            f"evenly across {world} processes; choose --batch and --accum with a product divisible by {world}"
        )


class TokenBatches:
    """Micro-batches of random windows of a token array, a pure function of (seed, step).

    Other objectives (distillation, SFT) supply their own object with the same two methods:
    `train(step) -> list of micro-batches` and `val() -> iterable of batches`; `train_shard(step, rank,
    world)` is optional (without it, data-parallel processes split `train(step)`'s micro-batches).
    """

    def __init__(self, data: TokenData, cfg: TrainConfig, n_ctx: int):
        ctx = cfg.ctx or n_ctx
        if ctx > n_ctx:
            raise SettingError(f"ctx={ctx} exceeds the model's n_ctx={n_ctx}")
        cfg.ctx = ctx
        self.cfg, self.ctx = cfg, ctx
        self.train_tokens, self.val_tokens = data.split(cfg.val_split)
        if len(self.train_tokens) <= ctx + 1:
            raise SettingError(
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
        check_global_batch(total, self.cfg, world)
        n = total // world
        starts = batch_starts(len(self.train_tokens), self.ctx, total, self.cfg.seed, step)[rank * n : (rank + 1) * n]
        return [windows(self.train_tokens, starts[i : i + b], self.ctx, self.device) for i in range(0, n, b)]

    def val(self) -> Iterator[tuple[Tensor, Tensor]]:
        b = self.cfg.batch_size
        for i in range(0, len(self.v_starts), b):
            yield windows(self.val_tokens, self.v_starts[i : i + b], self.ctx, self.device)


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
    progress: bool | None = None,
    state: dict[str, Any] | None = None,
    desc: str = "train",
    strategy: str = "ddp",
) -> TrainResult:
    """The training loop shared by `train`, `finetune`, `distill`, `sft` and `lora_finetune`.

    Under torchrun (WORLD_SIZE > 1) the same loop runs data-parallel on `torch.distributed` (see
    `tinygpt.training.distributed` and docs/distributed.md): every process takes its share of each step's global
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
        callbacks, device, progress: see `RunOptions`.
        state: extra JSON-serialisable entries for the checkpoint's training state.
        desc: the progress bar's label.
        strategy: under torchrun, "ddp" or "fsdp" (ignored in a single process).
    Returns:
        `TrainResult` (the model in eval mode; `interrupted` after Ctrl-C or a callback's KeyboardInterrupt).
    Raises:
        TrainingDiverged: the loss or the gradient norm became NaN/inf (the last checkpoint is kept).
    """
    par = distributed.wrap_model(model, strategy, device=device, mixed_precision=cfg.dtype)
    device, main, world = par.device, par.is_main, par.world
    batches.device = device
    history = list(run.history) if run else []
    start_step = run.step if run else 0
    lines = LogLines(cfg.log_every, cfg.steps, progress=progress_enabled(progress), main=main, start_step=start_step)
    progress = lines.bar
    master = None
    if cfg.param_dtype == "bfloat16":
        if world > 1:
            raise SettingError(
                "param_dtype='bfloat16' (bf16 weights, fp32 masters) runs in one process; under torchrun use "
                "dtype='bfloat16' (autocast; FSDP keeps fp32 master shards itself)"
            )
        master = MasterWeights(model)
    try:
        with compiled_forward(model, cfg.compile and world == 1):
            return _fit(
                model, cfg, batches, par, master, lines, loss_fn, val_loss_fn, out, run, callbacks, progress,
                state, desc, history, start_step,
            )  # fmt: skip
    finally:
        if master is not None:
            master.restore()


def _fit(
    model, cfg, batches, par, master, lines, loss_fn, val_loss_fn, out, run, callbacks, progress, state, desc,
    history, start_step,
) -> TrainResult:  # fmt: skip
    """`fit`'s loop, once the model is wrapped, its weights cast (`master`) and its forward compiled."""
    from tqdm.auto import tqdm

    device, main, rank, world = par.device, par.is_main, par.rank, par.world
    opt = make_optimizer(model, cfg, master)
    if run is not None:
        par.load_optimizer(opt, optimizer_state_dict(run.checkpoint, type(opt).__name__))
        if "torch" in run.checkpoint.rng:
            torch.set_rng_state(run.checkpoint.rng["torch"])
    if rank:  # dropout differs across processes; rank 0 keeps the single-process stream
        torch.manual_seed((cfg.seed * 1_000_003 + rank * 7919 + start_step) % 2**63)
    autocast = (
        torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
        if cfg.dtype == "bfloat16" and master is None  # bf16 weights compute in bf16 without autocast
        else contextlib.nullcontext()
    )
    tokens_per_step = batches.tokens_per_step
    train_model = par.train_model

    def checkpoint(step: int) -> None:
        if out is None:
            return
        weights, opt_state = par.full_state(opt)  # under FSDP every process gathers; rank 0 writes
        if master is not None:
            weights = master.state_dict()  # the fp32 masters, not the bf16 working copies
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
    rng_at_step = None  # the RNG state a step starts from: an abandoned step's draws (dropout) are undone
    try:
        while step < cfg.steps:
            distributed.fault_injection(step + 1)
            rng_at_step = torch.get_rng_state()
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
            if master is not None:
                master.grads_to_masters()
                grad_norm = master.grad_norm(cfg.grad_clip)
            else:
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
            if master is not None:
                master.masters_to_params()
            in_update = False
            step += 1
            rng_at_step = None  # the step is complete: the state after it is where the next one starts
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
            lines.update(rec, step_time=dt, units=tokens_per_step, write=bar.write if progress else None)
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
        if rng_at_step is not None and not in_update:
            # Ctrl-C inside a step: it is abandoned, so the checkpoint must hold the RNG state it started from
            # (its dropout masks were already drawn); resuming then replays it exactly
            torch.set_rng_state(rng_at_step)
        if in_update:  # weights may be half-updated: keep the previous checkpoint
            model.eval()
            return TrainResult(
                model, cfg, history, out if out and out.exists() else None, time.perf_counter() - t0, interrupted=True
            )
    finally:
        bar.close()
    if run is None or step > start_step or interrupted:  # a resumed run that had nothing to do keeps its file
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


def _last_val(history: list[dict[str, float]]) -> float | None:
    vals = [h["val_loss"] for h in history if "val_loss" in h]
    return vals[-1] if vals else None


def _saved_step(path: Path) -> int | str:
    try:
        return read_checkpoint(path, verify=False).train_state.get("step", "?")
    except CheckpointError:
        return "?"


__all__ = [
    "TokenBatches",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "default_device",
    "fit",
    "make_optimizer",
    "next_token_loss",
]
