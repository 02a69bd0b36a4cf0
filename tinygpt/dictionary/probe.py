"""Find latents: those separating a class of tokens (AUROC), firing on a text, or promoting a token.

    res = find_separating_latents(model, sae)                 # default class: inside a speaker tag ("ROMEO:")
    res.best                                                  # [(latent, auroc), ...] best first
    res = find_separating_latents(model, sae, labels=my_fn)   # my_fn(model, tokens [n, pos]) -> bool [n, pos]

For every feature, AUROC = P(a(positive token) > a(negative token)) + 0.5 * P(equal), computed exactly (ties
included: most latents are 0 on most tokens) by sorting the negatives and counting with `searchsorted`. A
feature that fires *outside* the class has AUROC < 0.5; the ranking is by AUROC itself.

`latents_for_text(model, sae, text)` and `latents_for_token(model, sae, token)` are the searches of a feature
browser: the latents that fire most on a text, and those whose decoder direction promotes a token.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tinygpt.checkpoint import as_model
from tinygpt.dictionary.activations import corpus_tokens, hook_activations, spaced_windows
from tinygpt.dictionary.errors import DictionaryError
from tinygpt.dictionary.features import feature_source
from tinygpt.dictionary.files import check_model
from tinygpt.dictionary.modules import SparseDictionary
from tinygpt.inputs import as_tokens, eval_mode, model_device, progress_enabled

#: a speaker tag like `ROMEO:` or `LADY CAPULET:`: a line holding an all-caps name and a colon (the default class)
SPEAKER_TAG = re.compile(rb"(?m)^[A-Z][A-Z0-9 ,.'&-]*[A-Z.]:$")
#: any speaker tag: also the mixed-case role tags of the corpus (`First Citizen:`, `Clown:`), i.e. up to four words
#: and a colon after a blank line; a verse line ending in a colon ("Stay but a while:") is not a tag
ANY_SPEAKER_TAG = re.compile(
    rb"(?m)(?:(?:\A|(?<=\n\n))[A-Z][\w.,'&-]*(?: [\w.,'&-]+){0,3}|^[A-Z][A-Z0-9 ,.'&-]*[A-Z.]):$"
)


def _token_bytes(tok, i: int) -> bytes:
    if hasattr(tok, "decode_bytes"):
        return tok.decode_bytes([i])
    return tok.decode([i]).encode("utf-8")


def text_span_labels(model, tokens: Tensor, pattern: re.Pattern[bytes]) -> Tensor:
    """bool [n, pos]: tokens overlapping a match of the bytes regex `pattern` in each window's decoded bytes."""
    tok = model.tokenizer
    if tok is None:
        raise DictionaryError("labelling tokens by text needs the model's tokenizer")
    out = torch.zeros(tokens.shape, dtype=torch.bool)
    cache: dict[int, bytes] = {}
    for r, row in enumerate(tokens.tolist()):
        pieces = [cache.setdefault(i, _token_bytes(tok, i)) for i in row]
        text = b"".join(pieces)
        inside = bytearray(len(text))
        for m in pattern.finditer(text):
            inside[m.start() : m.end()] = b"\x01" * (m.end() - m.start())
        pos = 0
        for c, p in enumerate(pieces):
            out[r, c] = any(inside[pos : pos + len(p)]) if p else False
            pos += len(p)
    return out


def speaker_tag_labels(model, tokens: Tensor) -> Tensor:
    """bool [n, pos]: the tokens of a speaker tag like `ROMEO:` or `LADY CAPULET:` (`SPEAKER_TAG`: an all-caps
    name and its colon on a line of their own)."""
    return text_span_labels(model, tokens, SPEAKER_TAG)


def any_speaker_tag_labels(model, tokens: Tensor) -> Tensor:
    """bool [n, pos]: the tokens of any speaker tag (`ANY_SPEAKER_TAG`): the all-caps ones and the mixed-case
    role tags such as `First Citizen:` or `Clown:`."""
    return text_span_labels(model, tokens, ANY_SPEAKER_TAG)


def auroc(values: Tensor, labels: Tensor) -> Tensor:
    """AUROC of each column of `values [N, F]` for bool `labels [N]` (ties count one half): [F]."""
    pos, neg = values[labels], values[~labels]
    if pos.shape[0] == 0 or neg.shape[0] == 0:
        raise DictionaryError("the labels need both positive and negative tokens")
    neg_sorted = neg.T.contiguous().sort(dim=-1).values  # [F, Nn]
    p = pos.T.contiguous()  # [F, Np]
    below = torch.searchsorted(neg_sorted, p, side="left").double()
    upto = torch.searchsorted(neg_sorted, p, side="right").double()
    return ((below + upto) / 2).sum(-1) / (pos.shape[0] * neg.shape[0])


@dataclass
class SeparationResult:
    """AUROC of every feature for a token class.

    Attributes:
        features: the feature ids scored (`(dictionary index, latent)` pairs when several dictionaries were
            searched); auroc: their AUROC [n_features]; best: `(feature, auroc)` best first.
        positives: the fraction of tokens in the class; tokens: tokens scored; hook: where the features live.
    """

    features: list[int]
    auroc: Tensor
    best: list[tuple[int, float]]
    positives: float
    tokens: int
    hook: str

    def __repr__(self) -> str:
        head = ", ".join(f"{f}: {a:.3f}" for f, a in self.best[:5])
        return f"SeparationResult({len(self.features)} features at {self.hook}; best AUROC {head})"

    def figure(self):
        """Plotly: the AUROC of every feature, sorted."""
        import plotly.graph_objects as go

        vals = self.auroc.sort(descending=True)
        ids = [self.features[i] for i in vals.indices.tolist()]
        fig = go.Figure(go.Scatter(y=vals.values.tolist(), text=[f"feature {i}" for i in ids], mode="markers"))
        fig.update_layout(
            height=340,
            title=f"AUROC per feature at {self.hook} ({self.positives:.1%} positive tokens)",
            xaxis_title="rank",
            yaxis_title="AUROC",
        )
        return fig


