"""Activation patching's public sweeps and their result: `patch_sweep` and one function per site, `patch_resid`
for a single cell, `PatchingResult` (see `tinygpt.interp.patching` for the semantics)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from tinygpt.inputs import as_tokens, eval_mode, progress_enabled
from tinygpt.interp.patching.engine import DIRECT, SITES, can_resume, sweep
from tinygpt.interp.patching.metrics import LogitDiff, Metric, PatchingError, resolve_metric, scalar


@dataclass
class PatchingResult:
    """The metric after each patch of a sweep.

    Attributes:
        values: the metric per cell, shaped by `axes` (e.g. [n_layers, pos]); normalised if `normalized`.
        axes: axis names, e.g. ("layer", "pos"), ("layer", "head"), ("layer", "pos", "head"), or with a
            leading "site" axis for `patch_block_every`.
        labels: tick labels per axis (positions show the clean token, "clean/corrupted" where they differ).
        clean_metric, corrupted_metric: the metric on the unpatched clean and corrupted runs.
        site: what was patched ("resid_pre", "attn_out", "mlp_out", "head", "head_by_pos", "block_every").
        normalized: values are (metric - corrupted) / (clean - corrupted).
    """

    values: Tensor
    axes: tuple[str, ...]
    labels: dict[str, list[str]]
    clean_metric: float
    corrupted_metric: float
    site: str
    normalized: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    def normalize(self) -> PatchingResult:
        """This result with values (v - corrupted) / (clean - corrupted)."""
        if self.normalized:
            return self
        span = self.clean_metric - self.corrupted_metric
        if span == 0:
            raise PatchingError("clean and corrupted metrics are equal: nothing to normalise against")
        return PatchingResult(
            (self.values - self.corrupted_metric) / span,
            self.axes,
            self.labels,
            self.clean_metric,
            self.corrupted_metric,
            self.site,
            True,
            self.meta,
        )

    def top(self, k: int = 5) -> list[tuple[dict[str, int], float]]:
        """The k cells with the largest value, as ({axis: index}, value)."""
        flat = self.values.flatten()
        order = torch.argsort(flat, descending=True)[:k]
        out = []
        for i in order.tolist():
            idx = torch.unravel_index(torch.tensor(i), self.values.shape)
            out.append(({a: int(j) for a, j in zip(self.axes, idx)}, float(flat[i])))
        return out

    def __repr__(self) -> str:
        dims = " x ".join(f"{a}={n}" for a, n in zip(self.axes, self.values.shape))
        kind = "normalised " if self.normalized else ""
        return (
            f"PatchingResult({self.site}: {dims}; {kind}values in [{float(self.values.min()):.3f}, "
            f"{float(self.values.max()):.3f}]; clean {self.clean_metric:.4f}, corrupted {self.corrupted_metric:.4f})"
        )

    def figure(self, title: str | None = None):
        """Plotly heatmap(s): (layer x position) or (layer x head); (layer.head x position) for by-position
        head sweeps; one panel per site for `patch_block_every`. Position ticks are the prompt's tokens."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        v = self.values.detach().float().cpu()
        axes, labels = list(self.axes), self.labels
        panels: list[tuple[str, Tensor, list[str], list[str]]] = []
        if axes[0] == "site":
            for i, name in enumerate(labels["site"]):
                panels.append((name, v[i], labels[axes[2]], [f"L{x}" for x in labels["layer"]]))
            axes = axes[1:]
        elif axes == ["layer", "pos", "head"]:
            z = v.permute(0, 2, 1).reshape(-1, v.shape[1])  # rows: L0H0, L0H1, ...
            rows = [f"L{layer}H{h}" for layer in range(v.shape[0]) for h in range(v.shape[2])]
            panels.append((self.site, z, labels["pos"], rows))
            axes = ["layer.head", "pos"]
        else:
            panels.append((self.site, v, labels[axes[1]], [f"L{x}" for x in labels["layer"]]))
        lim = float(v.abs().max()) or 1.0
        zmin, zmax = (-lim, lim)
        fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[p[0] for p in panels], horizontal_spacing=0.06)
        for c, (name, z, xt, yt) in enumerate(panels, start=1):
            fig.add_trace(
                go.Heatmap(
                    z=z.tolist(),
                    x=xt,
                    y=yt,
                    coloraxis="coloraxis",
                    hovertemplate="%{y} | %{x}: %{z:.4f}<extra>" + name + "</extra>",
                ),
                row=1,
                col=c,
            )
            fig.update_yaxes(autorange="reversed", type="category", row=1, col=c)
            fig.update_xaxes(type="category", tickangle=-45, row=1, col=c)
        cb = "normalised metric" if self.normalized else "metric"
        kind = f"Attribution patching, {self.meta['method']}" if self.meta.get("estimate") else "Activation patching"
        fig.update_layout(
            title=title
            or f"{kind} ({self.site}); clean {self.clean_metric:.3f}, corrupted {self.corrupted_metric:.3f}",
            coloraxis=dict(colorscale="RdBu", cmid=0, cmin=zmin, cmax=zmax, colorbar=dict(title=cb)),
            height=max(320, 22 * len(panels[0][3]) + 160),
            width=min(1600, 260 + 340 * len(panels) + 14 * len(panels[0][2]) * len(panels)),
        )
        return fig


