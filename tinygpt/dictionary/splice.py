"""Splicing dictionaries into a model's forward, with their hook points visible in the model's hook dict.

    with splice(model, sae, error_term=True):
        logits, cache = model.run_with_cache(tokens)        # == the clean logits, bit for bit
    cache["blocks.2.hook_resid_post.hook_sae_acts_post"]    # [batch, pos, d_sae]
    logits = run_with_saes(model, tokens, [sae, transcoder])

As SAELens' `HookedSAETransformer` does, the dictionary is attached at its hook's module path and
`model.setup()` is called again, so its hook points get names under that path
(`blocks.2.hook_resid_post.hook_sae_input` ... `hook_sae_output`) and work with `run_with_hooks`,
`run_with_cache`, the patching tools and nnsight. Unlike it, no model method is needed: the context manager
swaps the hook point for a `SpliceSite` (itself a `HookPoint`, so `blocks.2.hook_resid_post` stays a hook name
and holds the value the rest of the model reads, i.e. the dictionary's output) and restores the original
module, the hook dicts and the dictionary's own hook names exactly on exit. A transcoder reads its input hook
through a `TapSite` (which records the value after that hook's own hooks ran) and writes at its `out_hook`.

The dictionary is not registered as a parameter-holding submodule, so `model.state_dict()`,
`model_fingerprint` and `save` are unchanged while spliced. Hooks that were on the original hook point before
splicing keep running, on the dictionary's input.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from torch import Tensor
from transformer_lens.hook_points import HookPoint

from tinygpt.dictionary.errors import DictionaryError
from tinygpt.dictionary.files import check_model
from tinygpt.dictionary.modules import HOOK_NAMES, SparseDictionary
from tinygpt.inputs import as_tokens


class TapSite(HookPoint):
    """Replaces a transcoder's input hook point: an identity that remembers the value it passed on."""

    def __init__(self, original: HookPoint):
        super().__init__()
        object.__setattr__(self, "original", original)  # not a submodule: its name stays free for this site
        self.value: Tensor | None = None

    def __call__(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        out = super().__call__(self.original(x), *args, **kwargs)  # this site's hooks run inside
        self.value = out
        return out


class SpliceSite(HookPoint):
    """Replaces the hook point at a dictionary's output site; its children are the dictionary's hook points.

    Its output (what the model reads on, and what hooks on this name see) is the dictionary's output: the
    reconstruction, or with `error_term` the reconstruction plus the error, i.e. the clean value.
    """

    def __init__(self, original: HookPoint, sae: SparseDictionary, *, error_term: bool, tap: TapSite | None):
        super().__init__()
        object.__setattr__(self, "original", original)
        object.__setattr__(self, "sae", sae)  # not a submodule: the model's state dict is unchanged
        self.error_term = error_term
        object.__setattr__(self, "tap", tap)  # registered at its own path already
        for name in HOOK_NAMES:
            self.add_module(name, getattr(sae, name))

    def forward(self, x: Tensor) -> Tensor:
        x = self.original(x)
        if self.tap is None:
            return self.sae(x, error_term=self.error_term)
        if self.tap.value is None:
            raise DictionaryError(f"{self.sae.hook} did not run before {self.sae.out_hook} in this forward")
        inp, self.tap.value = self.tap.value, None
        return self.sae(inp, x, error_term=self.error_term)


def _parent(model, path: str) -> tuple[Any, str]:
    head, _, leaf = path.rpartition(".")
    return (model.get_submodule(head) if head else model), leaf


def _as_list(saes: SparseDictionary | Sequence[SparseDictionary]) -> list[SparseDictionary]:
    items = [saes] if isinstance(saes, SparseDictionary) else list(saes)
    for s in items:
        if not isinstance(s, SparseDictionary):
            raise DictionaryError(f"expected tinygpt dictionaries, got {type(s).__name__}")
    return items


@contextlib.contextmanager
def splice(
    model, saes: SparseDictionary | Sequence[SparseDictionary], *, error_term: bool = False, check: bool = True
) -> Iterator[Any]:
    """Run `model` with dictionaries in its forward for the duration of the block.

    Args:
        model: the model (a `tinygpt.GPT` or any `HookedRootModule` with the hooks).
        saes: one dictionary or several (at different sites; a transcoder occupies its input and output hooks).
        error_term: add each dictionary's error, so the spliced model equals the clean one exactly until a hook
            edits a latent (then the edit is the only change).
        check: refuse a dictionary pinned to another model (`DictionaryMismatchError`).

    Yields:
        The model.
    """
    items = _as_list(saes)
    taken: dict[str, str] = {}
    for s in items:
        check_model(s, model, check=check)
        for h in (s.hook, s.out_hook):
            if h is None:
                continue
            if h in taken or isinstance(model.hook_dict.get(h), (SpliceSite, TapSite)):
                raise DictionaryError(f"a dictionary is already spliced at {h}; splice one dictionary per site")
            taken[h] = s.hook
    swapped: list[tuple[Any, str, HookPoint]] = []
    try:
        for s in items:
            tap = None
            if s.cfg.transcoder:
                parent, leaf = _parent(model, s.hook)
                orig = getattr(parent, leaf)
                tap = TapSite(orig)
                setattr(parent, leaf, tap)
                swapped.append((parent, leaf, orig))
            parent, leaf = _parent(model, s.site)
            orig = getattr(parent, leaf)
            setattr(parent, leaf, SpliceSite(orig, s, error_term=error_term, tap=tap))
            swapped.append((parent, leaf, orig))
        model.setup()
        yield model
    finally:
        for parent, leaf, orig in reversed(swapped):
            setattr(parent, leaf, orig)
        model.setup()
        for s in items:
            s.setup()


def run_with_saes(
    model,
    tokens: Any,
    saes: SparseDictionary | Sequence[SparseDictionary],
    *,
    error_term: bool = False,
    return_type: str | None = "logits",
    **kwargs: Any,
) -> Any:
    """One forward of `model` on `tokens` (text, ids or [batch, pos]) with `saes` spliced in.

    Extra keyword arguments go to the model's forward (`return_type="loss"`, `targets=`...).
    """
    toks = as_tokens(model, tokens, error=DictionaryError)
    with splice(model, saes, error_term=error_term):
        return model(toks, return_type=return_type, **kwargs)


__all__ = ["SpliceSite", "TapSite", "run_with_saes", "splice"]
