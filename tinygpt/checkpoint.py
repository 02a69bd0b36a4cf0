"""`.tinygpt` files: one safetensors file holding the weights and a JSON manifest.

The manifest (safetensors metadata key "tinygpt") records the format version, the `GPTConfig`, the
tokenizer, the training state (step, metrics, training config) and a sha256 of the tensor content.
Training checkpoints also carry the optimizer state (`optimizer.*` tensors) and RNG state (`rng.*`).
Writes are atomic; reads validate everything and never unpickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tinygpt.config import ConfigError, GPTConfig
from tinygpt.io import atomic_write_bytes

FORMAT = "tinygpt"
FORMAT_VERSION = 1
OPTIM_PREFIX = "optimizer."
RNG_PREFIX = "rng."


class CheckpointError(ValueError):
    """A file is missing, truncated, corrupt, foreign or inconsistent."""


@dataclass
class Checkpoint:
    """The parsed content of a `.tinygpt` file."""

    path: Path
    manifest: dict[str, Any]
    tensors: dict[str, Tensor]  # model weights
    optimizer: dict[str, Tensor] = field(default_factory=dict)  # names without the prefix
    rng: dict[str, Tensor] = field(default_factory=dict)

    @property
    def config(self) -> GPTConfig:
        return GPTConfig.from_dict(self.manifest["config"])

    @property
    def train_state(self) -> dict[str, Any]:
        return self.manifest.get("train_state") or {}


# ------------------------------------------------------------------------------------- writing
def save(
    model,
    path: str | os.PathLike,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    train_state: dict[str, Any] | None = None,
    include_rng: bool = False,
    weights: dict[str, Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write `model` (with its tokenizer) to a `.tinygpt` file atomically.

    Args:
        model: a `tinygpt.GPT`.
        path: destination; parent directories are created.
        optimizer: if given, its state is stored for exact resumption.
        train_state: JSON-serialisable training state (defaults to `model.train_state`).
        include_rng: also store torch's CPU RNG state.
        weights: tensors to write instead of `model.state_dict()` (e.g. gathered from a sharded model).
        optimizer_state: an `optimizer.state_dict()`-layout dict to write instead of `optimizer`'s own
            (e.g. gathered from a sharded optimizer); `optimizer` still names the class.
    Returns:
        The path written.
    """
    path = Path(path)
    if model.tokenizer is None:
        raise CheckpointError("the model has no tokenizer attached; set model.tokenizer before saving")
    sd = weights if weights is not None else model.state_dict()
    tensors = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    if model.cfg.tie_embeddings:
        tensors.pop("unembed.weight", None)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": model.cfg.to_dict(),
        "tokenizer": model.tokenizer.to_dict(),
        "train_state": train_state if train_state is not None else getattr(model, "train_state", {}),
    }
    surgery = _surgery_record(model)  # factored / packed layers (tinygpt.surgery); absent otherwise
    if surgery is not None:
        manifest["surgery"] = surgery
    if optimizer is not None:
        groups, state = _flatten_optimizer(optimizer, optimizer_state)
        manifest["optimizer"] = {"class": type(optimizer).__name__, "param_groups": groups}
        tensors.update({OPTIM_PREFIX + k: v for k, v in state.items()})
    if include_rng:
        tensors[RNG_PREFIX + "torch"] = torch.get_rng_state()
    return write_tensor_file(path, tensors, manifest, key=FORMAT, error=CheckpointError, what="training state")


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


def _flatten_optimizer(opt: torch.optim.Optimizer, sd: dict | None = None) -> tuple[list[dict], dict[str, Tensor]]:
    sd = sd if sd is not None else opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            t = v if isinstance(v, Tensor) else torch.tensor(v)
            tensors[f"state.{idx}.{k}"] = t.detach().cpu().contiguous()
    groups = json.loads(json.dumps(sd["param_groups"], default=_json_default))
    return groups, tensors


def _json_default(o):
    if isinstance(o, Tensor):
        return o.item() if o.numel() == 1 else o.tolist()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"{type(o).__name__} is not JSON-serialisable")


def load_optimizer_state(opt: torch.optim.Optimizer, ckpt: Checkpoint) -> None:
    """Restore an optimizer saved with `save(..., optimizer=opt)`."""
    opt.load_state_dict(optimizer_state_dict(ckpt, type(opt).__name__))


