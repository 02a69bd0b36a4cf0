"""Logit lens and tuned lens: what does each layer of the residual stream already predict?

    import tinygpt
    from tinygpt.interp import logit_lens, tuned_lens, lens_report, TunedLens

    model = tinygpt.load("tiny.tinygpt")
    res = logit_lens(model, "ROMEO: But soft, what light", k=5)   # a LensResult
    res.figure("entropy")                                           # layer x position heatmap
    lens = tuned_lens(model, steps=300)                             # Belrose et al. (2023) translators
    logit_lens(model, "ROMEO: But soft", lens=lens).figure("kl")
    print(lens_report(model, lens).table())                        # held-out KL per layer
    lens.save("tiny.lenses"); TunedLens.load("tiny.lenses", model)

Layers are read where the tuned-lens paper reads them: `hidden_states[i]` = `blocks.{i}.hook_resid_pre`
(entry 0 is the embeddings) plus the final residual (`blocks.{L-1}.hook_resid_post`), so a result has
`n_layers + 1` entries labelled like TransformerLens' `accumulated_resid` ("0_pre" ... "final_post").
An entry's logits are `unembed(ln_final(h))`: the final LayerNorm is recomputed on the intermediate residual,
as TransformerLens' `logit_lens` does; the last entry therefore reproduces the model's own logits.

The tuned lens adds one affine translator per block input, `h + A h + b` (A, b initialised to zero, i.e. the
logit lens), trained to minimise KL(final || lens) summed over layers with the base model frozen. `.lenses`
files are one safetensors file with a JSON manifest that pins the base model (sha256 of its unembedding), so a
lens cannot be applied to the wrong model silently.
"""

from __future__ import annotations

import hashlib
import html
import json
import math
import os
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from tinygpt.checkpoint import CheckpointError, content_hash, read_manifest
from tinygpt.io import atomic_write_bytes

if TYPE_CHECKING:
    from tinygpt.model import GPT

FORMAT = "tinygpt-lenses"
FORMAT_VERSION = 1
METRICS = ("entropy", "kl", "prob", "rank")

__all__ = [
    "LensError",
    "LensReport",
    "LensResult",
    "TunedLens",
    "lens_report",
    "logit_lens",
    "residual_stack",
    "tuned_lens",
    "unembed_sha256",
]


class LensError(CheckpointError):
    """A `.lenses` file is missing, truncated, corrupt or foreign, or a lens does not fit the model."""


# ------------------------------------------------------------------------------------- base model pin
_HASH_CACHE: dict[int, tuple[weakref.ref, tuple, str]] = {}