def patching_figure(results: Mapping[str, PatchingResult] | Sequence[PatchingResult], *, title: str | None = None):
    """Several sweeps side by side: one panel per result (`{name: result}` in order, or a sequence named by
    each result's `site`), each the heatmap of the result's own `.figure()`, on one diverging colour scale
    (RdBu, ±max|value|); panel widths follow their number of columns.

    Args:
        results: the sweeps to show, e.g. `{"resid_pre": patch_resid_pre(...), "head": patch_heads(...)}`.
        title: the figure's title (default: the first result's clean and corrupted metrics).

    Returns:
        A plotly Figure with one heatmap trace per result, named by its key (or site).
    """
    from plotly.subplots import make_subplots

    named = dict(results) if isinstance(results, Mapping) else {r.site: r for r in results}
    if not named:
        raise PatchingError("patching_figure needs at least one PatchingResult")
    panels = []
    for site, r in named.items():
        heat = r.figure().data[0]  # [layer, pos], [layer, head] or rows L0H0, L0H1, ... for head_by_pos
        heat.update(name=site, hovertemplate="%{y} | %{x}: %{z:.4f}<extra>" + site + "</extra>")
        panels.append(heat)
    fig = make_subplots(
        rows=1,
        cols=len(panels),
        subplot_titles=list(named),
        horizontal_spacing=0.04,
        column_widths=[max(len(h.x), 6) for h in panels],
    )
    lim = max(abs(v) for h in panels for row in h.z for v in row) or 1.0
    for col, heat in enumerate(panels, start=1):
        fig.add_trace(heat, row=1, col=col)
        fig.update_yaxes(autorange="reversed", type="category", row=1, col=col)
        fig.update_xaxes(type="category", tickangle=-60, row=1, col=col)
    r0 = next(iter(named.values()))
    label = "normalised metric" if r0.normalized else "logit difference"
    fig.update_layout(
        title=title or f"patched metric per cell (clean {r0.clean_metric:.3f}, corrupted {r0.corrupted_metric:.3f})",
        coloraxis={"colorscale": "RdBu", "cmid": 0, "cmin": -lim, "cmax": lim, "colorbar": {"title": label}},
        template="plotly_white",
        height=max(340, 26 * max(len(h.y) for h in panels) + 200),
        width=min(1080, 160 + sum(40 + 18 * max(len(h.x), 6) for h in panels)),  # a notebook's output area
        margin={"t": 80, "b": 90, "l": 60, "r": 20},
    )
    return fig


# -------------------------------------------------------------------------------------------- inputs
def _pair(model, clean: Any, corrupted: Any) -> tuple[Tensor, Tensor]:
    """Clean and corrupted prompts (text, texts of equal token length, or tokens) -> two [batch, pos] tensors."""
    c = as_tokens(model, clean, what="clean", error=PatchingError)
    k = as_tokens(model, corrupted, what="corrupted", error=PatchingError)
    if c.shape != k.shape:
        raise PatchingError(
            f"clean and corrupted inputs must have the same shape, got {tuple(c.shape)} and {tuple(k.shape)}; "
            "choose corrupted prompts with the same number of tokens (e.g. swap one name for another)"
        )
    return c, k


def _pos_labels(model, clean: Tensor, corrupted: Tensor) -> list[str]:
    try:
        c, k = model.to_str_tokens(clean[0]), model.to_str_tokens(corrupted[0])
    except (ValueError, AttributeError):
        c = k = [""] * clean.shape[1]
    return [f"{i} {a!r}" if a == b else f"{i} {a!r}/{b!r}" for i, (a, b) in enumerate(zip(c, k))]


