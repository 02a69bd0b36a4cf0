"""Modules that stand in place of an `nn.Linear` (LASER's `LowRankLinear`, HQQ's `PackedQuantLinear`, LoRA's
`LoRALinear`) register themselves here when their module is imported; `save` records them in the manifest's
`surgery` entry and `load` rebuilds them, so the checkpoint layer imports none of the packages defining them.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from tinygpt.checkpoint.files import CheckpointError

# ------------------------------------------------------------------------------------- swapped modules
_SWAPS: dict[str, type[nn.Module]] = {}


def register_swap(kind: str, cls: type[nn.Module]) -> type[nn.Module]:
    """Register a module class that stands in place of an `nn.Linear`, so `save` records it and `load` rebuilds it.

    The protocol: an instance has `surgery_spec() -> dict` (JSON, with `"type": kind`, `in_features`,
    `out_features`); the class has `from_spec(spec, like) -> module`, an empty module shaped by `spec` in the
    dtype and device of `like`, the `nn.Linear` it replaces (`load_state_dict` then fills it). Called where the
    class is defined (`register_swap("low_rank", LowRankLinear)`); registering the same class again is a no-op.

    Raises:
        CheckpointError: `kind` is taken by another class.
    """
    old = _SWAPS.get(kind)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise CheckpointError(f"swap kind {kind!r} is already registered by {old.__module__}.{old.__qualname__}")
    _SWAPS[kind] = cls
    return cls


def set_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Replace the submodule at dotted path `name` by `new`; returns the old one.

    Keeps a `HookedRootModule`'s `mod_dict` and module `.name` attributes in step with the tree.
    """
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, leaf)
    setattr(parent, leaf, new)
    new.name = name
    mod_dict = getattr(model, "mod_dict", None)
    if isinstance(mod_dict, dict):
        mod_dict[name] = new
    return old


def surgery_record(model: nn.Module) -> dict[str, Any] | None:
    """The manifest's `surgery` entry: the swapped modules (name -> spec) and `model.surgery_log`; None if neither."""
    classes = tuple(_SWAPS.values())
    modules = {name: m.surgery_spec() for name, m in model.named_modules() if classes and isinstance(m, classes)}
    log = list(getattr(model, "surgery_log", None) or [])
    if not modules and not log:
        return None
    return {"version": 1, "modules": modules, "log": log}


def apply_surgery_record(model: nn.Module, rec: dict[str, Any]) -> None:
    """Swap in the modules a `surgery` record describes (before `load_state_dict`) and restore the log.

    Raises:
        ValueError: a malformed record, an unknown module type, or a module the model lacks or that is no Linear.
    """
    if not isinstance(rec, dict) or not isinstance(rec.get("modules", {}), dict):
        raise ValueError("malformed 'surgery' record in the manifest")
    for name, spec in rec.get("modules", {}).items():
        kind = spec.get("type") if isinstance(spec, dict) else None
        if kind not in _SWAPS:
            raise ValueError(f"unknown surgery module type {kind!r} for {name} (written by a newer tinygpt?)")
        try:
            old = model.get_submodule(name)
        except AttributeError as e:
            raise ValueError(f"surgery record names {name}, which the model does not have") from e
        if not isinstance(old, nn.Linear):
            raise ValueError(f"surgery record names {name}, which is a {type(old).__name__}, not a Linear")
        set_module(model, name, _SWAPS[kind].from_spec(spec, like=old))
    model.surgery_log = list(rec.get("log", []))
