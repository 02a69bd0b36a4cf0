"""Making a surgery operation's changes, and undoing them exactly.

Every operation (LASER, HQQ) is written once, as `apply(restorer, model, ...) -> report`, and comes in two
forms: the in-place function (`laser_`, `hqq_`) runs `in_place(apply, model, ...)`, and its context-manager
form (`laser(...)`, `hqq(...)`) is `temporarily(laser_, model, ...)`: the same call, made with a restorer
that records what it replaces, undone on exit (weights bitwise, modules by identity, also on an exception).

    with restoring(model) as r:           # what sweeps use: many changes, all undone at the end
        r.write_weight(lin, W_low_rank)
        r.swap("blocks.0.mlp.fc_in", LowRankLinear(...))

`SwappedLinear` is the base of the modules surgery puts in place of an `nn.Linear` (factored, packed); each
subclass registers itself with `tinygpt.checkpoint.register_swap`, so saved models rebuild them on load.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.nn as nn
from torch import Tensor

from tinygpt.checkpoint import set_module
from tinygpt.surgery.targets import SurgeryError

R = TypeVar("R")


class Restorer:
    """Makes the changes of one surgery operation and, when `active`, remembers what they replaced so that
    `restore()` puts it back exactly (bitwise). An inactive one (in-place `laser_` / `hqq_`) only makes them."""

    def __init__(self, model: nn.Module, active: bool = True):
        self.model, self.active = model, active
        self.weights: dict[int, tuple[nn.Linear, Tensor]] = {}  # id -> (module, weight before the first write)
        self.modules: list[tuple[str, nn.Module]] = []
        self.logged: list[dict[str, Any]] = []  # the `surgery_log` entries this restorer appended

    @torch.no_grad()
    def write_weight(self, lin: nn.Linear, value: Tensor) -> None:
        """Overwrite `lin.weight` with `value` (cast to its dtype); the first write to `lin` saves the original."""
        if self.active and id(lin) not in self.weights:
            self.weights[id(lin)] = (lin, lin.weight.detach().clone())
        lin.weight.copy_(value.to(lin.weight.dtype))

    def original(self, lin: nn.Linear) -> Tensor:
        """`lin.weight` as it was before this restorer first wrote it."""
        return self.weights[id(lin)][1] if id(lin) in self.weights else lin.weight.detach()

    def swap(self, name: str, new: nn.Module) -> None:
        """Replace the module at `name` by `new`."""
        old = set_module(self.model, name, new)
        if self.active:
            self.modules.append((name, old))

    @torch.no_grad()
    def restore(self) -> None:
        for lin, w in self.weights.values():
            lin.weight.copy_(w)
        for name, old in reversed(self.modules):
            set_module(self.model, name, old)
        log = getattr(self.model, "surgery_log", None) or []
        log[:] = [e for e in log if not any(e is mine for mine in self.logged)]
        self.weights.clear()
        self.modules.clear()
        self.logged.clear()

    def record(self, entry: dict[str, Any]) -> None:
        """Append an operation to `model.surgery_log` (saved in the checkpoint manifest); `restore()` removes it."""
        record(self.model, entry)
        if self.active:
            self.logged.append(entry)


@contextlib.contextmanager
def restoring(model: nn.Module) -> Iterator[Restorer]:
    """A `Restorer` whose changes are undone when the block exits (also on an exception)."""
    restorer = Restorer(model)
    try:
        yield restorer
    finally:
        restorer.restore()


_RECORDING: contextvars.ContextVar[Restorer | None] = contextvars.ContextVar("surgery_restorer", default=None)


def in_place(apply: Callable[..., R], model: nn.Module, *args: Any, **kwargs: Any) -> R:
    """Run a surgery operation `apply(restorer, model, *args, **kwargs)`: its changes stay, unless it runs
    inside `temporarily`, whose restorer then records them."""
    restorer = _RECORDING.get()
    if restorer is None or restorer.model is not model:
        restorer = Restorer(model, active=False)
    return apply(restorer, model, *args, **kwargs)


@contextlib.contextmanager
def temporarily(operation: Callable[..., R], model: nn.Module, *args: Any, **kwargs: Any) -> Iterator[R]:
    """Context manager: `operation(model, *args, **kwargs)` (an in-place function such as `laser_`) applied
    inside the block and undone on exit; yields what it returned. Calls made inside the block stay."""
    with restoring(model) as restorer:
        token = _RECORDING.set(restorer)
        try:
            result = operation(model, *args, **kwargs)
        finally:
            _RECORDING.reset(token)
        yield result


def signature_of(inplace: Callable[..., Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: show a context-manager form with the parameters of its in-place function (`help`, IDEs)."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn.__signature__ = inspect.signature(inplace).replace(return_annotation=inspect.Signature.empty)
        return fn

    return deco


def record(model: nn.Module, entry: dict[str, Any]) -> None:
    """Append an operation to `model.surgery_log` (saved in the checkpoint manifest)."""
    log = getattr(model, "surgery_log", None)
    if log is None:
        log = []
        model.surgery_log = log
    log.append(entry)


class SwappedLinear(nn.Module):
    """Base of the modules surgery puts in place of an `nn.Linear` (factored, packed), rebuilt on load from
    the manifest's `surgery` record. Subclasses set `kind` and `spec_fields` (their int constructor
    arguments after in_features and out_features, kept as attributes of the same names) and register
    themselves with `tinygpt.checkpoint.register_swap(kind, cls)`."""

    kind: str = "?"
    spec_fields: tuple[str, ...] = ()
    in_features: int
    out_features: int

    @classmethod
    def from_spec(cls, spec: dict[str, Any], like: nn.Linear) -> SwappedLinear:
        """An empty module shaped by a manifest `spec`, in the dtype/device of the Linear it replaces."""
        if (spec.get("in_features"), spec.get("out_features")) != (like.in_features, like.out_features):
            raise SurgeryError(
                f"{cls.kind} record {spec} does not match a Linear {like.in_features}->{like.out_features}"
            )
        w = like.weight
        args = (int(spec[k]) for k in cls.spec_fields)
        return cls(like.in_features, like.out_features, *args, like.bias is not None, device=w.device, dtype=w.dtype)

    def surgery_spec(self) -> dict[str, Any]:
        """The manifest entry `from_spec` rebuilds this module from."""
        fields = {k: getattr(self, k) for k in self.spec_fields}
        return {"type": self.kind, **fields, "in_features": self.in_features, "out_features": self.out_features}


@contextlib.contextmanager
def progress_bar(total: int, desc: str, progress: bool) -> Iterator[Any]:
    """A tqdm bar over `total` steps (disabled unless `progress`), closed on exit."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, disable=not progress)
    try:
        yield bar
    finally:
        bar.close()


@contextlib.contextmanager
def one_thread(on: bool = True) -> Iterator[None]:
    """Run many small CPU tensor ops on one thread: intra-op threading of matrices this size is slower, and
    10-1000x slower when the cores are shared with other processes (measured: 512x128 HQQ 18 ms vs 110 ms).
    `on=False` leaves the thread count alone."""
    n = torch.get_num_threads()
    if not on or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


__all__ = [
    "Restorer",
    "SwappedLinear",
    "in_place",
    "one_thread",
    "progress_bar",
    "record",
    "restoring",
    "signature_of",
    "temporarily",
]
