"""The patching engine: a sweep as a few batched forwards, computing only what a patch can change.

A cell whose clean and corrupted activations are identical (a position before the first token the prompts
differ in; a shared token in layer 0's resid_pre) is a no-op: its value is the corrupted run's. The other cells
are replicas of the corrupted run (chunked to bound memory). Every forward is the model's own
(`GPT.run_from`): nothing here re-implements block math.

- Plain block stacks resume: the blocks before the patched one are unaffected, so each replica starts there
  (`run_from(layer, ...)`) from the cached corrupted run, and runs only the patched position and the later ones
  (causal attention), on the corrupted keys and values of the earlier positions (`PrefixKV`).
- Position sites of a plain model with nothing hooked take the packed path: the patched block's output comes
  from the two runs' cached activations (patching `mlp_out` at p changes `resid_post` at p only; patching
  `resid_pre` at p changes the keys and values at p, not the other queries: the block runs with its
  projections known), and later blocks run on the packed (replica, position) rows (`PackedRows`); with the
  default metric the final block computes the last position only.
- Otherwise a hook patches a different cell in each replica (mixture-of-depths head sweeps patch by token
  position, see `tinygpt.interp.patching`).
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from tinygpt.interp.patching.metrics import LogitDiff, Metric, scalar
from tinygpt.interp.routing import routed_slots
from tinygpt.model import GPT, PackedRows, PrefixKV, observed

# site -> (hook name template, cell axes)
SITES: dict[str, tuple[str, tuple[str, ...]]] = {
    "resid_pre": ("blocks.{layer}.hook_resid_pre", ("layer", "pos")),
    "resid_mid": ("blocks.{layer}.hook_resid_mid", ("layer", "pos")),
    "attn_out": ("blocks.{layer}.hook_attn_out", ("layer", "pos")),
    "mlp_out": ("blocks.{layer}.hook_mlp_out", ("layer", "pos")),
    "head": ("blocks.{layer}.attn.hook_z", ("layer", "head")),
    "head_by_pos": ("blocks.{layer}.attn.hook_z", ("layer", "pos", "head")),
}

# site -> (clean, corrupted) activations of the patched layer that `_patched_rows` computes its output from
DIRECT: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "resid_pre": (("hook_resid_pre", "attn.hook_q", "attn.hook_k", "attn.hook_v"),) * 2,
    "resid_mid": (("hook_resid_post",), ("hook_resid_post",)),
    "attn_out": (("hook_attn_out",), ("hook_resid_pre", "hook_resid_post")),
    "mlp_out": (("hook_mlp_out",), ("hook_mlp_out", "hook_resid_post")),
}

_ROW_BUDGET = {"cpu": 768, "gpu": 1 << 16}  # packed rows per position-sweep chunk (see sweep)


def can_resume(model) -> bool:
    """True if the model is a plain block stack, so a forward can start at any block's resid_pre (with the
    earlier positions' keys and values from a cache)."""
    return (
        isinstance(model, GPT)
        and not getattr(model.cfg, "variants", [])
        and type(model).forward is GPT.forward
        and type(model).run_from is GPT.run_from
    )


def _quiet(model) -> bool:
    """True if nothing watches the model's hook points or modules, so a sweep may compute a block's patched
    output from cached activations instead of running the block."""
    return not any(
        m._forward_hooks or m._forward_pre_hooks or (isinstance(m, HookPoint) and observed(m)) for m in model.modules()
    )


