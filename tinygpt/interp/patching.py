"""Activation patching: run a corrupted prompt, splice in one activation from the clean run, measure recovery.

Same semantics as `transformer_lens.patching` (`get_act_patch_resid_pre`, `..._attn_out`, `..._mlp_out`,
`..._block_every`, `..._attn_head_out_all_pos`, `..._attn_head_out_by_pos`; the tests check agreement to 1e-5),
but a sweep runs as a few *batched* forwards instead of one forward per cell, and skips work that cannot change
the result. A cell whose clean and corrupted activations are identical (a position before the first token
the prompts differ in; a shared token in layer 0's resid_pre) is a no-op: its value is the corrupted run's.
The other cells are replicas of the corrupted run (chunked to bound memory): the blocks before the patched one
are unaffected, so each replica starts there from the cached corrupted run, and computes only the patched
position and the later ones (causal attention; the earlier positions' keys and values are the corrupted
run's). For position sites of a plain model with nothing hooked, the patched block's output comes from the
two runs' cached activations (e.g. patching `mlp_out` at p changes `resid_post` at p only; patching
`resid_pre` at p changes the keys and values at p, not the other queries), later blocks run on the packed
(replica, position) rows, and with the default metric the final block computes the last position only.
Otherwise a hook patches a different cell in each replica.

    clean, corrupted = "When Mary and John went, John gave it to", "When Mary and John went, Mary gave it to"
    res = patch_resid_pre(model, clean, corrupted, correct=" Mary", incorrect=" John")
    res.figure()                                   # (layer x position) heatmap with the prompt's tokens
    every = patch_block_every(model, clean, corrupted, correct=" Mary", incorrect=" John", normalize=True)
    heads = patch_heads(model, clean, corrupted, metric=my_metric)       # (layer x head), all positions
    patch_resid(model, clean, corrupted, layer=2, pos=5, correct=" Mary", incorrect=" John")   # one site

The metric maps logits [batch, pos, d_vocab] of a (patched) corrupted run to a scalar. By default it is
`logit_diff` at the last position between `correct` and `incorrect` (given as token ids or single-token
strings; if omitted, the clean and corrupted runs' own top predictions). `normalize=True` reports
(value - corrupted) / (clean - corrupted): 0 = no effect, 1 = fully restores the clean run, as in
TransformerLens' IOI demos.

Mixture-of-depths blocks (`mod=True`) compute only the tokens they route, so inside them `hook_z` holds the
routed tokens only ([batch, routed, n_heads, d_head]), and the clean and corrupted runs may route different
tokens. Head sweeps there patch by token position: the clean output of a head at position p replaces the
corrupted one at p when both runs route p through the block; a token either run skips keeps its corrupted
value (the clean run has no head output there, or the corrupted run does not compute the token). The
residual-stream sites keep their full shape in every variant and need nothing special.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from tinygpt.arch import backends
from tinygpt.interp.attention import routed_slots

Metric = Callable[[Tensor], Tensor | float]

# site -> (hook name template, cell axes)
SITES: dict[str, tuple[str, tuple[str, ...]]] = {
    "resid_pre": ("blocks.{layer}.hook_resid_pre", ("layer", "pos")),
    "resid_mid": ("blocks.{layer}.hook_resid_mid", ("layer", "pos")),
    "attn_out": ("blocks.{layer}.hook_attn_out", ("layer", "pos")),
    "mlp_out": ("blocks.{layer}.hook_mlp_out", ("layer", "pos")),
    "head": ("blocks.{layer}.attn.hook_z", ("layer", "head")),
    "head_by_pos": ("blocks.{layer}.attn.hook_z", ("layer", "pos", "head")),
}


class PatchingError(ValueError):
    """Prompts, answers or sites that cannot be patched as asked."""


# -------------------------------------------------------------------------------------------- metrics
def logit_diff(logits: Tensor, correct: Any, incorrect: Any, *, pos: int = -1, per_prompt: bool = False) -> Tensor:
    """Logit of the correct answer minus the incorrect one at position `pos`, averaged over the batch.

    Args:
        logits: [batch, pos, d_vocab].
        correct, incorrect: token ids: an int (every prompt) or a sequence / tensor [batch].
        pos: the position read (default the last).
        per_prompt: return [batch] instead of the mean.
    """
    last = logits[:, pos]  # [batch, d_vocab]
    b = last.shape[0]
    c = torch.as_tensor(correct, device=last.device).reshape(-1).expand(b) if _n(correct) == 1 else None
    w = torch.as_tensor(incorrect, device=last.device).reshape(-1).expand(b) if _n(incorrect) == 1 else None
    if c is None:
        c = torch.as_tensor(correct, device=last.device).reshape(-1)
    if w is None:
        w = torch.as_tensor(incorrect, device=last.device).reshape(-1)
    if c.shape[0] != b or w.shape[0] != b:
        raise PatchingError(
            f"logit_diff got {c.shape[0]} correct and {w.shape[0]} incorrect answers for a batch of {b} prompts; "
            "give one token id per prompt (or one for all)"
        )
    rows = torch.arange(b, device=last.device)
    diff = last[rows, c] - last[rows, w]
    return diff if per_prompt else diff.mean()


def _n(x: Any) -> int:
    return torch.as_tensor(x).numel()


def logit_diff_metric(
    correct: Any, incorrect: Any, *, pos: int = -1, clean: float | None = None, corrupted: float | None = None
) -> Metric:
    """A metric closure `logits -> logit_diff(...)`; with `clean` and `corrupted` baselines it is normalised,
    (ld - corrupted) / (clean - corrupted), as in TransformerLens' IOI demo's `ioi_metric`."""
    if (clean is None) != (corrupted is None):
        raise PatchingError("give both clean= and corrupted= baselines to normalise, or neither")

    def metric(logits: Tensor) -> Tensor:
        ld = logit_diff(logits, correct, incorrect, pos=pos)
        return ld if clean is None else (ld - corrupted) / (clean - corrupted)

    return metric


# -------------------------------------------------------------------------------------------- results
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
        fig.update_layout(
            title=title
            or f"Activation patching ({self.site}); clean {self.clean_metric:.3f}, "
            f"corrupted {self.corrupted_metric:.3f}",
            coloraxis=dict(colorscale="RdBu", cmid=0, cmin=zmin, cmax=zmax, colorbar=dict(title=cb)),
            height=max(320, 22 * len(panels[0][3]) + 160),
            width=min(1600, 260 + 340 * len(panels) + 14 * len(panels[0][2]) * len(panels)),
        )
        return fig


# -------------------------------------------------------------------------------------------- inputs
def _tokens(model, x: Any, what: str) -> Tensor:
    if isinstance(x, str):
        return model.to_tokens(x)
    if isinstance(x, (list, tuple)) and x and isinstance(x[0], str):
        ids = [model._require_tokenizer().encode(s) for s in x]
        if len({len(i) for i in ids}) != 1:
            raise PatchingError(
                f"the {what} prompts tokenize to different lengths {[len(i) for i in ids]}; patching compares "
                "positions, so every prompt must have the same number of tokens (pad or rephrase them)"
            )
        return torch.tensor(ids, dtype=torch.long, device=model.cfg.device)
    t = torch.as_tensor(x)
    if t.ndim == 1:
        t = t[None]
    if t.ndim != 2 or t.dtype not in (torch.long, torch.int, torch.int32, torch.int64):
        raise PatchingError(f"{what} must be text or integer tokens [batch, pos], got shape {tuple(t.shape)}")
    return t.long().to(model.cfg.device)


def _pair(model, clean: Any, corrupted: Any) -> tuple[Tensor, Tensor]:
    c, k = _tokens(model, clean, "clean"), _tokens(model, corrupted, "corrupted")
    if c.shape != k.shape:
        raise PatchingError(
            f"clean and corrupted inputs must have the same shape, got {tuple(c.shape)} and {tuple(k.shape)}; "
            "choose corrupted prompts with the same number of tokens (e.g. swap one name for another)"
        )
    return c, k


def _answer(model, x: Any) -> Any:
    if isinstance(x, str):
        return model.to_single_token(x)
    if isinstance(x, (list, tuple)) and x and isinstance(x[0], str):
        return [model.to_single_token(s) for s in x]
    return x


def _metric(
    model, metric: Metric | None, correct: Any, incorrect: Any, clean_logits: Tensor, corrupted_logits: Tensor
) -> Metric:
    if metric is not None:
        if correct is not None or incorrect is not None:
            raise PatchingError("give either metric= or correct=/incorrect= answers, not both")
        return metric
    if correct is None:
        correct = clean_logits[:, -1].argmax(-1)
    if incorrect is None:
        incorrect = corrupted_logits[:, -1].argmax(-1)
    correct, incorrect = _answer(model, correct), _answer(model, incorrect)
    same = torch.as_tensor(correct).cpu() == torch.as_tensor(incorrect).cpu()
    if bool(same.any()):
        raise PatchingError(
            "the correct and incorrect answers coincide (the clean and corrupted runs predict the same token?): "
            "pass correct= and incorrect= tokens, or a metric="
        )
    return _LogitDiff(correct, incorrect, clean_logits.shape[0], clean_logits.device)


class _LogitDiff:
    """The default metric, `logit_diff` at the last position; `batched` scores many patched runs at once."""

    def __init__(self, correct: Any, incorrect: Any, batch: int, device):
        c = torch.as_tensor(correct, device=device).reshape(-1)
        w = torch.as_tensor(incorrect, device=device).reshape(-1)
        if c.numel() not in (1, batch) or w.numel() not in (1, batch):
            raise PatchingError(
                f"got {c.numel()} correct and {w.numel()} incorrect answers for {batch} prompts; give one token "
                "per prompt (or one for all)"
            )
        self.correct, self.incorrect = c.expand(batch), w.expand(batch)

    def __call__(self, logits: Tensor) -> Tensor:
        return logit_diff(logits, self.correct, self.incorrect)

    def batched(self, logits: Tensor) -> Tensor:  # [n, batch, pos, d_vocab] -> [n]
        last = logits[:, :, -1]
        rows = torch.arange(last.shape[1], device=last.device)
        return (last[:, rows, self.correct] - last[:, rows, self.incorrect]).mean(-1)


def _scalar(value: Any) -> float:
    v = torch.as_tensor(value)
    if v.numel() != 1:
        raise PatchingError(f"the metric must return a scalar, got shape {tuple(v.shape)}")
    return float(v)


def _pos_labels(model, clean: Tensor, corrupted: Tensor) -> list[str]:
    try:
        c, k = model.to_str_tokens(clean[0]), model.to_str_tokens(corrupted[0])
    except (ValueError, AttributeError):
        c = k = [""] * clean.shape[1]
    return [f"{i} {a!r}" if a == b else f"{i} {a!r}/{b!r}" for i, (a, b) in enumerate(zip(c, k))]


# ------------------------------------------------------------------------------------------ the engine
def _can_resume(model) -> bool:
    """True if the model is a plain block stack, so a forward can start at any block's resid_pre."""
    from tinygpt.model import GPT

    plain = isinstance(model, GPT) and not getattr(model.cfg, "variants", [])
    return (
        plain
        and type(model).forward is GPT.forward
        and getattr(type(model), "run_blocks", None) is getattr(GPT, "run_blocks", None)
    )


