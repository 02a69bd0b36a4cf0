"""Activations for dictionaries: hook checks, forwards that stop at the last hook needed, a shuffled stream.

    info = check_hooks(model, ["blocks.2.hook_resid_post"])        # {name: width}, in forward order
    acts = hook_activations(model, tokens, ["blocks.2.hook_resid_post"])  # {name: [batch, pos, width]}
    stream = ActivationStream(model, windows, hooks, batch_size=4096, buffer_tokens=65536, seed=0)
    batch = stream.next()                                           # {name: [4096, width]}, shuffled

`hook_activations` runs the model with `run_with_hooks` and raises a private exception from the last hook it
needs, so the blocks after the deepest hook never run. The stream reads non-overlapping windows of the token
array in a seeded order (a new permutation each epoch), fills a buffer of about `buffer_tokens` activations,
shuffles it with a generator seeded by `(seed, fill)`, and hands it out in batches. Its whole state is
`(fill, pos)`: a resumed run recomputes fill `fill` (the model is deterministic) and continues at `pos`, so it
sees exactly the batches the uninterrupted run saw.
"""

from __future__ import annotations

import difflib
import math
import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from tinygpt.data import tokenize_corpus
from tinygpt.dictionary.errors import DictionaryError
from tinygpt.inputs import eval_mode, model_device

_PROBE_POS = 7


class _Stop(Exception):
    """Raised from the last hook needed: the rest of the forward is not run."""


