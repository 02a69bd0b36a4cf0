"""Activation patching over dictionary latents: which features carry the difference between two prompts.

    res = patch_latents(model, sae, "ROMEO: I", "JULIET: I", correct="s", incorrect="t")
    res.top(5)          # [({"latent": 123}, value), ...]
    res.figure()        # one bar per latent (a (latent x position) heatmap with by_pos=True)

The dictionary is spliced in with its error term (`tinygpt.dictionary.splice`), so both runs equal the clean
model's exactly; then, for each latent, the corrupted run is repeated with that latent's activation
(`{site}.hook_sae_acts_post`) set to its value in the clean run (at every position, or with `by_pos=True` at one
position), and the metric is read, as TransformerLens' activation patching does for any other site. Several
latents are patched in one forward (one replica of the corrupted batch per latent). By default only the
latents whose activations differ between the two runs are patched: the others leave the corrupted run exactly
as it is. The hook names are the ones every tool sees while spliced, so `run_with_hooks`, nnsight and
attribution patching can target the same latents by name.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from tinygpt.dictionary.errors import DictionaryError
from tinygpt.dictionary.modules import SparseDictionary
from tinygpt.dictionary.splice import splice
from tinygpt.inputs import as_tokens, eval_mode
from tinygpt.interp.patching import PatchingResult
from tinygpt.interp.patching.metrics import LogitDiff, Metric, resolve_metric, scalar


@dataclasses.dataclass(repr=False)  # PatchingResult's one-line repr
class LatentPatchingResult(PatchingResult):
    """A `PatchingResult` over latents: `values` [n_latents] (axes ("latent",)) or [n_latents, pos] (axes
    ("latent", "pos")); `labels["latent"]` the latent ids; `meta["latents"]` them as ints."""

    def normalize(self) -> LatentPatchingResult:
        if self.normalized:
            return self
        span = self.clean_metric - self.corrupted_metric
        if span == 0:
            raise DictionaryError("clean and corrupted metrics are equal: nothing to normalise against")
        return dataclasses.replace(self, values=(self.values - self.corrupted_metric) / span, normalized=True)

    def top(self, k: int = 5) -> list[tuple[dict[str, int], float]]:
        """The k cells with the largest value, as ({"latent": latent id[, "pos": position]}, value)."""
        ids = self.meta["latents"]
        return [({**cell, "latent": ids[cell["latent"]]}, v) for cell, v in super().top(k)]

    def figure(self, title: str | None = None):
        """Plotly: a bar per latent, or a (latent x position) heatmap."""
        import plotly.graph_objects as go

        v = self.values.detach().float().cpu()
        names = [f"latent {i}" for i in self.labels["latent"]]
        if v.ndim == 1:
            fig = go.Figure(go.Bar(x=names, y=v.tolist(), name="metric"))
            fig.update_xaxes(type="category", tickangle=-45)
        else:
            lim = float(v.abs().max()) or 1.0
            fig = go.Figure(
                go.Heatmap(z=v.tolist(), x=self.labels["pos"], y=names, colorscale="RdBu", zmid=0, zmin=-lim, zmax=lim)
            )
            fig.update_yaxes(autorange="reversed", type="category")
            fig.update_xaxes(type="category", tickangle=-45)
        kind = "normalised metric" if self.normalized else "metric"
        fig.update_layout(
            title=title
            or f"Latent patching ({self.site}, {kind}); clean {self.clean_metric:.3f}, "
            f"corrupted {self.corrupted_metric:.3f}",
            height=max(320, 22 * len(names) + 160) if v.ndim == 2 else 380,
        )
        return fig


@torch.no_grad()
def patch_latents(
    model,
    sae: SparseDictionary,
    clean: Any,
    corrupted: Any,
    metric: Metric | None = None,
    *,
    correct: Any = None,
    incorrect: Any = None,
    latents: Any = None,
    by_pos: bool = False,
    normalize: bool = False,
    batch: int = 64,
) -> LatentPatchingResult:
    """Patch each latent of `sae` from the clean run into the corrupted run (see the module docstring).

    Args:
        model: the base model.
        sae: a dictionary (SAE or transcoder) pinned to `model`.
        clean, corrupted: prompts of equal token length (text, texts or tokens [batch, pos]).
        metric: logits [batch, pos, d_vocab] -> scalar; default the logit difference of `correct` vs
            `incorrect` at the last position (default answers: the two runs' top predictions).
        latents: the latents to patch (default: every latent whose activations differ between the runs).
        by_pos: patch one (latent, position) at a time: values [n_latents, pos].
        normalize: report (value - corrupted) / (clean - corrupted).
        batch: replicas of the corrupted batch per forward.

    Returns:
        A `LatentPatchingResult` (`.top(k)`, `.figure()`).
    """
    c = as_tokens(model, clean, what="clean", error=DictionaryError)
    k = as_tokens(model, corrupted, what="corrupted", error=DictionaryError)
    if c.shape != k.shape:
        raise DictionaryError(f"clean and corrupted must have the same shape, got {tuple(c.shape)}, {tuple(k.shape)}")
    name = f"{sae.site}.hook_sae_acts_post"
    with eval_mode(model), splice(model, sae, error_term=True):
        clean_logits, cache = model.run_with_cache(c, names_filter=[name])
        corrupted_logits, cache_k = model.run_with_cache(k, names_filter=[name])
        a_clean, a_corr = cache[name], cache_k[name]  # [batch, pos, d_sae]
        fn = resolve_metric(model, metric, correct, incorrect, clean_logits, corrupted_logits)
        clean_value, corrupted_value = scalar(fn(clean_logits)), scalar(fn(corrupted_logits))
        ids = _latent_ids(sae, latents, a_clean, a_corr)
        n_pos = c.shape[1]
        cells = [(int(i), p) for i in ids.tolist() for p in (range(n_pos) if by_pos else [None])]
        values = []
        b = c.shape[0]
        for start in range(0, len(cells), batch):
            chunk = cells[start : start + batch]

            def patch(acts: Tensor, hook, chunk: list = chunk) -> Tensor:
                acts = acts.clone()
                for r, (i, p) in enumerate(chunk):
                    rows = slice(r * b, (r + 1) * b)
                    if p is None:
                        acts[rows, :, i] = a_clean[:, :, i]
                    else:
                        acts[rows, p, i] = a_clean[:, p, i]
                return acts

            logits = model.run_with_hooks(k.repeat(len(chunk), 1), fwd_hooks=[(name, patch)])
            values += [scalar(fn(logits[r * b : (r + 1) * b])) for r in range(len(chunk))]
    vals = torch.tensor(values, dtype=torch.float32)
    if by_pos:
        vals = vals.reshape(len(ids), n_pos)
    pos_labels = _pos_labels(model, c, k)
    answers = dict(correct=fn.correct.tolist(), incorrect=fn.incorrect.tolist()) if isinstance(fn, LogitDiff) else {}
    res = LatentPatchingResult(
        vals,
        ("latent", "pos") if by_pos else ("latent",),
        {"latent": [str(i) for i in ids.tolist()], "pos": pos_labels},
        clean_value,
        corrupted_value,
        f"{sae.site} latents",
        meta=dict(latents=ids.tolist(), hook=name, clean_tokens=c, corrupted_tokens=k, **answers),
    )
    return res.normalize() if normalize else res


def attribute_latents(
    model,
    sae: SparseDictionary,
    clean: Any,
    corrupted: Any,
    metric: Metric | None = None,
    *,
    correct: Any = None,
    incorrect: Any = None,
    latents: Any = None,
    by_pos: bool = False,
    normalize: bool = False,
) -> LatentPatchingResult:
    """Attribution patching (AtP) over latents: `patch_latents`' sweep estimated from one clean forward and one
    corrupted forward + backward, laid out exactly like it (same latents, same axes).

    Each cell is `metric(corrupted) + (a_clean - a_corrupted) · ∂metric/∂a` at the corrupted run (denoising, as
    `tinygpt.interp.attribution_patch`), with `a` the latent activations `{site}.hook_sae_acts_post` of the
    dictionary spliced in with its error term (so both runs are the clean model's exactly).

    Args:
        model, sae, clean, corrupted, metric, correct, incorrect, latents, by_pos, normalize: as `patch_latents`.

    Returns:
        A `LatentPatchingResult` with `meta["estimate"] = True`.
    """
    c = as_tokens(model, clean, what="clean", error=DictionaryError)
    k = as_tokens(model, corrupted, what="corrupted", error=DictionaryError)
    if c.shape != k.shape:
        raise DictionaryError(f"clean and corrupted must have the same shape, got {tuple(c.shape)}, {tuple(k.shape)}")
    name = f"{sae.site}.hook_sae_acts_post"
    saved: dict[str, Tensor] = {}

    def take_grad(acts: Tensor, hook) -> Tensor:
        acts = acts.detach().requires_grad_(True)
        saved["acts"] = acts
        return acts

    frozen = [p for p in model.parameters() if p.requires_grad] + [p for p in sae.parameters() if p.requires_grad]
    with eval_mode(model), splice(model, sae, error_term=True):
        with torch.no_grad():
            clean_logits, cache = model.run_with_cache(c, names_filter=[name])
        a_clean = cache[name]  # [batch, pos, d_sae]
        try:
            for p in frozen:  # gradients for the latents only; the weights' .grad stay untouched
                p.requires_grad_(False)
            with torch.enable_grad():
                corrupted_logits = model.run_with_hooks(k, fwd_hooks=[(name, take_grad)])
                fn = resolve_metric(model, metric, correct, incorrect, clean_logits.detach(), corrupted_logits.detach())
                value = fn(corrupted_logits)
                if not isinstance(value, Tensor) or value.numel() != 1:
                    raise DictionaryError("metric must return a scalar tensor (one number for the batch)")
                (grad,) = torch.autograd.grad(value.reshape(()), saved["acts"])
        finally:
            for p in frozen:
                p.requires_grad_(True)
        a_corr = saved["acts"].detach()
        clean_value, corrupted_value = scalar(fn(clean_logits)), scalar(value.detach())
    effect = ((a_clean - a_corr) * grad).sum(0)  # [pos, d_sae]
    ids = _latent_ids(sae, latents, a_clean, a_corr).to(effect.device)
    cells = effect[:, ids].T if by_pos else effect[:, ids].sum(0)  # [n_latents, pos] or [n_latents]
    vals = (corrupted_value + cells).detach().float().cpu()
    pos_labels = _pos_labels(model, c, k)
    answers = dict(correct=fn.correct.tolist(), incorrect=fn.incorrect.tolist()) if isinstance(fn, LogitDiff) else {}
    res = LatentPatchingResult(
        vals,
        ("latent", "pos") if by_pos else ("latent",),
        {"latent": [str(i) for i in ids.tolist()], "pos": pos_labels},
        clean_value,
        corrupted_value,
        f"{sae.site} latents",
        meta=dict(latents=ids.tolist(), hook=name, clean_tokens=c, corrupted_tokens=k, estimate=True, **answers),
    )
    return res.normalize() if normalize else res


@dataclasses.dataclass
class LatentDLAResult:
    """Each latent's direct contribution to `logit[good] - logit[bad]` at one position (batch means).

    Attributes:
        values: [d_sae] latent i's term `a_i (W_dec[i] / out_scale) · u`.
        bias: the decoder bias `b_dec`'s term; skip: a transcoder's skip connection's term (0 for an SAE);
        error: the error term's (what the dictionary misses); site: the site's own direct contribution, which
            equals `values.sum() + bias + skip + error` (the dictionary is spliced in with its error term).
        logit_diff: the model's logit difference, for comparison.
    """

    values: Tensor
    bias: float
    skip: float
    error: float
    site: float
    logit_diff: float
    hook: str
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def top(self, k: int = 5) -> list[tuple[int, float]]:
        """The k latents with the largest |contribution|, as (latent id, value)."""
        idx = self.values.abs().argsort(descending=True)[:k]
        return [(int(i), float(self.values[i])) for i in idx]

    def figure(self, k: int = 20, title: str | None = None):
        """Plotly: the k largest latent contributions beside the bias, skip and error terms."""
        import plotly.graph_objects as go

        top = self.top(k)
        names = [f"latent {i}" for i, _ in top] + ["b_dec", "skip", "error"]
        vals = [v for _, v in top] + [self.bias, self.skip, self.error]
        fig = go.Figure(go.Bar(x=names, y=vals))
        fig.update_xaxes(type="category", tickangle=-45)
        fig.update_layout(
            title=title
            or f"Direct logit attribution of {self.hook} latents (site total {self.site:.3f}, "
            f"logit diff {self.logit_diff:.3f})",
            height=400,
        )
        return fig


def latent_logit_attribution(
    model, sae: SparseDictionary, tokens: Any, good: Any, bad: Any = None, pos: int = -1, *, check: bool = True
) -> LatentDLAResult:
    """Direct logit attribution per latent (`tinygpt.interp.direct_logit_attribution`'s per-neuron view for a
    dictionary): with the final norm's scale frozen from the run and the dictionary spliced in with its error
    term, latent i contributes `a_i (W_dec[i] / out_scale) · u` to the logit difference.

    The dictionary's site must write the residual stream directly: a layer's `hook_attn_out` / `hook_mlp_out`
    (SAEs there, and transcoders), or the final `hook_resid_post`.

    Args:
        model: the base model.
        sae: a dictionary pinned to `model` (`check=False` skips the pin check).
        tokens: a prompt (text, texts of equal length, or tokens [batch, pos]).
        good, bad: answer tokens (ids or single-token strings), as `direct_logit_attribution`.
        pos: the position read (default the last).
    """
    from tinygpt.interp.circuits.dla import logit_readout  # same layer: the DLA readout, written once

    site = sae.site
    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    if not (site.endswith((".hook_attn_out", ".hook_mlp_out")) or site == last):
        raise DictionaryError(
            f"latent DLA needs a dictionary whose output writes the residual stream directly (a layer's "
            f"hook_attn_out or hook_mlp_out, or {last}); {site} reaches the logits only through later layers"
        )
    with eval_mode(model), splice(model, sae, error_term=True, check=check):
        u, cache, logit_diff = logit_readout(model, tokens, good, bad, pos)  # u [b, d_model] float64
        at = {x: cache[f"{site}.hook_sae_{x}"][:, pos].double() for x in ("acts_post", "recons", "error", "output")}
    w_dec = (sae.W_dec / sae.out_scale).detach().double()  # [d_sae, d_out]
    b_dec = (sae.b_dec / sae.out_scale).detach().double()
    values = (at["acts_post"] * (u @ w_dec.T)).mean(0)  # [d_sae]

    def dot(x: Tensor) -> float:
        return float((x * u).sum(-1).mean())

    bias = float((u @ b_dec).mean())
    skip = dot(at["recons"]) - float(values.sum()) - bias
    meta = dict(good=good, bad=bad, pos=pos)
    return LatentDLAResult(
        values=values.float(),
        bias=bias,
        skip=skip,
        error=dot(at["error"]),
        site=dot(at["output"]),
        logit_diff=logit_diff,
        hook=site,
        meta=meta,
    )


def _latent_ids(sae: SparseDictionary, latents: Any, a_clean: Tensor, a_corr: Tensor) -> Tensor:
    """The latents a sweep covers: those given (checked), else every latent whose activations differ."""
    if latents is None:
        return (a_clean != a_corr).flatten(0, 1).any(0).nonzero().squeeze(-1)
    ids = torch.as_tensor(latents, dtype=torch.long).reshape(-1)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= sae.d_sae):
        raise DictionaryError(f"latents must be in [0, {sae.d_sae}), got {latents!r}")
    return ids


def _pos_labels(model, c: Tensor, k: Tensor) -> list[str]:
    try:
        ct, kt = model.to_str_tokens(c[0]), model.to_str_tokens(k[0])
    except (ValueError, AttributeError):
        ct = kt = [""] * c.shape[1]
    return [f"{i} {x!r}" if x == y else f"{i} {x!r}/{y!r}" for i, (x, y) in enumerate(zip(ct, kt))]


__all__ = ["LatentDLAResult", "LatentPatchingResult", "attribute_latents", "latent_logit_attribution", "patch_latents"]
