"""Ablations: knock out a layer, its attention, its MLP or one head, and measure what breaks.

A spec names what to remove and how:

    "3"  / "3.layer"   the whole block 3 (its attention output and its MLP output)
    "3.attn"           block 3's attention output       blocks.3.hook_attn_out
    "1.mlp"            block 1's MLP output             blocks.1.hook_mlp_out
    "2.head5" / "L2H5" head 5 of block 2                blocks.2.attn.hook_z[:, :, 5]
    "2.head5:mean"     ... with a mode: zero (default), mean or resample

Modes:
    zero      the activation is replaced by zeros.
    mean      by its mean over every (batch, position) of a reference batch: one vector, so it applies at
              any position, including one token at a time under the KV cache.
    resample  by the activation at the same position in a randomly drawn row of the reference batch
              (Chan et al.'s resampling ablation). The draw for each (row, position) depends only on `seed`,
              the batch size and the position, so cached and uncached generation draw the same values.

Reference activations are computed once, on the model as it is when the context is first entered (with
whatever other hooks are active then). Several specs share one draw of reference rows per (row, position).

Mixture-of-depths blocks (`mod=True`) compute only the tokens they route, and `hook_z` inside them holds those
tokens only. A head ablation there acts on the routed tokens, by position: the mean is over the reference's
routed tokens, and resample draws, for a token at position p, the head's output at p in a random reference row
among those that routed p (the mean if none did). Layer, attention and MLP ablations edit the block's
full-shape `hook_attn_out` / `hook_mlp_out` as in a dense block.

    with ablate(model, ["0.head1", "1.mlp:mean"], reference_tokens=val):
        loss = model(tokens, return_type="loss")
    ablated_loss(model, tokens, "1.attn")                            # a scalar tensor
    tinygpt.generate(model, "ROMEO:", 50, ablate="1.attn")            # generation under an ablation
    sweep = ablation_sweep(model, val, modes=("zero", "mean"), heads=True); sweep.figure()
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from tinygpt.interp.attention import routed_slots

COMPONENTS = ("layer", "attn", "mlp", "head")
MODES = ("zero", "mean", "resample")

_SPEC_FORMS = (
    "LAYER[.COMPONENT][:MODE] with COMPONENT one of layer, attn, mlp, headN and MODE one of zero, mean, "
    "resample (e.g. '3.attn', '2.head5:mean', '1.mlp:resample', 'L2H5')"
)
_SPEC_RE = re.compile(
    r"^\s*(?:L(?P<tl_layer>-?\d+)H(?P<tl_head>\d+)"
    r"|(?P<layer>-?\d+)(?:\.(?P<comp>layer|attn|mlp|(?:head|h)(?P<head>\d+)))?)"
    r"(?::(?P<mode>\w+))?\s*$",
    re.IGNORECASE,
)


class AblationError(ValueError):
    """An ablation spec is malformed or does not fit the model."""


@dataclass(frozen=True)
class Ablation:
    """What to ablate and how.

    Attributes:
        layer: block index (negative counts from the last block, resolved by `resolve`).
        component: "layer" (attention and MLP outputs), "attn", "mlp" or "head".
        head: the head index, required for (and only for) component "head".
        mode: "zero", "mean" or "resample".
    """

    layer: int
    component: str = "layer"
    head: int | None = None
    mode: str = "zero"

    def __post_init__(self) -> None:
        if not isinstance(self.layer, int) or isinstance(self.layer, bool):
            raise AblationError(f"layer must be an integer, got {self.layer!r}")
        if self.component not in COMPONENTS:
            raise AblationError(f"component must be one of {COMPONENTS}, got {self.component!r}")
        if self.mode not in MODES:
            raise AblationError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.component == "head":
            if not isinstance(self.head, int) or isinstance(self.head, bool) or self.head < 0:
                raise AblationError(f"a head ablation needs a non-negative head index, got head={self.head!r}")
        elif self.head is not None:
            raise AblationError(f"head={self.head} only applies to component 'head', not {self.component!r}")

    @classmethod
    def parse(cls, text: str, mode: str | None = None) -> Ablation:
        """Parse "3.attn", "2.head5", "1.mlp:mean", "L2H5", "0" (whole layer). `mode` applies when the
        text names none."""
        if isinstance(text, Ablation):
            return text
        if not isinstance(text, str):
            raise AblationError(f"an ablation spec must be a string or an Ablation, got {type(text).__name__}")
        m = _SPEC_RE.match(text)
        if m is None:
            raise AblationError(f"cannot parse ablation spec {text!r}: expected {_SPEC_FORMS}")
        chosen = (m["mode"] or mode or "zero").lower()
        if chosen not in MODES:
            raise AblationError(f"unknown ablation mode {chosen!r} in {text!r}; choose one of {MODES}")
        if m["tl_layer"] is not None:
            return cls(int(m["tl_layer"]), "head", int(m["tl_head"]), chosen)
        comp = (m["comp"] or "layer").lower()
        if m["head"] is not None:
            return cls(int(m["layer"]), "head", int(m["head"]), chosen)
        return cls(int(m["layer"]), comp, None, chosen)

    def resolve(self, cfg) -> Ablation:
        """Check the layer and head against a model config; negative layers count from the end."""
        n_layers, n_heads = cfg.n_layers, cfg.n_heads
        layer = self.layer + n_layers if self.layer < 0 else self.layer
        if not 0 <= layer < n_layers:
            raise AblationError(
                f"ablation {self}: layer {self.layer} is out of range; the model has {n_layers} layers "
                f"(0..{n_layers - 1}, or -1..-{n_layers} from the end)"
            )
        if self.component == "head" and self.head >= n_heads:
            raise AblationError(
                f"ablation {self}: head {self.head} is out of range; layer {layer} has {n_heads} heads "
                f"(0..{n_heads - 1})"
            )
        return Ablation(layer, self.component, self.head, self.mode) if layer != self.layer else self

    @property
    def hook_names(self) -> list[str]:
        """The hook points this ablation edits."""
        block = f"blocks.{self.layer}"
        return {
            "layer": [f"{block}.hook_attn_out", f"{block}.hook_mlp_out"],
            "attn": [f"{block}.hook_attn_out"],
            "mlp": [f"{block}.hook_mlp_out"],
            "head": [f"{block}.attn.hook_z"],
        }[self.component]

    @property
    def label(self) -> str:
        """Short name without the mode: "3.attn", "2.head5", "1.layer"."""
        return f"{self.layer}.head{self.head}" if self.component == "head" else f"{self.layer}.{self.component}"

    def __str__(self) -> str:
        return f"{self.label}:{self.mode}"


def parse_ablations(specs: Any, mode: str | None = None) -> list[Ablation]:
    """Specs as a list of `Ablation`s. Accepts an `Ablation`, a string (several separated by commas or
    spaces: "0.head1, 1.mlp:mean") or an iterable of either; `mode` applies to strings naming none."""
    if specs is None:
        return []
    if isinstance(specs, (str, Ablation)):
        specs = [specs]
    out: list[Ablation] = []
    for spec in specs:
        if isinstance(spec, Ablation):
            out.append(spec)
        elif isinstance(spec, str):
            out.extend(Ablation.parse(part, mode) for part in re.split(r"[,\s]+", spec.strip()) if part)
        else:
            raise AblationError(f"an ablation spec must be a string or an Ablation, got {type(spec).__name__}")
    if not out:
        raise AblationError(f"no ablation given: pass specs such as {_SPEC_FORMS}")
    return out


# ------------------------------------------------------------------------------------- reference activations
def _routed_layer(model, name: str) -> int | None:
    """The layer of a hook inside a mixture-of-depths block's attention (its pos axis holds routed tokens only),
    else None."""
    parts = name.split(".")
    if len(parts) > 3 and parts[0] == "blocks" and parts[2] == "attn":
        layer = int(parts[1])
        if f"blocks.{layer}.hook_routing_mask" in model.hook_dict:
            return layer
    return None


def _mask_bool(mask: Tensor) -> Tensor:
    return mask if mask.dtype == torch.bool else mask > 0.5


class _Reference:
    """Reference activations for mean / resample ablations, computed lazily and once.

    `means[(hook, head)]`: [d] (head None = the whole activation); `samples[(hook, head)]`: [R, T, d]. For a hook
    inside a mixture-of-depths block, samples are at token positions and `routed[hook]` [R, T] says which
    tokens the block computed (see the module docstring).
    """

    def __init__(self, model, tokens: Tensor | None):
        self.model = model
        self.tokens = tokens
        self.means: dict[tuple[str, int | None], Tensor] = {}
        self.samples: dict[tuple[str, int | None], Tensor] = {}
        self.routed: dict[str, Tensor] = {}

    def prepare(self, specs: Sequence[Ablation]) -> None:
        need_mean = {(n, s.head) for s in specs if s.mode == "mean" for n in s.hook_names} - set(self.means)
        need_res = {(n, s.head) for s in specs if s.mode == "resample" for n in s.hook_names} - set(self.samples)
        if not need_mean and not need_res:
            return
        if self.tokens is None:
            which = next(str(s) for s in specs if s.mode in ("mean", "resample"))
            raise AblationError(
                f"ablation {which} needs reference activations: pass reference_tokens= (a batch of typical "
                "inputs [batch, pos], e.g. validation windows) to ablate() / ablated_loss() / generate(ablate="
                "ablate(model, specs, reference_tokens=...))"
            )
        tokens = _as_tokens(self.model, self.tokens)
        names = sorted({n for n, _ in need_mean | need_res})
        routed = {n: layer for n in names if (layer := _routed_layer(self.model, n)) is not None}
        masks = sorted({f"blocks.{layer}.hook_routing_mask" for layer in routed.values()})
        with torch.no_grad():
            _, cache = self.model.run_with_cache(tokens, names_filter=names + masks, return_type=None)
        acts = {}
        for name in names:
            if name not in routed:
                acts[name] = cache[name]
                continue
            # a routed block: its routed tokens' activations back at their positions
            mask = _mask_bool(cache[f"blocks.{routed[name]}.hook_routing_mask"])
            self.routed[name] = mask
            full = torch.zeros(*mask.shape, *self._inner_shape(name), device=mask.device)
            if name in cache.cache_dict:  # absent if the block routed no token of the reference batch
                act = cache[name]
                idx, valid = routed_slots(mask)
                rows = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(idx)
                full = full.to(act.dtype)
                full[rows[valid], idx[valid]] = act[valid]
            acts[name] = full
        for name, head in need_mean:
            act = acts[name] if head is None else acts[name][:, :, head]
            if name in routed:  # the mean over the tokens the block computed
                act = act[self.routed[name]] if bool(self.routed[name].any()) else act.reshape(-1, *act.shape[2:])
                self.means[(name, head)] = act.float().mean(dim=0).to(act.dtype)
            else:
                self.means[(name, head)] = act.float().mean(dim=(0, 1)).to(act.dtype)
        for name, head in need_res:
            self.samples[(name, head)] = acts[name] if head is None else acts[name][:, :, head]
            if name in routed and (name, head) not in self.means:
                act = self.samples[(name, head)]
                sel = act[self.routed[name]] if bool(self.routed[name].any()) else act.reshape(-1, *act.shape[2:])
                self.means[(name, head)] = sel.float().mean(dim=0).to(act.dtype)

    def _inner_shape(self, name: str) -> tuple[int, ...]:
        cfg = self.model.cfg
        if name.endswith(("hook_z", "hook_q", "hook_k", "hook_v")):
            return (cfg.n_heads, cfg.d_head)
        raise AblationError(f"cannot place {name} of a mixture-of-depths block at token positions")


def _as_tokens(model, tokens) -> Tensor:
    if isinstance(tokens, (str, list)) and (not tokens or isinstance(tokens, str) or isinstance(tokens[0], str)):
        tokens = model.to_tokens(tokens)
    tokens = torch.as_tensor(tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
    return tokens.to(model.embed.weight.device)


# ------------------------------------------------------------------------------------------ the context
class AblationContext:
    """Installs ablation hooks on entry (`with`) and removes them on exit; re-enterable.

    Built by `ablate(...)`; also accepted by `tinygpt.generate(..., ablate=...)`.
    """

    def __init__(
        self,
        model,
        specs: Any,
        reference_tokens: Any = None,
        seed: int = 0,
        mode: str | None = None,
        _reference: _Reference | None = None,
    ):
        self.model = model
        self.specs = [s.resolve(model.cfg) for s in parse_ablations(specs, mode)]
        self.seed = int(seed)
        self._reference = _reference or _Reference(model, reference_tokens)
        self._offset = 0  # absolute position of the current forward's first token (KV-cache decoding)
        self._masks: dict[str, Tensor] = {}  # routing masks of the current forward (mixture-of-depths resample)
        self._stack: list[tuple[Any, Any]] = []

    def __repr__(self) -> str:
        return f"ablate({', '.join(str(s) for s in self.specs)})"

    # The absolute position of the first token: past_kv_cache.length during incremental decoding, else 0.
    def _track_offset(self, module, args, kwargs) -> None:
        cache = kwargs.get("past_kv_cache")
        self._offset = int(getattr(cache, "length", 0)) if cache is not None else 0

    def fwd_hooks(self) -> list[tuple[str, Any]]:
        """The TransformerLens forward hooks `[(hook_name, fn)]` this context installs."""
        self._reference.prepare(self.specs)
        hooks = []
        # resample inside a mixture-of-depths block needs the forward's routing mask (it runs before hook_z)
        for layer in sorted(
            {
                layer
                for s in self.specs
                if s.mode == "resample"
                for n in s.hook_names
                if (layer := _routed_layer(self.model, n)) is not None
            }
        ):
            hooks.append((f"blocks.{layer}.hook_routing_mask", self._keep_mask))
        return hooks + [(name, self._hook_fn(spec, name)) for spec in self.specs for name in spec.hook_names]

    def _keep_mask(self, mask: Tensor, hook) -> None:
        self._masks[hook.name] = _mask_bool(mask)

    def _hook_fn(self, spec: Ablation, name: str):
        head, key = spec.head, (name, spec.head)
        layer = _routed_layer(self.model, name)

        def replacement(act: Tensor) -> Tensor:  # the values for act (or act[:, :, head])
            if spec.mode == "zero":
                return act.new_zeros(())
            if spec.mode == "mean":
                return self._reference.means[key].to(act.dtype)
            if layer is not None:
                mask = self._masks[f"blocks.{layer}.hook_routing_mask"]
                return self._resample_routed(key, mask, act.shape[1]).to(act.dtype)
            return self._resample(self._reference.samples[key], act.shape[0], act.shape[1]).to(act.dtype)

        def hook(act: Tensor, hook) -> Tensor:
            if head is None:
                return replacement(act).expand_as(act).clone() if spec.mode != "resample" else replacement(act)
            act = act.clone()  # hook_z may be saved for backward by attention; never edit it in place
            act[:, :, head] = replacement(act[:, :, head])
            return act

        return hook

    def _resample(self, ref: Tensor, batch: int, t: int) -> Tensor:
        """Reference rows for positions offset..offset+t: [batch, t, ...] (seeded per (row, position))."""
        n_ref, ref_len = ref.shape[0], ref.shape[1]
        start = self._offset
        if start + t > ref_len:
            raise AblationError(
                f"resample ablation reached position {start + t - 1} but reference_tokens have only {ref_len} "
                f"positions; pass reference tokens at least as long as the inputs (e.g. n_ctx={self.model.cfg.n_ctx})"
            )
        gen = torch.Generator().manual_seed(self.seed)
        rows = torch.randint(0, n_ref, (batch, ref_len), generator=gen)[:, start : start + t].to(ref.device)
        pos = torch.arange(start, start + t, device=ref.device)
        return ref[rows, pos[None, :].expand(batch, t)]

    def _resample_routed(self, key: tuple[str, int | None], mask: Tensor, k: int) -> Tensor:
        """Resampled values for the k slots of a routed block's sub-sequence [batch, k, ...]: the reference
        activation at the slot's token position, from a random reference row that routed that position (seeded
        per (row, position) like `_resample`; the reference mean where no row did)."""
        ref, routed = self._reference.samples[key], self._reference.routed[key[0]]  # [R, T, ...], [R, T]
        n_ref, ref_len = routed.shape
        batch, t = mask.shape
        start = self._offset
        if start + t > ref_len:
            raise AblationError(
                f"resample ablation reached position {start + t - 1} but reference_tokens have only {ref_len} "
                f"positions; pass reference tokens at least as long as the inputs (e.g. n_ctx={self.model.cfg.n_ctx})"
            )
        idx, _ = routed_slots(mask)  # [batch, k] positions of the slots (relative to this forward)
        pos = (idx[:, :k] + start).to(ref.device)
        gen = torch.Generator().manual_seed(self.seed)
        u = torch.rand((batch, ref_len), generator=gen).to(ref.device)
        counts = routed.sum(0)  # [T] reference rows that routed each position
        order = torch.sort((~routed).to(torch.uint8), dim=0, stable=True).indices  # routed rows first, per position
        pick = (u * counts).long().clamp(max=n_ref - 1)  # [batch, T]: the pick-th routed row at each position
        rows = order.gather(0, pick)  # [batch, T] reference row per (row, position)
        chosen = rows.gather(1, pos)  # [batch, k]
        out = ref[chosen, pos]
        none = counts[pos] == 0  # no reference row routed that position: the mean of the routed tokens
        if bool(none.any()):
            out[none] = self._reference.means[key].to(out.dtype)
        return out

    def __enter__(self):
        hooks = self.fwd_hooks()
        cm = self.model.hooks(fwd_hooks=hooks)
        cm.__enter__()
        handle = None
        if any(s.mode == "resample" for s in self.specs):
            handle = self.model.register_forward_pre_hook(self._track_offset, with_kwargs=True)
        self._stack.append((cm, handle))
        return self

    def __exit__(self, *exc) -> None:
        cm, handle = self._stack.pop()
        if handle is not None:
            handle.remove()
        cm.__exit__(*exc)


def ablate(model, specs: Any, reference_tokens: Any = None, seed: int = 0, mode: str | None = None) -> AblationContext:
    """A context manager that ablates `specs` while it is active (TransformerLens hooks via `model.hooks`).

    Args:
        model: a tinygpt model.
        specs: "3.attn", "2.head5:mean", an `Ablation`, or a list / comma-separated string of them.
        reference_tokens: [batch, pos] tokens (or texts) for mean / resample ablation.
        seed: seeds the resample draws.
        mode: default mode for string specs that name none ("zero" if None).

    Example:
        with ablate(model, "1.head3"):
            logits = model(tokens)
    """
    return AblationContext(model, specs, reference_tokens, seed, mode)


def as_ablation_context(model, ablation: Any) -> AblationContext:
    """`ablation` as a context for `model`: an `AblationContext` is used as is, anything else is parsed."""
    if isinstance(ablation, AblationContext):
        if ablation.model is not model:
            raise AblationError("this ablation context was built for another model; build it with ablate(model, ...)")
        return ablation
    return ablate(model, ablation)


@torch.no_grad()
def ablated_loss(
    model,
    tokens: Any,
    specs: Any,
    *,
    reference_tokens: Any = None,
    seed: int = 0,
    mode: str | None = None,
    targets: Tensor | None = None,
    per_token: bool = False,
) -> Tensor:
    """Next-token loss of `tokens` with `specs` ablated.

    Args:
        tokens: [batch, pos] tokens or text.
        specs, reference_tokens, seed, mode: as for `ablate`.
        targets: optional [batch, pos] targets (-100 ignored) instead of the next-token shift, e.g. to score
            only the repeated half of an induction sequence.
        per_token: return the loss per token ([batch, pos - 1], or the targets' shape).
    """
    tokens = _as_tokens(model, tokens)
    with ablate(model, specs, reference_tokens, seed, mode):
        return model(tokens, return_type="loss", targets=targets, loss_per_token=per_token)


# ------------------------------------------------------------------------------------------------ sweeps
@dataclass
class AblationSweepResult:
    """Loss increase of every ablation in a sweep.

    Attributes:
        baseline_loss: the unablated loss.
        ablations: the ablations, in sweep order.
        losses: [n] the loss under each ablation; `deltas` = losses - baseline_loss.
        n_layers, n_heads: the model's shape (for `delta` tables).
    """

    baseline_loss: float
    ablations: list[Ablation]
    losses: Tensor
    n_layers: int
    n_heads: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def deltas(self) -> Tensor:
        return self.losses - self.baseline_loss

    def delta(self, component: str = "attn", mode: str = "zero") -> Tensor:
        """Loss increase table: [n_layers] for layer/attn/mlp, [n_layers, n_heads] for "head" (NaN where the
        sweep did not run)."""
        shape = (self.n_layers, self.n_heads) if component == "head" else (self.n_layers,)
        out = torch.full(shape, float("nan"))
        found = False
        for a, d in zip(self.ablations, self.deltas.tolist()):
            if a.component == component and a.mode == mode:
                out[(a.layer, a.head) if component == "head" else a.layer] = d
                found = True
        if not found:
            have = sorted({(a.component, a.mode) for a in self.ablations})
            raise KeyError(f"the sweep has no ({component!r}, {mode!r}) ablations; it has {have}")
        return out

    def top(self, k: int = 5) -> list[tuple[Ablation, float]]:
        """The k ablations that increase the loss most, with their increase."""
        order = torch.argsort(self.deltas, descending=True)[:k].tolist()
        return [(self.ablations[i], float(self.deltas[i])) for i in order]

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(
            [
                dict(
                    layer=a.layer,
                    component=a.component,
                    head=a.head,
                    mode=a.mode,
                    loss=float(loss),
                    delta=float(loss) - self.baseline_loss,
                )
                for a, loss in zip(self.ablations, self.losses)
            ]
        )

    def __repr__(self) -> str:
        top = ", ".join(f"{a} +{d:.3f}" for a, d in self.top(3))
        return (
            f"AblationSweepResult({len(self.ablations)} ablations, baseline loss {self.baseline_loss:.4f}; "
            f"largest increases: {top})"
        )

    def figure(self, mode: str | None = None):
        """Plotly figure: grouped bars of the loss increase per layer for layer/attn/mlp ablations, and a
        (layer x head) heatmap for head ablations, for one mode (default: the first swept)."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        mode = mode or self.ablations[0].mode
        comps = [
            c for c in ("layer", "attn", "mlp") if any(a.component == c and a.mode == mode for a in self.ablations)
        ]
        has_heads = any(a.component == "head" and a.mode == mode for a in self.ablations)
        cols = int(bool(comps)) + int(has_heads)
        titles = ([f"{mode} ablation: loss increase by layer"] if comps else []) + (
            [f"{mode} ablation: loss increase by head"] if has_heads else []
        )
        fig = make_subplots(rows=1, cols=max(cols, 1), subplot_titles=titles)
        layers = [str(i) for i in range(self.n_layers)]
        if comps:
            for c in comps:
                fig.add_trace(go.Bar(x=layers, y=self.delta(c, mode).tolist(), name=c), row=1, col=1)
            fig.update_xaxes(title_text="layer", type="category", row=1, col=1)
            fig.update_yaxes(title_text="loss increase", row=1, col=1)
        if has_heads:
            z = self.delta("head", mode)
            lim = float(z.nan_to_num(0).abs().max()) or 1.0
            fig.add_trace(
                go.Heatmap(
                    z=z.tolist(),
                    x=[f"H{h}" for h in range(self.n_heads)],
                    y=[f"L{i}" for i in layers],
                    colorscale="RdBu",
                    reversescale=True,
                    zmid=0,
                    zmin=-lim,
                    zmax=lim,
                    colorbar=dict(title="Δ loss"),
                    hovertemplate="%{y}%{x}: %{z:.4f}<extra></extra>",
                ),
                row=1,
                col=cols,
            )
            fig.update_yaxes(autorange="reversed", row=1, col=cols)
        fig.update_layout(
            title=f"Ablation sweep (baseline loss {self.baseline_loss:.4f})",
            barmode="group",
            height=380,
            width=420 * max(cols, 1) + 100,
        )
        return fig


@torch.no_grad()
def ablation_sweep(
    model,
    tokens: Any,
    modes: Sequence[str] = ("zero",),
    components: Sequence[str] = ("attn", "mlp"),
    heads: bool = False,
    *,
    reference_tokens: Any = None,
    seed: int = 0,
    targets: Tensor | None = None,
    layers: Iterable[int] | None = None,
    progress: bool = True,
) -> AblationSweepResult:
    """Ablate every (layer, component) -- and every head if `heads` -- one at a time; report the loss increase.

    Args:
        tokens: a validation batch [batch, pos] (or text).
        modes: any of "zero", "mean", "resample".
        components: any of "layer", "attn", "mlp" ("head" is the same as heads=True).
        heads: also ablate each head of each layer.
        reference_tokens: for mean / resample (default: `tokens` themselves).
        seed: seeds resample draws.
        targets: optional [batch, pos] targets (-100 ignored) to score only some positions.
        layers: restrict to these layers (default all).
        progress: show a tqdm bar.
    """
    from tqdm.auto import tqdm

    tokens = _as_tokens(model, tokens)
    comps = list(components)
    if "head" in comps:
        comps.remove("head")
        heads = True
    for c in comps:
        if c not in ("layer", "attn", "mlp"):
            raise AblationError(f"unknown component {c!r}; choose from 'layer', 'attn', 'mlp' (and heads=True)")
    for m in modes:
        if m not in MODES:
            raise AblationError(f"unknown ablation mode {m!r}; choose from {MODES}")
    layer_list = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    specs = []
    for m in modes:
        for layer in layer_list:
            specs += [Ablation(layer, c, None, m).resolve(model.cfg) for c in comps]
            if heads:
                specs += [Ablation(layer, "head", h, m).resolve(model.cfg) for h in range(model.cfg.n_heads)]
    if not specs:
        raise AblationError("nothing to sweep: give at least one component or heads=True, and one mode")
    was_training = model.training
    model.eval()
    try:
        reference = _Reference(model, tokens if reference_tokens is None else reference_tokens)
        reference.prepare(specs)
        baseline = float(model(tokens, return_type="loss", targets=targets))
        losses = []
        for spec in tqdm(specs, desc="ablation sweep", disable=not progress, leave=False):
            with AblationContext(model, [spec], seed=seed, _reference=reference):
                losses.append(float(model(tokens, return_type="loss", targets=targets)))
    finally:
        model.train(was_training)
    return AblationSweepResult(
        baseline,
        specs,
        torch.tensor(losses),
        model.cfg.n_layers,
        model.cfg.n_heads,
        meta=dict(modes=tuple(modes), components=tuple(comps), heads=heads),
    )
