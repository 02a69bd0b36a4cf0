"""Dictionary files: tinygpt's `.sae` format, and SAELens' on-disk layout (export and import).

`.sae`: one safetensors file (written by `tinygpt.checkpoint.write_tensor_file`: atomic, `content_sha256`)
with the JSON manifest under the metadata key "sae"::

    tensors   W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_out], b_dec [d_out], in_scale [], out_scale [],
              threshold ([d_sae] jumprelu, [] batchtopk), W_skip [d_out, d_in] (skip transcoders);
              a training checkpoint adds optimizer.{param}.{key} (Adam state) and train.since_fired [d_sae]
    manifest  format "sae", format_version 1, dictionary (DictionaryConfig), base_model {fingerprint, config,
              source}, training {settings, step, tokens_seen, stream, optimizer, history, corpus, ...}

The weights are stored as trained (acting on normalised activations, with the constants `in_scale` and
`out_scale`). `load_sae(path, model)` refuses a model whose `model_fingerprint` differs from the pin.

SAELens layout (`export_saelens` / `import_saelens`): a directory with `cfg.json` and `sae_weights.safetensors`
holding `W_enc`, `b_enc`, `W_dec`, `b_dec` (+ `threshold`, `W_skip`), with the normalisation folded in (they act
on raw activations; `normalize_activations` is "none"). See docs/dictionaries.md for every `cfg.json` key.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tinygpt.checkpoint import content_hash, load_matching, model_fingerprint, read_manifest, write_tensor_file
from tinygpt.dictionary.errors import DictionaryError, DictionaryFileError, DictionaryMismatchError
from tinygpt.dictionary.modules import DictionaryConfig, SparseDictionary, make_dictionary
from tinygpt.dictionary.trainer import OPTIM_PREFIX, STATE_PREFIX
from tinygpt.io import atomic_write_bytes, atomic_write_text

FORMAT = "sae"
FORMAT_VERSION = 1
SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_VERSION = "6.0.0"  # the cfg.json layout written (SAELens >= 6 reads hook_name from metadata)
_WEIGHTS = ("W_enc", "b_enc", "W_dec", "b_dec", "W_skip", "threshold", "in_scale", "out_scale")


# ------------------------------------------------------------------------------------------ the pin
def model_pin(model) -> dict[str, Any]:
    """What a dictionary file records about its base model."""
    return {
        "fingerprint": model_fingerprint(model),
        "config": model.cfg.to_dict(),
        "source": getattr(model, "source_path", None),
    }


def check_model(sae: SparseDictionary, model, *, check: bool = True, what: str = "this dictionary") -> None:
    """Raise `DictionaryMismatchError` unless `sae` fits `model`: its hooks exist with the right widths, and
    (with `check`) the model's weights fingerprint equals the pin."""
    for h, d in ((sae.hook, sae.d_in), (sae.out_hook, sae.d_out)):
        if h is not None and h not in model.hook_dict:
            raise DictionaryMismatchError(f"{what} reads or writes {h}, which this model does not have")
        width = _width(model, h) if h is not None else None
        if width is not None and width != d:
            raise DictionaryMismatchError(f"{what} has width {d} at {h}, where this model has width {width}")
    if check and sae.base and sae.base.get("fingerprint"):
        got = model_fingerprint(model)
        if got != sae.base["fingerprint"]:
            src = sae.base.get("source")
            raise DictionaryMismatchError(
                f"{what} was trained on a different model: weights fingerprint {sae.base['fingerprint'][:12]}"
                f"{f' ({src})' if src else ''}, this model has {got[:12]}. Train a dictionary for this model "
                "(train_sae(model)); if its weights changed on purpose, pass check=False"
            )


def _width(model, hook: str) -> int | None:
    """The width of a standard hook from the model's config (None for hooks it does not know)."""
    cfg, leaf = model.cfg, hook.rsplit(".", 1)[-1]
    if leaf in (
        "hook_resid_pre",
        "hook_resid_mid",
        "hook_resid_post",
        "hook_attn_out",
        "hook_mlp_out",
        "hook_normalized",
        "hook_embed",
        "hook_pos_embed",
    ):
        return cfg.d_model
    if leaf in ("hook_pre", "hook_post") and ".mlp." in hook:
        return cfg.d_mlp
    if leaf in ("hook_q", "hook_k", "hook_v", "hook_z") and ".attn." in hook:
        return cfg.n_heads * cfg.d_head
    return None


