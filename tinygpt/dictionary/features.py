"""Max-activating examples: a feature index built once over a corpus, saved, and read back.

    index = build_feature_index(model, sae, out="tiny-l2.features")        # every latent of a dictionary
    index = build_feature_index(model, "neurons", hook="blocks.1.mlp.hook_post")
    index = build_feature_index(model, directions, hook="blocks.2.hook_resid_post")   # [n, d] or [d]
    report = index.feature(123)          # top contexts, quantile samples, histogram, density, logit effects
    report.figure(); report              # plotly figure / highlighted contexts in a notebook
    index = load_feature_index("tiny-l2.features", model, sae)

One pass over evenly spaced windows of the corpus computes every feature at every token and keeps, per
feature: the `top_k` largest activations with the activation of each token around them (`before` tokens
before, `after` after), a uniform random sample of `samples` activating tokens (each with its context; sorted
by value they give the quantile bands below the top), exact counts of positive and negative activations in
log10-spaced bins (`HIST_EDGES`), the active count, sum and maximum. A feature is active where its value is
> 0. Logit effects are the feature's output direction through the unembedding `W_U` (no final LayerNorm, as
SAELens / Neuronpedia show them): a dictionary latent's `latent_direction`, an MLP neuron's `W_out` row, or the
direction itself, for sites in the residual stream (`hook_resid_*`, `hook_attn_out`, `hook_mlp_out`).

The index file is safetensors + a JSON manifest (key "feature_index", written by `write_tensor_file`), pinned
to the base model's fingerprint and, for a dictionary, to the dictionary's content hash.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from tinygpt.checkpoint import as_model, content_hash, model_fingerprint, read_manifest
from tinygpt.dictionary.activations import check_hooks, corpus_tokens, hook_activations, spaced_windows
from tinygpt.dictionary.errors import DictionaryError, DictionaryFileError, DictionaryMismatchError
from tinygpt.dictionary.files import check_model
from tinygpt.dictionary.index import FORMAT, FORMAT_VERSION, HIST_EDGES, FeatureIndex
from tinygpt.dictionary.modules import SparseDictionary
from tinygpt.inputs import eval_mode, model_device, progress_enabled

_RESID = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out", "hook_embed")


# ------------------------------------------------------------------------------------------ feature sources
def feature_source(model, source: Any, hook: str | None = None, features: Any = None):
    """`(hook, feature_ids, fn, directions, record)`: `fn(acts [N, width]) -> [N, n_features]`.

    `source` is a dictionary (its latents), "neurons" (the hook's units, e.g. `blocks.1.mlp.hook_post`) or a
    direction tensor [n, width] / [width] (projections `acts @ directions.T`). `directions` [n, d_model] are
    the residual-stream write directions used for logit effects (None where there are none).
    """
    if isinstance(source, SparseDictionary):
        check_model(source, model, check=True)
        hook = source.hook
        ids = _ids(features, source.d_sae)
        sae = source

        def fn(a: Tensor) -> Tensor:
            return sae.encode(a)[:, ids]

        site = sae.site.rsplit(".", 1)[-1]
        dirs = torch.stack([sae.latent_direction(i) for i in ids.tolist()]) if site in _RESID else None
        rec = {
            "kind": "dictionary",
            "dictionary": sae.cfg.to_dict(),
            "dictionary_sha256": content_hash(sae.state_dict()),
        }
        return hook, ids, fn, dirs, rec
    if hook is None:
        raise DictionaryError("give hook= for neurons or directions (e.g. 'blocks.1.mlp.hook_post')")
    width = check_hooks(model, [hook])[hook]
    leaf = hook.rsplit(".", 1)[-1]
    if isinstance(source, str) and source == "neurons":
        ids = _ids(features, width)

        def fn(a: Tensor) -> Tensor:
            return a[:, ids]

        dirs = None
        if leaf == "hook_post" and ".mlp." in hook:
            block = model.get_submodule(hook.rsplit(".", 2)[0])
            dirs = block.mlp.W_out.detach()[ids] if hasattr(block, "mlp") else None
        elif leaf in _RESID:
            dirs = torch.eye(width, device=model_device(model))[ids]
        return hook, ids, fn, dirs, {"kind": "neurons"}
    if isinstance(source, Tensor):
        d = source.detach().float().to(model_device(model))
        d = d[None] if d.ndim == 1 else d
        if d.ndim != 2 or d.shape[1] != width:
            raise DictionaryError(f"directions must be [n, {width}] or [{width}] for {hook}, got {tuple(source.shape)}")
        ids = torch.arange(d.shape[0])

        def fn(a: Tensor) -> Tensor:
            return a @ d.T

        return hook, ids, fn, (d if leaf in _RESID else None), {"kind": "directions", "directions": d.cpu().tolist()}
    raise DictionaryError(f"source must be a dictionary, 'neurons' or a direction tensor, got {type(source).__name__}")


def _ids(features: Any, n: int) -> Tensor:
    ids = torch.arange(n) if features is None else torch.as_tensor(features, dtype=torch.long).reshape(-1)
    if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= n:
        raise DictionaryError(f"features must be indices in [0, {n}), got {features!r}")
    return ids


# ------------------------------------------------------------------------------------------ the scan
def _merge(
    keys: Tensor, new_keys: Tensor, payload: list[tuple[Tensor, Tensor]], keep: int
) -> tuple[Tensor, list[Tensor]]:
    """Keep the `keep` largest keys per column of `cat(keys [K, F], new_keys [N, F])`; merge payloads alike.

    `payload`: pairs (old [K, F, ...], new [N, F, ...] or a callable-free tensor) gathered by the same choice.
    """
    cat = torch.cat([keys, new_keys])
    top = cat.topk(keep, dim=0)
    out = []
    for old, new in payload:
        both = torch.cat([old, new])
        idx = top.indices.reshape(*top.indices.shape, *([1] * (both.ndim - 2))).expand(keep, *both.shape[1:])
        out.append(both.gather(0, idx))
    return top.values, out


@torch.no_grad()
def _scan(
    model,
    hook: str,
    fn: Callable[[Tensor], Tensor],
    n_feat: int,
    windows: Tensor,
    *,
    top_k: int,
    samples: int,
    before: int,
    after: int,
    batch: int,
    seed: int,
    progress: bool,
) -> dict[str, Tensor]:
    from tqdm.auto import tqdm

    device = model_device(model)
    T, L = windows.shape[1], before + 1 + after
    g = torch.Generator(device="cpu").manual_seed(seed)
    ninf = torch.full((top_k, n_feat), float("-inf"), device=device)
    st = {
        "top_values": ninf.clone(),
        "top_index": torch.full((top_k, n_feat), -1, dtype=torch.long, device=device),
        "top_context": torch.full((top_k, n_feat, L), float("nan"), device=device),
        "sample_keys": torch.full((samples, n_feat), float("-inf"), device=device),
        "sample_values": torch.zeros(samples, n_feat, device=device),
        "sample_index": torch.full((samples, n_feat), -1, dtype=torch.long, device=device),
        "sample_context": torch.full((samples, n_feat, L), float("nan"), device=device),
        "hist_pos": torch.zeros(n_feat, HIST_EDGES.numel() - 1, device=device),
        "hist_neg": torch.zeros(n_feat, HIST_EDGES.numel() - 1, device=device),
        "active": torch.zeros(n_feat, device=device, dtype=torch.float64),
        "sum": torch.zeros(n_feat, device=device, dtype=torch.float64),
        "max": torch.full((n_feat,), float("-inf"), device=device),
    }
    edges = HIST_EDGES.to(device)
    feat_offset = torch.arange(n_feat, device=device) * (edges.numel() - 1)
    bar = tqdm(total=windows.shape[0], desc="indexing features", unit="seq", disable=not progress)
    with eval_mode(model):
        for w0 in range(0, windows.shape[0], batch):
            toks = windows[w0 : w0 + batch].to(device)
            b = toks.shape[0]
            a = hook_activations(model, toks, [hook])[hook]
            v = fn(a.reshape(b * T, -1)).float()  # [N, F]
            padded = F.pad(v.view(b, T, n_feat), (0, 0, before, after), value=float("nan"))  # [b, T + L - 1, F]
            ar = torch.arange(L, device=device)
            flat = torch.arange(b * T, device=device)
            gidx = (w0 * T + flat)[:, None].expand(-1, n_feat)

            def contexts(rows: Tensor, padded: Tensor = padded, ar: Tensor = ar) -> Tensor:  # [K, F] -> [K, F, L]
                w, p = rows // T, rows % T
                f = torch.arange(n_feat, device=device).expand_as(rows)
                return padded[w[..., None], p[..., None] + ar, f[..., None]]

            # top-k by value: candidates from the batch first cut to top_k per feature, then merged
            cand = v.topk(min(top_k, v.shape[0]), dim=0)
            st["top_values"], (st["top_index"], st["top_context"]) = _merge(
                st["top_values"],
                cand.values,
                [(st["top_index"], gidx.gather(0, cand.indices)), (st["top_context"], contexts(cand.indices))],
                top_k,
            )
            # a uniform sample of activating tokens: random keys, the largest `samples` kept
            keys = torch.rand(v.shape, generator=g).to(device).masked_fill(v <= 0, float("-inf"))
            cand = keys.topk(min(samples, v.shape[0]), dim=0)
            st["sample_keys"], (st["sample_values"], st["sample_index"], st["sample_context"]) = _merge(
                st["sample_keys"],
                cand.values,
                [
                    (st["sample_values"], v.gather(0, cand.indices)),
                    (st["sample_index"], gidx.gather(0, cand.indices)),
                    (st["sample_context"], contexts(cand.indices)),
                ],
                samples,
            )
            bins = torch.bucketize(v.abs().clamp_min(1e-30).log10(), edges[1:-1]) + feat_offset  # [N, F]
            for name, mask in (("hist_pos", v > 0), ("hist_neg", v < 0)):
                st[name] += torch.bincount(bins[mask], minlength=st[name].numel()).view_as(st[name])
            st["active"] += (v > 0).sum(0)
            st["sum"] += v.sum(0).double()
            st["max"] = torch.maximum(st["max"], v.max(0).values)
            bar.update(b)
    bar.close()
    st["n_tokens"] = torch.tensor(windows.numel())
    empty = st["sample_keys"] == float("-inf")
    st["sample_index"][empty] = -1
    st["sample_values"][empty] = 0.0
    del st["sample_keys"]
    return {
        k: (v.transpose(0, 1).contiguous() if v.ndim >= 2 and not k.startswith("hist") else v).cpu()
        for k, v in st.items()
    }


def _logit_effects(model, dirs: Tensor, n: int) -> dict[str, Tensor]:
    eff = dirs.to(model.W_U.dtype) @ model.W_U.detach()  # [F, d_vocab]
    n = min(n, eff.shape[-1])
    top, bot = eff.topk(n, dim=-1), eff.topk(n, dim=-1, largest=False)
    return {
        "logit_top_ids": top.indices,
        "logit_top_values": top.values,
        "logit_bottom_ids": bot.indices,
        "logit_bottom_values": bot.values,
    }


def build_feature_index(
    model,
    source: Any,
    corpus: Any = None,
    *,
    hook: str | None = None,
    features: Any = None,
    tokens: int = 262_144,
    context: int = 128,
    top_k: int = 20,
    samples: int = 40,
    before: int = 16,
    after: int = 4,
    logit_effects: int = 10,
    batch: int = 16,
    seed: int = 0,
    out: Any = None,
    cache_dir: Any = None,
    progress: bool | None = None,
) -> FeatureIndex:
    """Index the max-activating examples of features over `corpus` (see the module docstring).

    Args:
        model: the model (or a `.tinygpt` path).
        source: a dictionary, "neurons" (with `hook`), or directions [n, width] / [width] (with `hook`).
        corpus: the corpus (default: built-in Shakespeare) or token ids.
        hook: the hook for neurons / directions. features: a subset of latent / neuron indices.
        tokens: about how many tokens to scan (evenly spaced windows of `context` tokens).
        top_k: top examples kept per feature; samples: random activating examples per feature.
        before, after: context tokens kept around each example.
        logit_effects: how many top and bottom tokens of each feature's logit effect to keep.
        out: also save the index there.
    """
    model = as_model(model)
    for name, v in (("tokens", tokens), ("context", context), ("top_k", top_k), ("samples", samples), ("batch", batch)):
        if not isinstance(v, int) or v < 1:
            raise DictionaryError(f"{name} must be a positive integer, got {v!r}")
    hook, ids, fn, dirs, rec = feature_source(model, source, hook, features)
    show = progress_enabled(progress)
    arr = corpus_tokens(model, corpus, cache_dir=cache_dir, progress=show)
    ctx = min(context, model.cfg.n_ctx)
    windows = spaced_windows(arr, ctx, 0, len(arr), math.ceil(tokens / ctx))
    st = _scan(
        model,
        hook,
        fn,
        ids.numel(),
        windows,
        top_k=top_k,
        samples=samples,
        before=before,
        after=after,
        batch=batch,
        seed=seed,
        progress=show,
    )
    st["tokens"] = windows.to(torch.int32)
    if dirs is not None and logit_effects > 0:
        st.update({k: v.cpu() for k, v in _logit_effects(model, dirs.to(model_device(model)), logit_effects).items()})
    manifest = {
        "hook": hook,
        "features": ids.tolist(),
        "source": rec,
        "before": before,
        "after": after,
        "context": ctx,
        "base_model": {"fingerprint": model_fingerprint(model), "source": getattr(model, "source_path", None)},
    }
    index = FeatureIndex(st, manifest, getattr(model, "tokenizer", None))
    if out is not None:
        index.save(out)
    return index


def load_feature_index(path: str | os.PathLike, model=None, dictionary: SparseDictionary | None = None) -> FeatureIndex:
    """Read an index; with `model` (its tokenizer renders tokens) and `dictionary`, check they are the ones indexed."""
    path = Path(path)
    manifest = read_manifest(
        path,
        key=FORMAT,
        max_version=FORMAT_VERSION,
        label="feature index",
        desc="tinygpt feature index",
        error=DictionaryFileError,
        missing=lambda meta: f"{path} is not a tinygpt feature index (no '{FORMAT}' manifest)",
    )
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    if content_hash(tensors) != manifest.get("content_sha256"):
        raise DictionaryFileError(f"{path} is corrupt: tensor content does not match its recorded sha256")
    if model is not None and model_fingerprint(model) != manifest["base_model"]["fingerprint"]:
        raise DictionaryMismatchError(f"{path} was built on a different model (weights fingerprint differs)")
    if dictionary is not None and content_hash(dictionary.state_dict()) != manifest["source"].get("dictionary_sha256"):
        raise DictionaryMismatchError(f"{path} was built for a different dictionary (content hash differs)")
    return FeatureIndex(tensors, manifest, getattr(model, "tokenizer", None))


__all__ = [
    "build_feature_index",
    "feature_source",
    "load_feature_index",
]