# -------------------------------------------------------------------------------------------- sweeps
def patch_sweep(
    model,
    clean: Any,
    corrupted: Any,
    site: str = "resid_pre",
    metric: Metric | None = None,
    *,
    correct: Any = None,
    incorrect: Any = None,
    normalize: bool = False,
    layers: Sequence[int] | None = None,
    batch_cells: int | None = None,
    progress: bool | None = None,
) -> PatchingResult:
    """Patch every cell of `site` from the clean run into the corrupted run, in batched forwards.

    Args:
        model: a tinygpt model (put in eval mode for the sweep, then restored).
        clean, corrupted: prompts of equal token length: text, a list of texts, or tokens [batch, pos].
        site: "resid_pre", "resid_mid", "attn_out", "mlp_out" -> values [layer, pos]; "head" (hook_z of one
            head at every position) -> [layer, head]; "head_by_pos" -> [layer, pos, head] (TransformerLens'
            axis order).
        metric: logits [batch, pos, d_vocab] -> scalar; default `logit_diff` of correct vs incorrect at the
            last position.
        correct, incorrect: answer tokens for the default metric (ids or single-token strings, one or one
            per prompt); default the clean and corrupted runs' top predictions.
        normalize: report (value - corrupted) / (clean - corrupted).
        layers: restrict to these layers (default all).
        batch_cells: cells patched per forward (default: as many as fit ~16k tokens).
        progress: show a tqdm bar (default `tinygpt.inputs.DEFAULT_PROGRESS`).

    Returns:
        A `PatchingResult` (values [layer, pos], [layer, head] or [layer, pos, head]).
    """
    if site not in SITES:
        raise PatchingError(f"unknown site {site!r}; choose one of {list(SITES)}")
    return _patch(model, clean, corrupted, [site], metric, correct, incorrect, normalize, layers, batch_cells, progress)


def _patch(
    model, clean, corrupted, sites, metric, correct, incorrect, normalize, layers, batch_cells, progress
) -> PatchingResult:
    clean_t, corrupted_t = _pair(model, clean, corrupted)
    n_layers = model.cfg.n_layers
    for s in sites:
        if SITES[s][0].format(layer=0) not in model.hook_dict:
            why = " (parallel attention+MLP blocks have none)" if getattr(model.cfg, "parallel_attn_mlp", 0) else ""
            raise PatchingError(
                f"site {s!r}: the model has no {SITES[s][0].format(layer='{layer}')} hook{why}; "
                f"patch one of {[x for x in SITES if SITES[x][0].format(layer=0) in model.hook_dict]}"
            )
    layer_list = list(range(n_layers)) if layers is None else [int(x) % n_layers for x in layers]
    for x in layers or []:
        if not -n_layers <= int(x) < n_layers:
            raise PatchingError(f"layer {x} is out of range; the model has {n_layers} layers (0..{n_layers - 1})")
    with eval_mode(model), torch.no_grad():
        names = sorted({SITES[s][0].format(layer=layer) for s in sites for layer in layer_list})
        masks = [  # mixture-of-depths blocks: head sweeps patch by token position (see the module docstring)
            f"blocks.{layer}.hook_routing_mask"
            for layer in layer_list
            if f"blocks.{layer}.hook_routing_mask" in model.hook_dict and {"head", "head_by_pos"} & set(sites)
        ]
        clean_names, corrupted_names = set(names + masks), set(names + masks)  # sites: unchanged cells
        if can_resume(model):
            corrupted_names |= {f"blocks.{layer}.hook_resid_pre" for layer in layer_list}
            if any("pos" in SITES[s][1] for s in sites):  # prefix keys/values (see engine.sweep)
                later = range(min(layer_list), n_layers)
                corrupted_names |= {f"blocks.{i}.attn.hook_{kv}" for i in later for kv in ("k", "v")}
            for s, layer in ((s, layer) for s in sites if s in DIRECT for layer in layer_list):
                clean_names |= {f"blocks.{layer}.{x}" for x in DIRECT[s][0]}
                corrupted_names |= {f"blocks.{layer}.{x}" for x in DIRECT[s][1]}
        clean_logits, clean_cache = model.run_with_cache(clean_t, names_filter=sorted(clean_names))
        corrupted_logits, corrupted_cache = model.run_with_cache(corrupted_t, names_filter=sorted(corrupted_names))
        fn = resolve_metric(model, metric, correct, incorrect, clean_logits, corrupted_logits)
        logit_diff = isinstance(fn, LogitDiff)  # record the answers it resolved (blank: the top predictions)
        answers = dict(correct=fn.correct.tolist(), incorrect=fn.incorrect.tolist()) if logit_diff else {}
        clean_value, corrupted_value = scalar(fn(clean_logits)), scalar(fn(corrupted_logits))
        caches = (clean_cache, corrupted_cache, corrupted_logits, corrupted_value)
        show = progress_enabled(progress)
        values = [sweep(model, corrupted_t, s, fn, layer_list, batch_cells, show, *caches) for s in sites]
    pos_labels = _pos_labels(model, clean_t, corrupted_t)
    labels = {
        "layer": [str(x) for x in layer_list],
        "pos": pos_labels,
        "head": [f"H{h}" for h in range(model.cfg.n_heads)],
    }
    if len(sites) == 1:
        value, axes, site = values[0], SITES[sites[0]][1], sites[0]
    else:
        value, axes, site = torch.stack(values), ("site", *SITES[sites[0]][1]), "block_every"
        labels["site"] = list(sites)
    result = PatchingResult(
        value,
        tuple(axes),
        labels,
        clean_value,
        corrupted_value,
        site,
        meta=dict(layers=layer_list, clean_tokens=clean_t, corrupted_tokens=corrupted_t, **answers),
    )
    return result.normalize() if normalize else result


