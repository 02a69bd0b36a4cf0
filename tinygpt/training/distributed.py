"""Data-parallel training on PyTorch's own distributed engine (DDP or FSDP), launched with `torchrun`.

    torchrun --nproc-per-node 2 -m tinygpt train --preset tiny --steps 300 --accum 2   # DDP
    torchrun --nproc-per-node 8 -m tinygpt train --preset huge --strategy fsdp         # fully sharded

`train()`, `distill()` and every other objective built on `tinygpt.training.loop.fit` notice torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK) and join the process group themselves: there is nothing to
call. This module holds what `fit` uses, and the few helpers a script launched by torchrun may want
(`rank()`, `is_main()`, `barrier()`, `all_reduce_mean()`, `shutdown()`).

The rules (see docs/distributed.md):

- The global batch of an optimizer step is `batch_size × accum` sequences, whatever the world size; the
  window starts are a pure function of (seed, step) and rank r takes the r-th contiguous share of them. A
  2-process run therefore sees the same data as a 1-process run with the same settings (which accumulates
  twice as many micro-batches per process) and gives the same losses up to floating-point reduction order.
- Gradients are averaged by DDP (all-reduce) or FSDP (reduce-scatter); we write no communication of our own
  beyond scalar metrics (loss, validation loss, a stop flag) and the parameter broadcast before sharding.
- Rank 0 alone shows progress, prints samples, runs callbacks and writes checkpoints. A checkpoint is the
  usual single `.tinygpt` file (FSDP gathers the full weights and optimizer state onto rank 0's CPU), so a
  run saved at one world size resumes at any other, and in a plain single-process run.
- Backend: NCCL for CUDA tensors (with gloo for CPU tensors), gloo on CPU-only machines.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from tinygpt.data.processes import (  # noqa: F401  (re-exported: the helpers a torchrun script may want)
    TIMEOUT_ENV,
    DistributedError,
    active,
    barrier,
    init_from_env,
    is_main,
    launched,
    local_device,
    local_main_first,
    local_rank,
    rank,
    shutdown,
    world,
)
from tinygpt.errors import TinyGPTValueError

STRATEGIES = ("ddp", "fsdp")
FAULT_ENV = "TINYGPT_FAULT_INJECT"  # test hook: "RANK:STEP" makes rank RANK raise before optimizer step STEP


# ------------------------------------------------------------------------------------------ environment
# the process environment lives in the data layer (the token cache is built once per machine): re-exported here
def all_reduce_sum(values: list[float], device: str | torch.device = "cpu") -> list[float]:
    """Element-wise sum of `values` over all processes (the values themselves when not distributed)."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_reduce_mean(x: float | Tensor, device: str | torch.device = "cpu") -> float:
    """The mean of a scalar over all processes."""
    v = float(x.item() if isinstance(x, Tensor) else x)
    return all_reduce_sum([v], device)[0] / world()


def any_process(flag: bool, device: str | torch.device = "cpu") -> bool:
    """True when `flag` is true on at least one process."""
    return all_reduce_sum([float(flag)], device)[0] > 0


def _collective_device(device: str | torch.device) -> torch.device:
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return d if d.type in ("cuda", "cpu") else torch.device("cpu")


def fault_injection(step: int) -> None:
    """The test hook behind `TINYGPT_FAULT_INJECT=RANK:STEP`: raise on that rank before that optimizer step.

    Args:
        step: the 1-based number of the optimizer step about to run (as logged).
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    try:
        r, s = (int(p) for p in spec.split(":"))
    except ValueError as e:
        raise TinyGPTValueError(f"{FAULT_ENV} must look like RANK:STEP (e.g. 1:3), got {spec!r}") from e
    if r == rank() and s == step:
        raise RuntimeError(f"{FAULT_ENV}: injected fault on rank {r} at step {s}")


def record_error(e: BaseException) -> None:
    """Write `e` to torchrun's error file, so that its failure summary names this rank's error (no-op
    outside torchrun). The `tinygpt` command calls it; a script can use torch's `@record` decorator."""
    if launched() and os.environ.get("TORCHELASTIC_ERROR_FILE"):
        from torch.distributed.elastic.multiprocessing.errors import get_error_handler

        get_error_handler().record_exception(e)