def _patched_rows(model, site: str, layer: int, rows: PackedRows, clean, corrupted, last_only: bool) -> Tensor:
    """`blocks.{layer}.hook_resid_post` rows [N, d_model] of the corrupted run with `site` patched from the
    clean run at each replica's position (only the last rows [nb, d_model] if `last_only` and `layer` is the
    final block), computed from the two runs' cached activations.

    Nothing is recomputed that the patch leaves unchanged. A patch at position p of `resid_mid` gives the clean
    `resid_post` at p; of `mlp_out`, the corrupted `resid_post - mlp_out` plus the clean `mlp_out` at p; of
    `attn_out`, the rest of the block (`finish_from`: its feed-forward half, or a parallel block's MLP) on the
    corrupted `resid_pre` and the clean `attn_out` (one pass shared by every cell of the layer); every other
    position keeps the corrupted `resid_post`. A patch of `resid_pre` at p changes the keys and values at p only
    (to the clean run's): the block runs for p and every later position with its queries, keys and values known
    from the two runs (`PackedRows.known`)."""
    c = {x: clean[f"blocks.{layer}.{x}"] for x in DIRECT[site][0]}
    k = {x: corrupted[f"blocks.{layer}.{x}"] for x in DIRECT[site][1]}
    if site == "resid_mid":
        return rows.take(k["hook_resid_post"], first=c["hook_resid_post"])
    if site == "mlp_out":  # resid_post - mlp_out is resid_mid (or, in a parallel block, resid_pre + attn_out)
        return rows.take(k["hook_resid_post"], first=k["hook_resid_post"] - k["hook_mlp_out"] + c["hook_mlp_out"])
    if site == "attn_out":
        post = model.blocks[layer].finish_from(k["hook_resid_pre"], c["hook_attn_out"])
        return rows.take(k["hook_resid_post"], first=post)
    rows.known[layer] = tuple(rows.take(k[f"attn.hook_{x}"], first=c[f"attn.hook_{x}"]) for x in "qkv")
    x = rows.take(k["hook_resid_pre"], first=c["hook_resid_pre"])[None]
    final = layer == model.cfg.n_layers - 1
    return model.run_from(layer, x, stop_at=layer + 1, past_kv_cache=rows, last_only=last_only and final)[0]


def _run_rows(model, layer: int, x: Tensor, rows: PackedRows, last_only: bool) -> Tensor:
    """Logits of the blocks from `layer` on for residual rows x [N, d_model]: [N, d_vocab], or with `last_only`
    the last position's [nb, d_vocab] (the final block then computes only that position's output)."""
    return model.run_from(layer, x[None], past_kv_cache=rows, last_only=last_only)[0]


def _cells(site: str, n_pos: int, n_heads: int) -> list[tuple[int, ...]]:
    if site == "head":
        return [(h,) for h in range(n_heads)]
    if site == "head_by_pos":
        return [(p, h) for p in range(n_pos) for h in range(n_heads)]
    return [(p,) for p in range(n_pos)]


def _mask(site: str, cells: list[tuple[int, ...]], act_shape: torch.Size, device, offset: int = 0) -> Tensor:
    """[n, 1, *act_shape[1:]]-broadcastable bool mask with cell i's slice set in row i (positions shifted by
    -offset when the activation starts at position `offset`)."""
    n = len(cells)
    t = act_shape[1]
    rows = torch.arange(n)
    if site == "head":
        m = torch.zeros(n, 1, 1, act_shape[2], 1, dtype=torch.bool, device=device)
        m[rows, 0, 0, [c[0] for c in cells]] = True
    elif site == "head_by_pos":
        m = torch.zeros(n, 1, t, act_shape[2], 1, dtype=torch.bool, device=device)
        m[rows, 0, [c[0] - offset for c in cells], [c[1] for c in cells]] = True
    else:
        m = torch.zeros(n, 1, t, *([1] * (len(act_shape) - 2)), dtype=torch.bool, device=device)
        m[rows, 0, [c[0] - offset for c in cells]] = True
    return m