class _PrefixKV:
    """A KV cache holding the corrupted run's keys and values of the first `length` positions (the same in
    every replica: a patch at position >= length cannot change them), for running only the later positions."""

    def __init__(self, cache, layers: range, length: int, replicas: int):
        self.length = length
        self.k = {i: self._prefix(cache[f"blocks.{i}.attn.hook_k"], replicas) for i in layers}
        self.v = {i: self._prefix(cache[f"blocks.{i}.attn.hook_v"], replicas) for i in layers}

    def _prefix(self, act: Tensor, replicas: int) -> Tensor:  # [b, pos, H, d] -> [replicas * b, H, length, d]
        return act[:, : self.length].transpose(1, 2).repeat(replicas, 1, 1, 1)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return torch.cat([self.k[layer], k], dim=2), torch.cat([self.v[layer], v], dim=2)


class _TailKV:
    """The final block's keys and values of every position but the last, for running the last position alone."""

    def __init__(self, k: Tensor, v: Tensor):
        self.k, self.v, self.length = k, v, k.shape[2]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)


def _run_from(model, layer: int, resid: Tensor, cache: _PrefixKV | None = None, last_only: bool = False) -> Tensor:
    """Logits of the blocks from `layer` on, given `blocks.{layer}.hook_resid_pre` [batch, pos, d_model]
    (of the positions after `cache.length` when a prefix cache is given). With `last_only` (for a metric that
    reads the last position; nothing observes the final block), the final block computes only the keys and
    values of the other positions and the last position itself: logits [batch, 1, d_vocab]."""
    x = resid
    blocks = list(model.blocks[layer:])
    final = blocks.pop() if last_only and len(blocks) > 1 else None
    for block in blocks:
        x = block(x, cache)
    if final is not None:
        attn, cfg = final.attn, model.cfg
        h = final.ln1(x[:, :-1])
        b, t, _ = h.shape
        k = attn.k_proj(h).view(b, t, cfg.n_heads, cfg.d_head).transpose(1, 2)
        v = attn.v_proj(h).view(b, t, cfg.n_heads, cfg.d_head).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(cfg.n_layers - 1, k, v)
        x = final(x[:, -1:], _TailKV(k, v))
    return model.unembed(model.ln_final(x))


