"""Reading a Hugging Face checkpoint's tensors lazily, and writing them.

`TensorSource(directory)` indexes `model.safetensors` or the shards listed by `model.safetensors.index.json`
(`weight_map`: tensor name -> shard file) by their headers only; `get(name)` reads one tensor (`safe_open` on its
shard, kept open while the source is), so an import holds the model plus one tensor at a time, never two copies of
the checkpoint. Pickled weights (`pytorch_model.bin`, `*.pt`) are never unpickled: they are refused with the
conversion to run.

`write_safetensors(tensors, directory, max_shard_bytes=)` writes `model.safetensors`, or numbered shards and the
index when the tensors exceed `max_shard_bytes` (default 5 GB, `transformers`' own default).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor

from tinygpt.interop.hf.common import InteropError

__all__ = ["DEFAULT_MAX_SHARD_BYTES", "TensorSource", "write_safetensors"]

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


class TensorSource:
    """The tensors of a checkpoint directory, read one at a time (see the module docstring).

    Use as a context manager (closes the shard handles), or call `close()`.
    """

    def __init__(self, directory: str | os.PathLike):
        from safetensors import safe_open

        self._safe_open = safe_open
        d = Path(directory)
        self.directory = d
        if (d / INDEX).exists():
            try:
                weight_map = json.loads((d / INDEX).read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise InteropError(f"{d / INDEX} is not a safetensors index (no weight_map): {e}") from None
            self.files = {name: d / f for name, f in weight_map.items()}
        elif (d / SINGLE).exists():
            self.files = {}
            with self._open(d / SINGLE) as f:
                self.files = dict.fromkeys(f.keys(), d / SINGLE)
        else:
            pickles = sorted(p.name for p in d.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
            hint = (
                f" It holds pickled weights ({', '.join(pickles)}), which tinygpt never unpickles: convert them "
                "with transformers first (from_pretrained(dir).save_pretrained(dir, safe_serialization=True))."
                if pickles
                else ""
            )
            raise InteropError(f"{d} has no {SINGLE} or {INDEX}.{hint}")
        missing = sorted({p.name for p in self.files.values() if not p.exists()})
        if missing:
            raise InteropError(f"{d} is incomplete: shard(s) {missing[:3]} named by {INDEX} are missing")
        self._handles: dict[Path, object] = {}

    def _open(self, path: Path):
        try:
            return self._safe_open(str(path), framework="pt")
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a bad header
            raise InteropError(f"{path} is not a readable safetensors file: {e}") from None

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for h in self._handles.values():
            h.__exit__(None, None, None)
        self._handles.clear()

    def names(self) -> set[str]:
        return set(self.files)

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> Tensor:
        """Read one tensor (a fresh CPU tensor in its stored dtype)."""
        path = self.files.get(name)
        if path is None:
            raise InteropError(f"{self.directory} has no tensor {name!r}")
        h = self._handles.get(path)
        if h is None:
            h = self._handles[path] = self._open(path).__enter__()
        try:
            return h.get_tensor(name)
        except Exception as e:  # noqa: BLE001 - a truncated file
            raise InteropError(f"cannot read tensor {name!r} from {path}: {e}") from None

    def float_dtype(self) -> torch.dtype:
        """The dtype most floating-point tensors are stored in (headers only, no data read)."""
        kinds = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
        counts: dict[torch.dtype, int] = {}
        for name, path in self.files.items():
            h = self._handles.get(path) or self._handles.setdefault(path, self._open(path).__enter__())
            dt = kinds.get(h.get_slice(name).get_dtype())
            if dt is not None:
                counts[dt] = counts.get(dt, 0) + 1
        return max(counts, key=counts.get) if counts else torch.float32


def write_safetensors(
    tensors: dict[str, Tensor], directory: str | os.PathLike, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
) -> list[str]:
    """Write `tensors` into `directory` as HF does (one file, or shards + index). Returns the file names."""
    from safetensors.torch import save_file

    d = Path(directory)
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        t = tensors[name]
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.detach().contiguous()
        size += n
    if len(shards) == 1:
        save_file(shards[0], str(d / SINGLE), metadata={"format": "pt"})
        return [SINGLE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(names, shards, strict=True):
        save_file(shard, str(d / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (d / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return [*names, INDEX]


def unused(names: Iterable[str], used: set[str], ignorable: tuple[str, ...]) -> list[str]:
    """The checkpoint tensors neither used nor known to be ignorable (buffers HF saved, e.g. rotary inv_freq)."""
    return sorted(n for n in names if n not in used and not n.endswith(ignorable))