def unembed_sha256(model: GPT) -> str:
    """sha256 of the model's unembedding weight (as float32 bytes, with its shape): the lens pin.

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
        base: the base-model pin (`unembed_sha256`, `config`, `source`) or None for an unpinned lens.
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
        lens = cls(model.cfg.d_model, model.cfg.n_layers).to(model.unembed.weight.device)
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
        """Raise `LensError` unless this lens fits `model` (shape, and the unembedding pin when present)."""
        cfg = model.cfg
        if (cfg.d_model, cfg.n_layers) != (self.d_model, self.n_layers):
            raise LensError(
                f"this lens was made for d_model={self.d_model}, n_layers={self.n_layers} but the model has "
                f"d_model={cfg.d_model}, n_layers={cfg.n_layers}; train a lens for this model with tuned_lens(model)"
            )
        if check_hash and self.base and self.base.get("unembed_sha256"):
            got = unembed_sha256(model)
            if got != self.base["unembed_sha256"]:
                src = self.base.get("source")
                raise LensError(
                    "this lens was trained on a different model: the unembedding hash does not match "
                    f"(lens pinned to {self.base['unembed_sha256'][:12]}{f' from {src}' if src else ''}, model has "
                    f"{got[:12]}). Train a lens for this model (tuned_lens(model)); if the weights changed on "
                    "purpose, re-pin with lens.pin(model) or load with check=False"
                )

    def pin(self, model: GPT) -> TunedLens:
        """Pin this lens to `model` (after checking its shape): record its unembedding hash and config."""
        self.check_model(model, check_hash=False)
        self.base = _model_pin(model)
        return self

    def extra_repr(self) -> str:
        pin = f", pinned to {self.base['unembed_sha256'][:12]}" if self.base else ", unpinned"
        return f"d_model={self.d_model}, n_layers={self.n_layers}{pin}"

    # ------------------------------------------------------------------------------------ file format
    def save(self, path: str | os.PathLike) -> Path:
        """Write a `.lenses` file (one safetensors file + JSON manifest), atomically."""
        from safetensors.torch import save as st_save

        path = Path(path)
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.state_dict().items()}
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": "tuned",
            "d_model": self.d_model,
            "n_layers": self.n_layers,
            "base_model": self.base,
            "training": self.train_settings,
            "content_sha256": content_hash(tensors),
        }
        try:
            data = st_save(tensors, metadata={FORMAT: json.dumps(manifest)})
        except TypeError as e:
            raise LensError(f"lens settings are not JSON-serialisable: {e}") from e
        atomic_write_bytes(path, data)
        return path

    @classmethod
    def load(
        cls, path: str | os.PathLike, model: GPT | None = None, *, check: bool = True, device: Any = None
    ) -> TunedLens:
        """Read a `.lenses` file; with `model`, verify it was trained on that model and move it to its device.

        Args:
            path: the file written by `TunedLens.save` (or `tinygpt tuned-lens --out`).
            model: the base model; a lens pinned to another model raises `LensError` unless `check=False`.
            check: verify the unembedding hash against `model`.
            device: where to put the lens (default: the model's device, else CPU).
        Raises:
            LensError: missing, truncated, corrupt or foreign file; or a lens for another model.
        """
        manifest, tensors = _read_lens_file(Path(path))
        lens = cls(manifest["d_model"], manifest["n_layers"])
        expected = set(lens.state_dict())
        if set(tensors) != expected:
            raise LensError(
                f"{path}: tensors do not match the manifest (d_model={manifest['d_model']}, "
                f"n_layers={manifest['n_layers']}): missing {sorted(expected - set(tensors))[:4]}, "
                f"unexpected {sorted(set(tensors) - expected)[:4]}"
            )
        try:
            lens.load_state_dict(tensors)
        except RuntimeError as e:
            raise LensError(f"{path}: tensor shapes do not match the manifest: {e}") from e
        lens.base = manifest.get("base_model")
        lens.train_settings = manifest.get("training") or {}
        if model is not None:
            try:
                lens.check_model(model, check_hash=check)
            except LensError as e:
                raise LensError(f"{path}: {e}") from None
            if check and not lens.base:
                import warnings

                warnings.warn(f"{path} records no base model; cannot verify it belongs to this model", stacklevel=2)
            device = device if device is not None else model.unembed.weight.device
        return lens.to(device) if device is not None else lens


def _read_lens_file(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Validate a `.lenses` file (the checks of `tinygpt.checkpoint.read_checkpoint`) and parse it."""

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
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error type
        raise LensError(f"{path}: corrupt tensor data ({e})") from e
    if "content_sha256" in manifest and content_hash(tensors) != manifest["content_sha256"]:
        raise LensError(f"{path} is corrupt: tensor content does not match its recorded sha256")
    return manifest, tensors


# ------------------------------------------------------------------------------------ the residual stack
def stack_labels(n_layers: int) -> list[str]:
    """TransformerLens' `accumulated_resid` labels: "0_pre" ... "{L-1}_pre", "final_post"."""
    return [f"{i}_pre" for i in range(n_layers)] + ["final_post"]


def residual_stack(model: GPT, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """One forward pass: (logits [b, p, d_vocab], stack [n_layers + 1, b, p, d_model]).

    `stack[i]` is `blocks.{i}.hook_resid_pre` for i < n_layers and the last block's `hook_resid_post` for
    i = n_layers. Runs under the caller's grad mode.
    """
    L = model.cfg.n_layers
    names = [f"blocks.{i}.hook_resid_pre" for i in range(L)] + [f"blocks.{L - 1}.hook_resid_post"]
    acts: dict[str, Tensor] = {}

    def save(t: Tensor, hook) -> None:
        acts[hook.name] = t

    logits = model.run_with_hooks(tokens, fwd_hooks=[(n, save) for n in names])
    return logits, torch.stack([acts[n] for n in names])


def _layer_logits(model: GPT, h: Tensor, layer: int, lens: TunedLens | None) -> Tensor:
    if lens is not None:
        h = lens(h, layer)
    return model.unembed(model.ln_final(h))


def _as_tokens(model: GPT, x: Any) -> Tensor:
    """A prompt (text), token ids [p] / [1, p] / list -> tokens [1, p] on the model's device."""
    if isinstance(x, str):
        tokens = model.to_tokens(x)
    else:
        tokens = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).long()
        if tokens.ndim == 2 and tokens.shape[0] == 1:
            tokens = tokens[0]
        if tokens.ndim != 1:
            raise ValueError(
                f"logit_lens reads one sequence: pass text or token ids [pos] (or [1, pos]), "
                f"got shape {tuple(tokens.shape)}; loop over a batch"
            )
        tokens = tokens[None].to(model.unembed.weight.device)
    if tokens.shape[1] == 0:
        raise ValueError("logit_lens needs at least one token")
    if int(tokens.min()) < 0 or int(tokens.max()) >= model.cfg.d_vocab:
        raise ValueError(f"token ids must be in [0, {model.cfg.d_vocab})")
    return tokens


def _resolve_targets(model: GPT, tokens: Tensor, target: Any) -> Tensor:
    """Per-position target ids [pos]; -1 where there is none."""
    p = tokens.shape[1]
    if target is None:
        out = torch.full((p,), -1, dtype=torch.long)
        out[:-1] = tokens[0, 1:].cpu()
        return out
    if isinstance(target, str):
        target = model.to_single_token(target)
    if isinstance(target, (int, np.integer)) or (isinstance(target, Tensor) and target.ndim == 0):
        out = torch.full((p,), int(target), dtype=torch.long)
    else:
        out = torch.as_tensor(target, dtype=torch.long).reshape(-1).cpu()
        if out.numel() != p:
            raise ValueError(
                f"target has {out.numel()} entries but the sequence has {p} positions "
                "(pass one id, one single-token string, or one id per position with -1 for none)"
            )
    bad = (out < -1) | (out >= model.cfg.d_vocab)
    if bad.any():
        raise ValueError(f"target ids must be in [0, {model.cfg.d_vocab}) (or -1 for none), got {out[bad].tolist()}")
    return out


def _str_token(model: GPT, i: int) -> str:
    tok = getattr(model, "tokenizer", None)
    return tok.token_str(int(i)) if tok is not None else str(int(i))


def _check_lens(model: GPT, lens: TunedLens | None) -> None:
    if lens is not None:
        if not isinstance(lens, TunedLens):
            raise TypeError(f"lens must be a TunedLens (or None for the logit lens), got {type(lens).__name__}")
        lens.check_model(model)


class _eval_mode:
    """Put a model in eval mode for the block and restore its previous mode after."""

    def __init__(self, *modules: nn.Module | None):
        self.modules = [m for m in modules if m is not None]

    def __enter__(self):
        self.modes = [m.training for m in self.modules]
        for m in self.modules:
            m.eval()

    def __exit__(self, *exc):
        for m, mode in zip(self.modules, self.modes):
            m.train(mode)
        return False


# ------------------------------------------------------------------------------------------ logit lens
@dataclass
class LensResult:
    """What every layer predicts at every position (`logit_lens`'s result). Entry i of the layer axis is
    `labels[i]`; the last entry is the model's own output.

    Attributes:
        tokens: the input ids [pos].
        str_tokens: readable input tokens (len pos).
        labels: layer labels ("0_pre" ... "final_post"), n_layers + 1 of them.
        top_ids, top_probs: the k most likely tokens and their probabilities [n_layers + 1, pos, k].
        top_strs: readable `top_ids` (nested lists [layer][pos][k]).
        entropy: entropy of each layer's distribution, nats [n_layers + 1, pos].
        kl: KL(final || layer) in nats [n_layers + 1, pos] (0 for the last entry).
        target_ids: the token whose rank/probability is tracked at each position [pos] (-1: none).
        target_rank: 0-based rank of the target among all tokens (0 = top-1; ties count only strictly
            larger logits) [n_layers + 1, pos]; -1 where there is no target.
        target_prob: probability of the target [n_layers + 1, pos]; NaN where there is no target.
        lens: "logit" or "tuned".
    """

    tokens: Tensor
    str_tokens: list[str]
    labels: list[str]
    top_ids: Tensor
    top_probs: Tensor
    top_strs: list[list[list[str]]]
    entropy: Tensor
    kl: Tensor
    target_ids: Tensor
    target_rank: Tensor
    target_prob: Tensor
    lens: str = "logit"
    target_strs: list[str] = field(default_factory=list)

    @property
    def n_layers(self) -> int:
        return len(self.labels) - 1

    def top(self, layer: int, pos: int) -> list[tuple[str, float]]:
        """(token, probability) pairs of the top-k at one layer and position."""
        return [(s, float(p)) for s, p in zip(self.top_strs[layer][pos], self.top_probs[layer, pos])]

    def __repr__(self) -> str:
        return (
            f"LensResult({self.lens} lens, {len(self.labels)} layers x {len(self.str_tokens)} positions, "
            f"top-{self.top_ids.shape[-1]})"
        )

    def figure(self, metric: str = "entropy"):
        """Plotly heatmap (layer x position) of `metric`: "entropy", "kl", "prob" or "rank" (of the target).

        Cells show the layer's top-1 token; the hover shows the top-5 with probabilities and the target.
        """
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        import plotly.graph_objects as go

        n_l, n_p = len(self.labels), len(self.str_tokens)
        has_t = self.target_ids >= 0
        if metric == "entropy":
            z, title, scale, zmin = self.entropy, "entropy (nats)", "Viridis", 0.0
        elif metric == "kl":
            z, title, scale, zmin = self.kl, "KL(final || layer), nats", "Reds", 0.0
        elif metric == "prob":
            z, title, scale, zmin = self.target_prob, "P(target)", "Blues", 0.0
        else:
            r = self.target_rank.float()
            z = torch.where(r >= 0, torch.log10(r + 1), torch.full_like(r, float("nan")))
            title, scale, zmin = "target rank", "Viridis_r", 0.0
        zz = [[None if not math.isfinite(v) else v for v in row] for row in z.float().tolist()]
        text = [[_show(self.top_strs[li][p][0]) for p in range(n_p)] for li in range(n_l)]
        hover = []
        for li in range(n_l):
            row = []
            for p in range(n_p):
                lines = [
                    f"<b>{html.escape(self.labels[li])}</b> · pos {p} {html.escape(repr(self.str_tokens[p]))}",
                    f"entropy {float(self.entropy[li, p]):.3f} · KL {float(self.kl[li, p]):.3f}",
                ]
                if has_t[p]:
                    tgt = self.target_strs[p] if self.target_strs else str(int(self.target_ids[p]))
                    lines.append(
                        f"target {html.escape(repr(tgt))}: rank {int(self.target_rank[li, p])}, "
                        f"p={float(self.target_prob[li, p]):.3f}"
                    )
                k = min(5, self.top_ids.shape[-1])
                lines += [
                    f"{html.escape(repr(self.top_strs[li][p][j]))} {float(self.top_probs[li, p, j]):.3f}"
                    for j in range(k)
                ]
                row.append("<br>".join(lines))
            hover.append(row)
        colorbar: dict[str, Any] = dict(title=title)
        if metric == "rank":
            ticks = [r for r in (0, 1, 10, 100, 1000, 10000, 100000) if r <= 10 * max(1, self.top_ids.numel())]
            colorbar.update(tickvals=[math.log10(r + 1) for r in ticks], ticktext=[str(r) for r in ticks])
        heat = go.Heatmap(
            z=zz,
            x=list(range(n_p)),
            y=list(range(n_l)),
            text=text,
            texttemplate="%{text}",
            customdata=hover,
            hovertemplate="%{customdata}<extra></extra>",
            colorscale=scale,
            zmin=zmin,
            zmax=1.0 if metric == "prob" else None,
            colorbar=colorbar,
        )
        fig = go.Figure(heat)
        fig.update_layout(
            title=f"{self.lens} lens: {title}",
            template="plotly_white",
            xaxis_title="input token (position)",
            yaxis_title="layer",
            height=max(300, 40 * n_l + 150),
            width=max(500, 60 * n_p + 200),
        )
        fig.update_xaxes(tickvals=list(range(n_p)), ticktext=[_show(s) for s in self.str_tokens], tickangle=0)
        fig.update_yaxes(tickvals=list(range(n_l)), ticktext=self.labels)
        return fig


def _show(s: str) -> str:
    """A token made visible in a plot cell: escaped newlines/tabs, spaces as '␣' when it is all blank."""
    s = s.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    if not s.strip():
        s = s.replace(" ", "␣")
    return html.escape(s)


def logit_lens(
    model: GPT,
    prompt_or_tokens: str | Tensor | Sequence[int],
    k: int = 5,
    target: int | str | Tensor | Sequence[int] | None = None,
    lens: TunedLens | None = None,
) -> LensResult:
    """Read every layer's residual stream through the final LayerNorm and unembedding.

    Args:
        model: a `tinygpt.GPT` (run in eval mode; its mode is restored afterwards).
        prompt_or_tokens: text, or one sequence of token ids [pos] / [1, pos].
        k: how many top tokens to keep per layer and position.
        target: the token to track per position: None = the actual next token (none at the last position),
            an id or single-token string for every position, or ids [pos] (-1 = none).
        lens: a `TunedLens` to translate each layer first (None = the plain logit lens).
    Returns:
        A `LensResult` with tensors [n_layers + 1, pos, ...] on the CPU.
    """
    _check_lens(model, lens)
    tokens = _as_tokens(model, prompt_or_tokens)
    targets = _resolve_targets(model, tokens, target)
    V = model.cfg.d_vocab
    if not 1 <= k <= V:
        raise ValueError(f"k must be in [1, {V}], got {k}")
    L = model.cfg.n_layers
    tops_i, tops_p, ents, kls, ranks, probs = [], [], [], [], [], []
    with torch.no_grad(), _eval_mode(model, lens):
        _, stack = residual_stack(model, tokens)
        lp_final = _layer_logits(model, stack[L], L, None).float().log_softmax(-1)[0]  # [p, V]
        p_final = lp_final.exp()
        tgt = targets.to(lp_final.device)
        has = tgt >= 0
        safe = tgt.clamp(min=0)[:, None]
        for i in range(L + 1):
            logits = _layer_logits(model, stack[i], i, lens).float()[0]  # [p, V]
            lp = logits.log_softmax(-1)
            top = lp.topk(k, dim=-1)
            tops_i.append(top.indices)
            tops_p.append(top.values.exp())
            ents.append(-(lp.exp() * lp).sum(-1))
            kls.append((p_final * (lp_final - lp)).sum(-1).clamp(min=0) if i < L else torch.zeros_like(lp[:, 0]))
            t_logit = logits.gather(-1, safe)
            ranks.append(torch.where(has, (logits > t_logit).sum(-1), -1))
            probs.append(torch.where(has, lp.gather(-1, safe)[:, 0].exp(), float("nan")))
    top_ids = torch.stack(tops_i).cpu()
    cache: dict[int, str] = {}

    def s(i: int) -> str:
        if i not in cache:
            cache[i] = _str_token(model, i)
        return cache[i]

    return LensResult(
        tokens=tokens[0].cpu(),
        str_tokens=[s(i) for i in tokens[0].tolist()],
        labels=stack_labels(L),
        top_ids=top_ids,
        top_probs=torch.stack(tops_p).cpu(),
        top_strs=[[[s(i) for i in pos] for pos in layer] for layer in top_ids.tolist()],
        entropy=torch.stack(ents).cpu(),
        kl=torch.stack(kls).cpu(),
        target_ids=targets,
        target_rank=torch.stack(ranks).cpu(),
        target_prob=torch.stack(probs).cpu(),
        lens="logit" if lens is None else "tuned",
        target_strs=[s(i) if i >= 0 else "" for i in targets.tolist()],
    )


# ------------------------------------------------------------------------------------ training the lens
SGD_LR, ADAM_LR = 1.0, 1e-3


def _token_source(model: GPT, corpus: Any, val_split: float, cache_dir, progress: bool):
    """(train tokens, held-out tokens) 1-D arrays from a corpus spec or a token array."""
    if isinstance(corpus, (Tensor, np.ndarray)):
        arr = np.asarray(corpus.cpu() if isinstance(corpus, Tensor) else corpus).reshape(-1)
        n_val = int(len(arr) * val_split)
        return arr[: len(arr) - n_val], arr[len(arr) - n_val :]
    from tinygpt.data import tokenize_corpus

    data = tokenize_corpus(corpus, model._require_tokenizer(), cache_dir=cache_dir, progress=progress)
    return data.split(val_split)


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
    progress: bool = True,
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
        callbacks: called with each step's record (`step`, `loss`, `lr`, `kl` per layer).
    Returns:
        The trained `TunedLens`, pinned to `model`, with `.history` and `.train_settings`.
    """
    from tqdm.auto import tqdm

    from tinygpt.data import batch_starts, windows
    from tinygpt.training.loop import TrainingDiverged

    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got steps={steps}, batch_size={batch_size}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    lr = float(lr if lr is not None else (SGD_LR if optimizer == "sgd" else ADAM_LR))
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if optimizer == "sgd" and lr < 1e-2:
        import warnings

        warnings.warn(
            f"SGD lr={lr:g} is tiny in the tuned-lens convention (default 1.0; torch's SGD gets lr * (1 - momentum)); "
            "it looks like an Adam learning rate: pass optimizer='adam' or a larger lr",
            stacklevel=2,
        )
    if warmup is None:
        warmup = min(1000, steps // 5) if optimizer == "adam" else 0
    ctx = int(ctx or model.cfg.n_ctx)
    if ctx > model.cfg.n_ctx:
        raise ValueError(f"ctx={ctx} exceeds the model's n_ctx={model.cfg.n_ctx}")
    train_tokens, _ = _token_source(model, corpus, val_split, cache_dir, progress)
    device = model.unembed.weight.device
    if lens is None:
        lens = TunedLens.from_model(model)
    else:
        _check_lens(model, lens)
        lens.to(device)
    L = model.cfg.n_layers
    params = [p for p in lens.parameters()]
    if optimizer == "sgd":
        opt = torch.optim.SGD(
            params, lr=lr * (1 - momentum), momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay
        )
    else:
        opt = torch.optim.Adam(params, lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay, amsgrad=True)
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
    was_training = model.training
    model.eval()
    model.requires_grad_(False)
    lens.train()
    history: list[dict[str, Any]] = []
    bar = tqdm(total=steps, desc="tuned lens", disable=not progress, dynamic_ncols=True)
    try:
        for step in range(steps):
            for g in opt.param_groups:
                g["lr"] = base_lr * lr_factor(step)
            starts = batch_starts(len(train_tokens), ctx, batch_size, seed, step)
            x, _ = windows(train_tokens, starts, ctx, device)
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
                    f"tuned-lens loss became {loss} (grad norm {gn}) at step {step + 1}; lower lr or keep grad_clip on"
                )
            opt.step()
            opt.zero_grad(set_to_none=True)
            rec = {"step": step + 1, "loss": loss, "lr": opt.param_groups[0]["lr"], "grad_norm": gn, "kl": kl_layers}
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
        model.train(was_training)
    lens.base = _model_pin(model)
    lens.train_settings = {**settings, "final_loss": history[-1]["loss"] if history else None}
    lens.history = history
    return lens


# --------------------------------------------------------------------------------------------- report
@dataclass
class LensReport:
    """Per-layer mean KL(final || layer) and next-token cross-entropy, logit lens vs tuned lens.

    Attributes:
        labels: layer labels, n_layers + 1 ("final_post" is the model itself: KL 0).
        logit_kl, tuned_kl: mean KL in nats [n_layers + 1].
        logit_ce, tuned_ce: mean next-token cross-entropy in nats [n_layers + 1].
        n_tokens: tokens averaged over.
    """

    labels: list[str]
    logit_kl: Tensor
    tuned_kl: Tensor
    logit_ce: Tensor
    tuned_ce: Tensor
    n_tokens: int

    def table(self) -> str:
        """A Markdown table: one row per layer."""
        rows = [
            "| layer | logit lens KL | tuned lens KL | logit lens CE | tuned lens CE |",
            "|---|---:|---:|---:|---:|",
        ]
        for i, lab in enumerate(self.labels):
            rows.append(
                f"| {lab} | {float(self.logit_kl[i]):.3f} | {float(self.tuned_kl[i]):.3f} | "
                f"{float(self.logit_ce[i]):.3f} | {float(self.tuned_ce[i]):.3f} |"
            )
        rows.append(
            f"\nKL(final || layer) and next-token cross-entropy in nats, mean over {self.n_tokens:,} held-out tokens."
        )
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.table()

    def _repr_markdown_(self) -> str:
        return self.table()

    def figure(self):
        """Plotly line chart: mean KL(final || layer) per layer for both lenses."""
        import plotly.graph_objects as go

        fig = go.Figure()
        fig.add_trace(go.Scatter(x=self.labels, y=self.logit_kl.tolist(), name="logit lens", mode="lines+markers"))
        fig.add_trace(go.Scatter(x=self.labels, y=self.tuned_kl.tolist(), name="tuned lens", mode="lines+markers"))
        fig.update_layout(
            title=f"KL(final || layer) on {self.n_tokens:,} held-out tokens",
            xaxis_title="layer",
            yaxis_title="KL (nats)",
            template="plotly_white",
        )
        return fig


def lens_report(
    model: GPT,
    lens: TunedLens | str | os.PathLike,
    corpus_or_tokens: Any = None,
    *,
    n_windows: int = 16,
    batch_size: int = 8,
    ctx: int | None = None,
    val_split: float = 0.01,
    progress: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> LensReport:
    """Compare the logit lens and a tuned lens on held-out text.

    Args:
        model: the base model.
        lens: a `TunedLens` or a `.lenses` path (checked against `model`).
        corpus_or_tokens: a corpus (path, `Corpus`, None = built-in Shakespeare), whose held-out last
            `val_split` is read in `n_windows` evenly spaced windows of `ctx` tokens; or tokens: [b, p]
            sequences used as given, or a 1-D array cut into windows of `ctx`.
        n_windows, batch_size, ctx: how much held-out text, in what batches (ctx default: the model's n_ctx).
    """
    from tinygpt.data import val_starts, windows

    if not isinstance(lens, TunedLens):
        lens = TunedLens.load(lens, model)
    _check_lens(model, lens)
    ctx = int(ctx or model.cfg.n_ctx)
    device = model.unembed.weight.device
    if (
        isinstance(corpus_or_tokens, (Tensor, np.ndarray, list))
        and np.asarray(corpus_or_tokens.cpu() if isinstance(corpus_or_tokens, Tensor) else corpus_or_tokens).ndim == 2
    ):
        seqs = torch.as_tensor(
            np.asarray(corpus_or_tokens.cpu() if isinstance(corpus_or_tokens, Tensor) else corpus_or_tokens)
        ).long()
    else:
        if isinstance(corpus_or_tokens, (Tensor, np.ndarray, list)):
            held = np.asarray(
                corpus_or_tokens.cpu() if isinstance(corpus_or_tokens, Tensor) else corpus_or_tokens
            ).reshape(-1)
        else:
            _, held = _token_source(model, corpus_or_tokens, val_split, cache_dir, progress)
        starts = val_starts(len(held), ctx, n_windows)
        x, y = windows(held, starts, ctx)
        seqs = torch.cat([x, y[:, -1:]], dim=1)  # [n, ctx + 1]: inputs plus the last target
    if seqs.shape[1] < 2:
        raise ValueError("lens_report needs sequences of at least 2 tokens")
    if seqs.shape[1] - 1 > model.cfg.n_ctx:
        raise ValueError(f"sequences of {seqs.shape[1] - 1} tokens exceed the model's n_ctx={model.cfg.n_ctx}")
    L = model.cfg.n_layers
    sums = torch.zeros(4, L + 1, dtype=torch.float64)
    n_tok = 0
    with torch.no_grad(), _eval_mode(model, lens):
        for b in range(0, len(seqs), batch_size):
            chunk = seqs[b : b + batch_size].to(device)
            x, y = chunk[:, :-1], chunk[:, 1:]
            _, stack = residual_stack(model, x)
            lp_final = _layer_logits(model, stack[L], L, None).float().log_softmax(-1)
            p_final = lp_final.exp()
            for i in range(L + 1):
                for j, ln in enumerate((None, lens)):
                    lp = _layer_logits(model, stack[i], i, ln).float().log_softmax(-1)
                    kl = (p_final * (lp_final - lp)).sum(-1).clamp(min=0) if i < L else torch.zeros_like(lp[..., 0])
                    ce = -lp.gather(-1, y[..., None])[..., 0]
                    sums[j, i] += kl.double().sum().cpu()
                    sums[2 + j, i] += ce.double().sum().cpu()
            n_tok += y.numel()
    mean = (sums / n_tok).float()
    return LensReport(
        labels=stack_labels(L), logit_kl=mean[0], tuned_kl=mean[1], logit_ce=mean[2], tuned_ce=mean[3], n_tokens=n_tok
    )
