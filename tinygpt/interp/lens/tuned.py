"""The tuned lens (Belrose et al. 2023): one affine translator per layer, its training and its `.lenses` file.

    lens = tuned_lens(model, steps=300)                 # translators h + A h + b, the model frozen
    lens.save("tiny.lenses"); TunedLens.load("tiny.lenses", model)

A translator `h + A h + b` per block input (A, b initialised to zero, i.e. the logit lens) is trained to minimise
KL(final || lens) summed over layers with the base model frozen.

The `.lenses` file is one safetensors file (written by `tinygpt.checkpoint.write_tensor_file`, the writer of
every tinygpt file) whose JSON manifest, under the metadata key "tinygpt-lenses", pins the base model in
`base_model`, so a lens cannot be applied to the wrong model silently:

- `fingerprint`: `tinygpt.checkpoint.model_fingerprint` of the whole model (every weight: a lens reads every
  layer's residual, so any weight change moves what it was trained on). Written since the restructure.
- `unembed_sha256`: sha256 of the unembedding (`unembed_sha256`), the pin of files written before (still
  written, so older tinygpt versions keep reading new files). A file may carry either or both; each one it
  carries must match. `lens.pin(model)` re-pins, `TunedLens.load(..., check=False)` skips the check.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from tinygpt.checkpoint import (
    CheckpointError,
    load_matching,
    model_fingerprint,
    read_manifest,
    read_tensor_file,
    write_tensor_file,
)
from tinygpt.inputs import eval_mode, model_device, progress_enabled
from tinygpt.interp.lens.logit import check_lens, residual_stack

if TYPE_CHECKING:
    from tinygpt.model import GPT

FORMAT = "tinygpt-lenses"
FORMAT_VERSION = 1
SGD_LR, ADAM_LR = 1.0, 1e-3


class LensError(CheckpointError):
    """A `.lenses` file is missing, truncated, corrupt or foreign, or a lens does not fit the model."""


# ------------------------------------------------------------------------------------- base model pin
_HASH_CACHE: dict[int, tuple[weakref.ref, tuple, str]] = {}


def unembed_sha256(model: GPT) -> str:
    """sha256 of the model's unembedding weight (as float32 bytes, with its shape): the pre-restructure lens pin.

    Cached per weight tensor and invalidated by any in-place change (optimizer steps, `load_state_dict`).
    """
    w = model.unembed.weight
    key = (w.data_ptr(), w._version, tuple(w.shape), w.dtype, str(w.device))
    hit = _HASH_CACHE.get(id(w))
    if hit is not None and hit[0]() is w and hit[1] == key:
        return hit[2]
    t = w.detach().to("cpu", torch.float32).contiguous()
    h = hashlib.sha256(f"unembed|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy())
    digest = h.hexdigest()
    for k in [k for k, v in _HASH_CACHE.items() if v[0]() is None]:
        del _HASH_CACHE[k]
    _HASH_CACHE[id(w)] = (weakref.ref(w), key, digest)
    return digest


def _model_pin(model: GPT) -> dict[str, Any]:
    return {
        "fingerprint": model_fingerprint(model),
        "unembed_sha256": unembed_sha256(model),
        "config": model.cfg.to_dict(),
        "source": getattr(model, "source_path", None),
    }


# ------------------------------------------------------------------------------------------ TunedLens
class TunedLens(nn.Module):
    """One affine translator per block input: `h -> h + A_i h + b_i` (Belrose et al. 2023).

    `translators[i]` reads `blocks.{i}.hook_resid_pre` (i = 0 is the embeddings); the final residual has no
    translator. Weights and biases start at zero, so a fresh lens *is* the logit lens.

    Calling the lens, `lens(h, layer_idx)`, translates `h` [..., d_model]; `layer_idx == n_layers` (the final
    residual) is the identity. That is the `lens=f(h, layer_idx)` slot of TransformerLens'
    `transformer_lens.tools.analysis.logit_lens` (with its default `incl_mid=False`; see `as_tl_lens`).

    Args:
        d_model: residual width of the base model.
        n_layers: number of blocks of the base model.

    Attributes:
        base: the base-model pin (`fingerprint`, `unembed_sha256`, `config`, `source`) or None for an unpinned lens.
        train_settings: how the lens was trained (saved in the `.lenses` manifest).
        history: per-step training records (`step`, `loss`, `lr`), not saved.
    """

    def __init__(self, d_model: int, n_layers: int):
        super().__init__()
        self.d_model, self.n_layers = int(d_model), int(n_layers)
        self.translators = nn.ModuleList(nn.Linear(d_model, d_model) for _ in range(n_layers))
        for t in self.translators:
            nn.init.zeros_(t.weight)
            nn.init.zeros_(t.bias)
        self.base: dict[str, Any] | None = None
        self.train_settings: dict[str, Any] = {}
        self.history: list[dict[str, float]] = []

    @classmethod
    def from_model(cls, model: GPT) -> TunedLens:
        """An identity lens (= the logit lens) sized for and pinned to `model`, on its device."""
        lens = cls(model.cfg.d_model, model.cfg.n_layers).to(model_device(model))
        lens.base = _model_pin(model)
        return lens

    def forward(self, h: Tensor, layer_idx: int) -> Tensor:
        """Translate residual `h` [..., d_model] read at entry `layer_idx` (0..n_layers) of the stack."""
        idx = int(layer_idx)
        if not 0 <= idx <= self.n_layers:
            raise IndexError(
                f"layer_idx {layer_idx} out of range: this lens has entries 0..{self.n_layers} "
                f"(0..{self.n_layers - 1} = blocks' resid_pre, {self.n_layers} = final residual)"
            )
        if idx == self.n_layers:
            return h
        t = self.translators[idx]
        x = h.to(t.weight.dtype)
        return (x + t(x)).to(h.dtype)

    def logits(self, model: GPT, h: Tensor, layer_idx: int) -> Tensor:
        """`unembed(ln_final(lens(h, layer_idx)))`: [..., d_vocab]."""
        return model.unembed(model.ln_final(self(h, layer_idx)))

    def as_tl_lens(self, incl_mid: bool = False) -> Callable[[Tensor, int], Tensor]:
        """A `lens=` callable for TransformerLens' `logit_lens(..., incl_mid=incl_mid)`.

        With `incl_mid=False` the lens itself fits (stack entry i = block i's resid_pre). With `incl_mid=True`
        the stack interleaves `i_pre, i_mid`: pre entries get their translator, mid entries (which have none)
        are read with the plain logit lens.
        """
        if not incl_mid:
            return self

        def lens(h: Tensor, idx: int) -> Tensor:
            if idx == 2 * self.n_layers:
                return h
            return self(h, idx // 2) if idx % 2 == 0 else h

        return lens

    def check_model(self, model: GPT, *, check_hash: bool = True) -> None:
        """Raise `LensError` unless this lens fits `model`: its shape, and each base-model pin it records."""
        cfg = model.cfg
        if (cfg.d_model, cfg.n_layers) != (self.d_model, self.n_layers):
            raise LensError(
                f"this lens was made for d_model={self.d_model}, n_layers={self.n_layers} but the model has "
                f"d_model={cfg.d_model}, n_layers={cfg.n_layers}; train a lens for this model with tuned_lens(model)"
            )
        if not check_hash or not self.base:
            return
        for key, what, of in (
            ("unembed_sha256", "the unembedding hash", unembed_sha256),
            ("fingerprint", "the weights' fingerprint", model_fingerprint),
        ):
            want = self.base.get(key)
            if want and (got := of(model)) != want:
                src = self.base.get("source")
                raise LensError(
                    f"this lens was trained on a different model: {what} does not match (lens pinned to "
                    f"{want[:12]}{f' from {src}' if src else ''}, model has {got[:12]}). Train a lens for this "
                    "model (tuned_lens(model)); if the weights changed on purpose, re-pin with lens.pin(model) "
                    "or load with check=False"
                )

    def pin(self, model: GPT) -> TunedLens:
        """Pin this lens to `model` (after checking its shape): record its fingerprint, unembedding hash, config."""
        self.check_model(model, check_hash=False)
        self.base = _model_pin(model)
        return self

    def extra_repr(self) -> str:
        base = self.base or {}
        pin = base.get("fingerprint") or base.get("unembed_sha256")
        return f"d_model={self.d_model}, n_layers={self.n_layers}, " + (f"pinned to {pin[:12]}" if pin else "unpinned")

    # ------------------------------------------------------------------------------------ file format
    def save(self, path: str | os.PathLike) -> Path:
        """Write a `.lenses` file (one safetensors file + JSON manifest), atomically."""
        tensors = {k: v.detach().to("cpu", torch.float32) for k, v in self.state_dict().items()}
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": "tuned",
            "d_model": self.d_model,
            "n_layers": self.n_layers,
            "base_model": self.base,
            "training": self.train_settings,
        }
        return write_tensor_file(path, tensors, manifest, key=FORMAT, error=LensError, what="lens settings")

    @classmethod
    def load(
        cls, path: str | os.PathLike, model: GPT | None = None, *, check: bool = True, device: Any = None
    ) -> TunedLens:
        """Read a `.lenses` file; with `model`, verify it was trained on that model and move it to its device.

        Args:
            path: the file written by `TunedLens.save` (or `tinygpt tuned-lens --out`), new or pre-restructure.
            model: the base model; a lens pinned to another model raises `LensError` unless `check=False`.
            check: verify the base-model pins (fingerprint and/or unembedding hash) against `model`.
            device: where to put the lens (default: the model's device, else CPU).
        Raises:
            LensError: missing, truncated, corrupt or foreign file; or a lens for another model.
        """
        manifest, tensors = _read_lens_file(Path(path))
        lens = cls(manifest["d_model"], manifest["n_layers"])
        record = f"its manifest (d_model={manifest['d_model']}, n_layers={manifest['n_layers']})"
        load_matching(lens, tensors, where=str(path), record=record, error=LensError)
        lens.base = manifest.get("base_model")
        lens.train_settings = manifest.get("training") or {}
        if model is not None:
            try:
                lens.check_model(model, check_hash=check)
            except LensError as e:
                raise LensError(f"{path}: {e}") from None
            if check and not lens.base:
                warnings.warn(f"{path} records no base model; cannot verify it belongs to this model", stacklevel=2)
            device = device if device is not None else model_device(model)
        return lens.to(device) if device is not None else lens


def _read_lens_file(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Validate a `.lenses` file (`tinygpt.checkpoint.read_manifest`, then the tensors and their sha256)."""

    def missing(meta: dict[str, str]) -> str:
        what = "a tinygpt model checkpoint (.tinygpt)" if "tinygpt" in meta else "a safetensors file"
        return (
            f"{path} is {what}, not a .lenses file (no '{FORMAT}' manifest in its metadata); "
            "write lenses with TunedLens.save(path) or `tinygpt tuned-lens`"
        )

    manifest = read_manifest(
        path,
        key=FORMAT,
        max_version=FORMAT_VERSION,
        label=".lenses",
        desc="tinygpt lens file",
        error=LensError,
        missing=missing,
        directory=(
            f"{path} is a directory, not a .lenses file (tuned-lens package lenses are directories "
            "with params.pt; tinygpt reads only its own safetensors .lenses files)"
        ),
        version_name="lens format",
        manifest_name="lens",
    )
    if manifest.get("kind") != "tuned":
        raise LensError(f"{path}: unknown lens kind {manifest.get('kind')!r} (this tinygpt reads 'tuned')")
    for k in ("d_model", "n_layers"):
        if not isinstance(manifest.get(k), int) or manifest[k] < 1:
            raise LensError(f"{path}: invalid manifest field {k}={manifest.get(k)!r}")

    tensors = read_tensor_file(path, manifest, error=LensError)
    return manifest, tensors


# ------------------------------------------------------------------------------------ training the lens
def token_source(model: GPT, corpus: Any, val_split: float, cache_dir, progress: bool | None):
    """(train tokens, held-out tokens) 1-D arrays from a corpus spec or a token array (its last `val_split`)."""
    if isinstance(corpus, (Tensor, np.ndarray)):
        arr = np.asarray(corpus.cpu() if isinstance(corpus, Tensor) else corpus).reshape(-1)
        n_val = int(len(arr) * val_split)
        return arr[: len(arr) - n_val], arr[len(arr) - n_val :]
    from tinygpt.data import tokenize_corpus

    data = tokenize_corpus(corpus, model._require_tokenizer(), cache_dir=cache_dir, progress=progress_enabled(progress))
    return data.split(val_split)


def _optimizer(params: list[Tensor], optimizer: str, lr: float, momentum: float, weight_decay: float):
    if optimizer == "sgd":  # the paper's convention: torch's momentum scales the step by 1 / (1 - momentum)
        return torch.optim.SGD(
            params, lr=lr * (1 - momentum), momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay
        )
    return torch.optim.Adam(params, lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay, amsgrad=True)


def _check_settings(optimizer: str, steps: int, batch_size: int, momentum: float, lr: float) -> None:
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got steps={steps}, batch_size={batch_size}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if optimizer == "sgd" and lr < 1e-2:
        warnings.warn(
            f"SGD lr={lr:g} is tiny in the tuned-lens convention (default 1.0; torch's SGD gets lr * (1 - momentum)); "
            "it looks like an Adam learning rate: pass optimizer='adam' or a larger lr",
            stacklevel=3,
        )


def tuned_lens(
    model: GPT,
    corpus: Any = None,
    *,
    steps: int = 300,
    lr: float | None = None,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 1e-3,
    warmup: int | None = None,
    batch_size: int = 8,
    ctx: int | None = None,
    grad_clip: float = 1.0,
    val_split: float = 0.01,
    seed: int = 0,
    lens: TunedLens | None = None,
    progress: bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    callbacks: Sequence[Callable[[dict[str, float]], Any]] = (),
) -> TunedLens:
    """Train a tuned lens (Belrose et al. 2023) on `model`, which stays frozen.

    Each step draws `batch_size` windows of `ctx` tokens (`tinygpt.data.batch_starts`/`windows`, a pure
    function of (seed, step)) from the training part of the corpus, and minimises
    `sum_i mean_tokens KL(final || lens_i)` over the n_layers translators (backward one layer at a time).

    Optimisers, as in the paper's code: "sgd" = SGD with Nesterov momentum `momentum`; `lr` uses their
    convention that PyTorch's momentum scales the step by 1/(1 - momentum), so torch's SGD receives
    `lr * (1 - momentum)` (default lr 1.0 -> 0.1). "adam" = Adam(amsgrad, betas=(momentum, 0.999)), default
    lr 1e-3, with linear warmup (default min(1000, steps // 5) steps). Both use coupled weight decay
    `weight_decay` (1e-3), a linear decay of the LR to 0 at `steps` after warmup (SGD: no warmup) and
    gradient-norm clipping at `grad_clip` (0 disables). Both reach similar held-out KL on the tiny preset
    (300 steps each); the `tinygpt tuned-lens` command defaults to Adam, so its `--lr 1e-3` is an Adam rate.

    Args:
        model: the base `tinygpt.GPT` (its requires_grad flags and train/eval mode are restored afterwards).
        corpus: a path (text file, directory, .jsonl), a `Corpus`, None for the built-in Shakespeare, or a
            1-D token array; tokenized with `model.tokenizer` through the token cache.
        steps: optimizer steps (the paper: 250 steps of 2^18 tokens; here `batch_size * ctx` tokens per step).
        lr: learning rate (None: 1.0 for SGD in the paper's convention, 1e-3 for Adam).
        optimizer: "sgd" (the paper's default) or "adam".
        val_split: the last fraction of the corpus is held out (for `lens_report`), matching `train()`.
        seed: seeds the batches.
        lens: continue training this lens instead of a fresh identity lens.
        progress: a progress bar (None: the package default, `tinygpt.inputs.DEFAULT_PROGRESS`).
        callbacks: called with each step's record (`step`, `loss`, `lr`, `kl` per layer).
    Returns:
        The trained `TunedLens`, pinned to `model`, with `.history` and `.train_settings`.
    """
    from tqdm.auto import tqdm

    from tinygpt.data import batch_starts, windows
    from tinygpt.training import TrainingDiverged

    lr = float(lr if lr is not None else (SGD_LR if optimizer == "sgd" else ADAM_LR))
    _check_settings(optimizer, steps, batch_size, momentum, lr)
    if warmup is None:
        warmup = min(1000, steps // 5) if optimizer == "adam" else 0
    ctx = int(ctx or model.cfg.n_ctx)
    if ctx > model.cfg.n_ctx:
        raise ValueError(f"ctx={ctx} exceeds the model's n_ctx={model.cfg.n_ctx}")
    progress = progress_enabled(progress)
    train_tokens, _ = token_source(model, corpus, val_split, cache_dir, progress)
    device = model_device(model)
    if lens is None:
        lens = TunedLens.from_model(model)
    else:
        check_lens(model, lens)
        lens.to(device)
    L = model.cfg.n_layers
    params = list(lens.parameters())
    opt = _optimizer(params, optimizer, lr, momentum, weight_decay)
    base_lr = opt.param_groups[0]["lr"]

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))

    settings = dict(
        optimizer=optimizer,
        lr=lr,
        torch_lr=base_lr,
        momentum=momentum,
        nesterov=optimizer == "sgd",
        weight_decay=weight_decay,
        warmup=warmup,
        schedule="linear",
        steps=steps,
        batch_size=batch_size,
        ctx=ctx,
        tokens_per_step=batch_size * ctx,
        grad_clip=grad_clip,
        seed=seed,
        val_split=val_split,
        loss="sum over layers of mean KL(final || lens)",
        corpus=str(corpus) if isinstance(corpus, (str, os.PathLike)) else (None if corpus is None else "tokens"),
    )
    requires = [p.requires_grad for p in model.parameters()]
    history: list[dict[str, Any]] = []
    bar = tqdm(total=steps, desc="tuned lens", disable=not progress, dynamic_ncols=True)
    try:
        model.requires_grad_(False)
        with eval_mode(model):
            lens.train()
            for step in range(steps):
                for g in opt.param_groups:
                    g["lr"] = base_lr * lr_factor(step)
                x, _ = windows(train_tokens, batch_starts(len(train_tokens), ctx, batch_size, seed, step), ctx, device)
                with torch.no_grad():
                    logits, stack = residual_stack(model, x)
                    lp_final = logits.float().log_softmax(-1)
                    p_final = lp_final.exp()
                kl_layers = []
                for i in range(L):  # one graph at a time keeps memory at one layer's logits
                    lp = lens.logits(model, stack[i], i).float().log_softmax(-1)
                    kl = (p_final * (lp_final - lp)).sum(-1).mean()
                    kl.backward()
                    kl_layers.append(kl.item())
                loss = sum(kl_layers)
                gn = (
                    torch.nn.utils.clip_grad_norm_(params, grad_clip)
                    if grad_clip > 0
                    else torch.stack([p.grad.norm() for p in params]).norm()
                ).item()
                if not (math.isfinite(loss) and math.isfinite(gn)):
                    raise TrainingDiverged(
                        f"tuned-lens loss became {loss} (grad norm {gn}) at step {step + 1}; "
                        "lower lr or keep grad_clip on"
                    )
                opt.step()
                opt.zero_grad(set_to_none=True)
                lr_now = opt.param_groups[0]["lr"]
                rec = {"step": step + 1, "loss": loss, "lr": lr_now, "grad_norm": gn, "kl": kl_layers}
                history.append(rec)
                bar.set_postfix_str(f"KL sum {loss:.3f}", refresh=False)
                bar.update(1)
                for cb in callbacks:
                    cb(rec)
    finally:
        bar.close()
        lens.eval()
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
    lens.base = _model_pin(model)
    lens.train_settings = {**settings, "final_loss": history[-1]["loss"] if history else None}
    lens.history = history
    return lens
