"""What every Hugging Face converter shares: the error class, the lazy `transformers` import, directory checks."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from tinygpt.errors import TinyGPTError

__all__ = ["RUNTIME_FIELDS", "InteropError", "check_hf_dir", "dtype_name", "non_default_fields", "transformers_module"]


class InteropError(TinyGPTError, ValueError):
    """A model, config or directory cannot be converted to or from Hugging Face format."""


def transformers_module():
    """`import transformers`, or an `InteropError` saying how to install it."""
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - transformers is part of the dev environment
        raise InteropError(
            "Hugging Face interop needs the `transformers` package: pip install 'tinygpt[interop]'"
        ) from e
    return transformers


def check_hf_dir(directory: str | os.PathLike) -> Path:
    """The directory as a Path, if it is a Hugging Face model directory (has config.json); else `InteropError`."""
    d = Path(directory)
    if not d.is_dir():
        raise InteropError(f"{d} is not a directory; give a Hugging Face model directory (with config.json)")
    if not (d / "config.json").exists():
        raise InteropError(f"{d} has no config.json: it is not a Hugging Face model directory")
    return d


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def dtype_name(dtype: str | torch.dtype | None, found: torch.dtype) -> str:
    """The tinygpt dtype ("float32" / "bfloat16") to import weights stored as `found` into.

    Args:
        dtype: what the caller asked for (None = keep the checkpoint's: bf16 stays bf16; fp16, which tinygpt
            does not train in, is upcast losslessly to fp32).
        found: the dtype of the checkpoint's floating-point tensors.
    """
    if dtype is None:
        return "bfloat16" if found == torch.bfloat16 else "float32"
    if isinstance(dtype, torch.dtype):
        names = {v: k for k, v in _DTYPES.items()}
        if dtype not in names:
            raise InteropError(f"dtype must be float32 or bfloat16, got {dtype}")
        return names[dtype]
    if dtype not in _DTYPES:
        raise InteropError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    return dtype


# Architecture-variant switches: a sub-knob `prefix_*` only matters when its switch is on.
_SWITCHES = {"diff": "diff_attn", "mod": "mod", "moe": "moe_experts", "yoco": "yoco"}
RUNTIME_FIELDS = {"attn_impl", "device", "dtype", "dropout", "init_std"}
"""GPTConfig fields every exported family accepts: runtime choices and training-only settings."""


def non_default_fields(cfg, allowed: set[str]) -> list[str]:
    """`name=value` for every GPTConfig field of `cfg` outside `allowed` that is not at its default.

    A sub-knob of a variant that is switched off (e.g. `moe_topk` without `moe_experts`) is inert and not listed.
    """
    import dataclasses

    from tinygpt.config import GPTConfig

    defaults = {f.name: f.default for f in dataclasses.fields(GPTConfig) if f.init}
    problems = []
    for name, default in defaults.items():
        if name in allowed or default is dataclasses.MISSING:
            continue
        value = getattr(cfg, name)
        if value == default:
            continue
        switch = _SWITCHES.get(name.split("_")[0])
        if switch and switch != name and switch not in allowed and getattr(cfg, switch) == defaults[switch]:
            continue  # a setting of a variant that is switched off: inert
        problems.append(f"{name}={value!r}")
    return problems
