"""Attribution patching (AtP, Nanda 2022; AtP*, Kramár et al. 2024): a whole activation-patching sweep estimated
from one clean forward and one corrupted forward + backward.

Denoising (the default, TransformerLens 4.3's convention): the exact sweep patches the clean activation `a_clean`
of one cell into the corrupted run; AtP estimates its metric to first order at the corrupted run,

    estimate(cell) = metric(corrupted) + Σ_cell (a_clean - a_corrupted) · ∂metric/∂a |corrupted

(the sum runs over the cell's slice: the batch, and d_model / d_head, and the positions for all-position sites).
`direction="noising"` patches the corrupted activation into the clean run instead: `metric(clean) +
Σ (a_corrupted - a_clean) · ∂metric/∂a |clean`, the estimate of `patch_sweep(model, corrupted, clean, ...)`'s
cells. The result is a `PatchingResult` laid out exactly like the exact sweep of the same site (same axes,
labels and baselines), so `top()`, `normalize()`, `.figure()`, `patching_figure` and the dashboards take it.

    est = attribution_patch(model, clean, corrupted, site="head")        # ~ patch_heads(model, clean, corrupted)
    compare_attribution(est, patch_heads(model, clean, corrupted))       # Pearson, Spearman, top-k, scatter

Sites: those of `patch_sweep` ("resid_pre", "resid_mid", "attn_out", "mlp_out", "head" = hook_z of a head at
every position, "head_by_pos") and "block_every" (like `patch_block_every`), plus "neuron" (`mlp.hook_post`, one
neuron at every position: [layer, neuron]) and the heads' inputs "head_q", "head_k", "head_v" ([layer, head], all
positions) and "head_q_by_pos", "head_k_by_pos", "head_v_by_pos" ([layer, pos, head]), which are
`transformer_lens.patching.get_act_patch_attn_head_{q,k,v}_{all,by}_pos`'s cells.

AtP* (`method="atp*"`) adds Kramár et al.'s two fixes:
- the QK fix: a query or key reaches the metric only through its head's attention softmax, which saturates, so
  the linear estimate can miss large effects. For the q and k sites the patched attention pattern is computed
  exactly (the scores with the patched queries or keys, then the softmax) and only what follows the pattern is
  linearised: `Σ (A_patched - A) · ∂metric/∂A`. A single key's patch changes one score per query, so the
  by-position key fix is closed form: `A_ts (e^δ - 1) (g_ts - Σ_j A_tj g_tj) / (1 + A_ts (e^δ - 1))`, summed
  over the queries t (their Algorithm 4). Other sites are read after their softmax, so the fix leaves them alone.
- GradDrop: direct and indirect effects can cancel in the gradient. For each layer l the backward pass is run
  again with the gradient through layer l's attention and MLP outputs dropped (their skip connection kept), and
  the cell's score is `Σ_l |I_l| / (L - 1)` per prompt, summed over prompts: a *magnitude* for ranking (the
  paper's use, a prefilter before exact patching), not a signed estimate. `meta["magnitude"]` says so.

Costs: one clean forward (no grad) and one corrupted forward + backward for every site at once, on the whole
batch of prompt pairs; GradDrop adds one forward + backward per layer. Autograd is switched on locally (also under
`torch.no_grad()`); parameters keep their `requires_grad` and `.grad`, and the model's training flags are restored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from tinygpt.inputs import eval_mode
from tinygpt.interp.circuits._common import CircuitError, add_zero, grad_enabled, require_hooks, scalar_metric
from tinygpt.interp.patching.api import PatchingResult, _pair, _pos_labels
from tinygpt.interp.patching.engine import SITES
from tinygpt.interp.patching.metrics import LogitDiff, resolve_metric

__all__ = ["ATP_SITES", "attribution_patch", "node_attribution"]

# site -> (hook name template, cell axes): the exact sweeps' sites (same layout), MLP neurons, and q/k/v by head
ATP_SITES: dict[str, tuple[str, tuple[str, ...]]] = {
    **SITES,
    "neuron": ("blocks.{layer}.mlp.hook_post", ("layer", "neuron")),
    **{
        f"head_{x}{suffix}": (f"blocks.{{layer}}.attn.hook_{x}", axes)
        for x in "qkv"
        for suffix, axes in (("", ("layer", "head")), ("_by_pos", ("layer", "pos", "head")))
    },
}
BLOCK_EVERY = ("resid_pre", "attn_out", "mlp_out")
METHODS = ("atp", "atp*")
DIRECTIONS = ("denoising", "noising")


def attribution_patch(
    model,
    clean: Any,
    corrupted: Any,
    metric=None,
    site: str = "head",
    method: str = "atp",
    direction: str = "denoising",
    *,
    correct: Any = None,
    incorrect: Any = None,
    normalize: bool = False,
    layers: Sequence[int] | None = None,
    qk_fix: bool | None = None,
    grad_drop: bool | None = None,
) -> PatchingResult:
    """Estimate every cell of the activation-patching sweep of `site` (see the module docstring).

    Args:
        model: a tinygpt model (eval mode during the call, then restored).
        clean, corrupted: prompts of equal token length: text, a list of texts, or tokens [batch, pos]; a batch
            of prompt pairs runs in one forward.
        metric: logits [batch, pos, d_vocab] -> a scalar tensor (differentiable); default the logit difference of
            `correct` vs `incorrect` at the last position (the clean and corrupted runs' top predictions).
        site: one of `ATP_SITES` or "block_every".
        method: "atp" (first order) or "atp*" (QK fix and GradDrop; each can be set with `qk_fix` / `grad_drop`).
        direction: "denoising" (clean into the corrupted run) or "noising" (corrupted into the clean run).
        correct, incorrect: answer tokens for the default metric (ids or single-token strings).
        normalize: report (value - corrupted) / (clean - corrupted), as `patch_sweep` does.
        layers: restrict to these layers (default all).
        qk_fix, grad_drop: override the method's choice of either fix.

    Returns:
        A `PatchingResult` shaped like the exact sweep's (e.g. [n_layers, n_heads] for "head"); `meta` holds
        `method`, `direction`, `qk_fix`, `grad_drop`, `magnitude` and `estimate=True`.

    Raises:
        CircuitError: an unknown site / method / direction, prompts of different lengths, a metric that does not
            return a scalar, a site the model's variant has no hook point for.
    """
    sites = list(BLOCK_EVERY) if site == "block_every" else [site]
    if site != "block_every" and site not in ATP_SITES:
        raise CircuitError(f"unknown site {site!r}; choose one of {[*ATP_SITES, 'block_every']}")
    if method not in METHODS:
        raise CircuitError(f"unknown method {method!r}; choose 'atp' or 'atp*'")
    if direction not in DIRECTIONS:
        raise CircuitError(f"unknown direction {direction!r}; choose 'denoising' or 'noising'")
    qk_fix = method == "atp*" if qk_fix is None else bool(qk_fix)
    grad_drop = method == "atp*" if grad_drop is None else bool(grad_drop)
    try:
        clean_t, corrupted_t = _pair(model, clean, corrupted)
    except CircuitError:
        raise
    except Exception as e:  # PatchingError / InputError: same message, the circuit error class
        raise CircuitError(str(e)) from e
    n_layers = model.cfg.n_layers
    for x in layers or []:
        if not -n_layers <= int(x) < n_layers:
            raise CircuitError(f"layer {x} is out of range; the model has {n_layers} layers (0..{n_layers - 1})")
    layer_list = list(range(n_layers)) if layers is None else [int(x) % n_layers for x in layers]
    with eval_mode(model):
        out = _attribute(model, clean_t, corrupted_t, sites, metric, correct, incorrect, layer_list, direction,
                         qk_fix, grad_drop)  # fmt: skip
    values, clean_value, corrupted_value, answers, heads = out
    labels = {
        "layer": [str(x) for x in layer_list],
        "pos": _pos_labels(model, clean_t, corrupted_t),
        "head": [f"H{h}" for h in range(heads)],
    }
    if "neuron" in sites:
        labels["neuron"] = [f"N{i}" for i in range(values[0].shape[-1])]
    if len(sites) == 1:
        value, axes, name = values[0], ATP_SITES[sites[0]][1], sites[0]
    else:
        value, axes, name = torch.stack(values), ("site", *ATP_SITES[sites[0]][1]), "block_every"
        labels["site"] = list(sites)
    meta = dict(
        layers=layer_list,
        clean_tokens=clean_t,
        corrupted_tokens=corrupted_t,
        method="atp*" if (qk_fix or grad_drop) else "atp",
        direction=direction,
        qk_fix=qk_fix,
        grad_drop=grad_drop,
        magnitude=grad_drop,
        estimate=True,
        **answers,
    )
    result = PatchingResult(value, tuple(axes), labels, clean_value, corrupted_value, name, meta=meta)
    return result.normalize() if normalize else result


# ------------------------------------------------------------------------------------------------ the runs
def _names(model, sites: list[str], layers: list[int], qk_fix: bool) -> tuple[list[str], dict[int, dict[str, str]]]:
    """Hook names of the sites, and per layer the names the QK fix reads (queries/keys after rotary, scores,
    pattern)."""
    names = sorted({ATP_SITES[s][0].format(layer=layer) for s in sites for layer in layers})
    require_hooks(model, names, f"attribution patching of {sites[0]!r}")
    qk: dict[int, dict[str, str]] = {}
    if qk_fix and any(s.startswith(("head_q", "head_k")) for s in sites):
        for layer in layers:
            a = f"blocks.{layer}.attn."
            rot = a + "hook_rot_q" in model.hook_dict
            qk[layer] = {
                "q": a + ("hook_rot_q" if rot else "hook_q"),
                "k": a + ("hook_rot_k" if rot else "hook_k"),
                "scores": a + "hook_attn_scores",
                "pattern": a + "hook_pattern",
            }
            require_hooks(model, list(qk[layer].values()), "the QK fix")
    return names, qk


def _backward(model, tokens: Tensor, names: list[str], grad_names: list[str], stop_layer: int | None = None):
    """A forward with zero tensors added at `grad_names` (gradient taken there) that records `names`' activations;
    with `stop_layer`, the gradient through that layer's attention and MLP outputs is dropped (GradDrop).

    Returns:
        (logits, activations {name: detached}, zeros {name: zero tensor requiring grad}).
    """
    zeros: dict[str, Tensor] = {}
    acts: dict[str, Tensor] = {}
    hooks = [(n, add_zero(zeros, acts)) for n in grad_names]
    hooks += [(n, _recorder(acts)) for n in names if n not in grad_names]
    if stop_layer is not None:
        stop = [f"blocks.{stop_layer}.hook_attn_out", f"blocks.{stop_layer}.hook_mlp_out"]
        require_hooks(model, stop, "GradDrop")
        hooks += [(n, lambda x, hook: x.detach()) for n in stop]
    with model.hooks(fwd_hooks=hooks):
        logits = model(tokens)
    return logits, acts, zeros


def _recorder(acts: dict[str, Tensor]):
    def hook(x: Tensor, hook) -> None:
        acts[hook.name] = x.detach()

    return hook


def _attribute(model, clean_t, corrupted_t, sites, metric, correct, incorrect, layers, direction, qk_fix, grad_drop):
    names, qk = _names(model, sites, layers, qk_fix)
    qk_names = sorted({n for d in qk.values() for n in d.values()})
    base_t, src_t = (corrupted_t, clean_t) if direction == "denoising" else (clean_t, corrupted_t)
    with torch.no_grad():
        src_logits, src_cache = model.run_with_cache(src_t, names_filter=sorted(set(names + qk_names)))
    pattern_names = [d["pattern"] for d in qk.values()]
    grad_names = sorted(set(names + pattern_names))
    with grad_enabled():
        logits, base, zeros = _backward(model, base_t, sorted(set(names + qk_names)), grad_names)
        clean_logits, corrupted_logits = (
            (src_logits, logits.detach()) if direction == "denoising" else (logits.detach(), src_logits)
        )
        fn = resolve_metric(model, metric, correct, incorrect, clean_logits, corrupted_logits)
        value = scalar_metric(fn(logits))
        grads = _grads(value, zeros, grad_names)
        with torch.no_grad():
            clean_value = float(scalar_metric(fn(clean_logits)))
        corrupted_value = float(scalar_metric(fn(corrupted_logits)))
        for name in names:
            if src_cache[name].shape != base[name].shape:
                raise CircuitError(
                    f"{name} has shape {tuple(src_cache[name].shape)} in one run and {tuple(base[name].shape)} in "
                    "the other (a mixture-of-depths block routes different tokens); attribution patching needs "
                    "the same cells in both runs: use patch_heads / patch_heads_by_pos, or a residual site"
                )
        per_example = _effects(sites, layers, names, src_cache, base, grads, qk)
        if grad_drop:
            total = [torch.zeros_like(e) for e in per_example]
            for stop in range(model.cfg.n_layers):
                logits_l, base_l, zeros_l = _backward(model, base_t, [], grad_names, stop_layer=stop)
                grads_l = _grads(scalar_metric(fn(logits_l)), zeros_l, grad_names)
                for t, e in zip(total, _effects(sites, layers, names, src_cache, base, grads_l, qk)):
                    t += e.abs()
            scores = [t.sum(1) / max(1, model.cfg.n_layers - 1) for t in total]
        else:
            scores = [e.sum(1) for e in per_example]
    base_value = corrupted_value if direction == "denoising" else clean_value
    values = [(base_value + s).float().cpu() for s in scores]
    answers = dict(correct=fn.correct.tolist(), incorrect=fn.incorrect.tolist()) if isinstance(fn, LogitDiff) else {}
    heads = next(
        (base[ATP_SITES[s][0].format(layer=layers[0])].shape[2] for s in sites if "head" in ATP_SITES[s][1]),
        model.cfg.n_heads,
    )
    return values, clean_value, corrupted_value, answers, heads


def _grads(value: Tensor, zeros: dict[str, Tensor], names: list[str]) -> dict[str, Tensor]:
    if not value.requires_grad:
        raise CircuitError("the metric does not depend on the logits it is given (no gradient); compute it from them")
    got = torch.autograd.grad(value, [zeros[n] for n in names], allow_unused=True)
    return {n: torch.zeros_like(zeros[n]) if g is None else g for n, g in zip(names, got)}


def _effects(sites, layers, names, src, base, grads, qk) -> list[Tensor]:
    """Per site: the per-prompt first-order effects [layer, batch, *cell] (QK-fixed where asked)."""
    out = []
    for s in sites:
        tpl, axes = ATP_SITES[s]
        rows = []
        for layer in layers:
            name = tpl.format(layer=layer)
            if layer in qk and s.startswith(("head_q", "head_k")):
                rows.append(_qk_fixed(s, qk[layer], src, base, grads))
                continue
            prod = (src[name].double() - base[name].double()) * grads[name].double()
            rows.append(_reduce(prod, axes))
        out.append(torch.stack(rows))
    return out


def _reduce(prod: Tensor, axes: tuple[str, ...]) -> Tensor:
    """(Δa · g) [batch, pos, ...] -> per-prompt cells [batch, *cell]."""
    if axes == ("layer", "pos"):
        return prod.flatten(2).sum(-1)
    if axes == ("layer", "head"):
        return prod.sum(-1).sum(1)
    if axes == ("layer", "pos", "head"):
        return prod.sum(-1)
    return prod.sum(1)  # ("layer", "neuron"): [batch, pos, d_mlp] -> [batch, d_mlp]


def _qk_fixed(site: str, names: dict[str, str], src, base, grads) -> Tensor:
    """Kramár et al.'s QK fix for a query or key site of one layer: the patched attention pattern computed
    exactly, what follows it linearised (`Σ (A' - A) · ∂metric/∂A`). Returns per-prompt cells [batch, *cell]."""
    q_b, k_b = base[names["q"]].double(), base[names["k"]].double()  # [b, T, H, d], [b, S, Hk, d]
    q_s, k_s = src[names["q"]].double(), src[names["k"]].double()
    scores = base[names["scores"]].double()  # [b, H, T, S], -inf where masked
    g = grads[names["pattern"]].double()  # ∂metric/∂pattern [b, H, T, S]
    h, hk, d = q_b.shape[2], k_b.shape[2], q_b.shape[3]
    group = h // hk

    def heads(x: Tensor) -> Tensor:  # [b, S, Hk, d] -> [b, H, S, d]
        return x.repeat_interleave(group, dim=2).transpose(1, 2)

    scale = 1 / math.sqrt(d)
    qh_b, kh_b = q_b.transpose(1, 2), heads(k_b)
    live = torch.isfinite(scores)
    check = (qh_b @ kh_b.transpose(-1, -2)) * scale
    err = (check - scores).abs()[live].max() if live.any() else torch.zeros(())
    if float(err) > 1e-3 * (1 + float(scores[live].abs().max())):
        raise CircuitError(
            "the QK fix recomputes attention scores as q·k/√d_head, which this attention variant does not use "
            f"(max difference {float(err):.3g}); run with qk_fix=False"
        )
    scores = torch.where(live, check, float("-inf"))  # the same scores, recomputed in float64
    a0 = scores.softmax(-1).nan_to_num(0.0)
    if site.startswith("head_q"):
        patched = torch.where(live, (q_s.transpose(1, 2) @ kh_b.transpose(-1, -2)) * scale, float("-inf"))
        eff = ((patched.softmax(-1).nan_to_num(0.0) - a0) * g).sum(-1)  # [b, H, T]: row t patched alone
        return eff.sum(-1) if site == "head_q" else eff.transpose(1, 2)  # [b, H] or [b, T, H]
    kh_s = heads(k_s)
    if site == "head_k":  # every key patched at once: the whole pattern recomputed
        patched = torch.where(live, (qh_b @ kh_s.transpose(-1, -2)) * scale, float("-inf"))
        eff = ((patched.softmax(-1).nan_to_num(0.0) - a0) * g).sum((-1, -2))  # [b, H]
        return eff.view(eff.shape[0], hk, group).sum(-1)
    # one key s at a time: score (t, s) moves by δ_ts, the rest of row t renormalises (closed form)
    delta = qh_b @ (kh_s - kh_b).transpose(-1, -2) * scale  # [b, H, T, S]
    delta = torch.where(live, delta, 0.0).clamp(-80.0, 80.0)  # e^±80 is finite in float64
    grow = a0 * torch.expm1(delta)  # the row's new normaliser is 1 + grow = (1 - A_ts) + A_ts e^δ
    norm = ((1 - a0) + a0 * torch.exp(delta)).clamp_min(torch.finfo(torch.float64).tiny)
    mean_g = (a0 * g).sum(-1, keepdim=True)
    eff = torch.where(live, grow * (g - mean_g) / norm, 0.0).sum(-2)  # [b, H, S]: summed over queries
    eff = eff.view(eff.shape[0], hk, group, -1).sum(2)  # [b, Hk, S]
    return eff.transpose(1, 2)  # [b, S, Hk]


def node_attribution(
    model, clean: Any, corrupted: Any, metric=None, *, correct: Any = None, incorrect: Any = None
) -> dict[str, float]:
    """Each node of the edge graph's attribution-patching score (all positions): heads from `site="head"`, MLPs
    from `"mlp_out"` and the embeddings from layer 0's `"resid_pre"`, summed over positions; each the estimated
    metric change (cell minus the corrupted metric). AtP is linear, so a sum of cells estimates patching them
    together, and each node's score equals the sum of its outgoing EAP edge scores.

    Returns:
        node name ("embed", "L{layer}H{head}", "MLP{layer}") -> estimated effect.
    """
    kw = dict(metric=metric, correct=correct, incorrect=incorrect)

    def effects(site: str, **more) -> Tensor:
        r = attribution_patch(model, clean, corrupted, site=site, **kw, **more)
        return r.values - r.corrupted_metric

    heads = effects("head")  # [layer, head]
    mlps = effects("mlp_out").sum(-1)  # [layer]
    out = {"embed": float(effects("resid_pre", layers=[0])[0].sum())}
    for layer in range(heads.shape[0]):
        out |= {f"L{layer}H{h}": float(heads[layer, h]) for h in range(heads.shape[1])}
        out[f"MLP{layer}"] = float(mlps[layer])
    return out