def _routed_head_hook(site: str, chunk: list[tuple[int, ...]], b: int, layer: int, clean_cache, corrupted_cache):
    """The patching hook for `hook_z` of a mixture-of-depths block (see the module docstring): replica i patches
    cell chunk[i] by token position, where both runs route the token."""
    mask_name, z_name = f"blocks.{layer}.hook_routing_mask", f"blocks.{layer}.attn.hook_z"
    clean_mask = clean_cache[mask_name]
    clean_mask = clean_mask if clean_mask.dtype == torch.bool else clean_mask > 0.5
    corrupted_mask = corrupted_cache[mask_name]
    corrupted_mask = corrupted_mask if corrupted_mask.dtype == torch.bool else corrupted_mask > 0.5
    t = clean_mask.shape[1]
    c_idx, c_valid = routed_slots(clean_mask)
    z = clean_cache[z_name] if z_name in clean_cache.cache_dict else None
    clean_full = None
    if z is not None:  # the clean head outputs at token positions [b, t, H, d]
        clean_full = torch.zeros(b, t, *z.shape[2:], dtype=z.dtype, device=z.device)
        rows = torch.arange(b, device=z.device)[:, None].expand_as(c_idx)
        clean_full[rows[c_valid], c_idx[c_valid]] = z[c_valid]
    k_idx, k_valid = routed_slots(corrupted_mask)
    ok = k_valid & clean_mask.gather(1, k_idx)  # [b, K]: slots whose token both runs route
    n = len(chunk)

    def hook(act: Tensor, hook) -> Tensor:
        if clean_full is None or act.shape[1] != k_idx.shape[1]:
            return act  # nothing routed in the clean run (or this forward routes differently): nothing to patch
        shaped = act.view(n, b, *act.shape[1:])  # [n, b, K, H, d]
        src = clean_full.gather(1, k_idx[..., None, None].expand(-1, -1, *clean_full.shape[2:]))  # [b, K, H, d]
        cell = torch.zeros(n, b, act.shape[1], act.shape[2], 1, dtype=torch.bool, device=act.device)
        for i, c in enumerate(chunk):
            if site == "head":
                cell[i, :, :, c[0]] = ok[..., None]
            else:
                cell[i, :, :, c[1]] = (ok & (k_idx == c[0]))[..., None]
        return torch.where(cell, src[None].to(act.dtype), shaped).reshape(act.shape)

    return hook


def _routed(model, site: str, layer: int) -> bool:
    """A head sweep of a mixture-of-depths block (patched by token position, see the module docstring)."""
    return site in ("head", "head_by_pos") and f"blocks.{layer}.hook_routing_mask" in model.hook_dict


def _unchanged(site: str, name: str, clean_cache, corrupted_cache) -> Tensor:
    """Per cell, True where the clean activation equals the corrupted one exactly (in every prompt): patching
    it changes nothing, so the patched run is the corrupted run (e.g. positions before the first token the
    prompts differ in, or any shared token in layer 0's resid_pre)."""
    same = clean_cache[name] == corrupted_cache[name]  # [b, pos, ...] or hook_z [b, pos, H, d_head]
    if site == "head":
        return same.all(-1).all(1).all(0)  # [H]
    if site == "head_by_pos":
        return same.all(-1).all(0).flatten()  # [pos * H], in _cells order
    return same.flatten(2).all(-1).all(0)  # [pos]