def optimizer_state_dict(ckpt: Checkpoint, class_name: str) -> dict[str, Any]:
    """The saved optimizer state in `optimizer.state_dict()` layout (checked to be `class_name`'s)."""
    if "optimizer" not in ckpt.manifest:
        raise CheckpointError(
            f"{ckpt.path} has no optimizer state (it was saved for inference, not as a training "
            "checkpoint); start a new run instead of resuming"
        )
    rec = ckpt.manifest["optimizer"]
    if rec["class"] != class_name:
        raise CheckpointError(f"{ckpt.path} holds {rec['class']} state, not {class_name}")
    state: dict[int, dict[str, Tensor]] = {}
    for name, t in ckpt.optimizer.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = t
    groups = rec["param_groups"]
    for g in groups:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


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
) -> dict[str, Any]:
    """Validate the framing of a tinygpt safetensors file (`.tinygpt`, `.lenses`) and return its manifest.

    Reads only the header: checks the file exists and is not a directory, is not a pickle/zip/GGUF/NumPy file,
    that the header length fits, the header is JSON with a `key` manifest in its metadata, the tensor table
    fits the file, and the manifest names format `key` at a version this tinygpt reads.

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
        if len(head) < 8:
            raise error(f"{path} is not a {label} file: only {size} bytes (empty or truncated)")
        (n,) = struct.unpack("<Q", head)
        raw = f.read(n) if n <= size - 8 and n <= 100_000_000 else b""
        # a safetensors header length can begin with a pickle's magic bytes (e.g. 0x80 0x05): name other
        # formats only when the file is not a plausible safetensors file
        for magic, what in _MAGIC_HINTS.items():
            if head.startswith(magic) and not raw.startswith(b"{"):
                raise error(f"{path} is {what}, not a {label} (safetensors) file; tinygpt never unpickles files")
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
    if not isinstance(version, int) or manifest.get("format") != key:
        raise error(f"{path}: the manifest does not describe a {desc}")
    if version > max_version:
        raise error(
            f"{path} was written by a newer tinygpt ({version_name} {version}; this one reads up to "
            f"{max_version}); upgrade tinygpt"
        )
    return manifest


def read_checkpoint(path: str | os.PathLike, verify: bool = True) -> Checkpoint:
    """Parse and validate a `.tinygpt` file without building a model."""
    path = Path(path)
    manifest = read_manifest(
        path,
        key=FORMAT,
        max_version=FORMAT_VERSION,
        label=".tinygpt",
        desc="tinygpt checkpoint",
        error=CheckpointError,
        missing=lambda meta: (
            f"{path} is a safetensors file but not a tinygpt checkpoint (no '{FORMAT}' manifest in its "
            "metadata); save models with tinygpt.save(model, path)"
        ),
    )
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error type
        raise CheckpointError(f"{path}: corrupt tensor data ({e})") from e
    if verify and "content_sha256" in manifest and content_hash(tensors) != manifest["content_sha256"]:
        raise CheckpointError(f"{path} is corrupt: tensor content does not match its recorded sha256")
    ckpt = Checkpoint(path=path, manifest=manifest, tensors={})
    for k, v in tensors.items():
        if k.startswith(OPTIM_PREFIX):
            ckpt.optimizer[k[len(OPTIM_PREFIX) :]] = v
        elif k.startswith(RNG_PREFIX):
            ckpt.rng[k[len(RNG_PREFIX) :]] = v
        else:
            ckpt.tensors[k] = v
    return ckpt


def load(path: str | os.PathLike | Checkpoint, device: str | torch.device | None = None):
    """Load a `.tinygpt` file: the model, with its tokenizer attached and `train_state` filled.

    Args:
        path: the file (or an already parsed `Checkpoint`).
        device: where to put the model (default: CPU).
    """
    from tinygpt.model import GPT
    from tinygpt.tokenizer import TokenizerError, load_tokenizer

    ckpt = path if isinstance(path, Checkpoint) else read_checkpoint(path)
    try:
        cfg = ckpt.config
        tokenizer = load_tokenizer(ckpt.manifest.get("tokenizer"))
    except (ConfigError, TokenizerError, TypeError) as e:
        raise CheckpointError(f"{ckpt.path}: invalid manifest: {e}") from e
    if tokenizer.vocab_size > cfg.d_vocab:
        raise CheckpointError(
            f"{ckpt.path}: tokenizer has {tokenizer.vocab_size} tokens but the model only {cfg.d_vocab}"
        )
    model = GPT(cfg, tokenizer=tokenizer)
    if ckpt.manifest.get("surgery"):
        _rebuild_surgery(model, ckpt)
    expected = set(model.state_dict())
    if cfg.tie_embeddings:
        expected.discard("unembed.weight")
    missing, unexpected = expected - set(ckpt.tensors), set(ckpt.tensors) - expected
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt.path}: tensors do not match the config: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    try:
        model.load_state_dict(ckpt.tensors, strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"{ckpt.path}: tensor shapes do not match the config: {e}") from e
    model.train_state = ckpt.train_state
    model.source_path = str(ckpt.path)
    if device is not None:
        model.to(device)
    return model.eval()


def as_model(model: Any, *, device: str | torch.device | None = None, what: str = "model"):
    """The one loader of "a model or a path": a `tinygpt.GPT` passes through, a path is `load`ed.

    Args:
        model: a `GPT` (any `nn.Module` with a `cfg`), or the path of a `.tinygpt` file.
        device: for a path, where to put the loaded model (a model passed in is not moved).
        what: how the error names the argument ("teacher", "base model", ...).
    """
    if isinstance(model, Checkpoint):
        return load(model, device=device)
    if isinstance(model, (str, os.PathLike)):
        if not Path(model).exists():
            raise CheckpointError(f"{what} {model} does not exist; pass a .tinygpt file (e.g. from `tinygpt train`)")
        return load(model, device=device)
    if isinstance(model, torch.nn.Module) and hasattr(model, "cfg"):
        return model
    raise CheckpointError(f"expected a tinygpt GPT or a .tinygpt path as the {what}, got {type(model).__name__}")


# ------------------------------------------------------------------------------------- surgery
def _surgery_record(model) -> dict[str, Any] | None:
    """Manifest entry for weight surgery (see `tinygpt.surgery`): replaced modules and the operation log."""
    if not any(hasattr(m, "surgery_spec") for m in model.modules()) and not getattr(model, "surgery_log", None):
        return None
    from tinygpt.surgery.common import surgery_record

    return surgery_record(model)


def _rebuild_surgery(model, ckpt: Checkpoint) -> None:
    """Swap in the factored / packed modules a file records, so its tensors load into them."""
    from tinygpt.surgery.common import apply_surgery_record

    try:
        apply_surgery_record(model, ckpt.manifest["surgery"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{ckpt.path}: invalid 'surgery' record in the manifest: {e}") from e


# ------------------------------------------------------------------------------------- inspect
def describe(path: str | os.PathLike) -> str:
    """Human-readable summary: config, tokenizer, parameter count and a table of every tensor."""
    ckpt = read_checkpoint(path)
    cfg, m = ckpt.config, ckpt.manifest
    tok = m.get("tokenizer", {})
    n_params = sum(t.numel() for t in ckpt.tensors.values())
    lines = [f"file        {ckpt.path}  ({ckpt.path.stat().st_size:,} bytes, format {m['format_version']})"]
    lines.append("config      " + ", ".join(f"{k}={v}" for k, v in cfg.to_dict().items()))
    if tok.get("type") == "bpe":
        from tinygpt.tokenizer import load_tokenizer

        lines.append(f"tokenizer   bpe, vocab {load_tokenizer(tok).vocab_size}")
    else:
        added = tok.get("added_tokens") or []
        specials = f" (256 bytes + special tokens {', '.join(added)})" if added else ""
        lines.append(f"tokenizer   {tok.get('type', '?')}, vocab {256 + len(added)}{specials}")
    lines.append(f"parameters  {n_params:,}" + ("  (embeddings tied)" if cfg.tie_embeddings else ""))
    if m.get("surgery", {}).get("modules"):
        kinds: dict[str, int] = {}
        for spec in m["surgery"]["modules"].values():
            kind = spec.get("type", "?") + (f" {spec['bits']}-bit" if "bits" in spec else "")
            kinds[kind] = kinds.get(kind, 0) + 1
        lines.append("surgery     " + ", ".join(f"{n} {k}" for k, n in kinds.items()) + " modules")
    ts = ckpt.train_state
    if ts:
        keys = ("step", "loss", "val_loss", "tokens_seen")
        lines.append("training    " + ", ".join(f"{k}={ts[k]}" for k in keys if k in ts))
    if ckpt.optimizer:
        n = sum(t.numel() for t in ckpt.optimizer.values())
        lines.append(f"optimizer   {m['optimizer']['class']} state: {len(ckpt.optimizer)} tensors, {n:,} elements")
    lines.append("")
    w = max(len(k) for k in ckpt.tensors) if ckpt.tensors else 4
    lines.append(f"{'tensor':<{w}}  {'dtype':<9} {'shape':<16} {'elements':>12}")
    lines.append("-" * (w + 41))
    for k, t in sorted(ckpt.tensors.items(), key=lambda kv: _natural_key(kv[0])):
        dt = str(t.dtype).removeprefix("torch.")
        lines.append(f"{k:<{w}}  {dt:<9} {str(list(t.shape)):<16} {t.numel():>12,}")
    lines.append("-" * (w + 41))
    lines.append(f"{'total':<{w}}  {'':<9} {'':<16} {n_params:>12,}")
    return "\n".join(lines)


def _natural_key(name: str) -> list:
    """Sort "blocks.2" before "blocks.10"."""
    import re

    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]