def _quiet(model) -> bool:
    """True if nothing watches the model's hook points or modules, so a sweep may compute a block's patched
    output from cached activations instead of running the block."""
    from tinygpt.model import observed

    return not any(
        m._forward_hooks or m._forward_pre_hooks or (isinstance(m, HookPoint) and observed(m)) for m in model.modules()
    )


# site -> (clean, corrupted) activations of the patched layer that `_patched_rows` computes its output from
_DIRECT: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "resid_pre": (("hook_resid_pre", "attn.hook_q", "attn.hook_k", "attn.hook_v"),) * 2,
    "resid_mid": (("hook_resid_post",), ("hook_resid_post",)),
    "attn_out": (("hook_attn_out",), ("hook_resid_pre", "hook_resid_post")),
    "mlp_out": (("hook_mlp_out",), ("hook_resid_mid", "hook_resid_post")),
}


_ROW_BUDGET = {"cpu": 768, "gpu": 1 << 16}  # packed rows per position-sweep chunk (see _sweep)


class _Rows:
    """The (replica, position) rows a position sweep computes, packed: replica j (prompt j % batch of cell
    j // batch) holds its cell's patched position `pos[j // batch]` and every later one; the earlier positions
    are the corrupted run's (causal attention) and are not computed."""

    def __init__(self, pos: list[int], batch: int, t: int, device):
        p = torch.as_tensor(pos, device=device).repeat_interleave(batch)  # [nb] each replica's patched position
        lengths = t - p
        self.nb, self.t = p.numel(), t
        self.r = torch.arange(self.nb, device=device).repeat_interleave(lengths)  # [N] replica of each row
        start = torch.cumsum(lengths, 0) - lengths
        self.q = torch.arange(self.r.numel(), device=device) - start[self.r] + p[self.r]  # [N] position of each row
        self.prompt = self.r % batch
        self.patched = self.q == p[self.r]  # [N] the rows at the patched position
        self.last = self.q == t - 1  # [N] one row per replica

    def take(self, act: Tensor) -> Tensor:  # an activation of the unpatched run [batch, t, ...] -> rows [N, ...]
        return act[self.prompt, self.q]

    def mix(self, clean: Tensor, corrupted: Tensor) -> Tensor:  # -> rows: clean at the patched positions
        m = self.patched.view(-1, *([1] * (clean.ndim - 2)))
        return torch.where(m, self.take(clean), self.take(corrupted))