# ------------------------------------------------------------------------------------------ the wrapper
class _DDPCall:
    """What an objective receives under DDP: calls run through DDP (so gradients are averaged), attribute
    access reaches the model itself (`model.cfg`, `model.aux_loss()`, `model.eval()`, ...)."""

    def __init__(self, ddp: torch.nn.parallel.DistributedDataParallel):
        self.__dict__["_ddp"] = ddp

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._ddp(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ddp.module, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._ddp.module, name, value)


class DataParallel:
    """A model prepared for `fit` in one process, or data-parallel with DDP or FSDP.

    Attributes:
        module: the model itself (under FSDP it is sharded in place: its parameters are DTensors).
        strategy: "single", "ddp" or "fsdp".
        rank, world: this process's rank and the number of processes.
        device: the device the model computes on.
    """

    def __init__(self, module: torch.nn.Module, strategy: str, device: str, ddp: Any = None, routed: bool = False):
        self.module, self.strategy, self.device, self._ddp, self._routed = module, strategy, device, ddp, routed
        self.rank, self.world = rank(), world()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def train_model(self) -> Any:
        """What the training objective is called with: the DDP call proxy, or the (sharded) model."""
        return _DDPCall(self._ddp) if self._ddp is not None else self.module

    @property
    def sharded(self) -> bool:
        """True under FSDP: every process must run every forward (they all-gather parameters)."""
        return self.strategy == "fsdp"

    def train(self, mode: bool = True) -> None:
        (self._ddp if self._ddp is not None else self.module).train(mode)

    def sync_gradients(self, last: bool) -> contextlib.AbstractContextManager:
        """Around one micro-batch's backward: DDP all-reduces on the last micro-batch only (`no_sync`
        before it); FSDP reduce-scatters every micro-batch so gradients stay sharded."""
        if self._ddp is not None and not last:
            return self._ddp.no_sync()
        return contextlib.nullcontext()

    def drop_unused_grads(self) -> None:
        """After a step's backward, under FSDP with a routed model: give the parameters that no process used
        (gradient zero everywhere) no gradient, as a single process would, so AdamW skips them (no weight
        decay, no momentum step). FSDP reduce-scatters zeros for them to keep its collectives aligned."""
        if not (self.sharded and self._routed):
            return
        params = list(self.module.parameters())
        local = [p.grad is None or not bool(p.grad.to_local().any()) for p in params]
        flags = torch.tensor(local, dtype=torch.float32, device=_collective_device(self.device))
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        for p, unused in zip(params, flags.tolist()):
            if unused:
                p.grad = None

    def grad_norm(self, max_norm: float) -> float:
        """Clip the global gradient norm to `max_norm` (0: measure only) and return it before clipping."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        if not params:
            return 0.0
        if self.sharded or max_norm > 0:
            n = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
            n = n.full_tensor() if hasattr(n, "full_tensor") else n
            return float(n.item())
        return torch.stack([p.grad.detach().norm() for p in params]).norm().item()

    def full_state(self, optimizer: torch.optim.Optimizer | None) -> tuple[dict | None, dict | None]:
        """Full (unsharded) weights and optimizer state for a checkpoint, on rank 0's CPU.

        Under FSDP every process must call this (it gathers); the result is (None, None) elsewhere and for
        unsharded models, whose own `state_dict()`s are already complete. The optimizer state is in
        `optimizer.state_dict()` layout (integer parameter ids), as a single-process run would save it.
        """
        if not self.sharded:
            return None, None
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(self.module, options=opts)
        osd = get_optimizer_state_dict(self.module, optimizer, options=opts) if optimizer is not None else None
        if not self.is_main:
            return None, None
        if osd is not None:
            index = {name: i for i, name in enumerate(self._param_order(optimizer))}
            osd = {
                "state": {index[k]: v for k, v in osd["state"].items()},
                "param_groups": [{**g, "params": [index[k] for k in g["params"]]} for g in osd["param_groups"]],
            }
        return weights, osd

    def load_optimizer(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Load a full optimizer state (`optimizer.state_dict()` layout, as saved by any world size)."""
        if not self.sharded:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        names = self._param_order(optimizer)
        fqn_state = {
            "state": {names[int(i)]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]],
        }
        set_optimizer_state_dict(
            self.module, optimizer, fqn_state, options=StateDictOptions(full_state_dict=True, strict=True)
        )

    def _param_order(self, optimizer: torch.optim.Optimizer) -> list[str]:
        """Parameter names in optimizer order: the i-th is parameter id i of `optimizer.state_dict()`."""
        names = {id(p): n for n, p in self.module.named_parameters()}
        return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def wrap_model(
    model: torch.nn.Module,
    strategy: str = "ddp",
    *,
    device: str = "cpu",
    mixed_precision: str | None = None,
) -> DataParallel:
    """Prepare `model` for training in this process: plain, DDP or FSDP (FSDP2 `fully_shard`).

    Outside a distributed run (or with one process) the model is only moved to `device`.

    Args:
        model: a `tinygpt.GPT` (any architecture); identical on every process is not required: DDP and
            FSDP both start from rank 0's weights.
        strategy: "ddp" (each process holds the whole model; gradients all-reduced) or "fsdp" (parameters,
            gradients and optimizer state sharded across processes; each block is its own FSDP unit).
        device: "cpu", "cuda" (this process's LOCAL_RANK GPU is used), ...
        mixed_precision: "bfloat16" with FSDP: compute in bf16 (parameters all-gathered in bf16, gradients
            reduced in fp32, fp32 master shards). DDP uses autocast (`TrainConfig.dtype`) instead.
    Returns:
        A `DataParallel` handle (`.module` is the model).
    """
    if strategy not in STRATEGIES:
        raise TinyGPTValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    cfg = getattr(model, "cfg", None)
    routed = bool(getattr(cfg, "moe_experts", 0) or getattr(cfg, "mod", False))  # may leave parameters unused
    if not init_from_env():
        model.to(device)
        return DataParallel(model, "single", device)
    device = local_device(device)
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise TinyGPTValueError(f"distributed training runs on CUDA or CPU, not {device!r}; pass --device cuda or cpu")
    if strategy == "ddp":
        model.to(device)
        from torch.nn.parallel import DistributedDataParallel as DDP

        # buffers are constants: no broadcast per forward (which would also make every forward a collective;
        # evaluation and sampling run on rank 0's model alone). Routed models may leave parameters unused.
        ddp = DDP(
            model,
            device_ids=[torch.device(device).index] if device.startswith("cuda") else None,
            forward_sync_buffers=False,
            find_unused_parameters=routed,
        )
        return DataParallel(model, "ddp", device, ddp)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    with torch.no_grad():  # FSDP shards each process's own copy: start every copy from rank 0's weights
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src=0)
    mesh = init_device_mesh(torch.device(device).type, (world(),))
    kw: dict[str, Any] = {"mesh": mesh}
    if mixed_precision == "bfloat16":
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    elif mixed_precision not in (None, "float32"):
        raise TinyGPTValueError(f"mixed_precision must be None, 'float32' or 'bfloat16', got {mixed_precision!r}")
    for block in getattr(model, "blocks", []):
        fully_shard(block, **kw)  # moves one block at a time to the device, then keeps only its shard
    fully_shard(model, **kw)
    if routed:  # a parameter may lack a gradient on one process only: reduce zeros for it, as DDP's
        model.set_reduce_scatter_unused_params(True)  # find_unused_parameters does (see drop_unused_grads)
    if cfg is not None:
        cfg.device = device
    return DataParallel(model, "fsdp", device, routed=routed)


def shard_micro_batches(batches: Any, step: int, rank: int, world: int) -> list:
    """This process's micro-batches of the global batch of optimizer step `step`.

    A batch object with `train_shard(step, rank, world)` shards itself (`TokenBatches` splits the global
    batch by sequence); otherwise the micro-batches of `train(step)` are split into `world` contiguous
    groups, which needs a number of micro-batches (`accum`) divisible by the world size.
    """
    if world == 1:
        return batches.train(step)
    if hasattr(batches, "train_shard"):
        return batches.train_shard(step, rank, world)
    micro = batches.train(step)
    if len(micro) % world:
        raise TinyGPTValueError(
            f"this objective's {len(micro)} micro-batches per step (accum) cannot be split evenly across "
            f"{world} processes; make --accum a multiple of {world}"
        )
    k = len(micro) // world
    return micro[rank * k : (rank + 1) * k]