def check_hooks(model, hooks: Sequence[str]) -> dict[str, int]:
    """Check that each hook exists and holds per-token activations; return `{name: width}` in forward order.

    A probe forward of a few tokens records each hook's shape: `[batch, pos, d]` (width d) and
    `[batch, pos, n_heads, d_head]` (width n_heads * d_head) are accepted; attention patterns, LayerNorm scales
    of width 1 and hooks inside Mixture-of-Depths routed blocks (whose `pos` axis is the routed tokens) are not.

    Raises:
        DictionaryError: an unknown hook (with the closest names), or one without per-token activations.
    """
    names = list(dict.fromkeys(hooks))
    for h in names:
        if not isinstance(h, str) or h not in model.hook_dict:
            close = difflib.get_close_matches(str(h), list(model.hook_dict), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else "; see model.hook_dict for the hook names"
            raise DictionaryError(f"unknown hook {h!r}{hint}")
    pos = min(_PROBE_POS, model.cfg.n_ctx)
    seen: dict[str, tuple[int, ...]] = {}

    def record(t: Tensor, hook) -> None:
        seen.setdefault(hook.name, tuple(t.shape))

    tokens = torch.zeros(1, pos, dtype=torch.long, device=model_device(model))
    with torch.no_grad(), eval_mode(model):
        model.run_with_hooks(tokens, return_type=None, fwd_hooks=[(h, record) for h in names])
    for h in names:
        shape = seen.get(h)
        if shape is None:
            raise DictionaryError(f"hook {h} is never called in a forward pass of this model")
        bad = h.endswith(("hook_pattern", "hook_attn_scores")) or "pattern" in h.rsplit(".", 1)[-1]
        if bad or len(shape) not in (3, 4) or shape[:2] != (1, pos) or math.prod(shape[2:]) < 2:
            raise DictionaryError(
                f"hook {h} holds {list(shape)} for a [1, {pos}] input, not per-token activations [batch, pos, d]; "
                "dictionaries read residual, attention/MLP output, LayerNorm output, MLP neuron or per-head hooks"
            )
    order = [h for h in seen if h in names]
    return {h: math.prod(seen[h][2:]) for h in order}


@torch.no_grad()
def hook_activations(model, tokens: Tensor, hooks: Sequence[str]) -> dict[str, Tensor]:
    """Activations of `hooks` for tokens [batch, pos]: `{name: [batch, pos, width]}` (float32).

    The forward stops right after the last of `hooks` runs (the remaining blocks are skipped).
    """
    need = set(hooks)
    out: dict[str, Tensor] = {}

    def save(t: Tensor, hook) -> None:
        out[hook.name] = t.detach().reshape(t.shape[0], t.shape[1], -1).float()
        if len(out) == len(need):
            raise _Stop

    with eval_mode(model):
        try:
            model.run_with_hooks(tokens, return_type=None, fwd_hooks=[(h, save) for h in need])
        except _Stop:
            pass
    return out


# ------------------------------------------------------------------------------------------ token windows
class TokenWindows:
    """Non-overlapping windows of `context` tokens in `tokens[start:stop]`, visited in a seeded order.

    Window `j` of the stream is window `perm_e[j % n]` with `e = j // n` (a fresh permutation each epoch).
    """

    def __init__(self, tokens: np.ndarray, context: int, start: int, stop: int, seed: int):
        self.tokens, self.context, self.start, self.seed = tokens, context, start, seed
        self.n = (stop - start) // context
        if self.n < 1:
            raise DictionaryError(f"{stop - start} tokens are fewer than one window of {context}")
        self._perm: tuple[int, Tensor] | None = None

    def _order(self, epoch: int) -> Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**63)
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        return self._perm[1]

    def get(self, first: int, count: int) -> Tensor:
        """Windows `first .. first + count - 1` of the stream: tokens [count, context] (int64)."""
        idx = [int(self._order(j // self.n)[j % self.n]) for j in range(first, first + count)]
        starts = [self.start + i * self.context for i in idx]
        return torch.from_numpy(
            np.stack([np.asarray(self.tokens[s : s + self.context]) for s in starts]).astype(np.int64)
        )


def spaced_windows(tokens: np.ndarray, context: int, start: int, stop: int, count: int) -> Tensor:
    """`count` evenly spaced windows of `context` tokens in `tokens[start:stop]` (fewer if they do not fit)."""
    high = stop - context
    if high < start:
        raise DictionaryError(f"{stop - start} tokens are fewer than one window of {context}")
    starts = torch.linspace(start, high, max(1, count)).long().unique().tolist()
    return torch.from_numpy(np.stack([np.asarray(tokens[s : s + context]) for s in starts]).astype(np.int64))


# ------------------------------------------------------------------------------------------ the stream
class ActivationStream:
    """Shuffled activations of several hooks from one model forward per chunk of windows.

    Args:
        model: the model (run in eval mode, under no_grad, up to the deepest of `hooks`).
        windows: the `TokenWindows` to read.
        hooks: hook names; every batch holds each hook's activations for the same tokens.
        batch_size: rows per batch.
        buffer_tokens: about how many activations a fill holds (rounded up to whole windows; at least one batch).
        model_batch: windows per model forward.
        seed: seeds the shuffle of each fill.

    Attributes:
        fill, pos: the state (`state_dict` / `load_state_dict`).
        forward_seconds: time spent in the model's forwards.
    """

    def __init__(
        self,
        model,
        windows: TokenWindows,
        hooks: Sequence[str],
        *,
        batch_size: int,
        buffer_tokens: int,
        model_batch: int = 16,
        seed: int = 0,
    ):
        self.model, self.windows, self.hooks = model, windows, list(hooks)
        self.batch_size, self.model_batch, self.seed = batch_size, max(1, model_batch), seed
        self.per_fill = max(1, math.ceil(max(buffer_tokens, batch_size) / windows.context))
        self.rows = self.per_fill * windows.context
        self.device = model_device(model)
        self.fill, self.pos = 0, 0
        self.data: dict[str, Tensor] | None = None
        self.forward_seconds = 0.0

    @property
    def batches_per_fill(self) -> int:
        return self.rows // self.batch_size

    def _load(self) -> None:
        first = self.fill * self.per_fill
        parts: dict[str, list[Tensor]] = {h: [] for h in self.hooks}
        t0 = time.perf_counter()
        for i in range(0, self.per_fill, self.model_batch):
            toks = self.windows.get(first + i, min(self.model_batch, self.per_fill - i)).to(self.device)
            acts = hook_activations(self.model, toks, self.hooks)
            for h in self.hooks:
                parts[h].append(acts[h].reshape(-1, acts[h].shape[-1]))
        self.forward_seconds += time.perf_counter() - t0
        g = torch.Generator().manual_seed((self.seed * 7_919 + self.fill) % 2**63)
        perm = torch.randperm(self.rows, generator=g).to(self.device)
        self.data = {h: torch.cat(p)[perm] for h, p in parts.items()}

    def peek(self) -> dict[str, Tensor]:
        """The current fill's activations (all rows), loading it if needed; the state does not move."""
        if self.data is None:
            self._load()
        return self.data

    def next(self) -> dict[str, Tensor]:
        """The next batch: `{hook: [batch_size, width]}`."""
        if self.data is not None and self.pos + self.batch_size > self.rows:
            self.fill, self.pos, self.data = self.fill + 1, 0, None
        if self.pos + self.batch_size > self.rows:  # a restored position past the end of its fill
            self.fill, self.pos = self.fill + 1, 0
        if self.data is None:
            self._load()
        out = {h: t[self.pos : self.pos + self.batch_size] for h, t in self.data.items()}
        self.pos += self.batch_size
        return out

    def state_dict(self) -> dict[str, int]:
        return {"fill": self.fill, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.fill, self.pos, self.data = int(state["fill"]), int(state["pos"]), None


def corpus_tokens(model, corpus, *, cache_dir=None, progress: bool = False) -> np.ndarray:
    """A 1-D token array from a corpus spec (None = built-in Shakespeare, a path, a `Corpus`) or from token ids
    (a 1-D tensor / array), tokenized with the model's tokenizer through the token cache."""
    if isinstance(corpus, (Tensor, np.ndarray)):
        arr = corpus.detach().cpu().numpy() if isinstance(corpus, Tensor) else corpus
        return np.asarray(arr).reshape(-1)
    if getattr(model, "tokenizer", None) is None:
        raise DictionaryError("the model has no tokenizer to read a corpus with; attach one or pass token ids")
    return tokenize_corpus(corpus, model.tokenizer, cache_dir=cache_dir, progress=progress).tokens


__all__ = ["ActivationStream", "TokenWindows", "check_hooks", "corpus_tokens", "hook_activations", "spaced_windows"]