# ------------------------------------------------------------------------------------------ .sae files
def save_sae(
    sae: SparseDictionary,
    path: str | os.PathLike,
    *,
    training: dict[str, Any] | None = None,
    state: dict[str, Tensor] | None = None,
) -> Path:
    """Write a `.sae` file atomically.

    Args:
        sae: the dictionary (its `base` pin and `training_state` are recorded).
        path: destination; parent directories are created.
        training: the training record to store (default `sae.training_state`).
        state: extra tensors of a training checkpoint (optimizer state, dead-latent counters).
    """
    tensors = {k: v for k, v in sae.state_dict().items() if k in _WEIGHTS}
    if state:
        tensors.update(state)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dictionary": sae.cfg.to_dict(),
        "base_model": sae.base,
        "training": training if training is not None else sae.training_state,
    }
    return write_tensor_file(path, tensors, manifest, key=FORMAT, error=DictionaryError, what="the training record")


def read_sae_file(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Validate a `.sae` file (framing, version, content hash) and return `(manifest, tensors)`."""
    path = Path(path)

    def missing(meta: dict[str, str]) -> str:
        what = "a tinygpt model checkpoint (.tinygpt)" if "tinygpt" in meta else "a safetensors file"
        hint = " (an SAELens directory's weights? use import_saelens(directory))" if "tinygpt" not in meta else ""
        return f"{path} is {what}, not a .sae file (no 'sae' manifest in its metadata){hint}"

    manifest = read_manifest(
        path,
        key=FORMAT,
        max_version=FORMAT_VERSION,
        label=".sae",
        desc="tinygpt sparse dictionary",
        error=DictionaryFileError,
        missing=missing,
        directory=(
            f"{path} is a directory, not a .sae file; an SAELens directory (cfg.json + "
            "sae_weights.safetensors) is read by import_saelens(path)"
        ),
        version_name="sae format",
        manifest_name="sae",
    )
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error type
        raise DictionaryFileError(f"{path}: corrupt tensor data ({e})") from e
    if "content_sha256" in manifest and content_hash(tensors) != manifest["content_sha256"]:
        raise DictionaryFileError(f"{path} is corrupt: tensor content does not match its recorded sha256")
    return manifest, tensors


def _build(manifest: dict[str, Any], tensors: dict[str, Tensor], where: str) -> SparseDictionary:
    try:
        cfg = DictionaryConfig.from_dict(manifest["dictionary"])
    except (KeyError, TypeError) as e:
        raise DictionaryFileError(f"{where}: invalid dictionary record in the manifest ({e})") from e
    sae = make_dictionary(cfg)
    weights = {k: v for k, v in tensors.items() if not k.startswith((OPTIM_PREFIX, STATE_PREFIX))}
    record = f"its dictionary record ({cfg.arch}, d_in={cfg.d_in}, d_sae={cfg.d_sae})"
    load_matching(sae, weights, where=where, record=record, error=DictionaryFileError)
    return sae


def load_sae(path: str | os.PathLike, model=None, *, check: bool = True, device: Any = None) -> SparseDictionary:
    """Read a `.sae` file; with `model`, check the dictionary was trained on it and move it to its device.

    Args:
        path: the file (from `train_sae(..., out=)` or `save_sae`).
        model: the base model; a dictionary pinned to another model raises `DictionaryMismatchError`.
        check: compare the weights fingerprint (False: only the hooks and widths are checked).
        device: where to put the dictionary (default: the model's device, else CPU).
    """
    manifest, tensors = read_sae_file(path)
    sae = _build(manifest, tensors, str(path))
    sae.base = manifest.get("base_model")
    sae.training_state = manifest.get("training") or {}
    sae.source_path = str(path)
    if model is not None:
        try:
            check_model(sae, model, check=check)
        except DictionaryMismatchError as e:
            raise DictionaryMismatchError(f"{path}: {e}") from None
        device = device if device is not None else next(model.parameters()).device
    return sae.to(device) if device is not None else sae


# ------------------------------------------------------------------------------------------ SAELens
def _saelens_arch(sae: SparseDictionary) -> str:
    arch, c = sae.cfg.arch, sae.cfg
    if not c.transcoder:
        return {"topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu", "relu": "standard"}[arch]
    if arch in ("jumprelu", "batchtopk") and not c.skip:
        return "jumprelu_transcoder"
    if arch == "relu":
        return "skip_transcoder" if c.skip else "transcoder"
    raise DictionaryError(
        f"SAELens has no {arch} transcoder{' with a skip connection' if c.skip else ''}; export a relu "
        "(transcoder / skip_transcoder) or jumprelu / batchtopk (jumprelu_transcoder) one"
    )


def export_saelens(sae: SparseDictionary, out: str | os.PathLike, *, model_name: str | None = None) -> Path:
    """Write `sae` in SAELens' layout: `out/cfg.json` and `out/sae_weights.safetensors` (normalisation folded).

    A BatchTopK dictionary is written as SAELens saves one, a "jumprelu" with its threshold on every latent.
    """
    from safetensors.torch import save as st_save

    arch = _saelens_arch(sae)
    c = sae.cfg
    weights = {k: v.detach().cpu().float().contiguous() for k, v in sae.folded_weights().items()}
    if arch in ("topk", "standard", "transcoder", "skip_transcoder"):
        weights.pop("threshold", None)
    model = (sae.base or {}).get("source") or "tinygpt"
    cfg: dict[str, Any] = {
        "architecture": arch,
        "d_in": c.d_in,
        "d_sae": c.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": bool(c.apply_b_dec_to_input),
        "normalize_activations": "none",
        "reshape_activations": "hook_z" if c.hook.endswith("hook_z") else "none",
        "hook_name": c.hook,
        "metadata": {
            "sae_lens_version": SAELENS_VERSION,
            "model_name": model_name or model,
            "hook_name": c.hook,
            "hook_head_index": None,
            "prepend_bos": False,
            "context_size": (sae.training_state.get("settings") or {}).get("context"),
            "tinygpt": {
                "arch": c.arch,
                "k": c.k,
                "bandwidth": c.bandwidth,
                "base_model_fingerprint": (sae.base or {}).get("fingerprint"),
            },
        },
    }
    if arch == "topk":
        cfg.update(k=c.k, rescale_acts_by_decoder_norm=False)
    if c.transcoder:
        cfg["d_out"] = c.d_out
        cfg["hook_name_out"] = cfg["metadata"]["hook_name_out"] = c.out_hook
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DictionaryFileError(f"{out} exists and is not a directory; SAELens' layout is a directory")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / SAELENS_WEIGHTS, st_save(weights))
    atomic_write_text(out / SAELENS_CFG, json.dumps(cfg, indent=2) + "\n")
    return out


_FROM_SAELENS = {
    "topk": "topk",
    "jumprelu": "jumprelu",
    "standard": "relu",
    "transcoder": "relu",
    "skip_transcoder": "relu",
    "jumprelu_transcoder": "jumprelu",
}


def import_saelens(
    path: str | os.PathLike, model=None, *, hook: str | None = None, check: bool = True
) -> SparseDictionary:
    """Read an SAELens directory (`cfg.json` + `sae_weights.safetensors`) as a tinygpt dictionary.

    Architectures "standard" (ReLU), "topk", "jumprelu", "transcoder", "skip_transcoder" and
    "jumprelu_transcoder" are read; a "jumprelu" exported by tinygpt from a BatchTopK dictionary comes back as
    BatchTopK. `rescale_acts_by_decoder_norm` is folded into the weights. The result is unpinned (SAELens files
    carry no weights fingerprint) unless it was exported by tinygpt; with `model`, its hooks are checked.

    Args:
        path: the directory.
        model: a model to check the hooks against (and to move the dictionary to its device).
        hook: the hook to use when `cfg.json` names one this model does not have (e.g. another model family's).
        check: with `model`, refuse a dictionary pinned (by a tinygpt export) to another model's weights
            (`DictionaryMismatchError`); False checks only the hooks and widths.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / SAELENS_CFG).is_file() or not (path / SAELENS_WEIGHTS).is_file():
        raise DictionaryFileError(f"{path} is not an SAELens directory: it needs {SAELENS_CFG} and {SAELENS_WEIGHTS}")
    try:
        cfg = json.loads((path / SAELENS_CFG).read_text())
        w = load_file(str(path / SAELENS_WEIGHTS))
    except Exception as e:  # noqa: BLE001 - JSON or safetensors errors, reported as one
        raise DictionaryFileError(f"{path}: unreadable SAELens files ({e})") from e
    meta = cfg.get("metadata") or {}
    arch_sl = cfg.get("architecture", "standard")
    if arch_sl not in _FROM_SAELENS:
        raise DictionaryFileError(
            f"{path}: SAELens architecture {arch_sl!r} is not supported ({sorted(_FROM_SAELENS)})"
        )
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise DictionaryFileError(f"{path}: normalize_activations={cfg['normalize_activations']!r} is not folded in")
    if arch_sl == "standard" and cfg.get("activation_fn", "relu") != "relu":
        raise DictionaryFileError(f"{path}: activation_fn {cfg['activation_fn']!r} is not supported (only relu)")
    ours = meta.get("tinygpt") or {}
    arch = "batchtopk" if ours.get("arch") == "batchtopk" and arch_sl == "jumprelu" else _FROM_SAELENS[arch_sl]
    try:
        W_enc, b_enc, W_dec, b_dec = (w[k].float() for k in ("W_enc", "b_enc", "W_dec", "b_dec"))
    except KeyError as e:
        raise DictionaryFileError(f"{path}: {SAELENS_WEIGHTS} lacks {e}") from None
    if arch_sl == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        n = W_dec.norm(dim=-1)
        W_enc, b_enc, W_dec = W_enc * n, b_enc * n, W_dec / n[:, None]
    transcoder = arch_sl.endswith("transcoder")
    hook = hook or meta.get("hook_name") or cfg.get("hook_name")
    out_hook = (meta.get("hook_name_out") or cfg.get("hook_name_out")) if transcoder else None
    if not hook or (transcoder and not out_hook):
        raise DictionaryFileError(f"{path}: cfg.json names no hook_name{' / hook_name_out' if transcoder else ''}")
    k = cfg.get("k", ours.get("k"))
    dcfg = DictionaryConfig(
        arch=arch,
        d_in=int(cfg["d_in"]),
        d_sae=int(cfg["d_sae"]),
        hook=hook,
        out_hook=out_hook,
        d_out=int(cfg.get("d_out", cfg["d_in"])),
        k=int(k) if k is not None and arch in ("topk", "batchtopk") else None,
        skip=arch_sl == "skip_transcoder",
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", not transcoder)),
        bandwidth=float(ours.get("bandwidth", 0.05)),
    )
    sae = make_dictionary(dcfg)
    sd = {
        "W_enc": W_enc,
        "b_enc": b_enc,
        "W_dec": W_dec,
        "b_dec": b_dec,
        "in_scale": torch.ones(()),
        "out_scale": torch.ones(()),
    }
    for name in ("W_skip",) * dcfg.skip + ("threshold",) * (arch in ("jumprelu", "batchtopk")):
        if name not in w:
            raise DictionaryFileError(f"{path}: {SAELENS_WEIGHTS} lacks {name!r}, which {arch_sl!r} needs")
    if dcfg.skip:
        sd["W_skip"] = w["W_skip"].float()
    if arch == "jumprelu":
        sd["threshold"] = w["threshold"].float()
    elif arch == "batchtopk":
        sd["threshold"] = w["threshold"].float().reshape(-1)[0]
    try:
        sae.load_state_dict(sd)
    except RuntimeError as e:
        raise DictionaryFileError(f"{path}: weight shapes do not match cfg.json: {e}") from e
    if ours.get("base_model_fingerprint"):
        sae.base = {"fingerprint": ours["base_model_fingerprint"], "config": None, "source": str(path)}
    sae.source_path = str(path)
    if model is not None:
        check_model(sae, model, check=check, what=f"{path}")
        sae.to(next(model.parameters()).device)
    return sae


__all__ = ["check_model", "export_saelens", "import_saelens", "load_sae", "model_pin", "read_sae_file", "save_sae"]
