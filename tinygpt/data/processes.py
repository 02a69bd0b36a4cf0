"""Which process am I under torchrun: the environment (RANK, WORLD_SIZE, LOCAL_RANK), the process group, a barrier.

The token cache (`tinygpt.data.cache`) is built by the first process of each machine while the others wait
(`local_main_first`), which is the first collective of a data-parallel run; the training loop
(`tinygpt.training.distributed`, which re-exports these) joins the same group. Outside torchrun every function
is a cheap no-op: rank 0 of a world of 1.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from tinygpt.errors import TinyGPTError

TIMEOUT_ENV = "TINYGPT_DIST_TIMEOUT"  # seconds a collective may wait (default: torch's, 30 min for gloo)


class DistributedError(TinyGPTError, RuntimeError):
    """A data-parallel run cannot start (e.g. torch.distributed is missing from this PyTorch build)."""


def launched() -> bool:
    """True when this process is one of several started by torchrun (WORLD_SIZE > 1 in the environment)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """True when a process group of more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 when not distributed)."""
    return dist.get_rank() if active() else int(os.environ.get("RANK", "0")) if launched() else 0


def world() -> int:
    """The number of processes (1 when not distributed)."""
    return dist.get_world_size() if active() else int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """This process's rank on its machine (torchrun's LOCAL_RANK)."""
    return int(os.environ.get("LOCAL_RANK", "0")) if launched() else 0


def is_main() -> bool:
    """True on rank 0 (and in a plain single-process run): the process that logs and saves."""
    return rank() == 0


def init_from_env() -> bool:
    """Join the process group torchrun describes; a no-op outside torchrun or when already joined.

    Backend: "cpu:gloo,cuda:nccl" when CUDA is available (NCCL for GPU tensors, gloo for CPU ones, e.g. the
    parameter broadcast before FSDP sharding), else "gloo". With CUDA, the current device is set from
    LOCAL_RANK. The collective timeout is `TINYGPT_DIST_TIMEOUT` seconds when set (torch's default
    otherwise). The group is destroyed at interpreter exit.

    Returns:
        True when this process is part of a group of more than one process.
    """
    if not launched():
        return False
    if not dist.is_available():
        raise DistributedError("torch.distributed is not available in this PyTorch build; run a single process")
    if dist.is_initialized():
        return dist.get_world_size() > 1
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank())
    kw: dict[str, Any] = {}
    if os.environ.get(TIMEOUT_ENV):
        kw["timeout"] = datetime.timedelta(seconds=float(os.environ[TIMEOUT_ENV]))
    dist.init_process_group(backend="cpu:gloo,cuda:nccl" if cuda else "gloo", **kw)
    atexit.register(shutdown)
    return dist.get_world_size() > 1


def shutdown() -> None:
    """Destroy the process group (if any); safe to call more than once."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def local_device(device: str) -> str:
    """ "cuda" -> "cuda:LOCAL_RANK" in a distributed run; other devices unchanged."""
    if launched() and device == "cuda":
        return f"cuda:{local_rank()}"
    return device


def barrier() -> None:
    """Wait for every process (no-op when not distributed)."""
    if active():
        dist.barrier()


@contextlib.contextmanager
def local_main_first() -> Iterator[bool]:
    """Run the body on each machine's first process, then on the others (e.g. building the token cache).

    Yields:
        True on the process that goes first (LOCAL_RANK 0, or the only process).
    """
    init_from_env()
    first = local_rank() == 0
    if not first:
        barrier()
    yield first
    if first:
        barrier()


__all__ = [
    "TIMEOUT_ENV",
    "DistributedError",
    "active",
    "barrier",
    "init_from_env",
    "is_main",
    "launched",
    "local_device",
    "local_main_first",
    "local_rank",
    "rank",
    "shutdown",
    "world",
]
