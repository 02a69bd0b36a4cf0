"""The framing every tinygpt file shares: one safetensors file with a JSON manifest in its metadata.

`write_tensor_file` writes one (content hash added, atomic), `read_manifest` validates one from its header alone,
`read_tensor_file` reads and verifies the tensors; `model_fingerprint` pins a file to the model it belongs to.
`.tinygpt`, `.lenses`, `.lora` and `.sae` files are all written and read here.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tinygpt.errors import TinyGPTError
from tinygpt.io import atomic_write_bytes


class CheckpointError(TinyGPTError, ValueError):
    """A file is missing, truncated, corrupt, foreign or inconsistent."""


class OutputError(TinyGPTError, OSError):
    """An output cannot (or must not) be written: a directory, read-only, an input of the same command, or an
    existing file without `overwrite=True` (`--overwrite`). Raised before any work starts."""


def write_tensor_file(
    path: str | os.PathLike,
    tensors: dict[str, Tensor],
    manifest: dict[str, Any],
    *,
    key: str,
    error: type[Exception] | None = None,
    what: str = "the manifest",
) -> Path:
    """The one writer of tinygpt's safetensors files (`.tinygpt`, `.lenses`, `.lora`, `.sae`, ...).

    Adds `content_sha256` (`content_hash` of `tensors`) to `manifest`, stores the manifest as JSON under the
    safetensors metadata key `key`, and writes atomically (temp file beside `path`, fsync, rename), so a crash
    leaves the previous file or none. `read_manifest` is the matching reader.

    Args:
        path: destination; parent directories are created.
        tensors: name -> tensor (moved to CPU, made contiguous).
        manifest: JSON-serialisable dict with `format` and `format_version`.
        key: the metadata key (the format's name: "tinygpt", "lens", "lora", ...).
        error: the exception class for a manifest that is not JSON-serialisable (default `CheckpointError`).
        what: how that error names the manifest content ("training state", "lens settings").
    """
    from safetensors.torch import save as st_save

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    manifest = {**manifest, "content_sha256": content_hash(tensors)}
    try:
        data = st_save(tensors, metadata={key: json.dumps(manifest)})
    except TypeError as e:
        raise (error or CheckpointError)(f"{what} is not JSON-serialisable: {e}") from e
    path = Path(path)
    atomic_write_bytes(path, data)
    return path


_FINGERPRINTS: dict[int, tuple[Any, tuple, str]] = {}


def model_fingerprint(model, *, skip: Callable[[str], bool] | None = None) -> str:
    """The one base-model fingerprint: `content_hash` of the model's weights (its state dict).

    Files that only make sense on one model (`.lenses`, `.lora`, `.sae`) store it and refuse another model.
    A tied unembedding is counted once (`unembed.weight` is left out, as in `.tinygpt` files); `skip(name)`
    leaves out tensors that are not the base model's (LoRA adapters). Cached per model until any weight
    changes in place (optimizer steps, `load_state_dict`, surgery).
    """
    sd = {k: v for k, v in model.state_dict().items() if skip is None or not skip(k)}
    if getattr(model.cfg, "tie_embeddings", False):
        sd.pop("unembed.weight", None)
    key = tuple((k, v.data_ptr(), v._version, tuple(v.shape), v.dtype) for k, v in sd.items())
    hit = _FINGERPRINTS.get(id(model))
    if hit is not None and hit[0]() is model and hit[1] == key:
        return hit[2]
    digest = content_hash(sd)
    for k in [k for k, v in _FINGERPRINTS.items() if v[0]() is None]:
        del _FINGERPRINTS[k]
    _FINGERPRINTS[id(model)] = (weakref.ref(model), key, digest)
    return digest


def content_hash(tensors: dict[str, Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


# ------------------------------------------------------------------------------------- reading
_MAGIC_HINTS = {
    b"PK\x03\x04": "a zip archive (a PyTorch torch.save checkpoint?)",
    b"\x80\x02": "a Python pickle",
    b"\x80\x03": "a Python pickle",
    b"\x80\x04": "a Python pickle",
    b"\x80\x05": "a Python pickle",
    b"GGUF": "a GGUF file",
    b"\x93NUMPY": "a NumPy .npy file",
}


def read_manifest(
    path: Path,
    *,
    key: str,
    max_version: int,
    label: str,
    desc: str,
    error: type[Exception],
    missing: Callable[[dict[str, str]], str],
    directory: str | None = None,
    version_name: str = "format",
    manifest_name: str = "tinygpt",
    format_name: str | None = None,
) -> dict[str, Any]:
    """Validate the framing of a tinygpt safetensors file (`.tinygpt`, `.lenses`) and return its manifest.

    Reads only the header: checks the file exists and is not a directory, is not a pickle/zip/GGUF/NumPy file,
    that the header length fits, the header is JSON with a `key` manifest in its metadata, the tensor table
    fits the file, and the manifest names format `format_name` (default `key`) at a version this tinygpt reads.

    Args:
        label: the file kind in messages (".tinygpt"); desc: what the manifest describes ("tinygpt checkpoint").
        error: the exception class to raise; missing: the message when the metadata has no `key` manifest.
        directory: the message for a directory (default: "{path} is a directory, not a {label} file").
        version_name, manifest_name: words for the version and manifest in messages ("lens format", "lens").
    """
    if not path.exists():
        raise error(f"{path}: no such file")
    if path.is_dir():
        raise error(directory or f"{path} is a directory, not a {label} file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        (n,) = struct.unpack("<Q", head) if len(head) == 8 else (size,)
        raw = f.read(n) if n <= size - 8 and n <= 100_000_000 else b""
        # a safetensors header length can begin with a pickle's magic bytes (e.g. 0x80 0x05): name other
        # formats only when the file is not a plausible safetensors file
        for magic, what in _MAGIC_HINTS.items():
            if head.startswith(magic) and not raw.startswith(b"{"):
                raise error(f"{path} is {what}, not a {label} (safetensors) file; tinygpt never unpickles files")
        if len(head) < 8:
            raise error(f"{path} is not a {label} file: only {size} bytes (empty or truncated)")
        if n > size - 8 or n > 100_000_000:
            raise error(
                f"{path} is not a {label} file: header length {n} does not fit a {size}-byte file "
                "(truncated, corrupt or not safetensors)"
            )
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path} is not a {label} file: its header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise error(f"{path} is not a {label} file: unexpected header")
    meta = header.pop("__metadata__", None) or {}
    if key not in meta:
        raise error(missing(meta))
    try:
        end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise error(f"{path}: corrupt tensor table in header ({e})") from e
    if 8 + n + end > size:
        raise error(f"{path} is truncated: its header promises {8 + n + end} bytes but the file has {size}")
    try:
        manifest = json.loads(meta[key])
    except json.JSONDecodeError as e:
        raise error(f"{path}: the {manifest_name} manifest is not valid JSON ({e})") from e
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if not isinstance(version, int) or manifest.get("format") != (format_name or key):
        raise error(f"{path}: the manifest does not describe a {desc}")
    if version > max_version:
        raise error(
            f"{path} was written by a newer tinygpt ({version_name} {version}; this one reads up to "
            f"{max_version}); upgrade tinygpt"
        )
    return manifest


def read_tensor_file(
    path: str | os.PathLike, manifest: dict[str, Any], *, error: type[Exception] = CheckpointError, verify: bool = True
) -> dict[str, Tensor]:
    """The tensors of a file whose `manifest` `read_manifest` returned, checked against its `content_sha256`.

    Raises:
        error: the tensor data is corrupt or does not match the recorded hash.
    """
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise error(f"{path}: corrupt tensor data ({e})") from e
    if verify and "content_sha256" in manifest and content_hash(tensors) != manifest["content_sha256"]:
        raise error(f"{path} is corrupt: tensor content does not match its recorded sha256")
    return tensors


def tensor_mismatch(
    expected: dict[str, tuple[int, ...]], tensors: dict[str, Tensor], *, ignore: set[str] = frozenset()
) -> str | None:
    """What differs between the tensors a module needs and the ones a file holds, in one short sentence.

    Args:
        expected: name -> shape the module needs (e.g. `{k: tuple(v.shape) for k, v in module.state_dict().items()}`).
        tensors: the file's tensors (name -> tensor).
        ignore: names neither side must have (e.g. a tied `unembed.weight`).

    Returns:
        None when names and shapes agree, else e.g. "embed.weight is [256, 64] where the config needs [256, 128],
        and 25 more shape mismatches" or "3 tensors missing (blocks.2.attn.k_proj.bias, ...)".
    """
    names = set(expected) - ignore
    have = set(tensors) - ignore
    parts = []
    for what, group in (("missing", sorted(names - have)), ("unexpected", sorted(have - names))):
        if group:
            shown = ", ".join(group[:3]) + (", ..." if len(group) > 3 else "")
            parts.append(f"{len(group)} tensor{'s' * (len(group) > 1)} {what} ({shown})")
    wrong = [k for k in sorted(names & have) if tuple(tensors[k].shape) != tuple(expected[k])]
    if wrong:
        k = wrong[0]
        more = f", and {len(wrong) - 1} more shape mismatch{'es' * (len(wrong) > 2)}" if len(wrong) > 1 else ""
        parts.append(f"{k} is {list(tensors[k].shape)} where it should be {list(expected[k])}{more}")
    return "; ".join(parts) or None


def load_matching(
    module: torch.nn.Module,
    tensors: dict[str, Tensor],
    *,
    where: str,
    record: str,
    error: type[Exception] = CheckpointError,
    ignore: set[str] = frozenset(),
) -> None:
    """`module.load_state_dict(tensors)` after checking names and shapes, so a mismatch is one short line naming the
    first differing tensor (torch's own message lists every tensor: kilobytes of text).

    Args:
        module: what to fill.
        tensors: the file's tensors.
        where: the file, for the message.
        record: what the shapes were derived from ("its config (d_model=128, n_layers=2)"), for the message.
        error: the exception class to raise.
        ignore: names to skip on both sides (e.g. a tied `unembed.weight`).
    """
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    problem = tensor_mismatch(expected, tensors, ignore=ignore)
    if problem:
        raise error(
            f"{where}: its tensors do not match {record}: {problem}; the file was edited or written by other code"
        )
    module.load_state_dict({k: v for k, v in tensors.items() if k not in ignore}, strict=not ignore)