def _kv(corrupted, layer: int, rows: _Rows) -> tuple[Tensor, Tensor]:
    """The corrupted run's keys and values of `layer` for every replica, [nb, t, H * d_head] (copies to write
    the computed rows into)."""
    k, v = corrupted[f"blocks.{layer}.attn.hook_k"], corrupted[f"blocks.{layer}.attn.hook_v"]  # [b, t, H, dh]
    n = rows.nb // k.shape[0]
    return k.flatten(2).repeat(n, 1, 1), v.flatten(2).repeat(n, 1, 1)


def _block_rows(block, cfg, rows: _Rows, sel: Tensor | None, x: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The rest of a plain block for residual rows x [M, d_model] (rows `sel` of `rows`, all if None), given
    their queries q [M, H * d_head] and every replica's keys and values k, v [nb, t, H * d_head]: the block's
    output rows [M, d_model] (attention, output projection, MLP)."""
    h, dh = cfg.n_heads, cfg.d_head
    r, qp = (rows.r, rows.q) if sel is None else (rows.r[sel], rows.q[sel])
    t0 = int(qp.min())
    padded = q.new_zeros(rows.nb, rows.t - t0, h * dh)  # queries at their positions (zeros elsewhere: unused)
    padded[r, qp - t0] = q
    z = backends.attend(
        padded.view(rows.nb, -1, h, dh).transpose(1, 2),
        k.view(rows.nb, rows.t, h, dh).transpose(1, 2),
        v.view(rows.nb, rows.t, h, dh).transpose(1, 2),
        t0,
        impl=cfg.attn_impl,
    )  # [nb, H, t - t0, dh]
    x = x + block.attn.o_proj(z.transpose(1, 2).reshape(rows.nb, -1, h * dh)[r, qp - t0])
    return x + getattr(block, block._ffn_name)(block.ln2(x))


def _patched_rows(model, site: str, layer: int, rows: _Rows, clean, corrupted, last_only: bool) -> Tensor:
    """`blocks.{layer}.hook_resid_post` rows [N, d_model] of the corrupted run with `site` patched from the
    clean run at each replica's position (only the last rows [nb, d_model] if `last_only` and `layer` is the
    final block), computed from the two runs' cached activations.

    Nothing is recomputed that the patch leaves unchanged. A patch at position p of `resid_mid` gives the clean
    `resid_post` at p; of `mlp_out`, the corrupted `resid_mid` plus the clean `mlp_out` at p; of `attn_out`, the
    MLP of the corrupted `resid_pre` plus the clean `attn_out` (one MLP pass shared by every cell of the layer);
    every other position keeps the corrupted `resid_post`. A patch of `resid_pre` at p changes the keys and
    values at p only (to the clean run's): the block's attention, output projection and MLP run for p and every
    later position, without recomputing the other queries, keys and values."""
    block, cfg = model.blocks[layer], model.cfg
    c = {x: clean[f"blocks.{layer}.{x}"] for x in _DIRECT[site][0]}
    k = {x: corrupted[f"blocks.{layer}.{x}"] for x in _DIRECT[site][1]}
    if site != "resid_pre":
        if site == "resid_mid":
            src = c["hook_resid_post"]
        elif site == "mlp_out":
            src = k["hook_resid_mid"] + c["hook_mlp_out"]
        else:
            mid = k["hook_resid_pre"] + c["hook_attn_out"]
            src = mid + getattr(block, block._ffn_name)(block.ln2(mid))
        return rows.mix(src, k["hook_resid_post"])
    keys, values = _kv(corrupted, layer, rows)  # the clean keys and values at each replica's patched position
    at = rows.patched
    keys[rows.r[at], rows.q[at]] = rows.take(c["attn.hook_k"])[at].flatten(1)
    values[rows.r[at], rows.q[at]] = rows.take(c["attn.hook_v"])[at].flatten(1)
    sel = rows.last if last_only and layer == cfg.n_layers - 1 else None
    resid, q = rows.mix(c["hook_resid_pre"], k["hook_resid_pre"]), rows.mix(c["attn.hook_q"], k["attn.hook_q"])
    if sel is not None:
        resid, q = resid[sel], q[sel]
    return _block_rows(block, cfg, rows, sel, resid, q.flatten(1), keys, values)


def _run_rows(model, layer: int, x: Tensor, rows: _Rows, corrupted, last_only: bool) -> Tensor:
    """Logits of the blocks from `layer` on for residual rows x [N, d_model]: [N, d_vocab], or with `last_only`
    the last position's [nb, d_vocab] (the final block then computes only that position's output)."""
    cfg = model.cfg
    for i in range(layer, cfg.n_layers):
        block = model.blocks[i]
        h = block.ln1(x)
        k, v = _kv(corrupted, i, rows)
        k[rows.r, rows.q], v[rows.r, rows.q] = block.attn.k_proj(h), block.attn.v_proj(h)
        sel = rows.last if last_only and i == cfg.n_layers - 1 else None
        xs, hs = (x, h) if sel is None else (x[sel], h[sel])
        x = _block_rows(block, cfg, rows, sel, xs, block.attn.q_proj(hs), k, v)
    if last_only and x.shape[0] == rows.r.numel():  # no block ran (the patched one was the final block)
        x = x[rows.last]
    return model.unembed(model.ln_final(x))


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
def _sweep(
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
    resume = _can_resume(model)
    by_pos = "pos" in axes
    # the default metric reads the last position only: the final block then runs that position alone
    quiet = _quiet(model)
    last_only = isinstance(metric, _LogitDiff) and quiet
    direct = resume and quiet and site in _DIRECT  # packed rows from cached activations (_patched_rows)
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
            rows = _Rows([c[0] for c in chunk], b, t, corrupted.device)
            x = _patched_rows(model, site, layer, rows, clean_cache, corrupted_cache, last_only)
            logits = _run_rows(model, layer + 1, x, rows, corrupted_cache, last_only)
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
                    kv = _PrefixKV(corrupted_cache, range(layer, n_layers), first, n) if first else None
                    # logits of the last position only (the hooked block runs whole)
                    tail = last_only and layer < n_layers - 1 and t - first > 1
                    logits = _run_from(model, layer, resid.repeat(n, 1, 1), kv, tail)
                    if first and not tail:
                        logits = torch.cat([corrupted_logits[:, :first].repeat(n, 1, 1), logits], dim=1)
                else:
                    logits = model(corrupted.repeat(n, 1))
        logits = logits.view(n, b, *logits.shape[1:])
        if hasattr(metric, "batched"):
            out[li, idx] = metric.batched(logits).float().cpu()
        else:
            for j in range(n):
                out[li, idx[j]] = _scalar(metric(logits[j]))
    # cells -> axes
    if site == "head":
        return out.view(len(layers), n_heads)
    if site == "head_by_pos":
        return out.view(len(layers), t, n_heads)
    return out.view(len(layers), t)


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
    progress: bool = False,
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
        progress: show a tqdm bar.
    """
    if site not in SITES:
        raise PatchingError(f"unknown site {site!r}; choose one of {list(SITES)}")
    return _patch(model, clean, corrupted, [site], metric, correct, incorrect, normalize, layers, batch_cells, progress)