@torch.no_grad()
def find_separating_latents(
    model,
    source: Any,
    corpus: Any = None,
    *,
    labels: Callable[[Any, Tensor], Tensor] = speaker_tag_labels,
    hook: str | None = None,
    features: Any = None,
    tokens: int = 65_536,
    context: int = 128,
    top: int = 10,
    val_split: float = 0.05,
    batch: int = 16,
    cache_dir: Any = None,
    progress: bool | None = None,
) -> SeparationResult:
    """Score every feature of `source` by how well it separates `labels`' token class (AUROC); best first.

    Args:
        model: the model (or a `.tinygpt` path).
        source: a dictionary, "neurons" (with `hook`) or directions (with `hook`), as for `build_feature_index`;
            or a list of dictionaries (e.g. `train_sae(...).dictionaries`), searched together: features are then
            `(dictionary index, latent)` pairs.
        corpus: the corpus (default built-in Shakespeare) or token ids.
        labels: `labels(model, tokens [n, pos]) -> bool [n, pos]` (default: inside a speaker tag).
        tokens, context: about how many tokens to score, in windows of `context`.
        top: how many features `best` lists.
        val_split: score on this held-out tail of the corpus (0: evenly over all of it).
    """
    model = as_model(model)
    if isinstance(source, (list, tuple)) and source and all(isinstance(s, SparseDictionary) for s in source):
        opts = dict(labels=labels, tokens=tokens, context=context, top=top, val_split=val_split, batch=batch)
        parts = [
            find_separating_latents(model, s, corpus, features=features, cache_dir=cache_dir, progress=progress, **opts)
            for s in source
        ]
        feats = [(i, f) for i, r in enumerate(parts) for f in r.features]
        scores = torch.cat([r.auroc for r in parts])
        order = scores.argsort(descending=True)[:top].tolist()
        return SeparationResult(
            features=feats,
            auroc=scores,
            best=[(feats[j], float(scores[j])) for j in order],
            positives=parts[0].positives,
            tokens=parts[0].tokens,
            hook=", ".join(dict.fromkeys(r.hook for r in parts)),
        )
    hook, ids, fn, _, _ = feature_source(model, source, hook, features)
    show = progress_enabled(progress)
    arr = corpus_tokens(model, corpus, cache_dir=cache_dir, progress=show)
    ctx = min(context, model.cfg.n_ctx)
    start = len(arr) - int(len(arr) * val_split) if val_split > 0 else 0
    windows = spaced_windows(arr, ctx, start, len(arr), math.ceil(tokens / ctx))
    lab = labels(model, windows).reshape(-1).bool()
    vals = []
    device = model_device(model)
    with eval_mode(model):
        for i in range(0, windows.shape[0], batch):
            toks = windows[i : i + batch].to(device)
            a = hook_activations(model, toks, [hook])[hook]
            vals.append(fn(a.reshape(-1, a.shape[-1])).float().cpu())
    v = torch.cat(vals)
    scores = torch.cat([auroc(v[:, j : j + 256], lab).float() for j in range(0, v.shape[1], 256)])
    order = scores.argsort(descending=True)[:top]
    best = [(int(ids[i]), float(scores[i])) for i in order.tolist()]
    return SeparationResult(
        features=ids.tolist(),
        auroc=scores,
        best=best,
        positives=float(lab.float().mean()),
        tokens=int(v.shape[0]),
        hook=hook,
    )


@torch.no_grad()
def latents_for_text(model, sae: SparseDictionary, text: Any, *, top: int = 10) -> list[tuple[int, float]]:
    """The latents that fire most on `text` (a string or token ids): `(latent, max activation)`, largest first."""
    toks = as_tokens(model, text, error=DictionaryError, max_len=model.cfg.n_ctx)
    check_model(sae, model, check=False)
    acts = sae.encode(hook_activations(model, toks, [sae.hook])[sae.hook]).amax(dim=(0, 1))
    vals = acts.topk(min(top, acts.numel()))
    return [(int(i), float(v)) for i, v in zip(vals.indices, vals.values) if v > 0]


@torch.no_grad()
def latents_for_token(model, sae: SparseDictionary, token: str | int, *, top: int = 10) -> list[tuple[int, float]]:
    """The latents whose decoder direction promotes `token` most through the unembedding: `(latent, logit)`.

    The direct logit effect `latent_direction(i) @ W_U[:, token]` (residual-stream sites only).
    """
    tid = model.to_single_token(token) if isinstance(token, str) else int(token)
    if sae.site.rsplit(".", 1)[-1] not in (
        "hook_resid_pre",
        "hook_resid_mid",
        "hook_resid_post",
        "hook_attn_out",
        "hook_mlp_out",
    ):
        raise DictionaryError(f"{sae.site} is not in the residual stream: its latents have no direct logit effect")
    eff = (sae.W_dec / sae.out_scale) @ model.W_U[:, tid].to(sae.W_dec.dtype)
    vals = eff.topk(min(top, eff.numel()))
    return [(int(i), float(v)) for i, v in zip(vals.indices, vals.values)]


__all__ = [
    "ANY_SPEAKER_TAG",
    "SPEAKER_TAG",
    "SeparationResult",
    "any_speaker_tag_labels",
    "auroc",
    "find_separating_latents",
    "latents_for_text",
    "latents_for_token",
    "speaker_tag_labels",
    "text_span_labels",
]