@torch.no_grad()
def sweep(
    model,
    corrupted: Tensor,
    site: str,
    metric: Metric,
    layers: list[int],
    batch_cells: int | None,
    progress: bool,
    clean_cache,
    corrupted_cache,
    corrupted_logits: Tensor,
    corrupted_value: float,
) -> Tensor:
    from tqdm.auto import tqdm

    hook_tpl, axes = SITES[site]
    b, t = corrupted.shape
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    cells = _cells(site, t, n_heads)  # position cells come sorted by position
    resume = can_resume(model)
    by_pos = "pos" in axes
    # the default metric reads the last position only: the final block then runs that position alone
    quiet = _quiet(model)
    last_only = isinstance(metric, LogitDiff) and quiet
    direct = resume and quiet and site in DIRECT  # packed rows from cached activations (_patched_rows)
    per_cell = b * t
    widest = max(model.cfg.d_vocab, model.cfg.d_mlp, 4 * model.cfg.d_model)
    fixed = batch_cells
    if batch_cells is None:  # ~4k replicated tokens per forward and logits of at most ~64M floats
        batch_cells = max(1, min(4096 // per_cell, (1 << 26) // (per_cell * widest)))
        if by_pos and corrupted.device.type == "cpu" and resume:
            # CPU matmuls are compute-bound: position chunks of ~400 tokens (at most ~16 per layer), so later
            # chunks run fewer positions (on a GPU one wide batch per layer is faster: small forwards are
            # launch-bound)
            batch_cells = min(batch_cells, max(4, 384 // per_cell, -(-len(cells) // 16)))
    # packed rows: chunks of about `budget` computed rows (a cell at position p has b * (t - p)); the padded
    # keys, values and queries (and the full logits for a metric that reads every position) stay bounded too
    budget = _ROW_BUDGET["cpu" if corrupted.device.type == "cpu" else "gpu"]
    max_cells = max(1, (1 << 26) // (per_cell * (4 * model.cfg.d_model if last_only else widest)))
    out = torch.full((len(layers), len(cells)), corrupted_value)
    todo = []
    for li, layer in enumerate(layers):
        if _routed(model, site, layer):  # routed tokens: every cell runs
            live = list(range(len(cells)))
        else:  # the other cells change nothing
            same = _unchanged(site, hook_tpl.format(layer=layer), clean_cache, corrupted_cache)
            live = [i for i in range(len(cells)) if not bool(same[i])]
        if not direct or fixed is not None:
            todo += [(li, live[j : j + batch_cells]) for j in range(0, len(live), batch_cells)]
            continue
        chunk, size = [], 0
        for i in live:
            rows = b * (t - cells[i][0])
            if chunk and (size + rows > budget or len(chunk) == max_cells):
                todo.append((li, chunk))
                chunk, size = [], 0
            chunk.append(i)
            size += rows
        todo += [(li, chunk)] if chunk else []
    for li, idx in tqdm(todo, desc=f"patching {site}", disable=not progress, leave=False):
        layer = layers[li]
        chunk = [cells[i] for i in idx]
        n = len(chunk)
        name = hook_tpl.format(layer=layer)
        # Positions before the chunk's first patched position are the corrupted run's: with a plain block
        # stack, only the later positions are run (on the corrupted keys and values of the earlier ones).
        first = min(c[0] for c in chunk) if by_pos and resume else 0
        if direct:
            start = torch.tensor([c[0] for c in chunk], device=corrupted.device).repeat_interleave(b)
            rows = PackedRows(start, corrupted_cache, b, t)
            x = _patched_rows(model, site, layer, rows, clean_cache, corrupted_cache, last_only)
            logits = _run_rows(model, layer + 1, x, rows, last_only)
            if last_only:
                logits = logits[:, None]  # [nb, 1, d_vocab]
            else:
                full = corrupted_logits.repeat(n, 1, 1)
                full[rows.r, rows.q] = logits
                logits = full
        else:
            if _routed(model, site, layer):
                hook = _routed_head_hook(site, chunk, b, layer, clean_cache, corrupted_cache)
            else:

                def hook(act: Tensor, hook, chunk=chunk, clean_act=clean_cache[name][:, first:], first=first):
                    shaped = act.view(len(chunk), b, *act.shape[1:])
                    mask = _mask(site, chunk, act.shape, act.device, offset=first)
                    return torch.where(mask, clean_act[None].to(act.dtype), shaped).reshape(act.shape)

            with model.hooks(fwd_hooks=[(name, hook)]):
                if resume:
                    resid = corrupted_cache[f"blocks.{layer}.hook_resid_pre"][:, first:]
                    kv = PrefixKV.from_activations(corrupted_cache, range(layer, n_layers), first, n) if first else None
                    # logits of the last position only (the hooked block runs whole)
                    tail = last_only and layer < n_layers - 1 and t - first > 1
                    logits = model.run_from(layer, resid.repeat(n, 1, 1), past_kv_cache=kv, last_only=tail)
                    if first and not tail:
                        logits = torch.cat([corrupted_logits[:, :first].repeat(n, 1, 1), logits], dim=1)
                else:
                    logits = model(corrupted.repeat(n, 1))
        logits = logits.view(n, b, *logits.shape[1:])
        if hasattr(metric, "batched"):
            out[li, idx] = metric.batched(logits).float().cpu()
        else:
            for j in range(n):
                out[li, idx[j]] = scalar(metric(logits[j]))
    # cells -> axes
    if site == "head":
        return out.view(len(layers), n_heads)
    if site == "head_by_pos":
        return out.view(len(layers), t, n_heads)
    return out.view(len(layers), t)
