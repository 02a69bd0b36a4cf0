"""Ablation contexts: install zero / mean / resample hooks for a list of specs while a `with` block runs.

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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from tinygpt.inputs import as_tokens
from tinygpt.interp.ablation.specs import Ablation, AblationError, parse_ablations
from tinygpt.interp.routing import as_mask, at_positions, routed_slots


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


def _routed_mean(act: Tensor, routed: Tensor) -> Tensor:
    """The mean of `act` [R, T, ...] over the tokens a routed block computed (over every token if none)."""
    sel = act[routed] if bool(routed.any()) else act.reshape(-1, *act.shape[2:])
    return sel.float().mean(dim=0).to(act.dtype)


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
        tokens = as_tokens(self.model, self.tokens, what="reference_tokens", error=AblationError)
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
            mask = self.routed[name] = as_mask(cache[f"blocks.{routed[name]}.hook_routing_mask"])
            if name in cache.cache_dict:
                acts[name] = at_positions(cache[name], mask)
            else:  # the block routed no token of the reference batch
                acts[name] = torch.zeros(*mask.shape, *self._inner_shape(name), device=mask.device)
        for name, head in need_mean:
            act = acts[name] if head is None else acts[name][:, :, head]
            if name in routed:  # the mean over the tokens the block computed
                self.means[(name, head)] = _routed_mean(act, self.routed[name])
            else:
                self.means[(name, head)] = act.float().mean(dim=(0, 1)).to(act.dtype)
        for name, head in need_res:
            self.samples[(name, head)] = acts[name] if head is None else acts[name][:, :, head]
            if name in routed and (name, head) not in self.means:
                self.means[(name, head)] = _routed_mean(self.samples[(name, head)], self.routed[name])

    def _inner_shape(self, name: str) -> tuple[int, ...]:
        cfg = self.model.cfg
        if name.endswith(("hook_z", "hook_q", "hook_k", "hook_v")):
            return (cfg.n_heads, cfg.d_head)
        raise AblationError(f"cannot place {name} of a mixture-of-depths block at token positions")


# ------------------------------------------------------------------------------------------ the context
class AblationContext:
    """Installs ablation hooks on entry (`with`) and removes them on exit; re-enterable.

    Built by `ablate(...)`; also accepted by `tinygpt.generate(..., ablate=...)`.
    """

    def __init__(
        self,
        model,
        specs: Any,
        *,
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
        self._masks[hook.name] = as_mask(mask)

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


def ablate(
    model, specs: Any, *, reference_tokens: Any = None, seed: int = 0, mode: str | None = None
) -> AblationContext:
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
    return AblationContext(model, specs, reference_tokens=reference_tokens, seed=seed, mode=mode)


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
    tokens = as_tokens(model, tokens, what="tokens", error=AblationError)
    with ablate(model, specs, reference_tokens=reference_tokens, seed=seed, mode=mode):
        return model(tokens, return_type="loss", targets=targets, loss_per_token=per_token)
