"""Steering vectors: a direction added (times a coefficient) at a hook point, e.g. during generation.

    v = steering_vector(model, sae, latent=123)                          # a latent's decoder direction
    v = steering_vector(model, ["I love", "so happy"], ["I hate", "so sad"], hook="blocks.2.hook_resid_post")
    v = steering_vector(model, torch.randn(128), hook="blocks.2.hook_resid_post")   # any vector
    with steer(model, v, coeff=8.0):                                     # or steer(model, hook, vector, coeff)
        text = tinygpt.generate(model, "ROMEO:", 100, seed=0)
    text = tinygpt.generate(model, "ROMEO:", 100, seed=0, steer=v * 8.0)  # the same, through the sampling registry

`steer` adds `coeff * vector` to the hook's activations at every position of every forward inside the block
(a TransformerLens hook added with `model.hooks`, removed on exit); the `Steering` it returns can be entered
again and again. This module registers `as_steering` with `tinygpt.sampling.register_intervention(...,
kind="steer")`, so `generate(..., steer=...)` needs no import of the dictionary package. Every position is
steered the same way with and without a KV cache (each cached position was steered when it was computed), so
generation gives the same tokens with `use_cache=True` and `use_cache=False`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tinygpt.dictionary.activations import check_hooks, hook_activations
from tinygpt.dictionary.errors import DictionaryError
from tinygpt.dictionary.files import check_model
from tinygpt.dictionary.modules import SparseDictionary
from tinygpt.inputs import as_tokens, model_device


@dataclass
class SteeringVector:
    """A direction at a hook: `vector [width]` (the hook's last dimension, or n_heads * d_head).

    `coeff` is the default coefficient `steer` uses; `source` says where the vector came from.
    """

    hook: str
    vector: Tensor
    coeff: float = 1.0
    source: str = "vector"

    def unit(self) -> SteeringVector:
        """The same direction with unit L2 norm."""
        return SteeringVector(self.hook, self.vector / self.vector.norm().clamp_min(1e-12), self.coeff, self.source)

    def __mul__(self, c: float) -> SteeringVector:
        return SteeringVector(self.hook, self.vector, self.coeff * c, self.source)

    __rmul__ = __mul__

    def context(self, model, coeff: float | None = None) -> Steering:
        """`steer(model, self, coeff=...)`: the context manager that applies this vector."""
        return steer(model, self, coeff=coeff)


def _mean_acts(model, prompts: Sequence[str] | str, hook: str, position: str) -> Tensor:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise DictionaryError("each prompt set needs at least one prompt")
    rows = []
    for p in prompts:
        toks = as_tokens(model, p, error=DictionaryError, max_len=model.cfg.n_ctx)
        a = hook_activations(model, toks, [hook])[hook][0]  # [pos, width]
        rows.append(a[-1] if position == "last" else a.mean(0))
    return torch.stack(rows).mean(0)


def steering_vector(
    model,
    source: Any,
    negative: Any = None,
    *,
    hook: str | None = None,
    latent: int | None = None,
    position: str = "mean",
    coeff: float = 1.0,
) -> SteeringVector:
    """A `SteeringVector` from a dictionary latent, a difference of means of two prompt sets, or a vector.

    Args:
        model: the model the vector is for.
        source: a dictionary (with `latent`: its decoder direction at the dictionary's output site, per unit of
            activation, `sae.latent_direction(latent)`); prompts (a text or a list of texts: with `negative`,
            the difference of their mean activations at `hook`); or a tensor [width] (with `hook`).
        negative: the contrasting prompts.
        hook: where the vector is added (not needed for a dictionary latent).
        latent: the latent of a dictionary.
        position: for prompts, "mean" (average over every position) or "last" (the last token of each prompt).
        coeff: the default coefficient of `steer`.
    """
    if isinstance(source, SparseDictionary):
        if latent is None or not 0 <= int(latent) < source.d_sae:
            raise DictionaryError(f"give latent=, an index in [0, {source.d_sae}), to steer with a dictionary latent")
        check_model(source, model, check=False)
        vec = source.latent_direction(int(latent)).to(model_device(model))
        return SteeringVector(source.site, vec, coeff, f"latent {latent} of {source.cfg.arch} at {source.site}")
    if hook is None:
        raise DictionaryError("give hook= (where the vector is added), e.g. 'blocks.2.hook_resid_post'")
    width = check_hooks(model, [hook])[hook]
    if isinstance(source, Tensor):
        vec = source.detach().float().reshape(-1)
        if vec.numel() != width:
            raise DictionaryError(f"{hook} has width {width}, the vector has {vec.numel()} elements")
        return SteeringVector(hook, vec.to(model_device(model)), coeff, "vector")
    if negative is None:
        raise DictionaryError("a difference of means needs two prompt sets: steering_vector(model, positive, negative)")
    if position not in ("mean", "last"):
        raise DictionaryError(f"position must be 'mean' or 'last', got {position!r}")
    vec = _mean_acts(model, source, hook, position) - _mean_acts(model, negative, hook, position)
    return SteeringVector(hook, vec, coeff, f"difference of means ({position}) at {hook}")


class Steering:
    """What `steer` returns: a reusable context manager that adds `coeff * vector` at hooks while entered.

    Each `with` adds TransformerLens hooks (`model.hooks`) and removes them on exit, so the same object can be
    entered around every forward (this is how `tinygpt.generate(..., steer=...)` uses it).

    Attributes:
        model: the model. items: `(hook, added vector)` pairs (the coefficient already applied).
    """

    def __init__(self, model, items: list[tuple[str, Tensor]]):
        self.model, self.items = model, items
        self._open: list[contextlib.AbstractContextManager] = []

    def _fwd_hooks(self) -> list[tuple[str, Any]]:
        def make(add: Tensor):
            def fn(t: Tensor, hook) -> Tensor:
                return t + add.to(t.dtype).reshape(t.shape[2:])

            return fn

        return [(h, make(add)) for h, add in self.items]

    def __enter__(self):
        ctx = self.model.hooks(fwd_hooks=self._fwd_hooks())
        ctx.__enter__()
        self._open.append(ctx)
        return self.model

    def __exit__(self, *exc: Any) -> bool | None:
        return self._open.pop().__exit__(*exc)

    def __repr__(self) -> str:
        parts = ", ".join(f"{h} (norm {float(v.norm()):.3g})" for h, v in self.items)
        return f"Steering({parts})"


def steer(
    model,
    hook: str | SteeringVector | Sequence[SteeringVector],
    vector: Tensor | None = None,
    coeff: float | None = None,
) -> Steering:
    """Add `coeff * vector` at `hook` in every forward inside a `with` block (a reusable `Steering`).

    Args:
        model: the model.
        hook: a hook name (then give `vector`), a `SteeringVector`, or a list of them.
        vector: the direction [width] (a 4-D hook such as `attn.hook_z` takes n_heads * d_head values).
        coeff: the coefficient (default: the `SteeringVector`'s own, 1 for a bare vector).

    Raises:
        DictionaryError: an unknown hook, a vector of the wrong width, or something that is not a vector.
    """
    if isinstance(hook, str):
        if vector is None:
            raise DictionaryError("steer(model, hook, vector, coeff): give the vector to add")
        items = [steering_vector(model, vector, hook=hook, coeff=1.0 if coeff is None else coeff)]
        coeff = None
    elif isinstance(hook, SteeringVector):
        items = [hook]
    elif isinstance(hook, (list, tuple)):
        items = list(hook)
    else:
        raise DictionaryError(
            f"steer takes a SteeringVector (from steering_vector), a list of them, or a hook name and a vector; "
            f"got {type(hook).__name__}"
        )
    pairs = []
    for sv in items:
        if not isinstance(sv, SteeringVector):
            raise DictionaryError(f"expected SteeringVector objects, got {type(sv).__name__}")
        width = check_hooks(model, [sv.hook])[sv.hook]
        if sv.vector.numel() != width:
            raise DictionaryError(f"{sv.hook} has width {width}, the steering vector has {sv.vector.numel()} elements")
        c = sv.coeff if coeff is None else coeff
        pairs.append((sv.hook, (c * sv.vector).to(model_device(model))))
    return Steering(model, pairs)


def as_steering(model, spec: Any) -> Steering:
    """`generate(..., steer=spec)`'s argument as a `Steering`: a `Steering` (for this model), a `SteeringVector`
    or a list of them (each with its own `coeff`; `vector * 8.0` scales it)."""
    if isinstance(spec, Steering):
        if spec.model is not model:
            raise DictionaryError("this Steering was built for another model; build it with steer(model, ...)")
        return spec
    if not isinstance(spec, (SteeringVector, list, tuple)):
        raise DictionaryError(
            "generate(..., steer=) takes a SteeringVector (steering_vector(model, sae, latent=i) * coeff), a list "
            f"of them or a steer(model, ...) context; got {type(spec).__name__}"
        )
    return steer(model, spec)


__all__ = ["Steering", "SteeringVector", "as_steering", "steer", "steering_vector"]