def patch_resid_pre(model, clean, corrupted, metric=None, **kwargs) -> PatchingResult:
    """Patch `blocks.{layer}.hook_resid_pre` at each (layer, position): values [n_layers, pos]."""
    return patch_sweep(model, clean, corrupted, "resid_pre", metric, **kwargs)


def patch_resid_mid(model, clean, corrupted, metric=None, **kwargs) -> PatchingResult:
    """Patch `blocks.{layer}.hook_resid_mid` at each (layer, position): values [n_layers, pos]."""
    return patch_sweep(model, clean, corrupted, "resid_mid", metric, **kwargs)


def patch_attn_out(model, clean, corrupted, metric=None, **kwargs) -> PatchingResult:
    """Patch `blocks.{layer}.hook_attn_out` at each (layer, position): values [n_layers, pos]."""
    return patch_sweep(model, clean, corrupted, "attn_out", metric, **kwargs)


def patch_mlp_out(model, clean, corrupted, metric=None, **kwargs) -> PatchingResult:
    """Patch `blocks.{layer}.hook_mlp_out` at each (layer, position): values [n_layers, pos]."""
    return patch_sweep(model, clean, corrupted, "mlp_out", metric, **kwargs)


def patch_heads(model, clean, corrupted, metric=None, **kwargs) -> PatchingResult:
    """Patch each head's output (`hook_z[:, :, h]`) at every position: values [n_layers, n_heads]."""
    return patch_sweep(model, clean, corrupted, "head", metric, **kwargs)


def patch_heads_by_pos(model, clean, corrupted, metric=None, **kwargs) -> PatchingResult:
    """Patch each head's output at each position: values [n_layers, pos, n_heads]."""
    return patch_sweep(model, clean, corrupted, "head_by_pos", metric, **kwargs)


def patch_block_every(
    model,
    clean,
    corrupted,
    metric=None,
    *,
    correct=None,
    incorrect=None,
    normalize=False,
    layers=None,
    batch_cells=None,
    progress=None,
) -> PatchingResult:
    """resid_pre, attn_out and mlp_out sweeps stacked: values [3, n_layers, pos] (axes site, layer, pos),
    like `transformer_lens.patching.get_act_patch_block_every`; the options are `patch_sweep`'s."""
    sites = ["resid_pre", "attn_out", "mlp_out"]
    return _patch(model, clean, corrupted, sites, metric, correct, incorrect, normalize, layers, batch_cells, progress)


@torch.no_grad()
def patch_resid(
    model,
    clean: Any,
    corrupted: Any,
    layer: int,
    pos: int,
    metric: Metric | None = None,
    *,
    correct: Any = None,
    incorrect: Any = None,
    normalize: bool = False,
) -> float:
    """Patch the clean residual stream at one (layer, position) (`blocks.{layer}.hook_resid_pre`; layer ==
    n_layers means the final `blocks.{n-1}.hook_resid_post`) into the corrupted run and return the metric:
    "was this token, at this depth, load-bearing?"."""
    clean_t, corrupted_t = _pair(model, clean, corrupted)
    n_layers, t = model.cfg.n_layers, clean_t.shape[1]
    if not 0 <= layer <= n_layers:
        raise PatchingError(f"layer {layer} is out of range: 0..{n_layers} (n_layers = the final residual stream)")
    if not -t <= pos < t:
        raise PatchingError(f"position {pos} is out of range for prompts of {t} tokens")
    name = f"blocks.{layer}.hook_resid_pre" if layer < n_layers else f"blocks.{n_layers - 1}.hook_resid_post"
    with eval_mode(model):
        clean_logits, cache = model.run_with_cache(clean_t, names_filter=[name])
        corrupted_logits = model(corrupted_t)
        fn = resolve_metric(model, metric, correct, incorrect, clean_logits, corrupted_logits)

        def hook(act: Tensor, hook) -> Tensor:
            act = act.clone()
            act[:, pos] = cache[name][:, pos]
            return act

        value = scalar(fn(model.run_with_hooks(corrupted_t, fwd_hooks=[(name, hook)])))
        if normalize:
            c, k = scalar(fn(clean_logits)), scalar(fn(corrupted_logits))
            if c == k:
                raise PatchingError("clean and corrupted metrics are equal: nothing to normalise against")
            value = (value - k) / (c - k)
    return value