def _patch(
    model, clean, corrupted, sites, metric, correct, incorrect, normalize, layers, batch_cells, progress
) -> PatchingResult:
    clean_t, corrupted_t = _pair(model, clean, corrupted)
    n_layers = model.cfg.n_layers
    layer_list = list(range(n_layers)) if layers is None else [int(x) % n_layers for x in layers]
    for x in layers or []:
        if not -n_layers <= int(x) < n_layers:
            raise PatchingError(f"layer {x} is out of range; the model has {n_layers} layers (0..{n_layers - 1})")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            names = sorted({SITES[s][0].format(layer=layer) for s in sites for layer in layer_list})
            masks = [  # mixture-of-depths blocks: head sweeps patch by token position (see the module docstring)
                f"blocks.{layer}.hook_routing_mask"
                for layer in layer_list
                if f"blocks.{layer}.hook_routing_mask" in model.hook_dict and {"head", "head_by_pos"} & set(sites)
            ]
            clean_names, corrupted_names = set(names + masks), set(names + masks)  # sites: unchanged cells
            if _can_resume(model):
                corrupted_names |= {f"blocks.{layer}.hook_resid_pre" for layer in layer_list}
                if any("pos" in SITES[s][1] for s in sites):  # prefix keys/values (see _sweep)
                    later = range(min(layer_list), n_layers)
                    corrupted_names |= {f"blocks.{i}.attn.hook_{kv}" for i in later for kv in ("k", "v")}
                for s, layer in ((s, layer) for s in sites if s in _DIRECT for layer in layer_list):
                    clean_names |= {f"blocks.{layer}.{x}" for x in _DIRECT[s][0]}
                    corrupted_names |= {f"blocks.{layer}.{x}" for x in _DIRECT[s][1]}
            clean_logits, clean_cache = model.run_with_cache(clean_t, names_filter=sorted(clean_names))
            corrupted_logits, corrupted_cache = model.run_with_cache(corrupted_t, names_filter=sorted(corrupted_names))
            fn = _metric(model, metric, correct, incorrect, clean_logits, corrupted_logits)
            clean_value, corrupted_value = _scalar(fn(clean_logits)), _scalar(fn(corrupted_logits))
            values = [
                _sweep(
                    model,
                    corrupted_t,
                    s,
                    fn,
                    layer_list,
                    batch_cells,
                    progress,
                    clean_cache,
                    corrupted_cache,
                    corrupted_logits,
                    corrupted_value,
                )
                for s in sites
            ]
    finally:
        model.train(was_training)
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
        meta=dict(layers=layer_list, clean_tokens=clean_t, corrupted_tokens=corrupted_t),
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
    progress=False,
) -> PatchingResult:
    """resid_pre, attn_out and mlp_out sweeps stacked: values [3, n_layers, pos] (axes site, layer, pos),
    like `transformer_lens.patching.get_act_patch_block_every`."""
    return _patch(
        model,
        clean,
        corrupted,
        ["resid_pre", "attn_out", "mlp_out"],
        metric,
        correct,
        incorrect,
        normalize,
        layers,
        batch_cells,
        progress,
    )


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
    was_training = model.training
    model.eval()
    try:
        clean_logits, cache = model.run_with_cache(clean_t, names_filter=[name])
        corrupted_logits = model(corrupted_t)
        fn = _metric(model, metric, correct, incorrect, clean_logits, corrupted_logits)

        def hook(act: Tensor, hook) -> Tensor:
            act = act.clone()
            act[:, pos] = cache[name][:, pos]
            return act

        value = _scalar(fn(model.run_with_hooks(corrupted_t, fwd_hooks=[(name, hook)])))
        if normalize:
            c, k = _scalar(fn(clean_logits)), _scalar(fn(corrupted_logits))
            if c == k:
                raise PatchingError("clean and corrupted metrics are equal: nothing to normalise against")
            value = (value - k) / (c - k)
    finally:
        model.train(was_training)
    return value
