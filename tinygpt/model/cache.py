"""Key/value caches: which keys and values the new queries of an attention layer see.

- `KVCache`: pre-allocated keys and values for incremental decoding (`GPT.make_cache`).
- `PrefixKV`: fixed keys and values of the first `length` positions of each layer, e.g. from an earlier run's
  activation cache (`PrefixKV.from_activations`), for running only the later positions (`GPT.run_from`).
- `PackedRows`: rows of several sequences packed along one axis, each sequence computed from its own position
  on (its earlier keys and values are a base run's): how an activation-patching sweep runs many patched copies of
  one run without recomputing what a patch cannot change.
- `SharedKV`, `YocoCache`: YOCO's shared global keys/values and its decoding cache (see `tinygpt.arch.yoco`).

The protocol an attention module uses (`tinygpt.model.layers.Attention.forward`): `cache.project(attn, x)`
gives the queries, keys and values of the new positions (normally `attn.project(x)`), `cache.attend(attn, q, k,
v)` stores the new keys and values and attends (normally `attn.attend` over the cached keys followed by the new
ones); `length` is the number of earlier positions, `update(layer, k, v)` appends and returns every key so far.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from tinygpt.config import GPTConfig
from tinygpt.errors import TinyGPTError

if TYPE_CHECKING:
    from torch import nn

__all__ = ["CacheError", "KVCache", "PackedRows", "PrefixKV", "SharedKV", "YocoCache"]


class CacheError(TinyGPTError, TypeError):
    """A cache of the wrong kind for the model or module it is given to."""


class KVCache:
    """Pre-allocated keys and values for incremental decoding.

    `k[layer]`, `v[layer]`: [batch, n_kv, max_len, d_head] (n_kv = `cfg.n_key_value_heads`, or n_heads: only the
    key/value heads are stored under grouped-query attention; rotary models store the keys unrotated); `length`
    tokens are filled.
    """

    def __init__(self, cfg: GPTConfig, batch: int, max_len: int, device, dtype: torch.dtype):
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.d_head)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.length = 0
        self.max_len = max_len

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append k, v [batch, n_heads, t, d_head]; return all keys and values so far."""
        s, t = self.length, k.shape[2]
        self.k[layer, :, :, s : s + t] = k
        self.v[layer, :, :, s : s + t] = v
        return self.k[layer, :, :, : s + t], self.v[layer, :, :, : s + t]

    def project(self, attn: nn.Module, x: Tensor, *, queries: bool = True) -> tuple[Tensor | None, Tensor, Tensor]:
        """q, k, v [batch, n_heads, t, d_head] of the new positions x [batch, t, d_model]: `attn.project(x)`."""
        return attn.project(x, queries=queries)

    def attend(self, attn: nn.Module, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Store the new k, v and attend the new queries over every key so far: z [batch, t, n_heads, d_head]."""
        past = self.length
        k, v = self.update(attn.layer, k, v)
        return attn.attend(q, k, v, past)


class PrefixKV(KVCache):
    """Fixed keys and values of the first `length` positions of some layers; `update` returns them followed by
    the new ones and stores nothing (the same prefix serves every call).

    Args:
        k, v: {layer: [batch, n_heads, length, d_head]}.
        length: the prefix's positions.
    """

    def __init__(self, k: dict[int, Tensor], v: dict[int, Tensor], length: int):  # no storage of its own
        self.k, self.v, self.length = k, v, length
        self.max_len = None

    @classmethod
    def from_activations(cls, acts: Any, layers: range | list[int], length: int, repeat: int = 1) -> PrefixKV:
        """The first `length` positions of `blocks.{i}.attn.hook_k` / `hook_v` ([batch, pos, n_heads, d_head],
        from a run's activation cache) for each layer `i`, the batch repeated `repeat` times."""

        def prefix(act: Tensor) -> Tensor:  # -> [repeat * batch, n_heads, length, d_head]
            return act[:, :length].transpose(1, 2).repeat(repeat, 1, 1, 1)

        k = {i: prefix(acts[f"blocks.{i}.attn.hook_k"]) for i in layers}
        v = {i: prefix(acts[f"blocks.{i}.attn.hook_v"]) for i in layers}
        return cls(k, v, length)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return torch.cat([self.k[layer], k], dim=2), torch.cat([self.v[layer], v], dim=2)


class PackedRows(KVCache):
    """Rows of `nb` sequences of `t` positions packed along one axis: sequence `j` holds its positions
    `start[j] .. t - 1`; its earlier positions' keys and values are those of a base run (sequence `j` is row
    `j % batch` of the base run's batch).

    A model runs packed rows as one sequence, `x` [1, N, d_model] (`GPT.run_from(layer, x, past_kv_cache=rows)`):
    position-wise parts (LayerNorm, MLP, projections) see N rows, and attention attends each row's query over its
    own sequence's keys (the base run's, with the rows computed so far written in). One pass: each layer's keys
    are written once.

    Args:
        start: [nb] the first computed position of each sequence.
        base: the base run's activations with `blocks.{i}.attn.hook_k` / `hook_v` [batch, t, n_heads, d_head].
        batch: the base run's batch.
        t: positions per sequence.
        known: {layer: (q, k, v)} projections known beforehand for every row, each [N, n_heads, d_head] (e.g.
            from activation caches): that layer's attention uses them instead of projecting.

    Attributes:
        nb, t: sequences and positions; N rows in all.
        r, q: [N] each row's sequence and position; `prompt` [N]: its row in the base batch.
        first, last: [N] bool, the rows at each sequence's first computed position and at position t - 1.
    """

    def __init__(self, start: Tensor | list[int], base: Any, batch: int, t: int, known: dict | None = None):
        p = torch.as_tensor(start)
        lengths = t - p
        self.nb, self.t, self.batch = p.numel(), t, batch
        self.r = torch.arange(self.nb, device=p.device).repeat_interleave(lengths)  # [N]
        ends = torch.cumsum(lengths, 0)
        offset = ends - lengths  # [nb] the row of each sequence's first position
        self.q = torch.arange(self.r.numel(), device=p.device) - offset[self.r] + p[self.r]  # [N]
        self.prompt = self.r % batch
        self.first = self.q == p[self.r]
        self.last = self.q == t - 1
        self._first_idx, self._last_idx = offset, ends - 1
        self.length = 0  # unused: each row has its own past
        self.max_len = t
        self._base, self.known = base, dict(known or {})
        self._buffers: dict[int, tuple[Tensor, Tensor]] = {}
        self._idx: Tensor | None = None  # rows of this view (None: all)
        self._r, self._q, self._t0 = self.r, self.q, None
        self._kv_written = False  # this view's keys and values are in the buffers already (see split_last)

    @property
    def n_rows(self) -> int:
        return self.r.numel()

    def take(self, act: Tensor, first: Tensor | None = None) -> Tensor:
        """The rows of a base-shaped activation [batch, t, ...] -> [N, ...]; with `first` (the same shape), each
        sequence's first row comes from `first` instead."""
        rows = act[self.prompt, self.q]
        if first is not None:
            f = self._first_idx
            rows[f] = first[self.prompt[f], self.q[f]].to(rows.dtype)
        return rows

    def select(self, mask: Tensor) -> PackedRows:
        """A view of the rows where `mask` [N] is True (same buffers): the rows a call computes."""
        return self._view(mask.nonzero()[:, 0] if self._idx is None else self._idx[mask])

    def _view(self, idx: Tensor, t0: int | None = None) -> PackedRows:
        view = object.__new__(PackedRows)
        view.__dict__.update(self.__dict__)
        view._idx, view._r, view._q, view._t0 = idx, self.r[idx], self.q[idx], t0
        return view

    def split_last(self, block: nn.Module, x: Tensor) -> tuple[Tensor, PackedRows]:
        """For a block that computes only the last positions: write the keys and values of every row of x
        [1, N, d_model], return (the last rows [1, nb, d_model], the view to run them with)."""
        if self._idx is not None:
            raise CacheError("split_last needs every row (call it on the cache, not on a view)")
        k, v = block.keys_values(x, self)
        self.update(block.attn.layer, k, v)
        view = self._view(self._last_idx, t0=self.t - 1)
        view._kv_written = True
        return x[:, self._last_idx], view

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write the rows' k, v [1, n_heads, M, d_head] into their sequences: all keys [nb, n_heads, t, d_head]."""
        if layer not in self._buffers:
            n = self.nb // self.batch
            base_k, base_v = self._base[f"blocks.{layer}.attn.hook_k"], self._base[f"blocks.{layer}.attn.hook_v"]
            self._buffers[layer] = (base_k.repeat(n, 1, 1, 1), base_v.repeat(n, 1, 1, 1))  # [nb, t, H, dh]
        keys, values = self._buffers[layer]
        keys[self._r, self._q] = k[0].transpose(0, 1).to(keys.dtype)
        values[self._r, self._q] = v[0].transpose(0, 1).to(values.dtype)
        return keys.transpose(1, 2), values.transpose(1, 2)

    def project(self, attn: nn.Module, x: Tensor, *, queries: bool = True) -> tuple[Tensor | None, Tensor, Tensor]:
        known = self.known.get(attn.layer)
        if known is None:
            return attn.project(x, queries=queries, keys=not self._kv_written)
        rows = (lambda a: a) if self._idx is None else (lambda a: a[self._idx])
        q, k, v = (rows(a)[None].transpose(1, 2) for a in known)  # [1, H, M, dh]
        return (q if queries else None), k, v

    def attend(self, attn: nn.Module, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Each row's query over its own sequence's keys: z [1, M, n_heads, d_head]."""
        if self._kv_written:
            keys, values = (b.transpose(1, 2) for b in self._buffers[attn.layer])
        else:
            keys, values = self.update(attn.layer, k, v)
        if self._t0 is None:
            self._t0 = int(self._q.min())
        t0 = self._t0
        rows = q[0].transpose(0, 1)  # [M, H, dh]
        padded = rows.new_zeros(self.nb, self.t - t0, *rows.shape[1:])  # queries at their positions (0: unused)
        padded[self._r, self._q - t0] = rows
        z = attn.attend(padded.transpose(1, 2), keys, values, t0)  # [nb, t - t0, H, dh]
        return z[self._r, self._q - t0][None]

    def last_rows(self, x: Tensor) -> Tensor:
        """x [1, N, ...] -> the last position's rows [1, nb, ...] (x as is if it holds only those)."""
        return x[:, self._last_idx] if x.shape[1] == self.n_rows and self.n_rows != self.nb else x


@dataclass
class SharedKV:
    """What a YOCO cross-decoder block attends to: the shared keys/values of every position so far.

    Attributes:
        k, v: [batch, n_heads, past + pos, d_head].
        past: positions before the current chunk; the block's queries are positions `past .. past + pos - 1`.
        q_pos: [batch, q] key index of each query, when the queries are a sub-sequence of the chunk (a
            Mixture-of-Depths routed block; see `select`); None: the whole chunk, in order.
        cached: a `YocoCache` is in use (incremental decoding).
    """

    k: Tensor
    v: Tensor
    past: int = 0
    q_pos: Tensor | None = None
    cached: bool = False

    def select(self, idx: Tensor) -> SharedKV:
        """The same keys, for queries at positions `idx` [batch, q] (int64) of the current chunk."""
        return SharedKV(self.k, self.v, self.past, idx + self.past, self.cached)


class YocoCache:
    """Decoding cache of a YOCO model: window caches for the self-decoder, one global cache for the cross-decoder.

    Attributes:
        wk, wv: [n_self, batch, n_heads, w, d_head] ring buffers, `w = min(yoco_window, max_len)`; the
            key/value of position `s` lives in slot `s % w` (only the last `w` positions are kept).
        k, v: [batch, n_heads, max_len, d_head], the shared K/V of every position so far (cross-decoder).
        length: positions processed so far (the model advances it; set it to 0 to start over).
        max_len: capacity of the global cache.
    """

    def __init__(self, cfg: GPTConfig, batch: int, max_len: int, device, dtype: torch.dtype):
        n_self = cfg.n_layers // 2
        self.window = cfg.yoco_window
        self.slots = min(cfg.yoco_window, max_len)
        wshape = (n_self, batch, cfg.n_heads, self.slots, cfg.d_head)
        self.wk = torch.empty(wshape, device=device, dtype=dtype)
        self.wv = torch.empty(wshape, device=device, dtype=dtype)
        gshape = (batch, cfg.n_heads, max_len, cfg.d_head)
        self.k = torch.empty(gshape, device=device, dtype=dtype)
        self.v = torch.empty(gshape, device=device, dtype=dtype)
        self.length = 0
        self.max_len = max_len

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache tensors (with Mixture-of-Depths, the routed layers' caches too)."""
        tensors = [self.wk, self.wv, self.k, self.v]
        for st in getattr(self, "routed_layers", {}).values():
            tensors += [t for t in (st.k, st.v) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def window_step(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """One new position (k, v: [batch, n_heads, 1, d_head]) into the ring of self-decoder `layer`.

        Returns every key/value in the window of the new position, [batch, n_heads, n, d_head], in ring
        (not position) order: fine for attention without a mask, where the order of keys does not matter.
        """
        p = self.length
        self.wk[layer, :, :, p % self.slots] = k[:, :, 0]
        self.wv[layer, :, :, p % self.slots] = v[:, :, 0]
        n = min(p + 1, self.window, self.slots)
        return self.wk[layer, :, :, :n], self.wv[layer, :, :, :n]

    def window_update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, int]:
        """New positions (k, v: [batch, n_heads, t, d_head]) for self-decoder `layer`.

        Returns (keys, values, first): the cached positions the new queries can still see followed by the
        new ones, in position order, [batch, n_heads, n_cached + t, d_head]; `first` is the position of
        the first returned key. Then keeps the last `w` positions in the ring.
        """
        p, t = self.length, k.shape[2]
        n_cached = min(p, self.window - 1)
        if n_cached:
            idx = torch.arange(p - n_cached, p, device=k.device) % self.slots
            k_all = torch.cat([self.wk[layer].index_select(2, idx), k], dim=2)
            v_all = torch.cat([self.wv[layer].index_select(2, idx), v], dim=2)
        else:
            k_all, v_all = k, v
        m = min(t, self.slots)
        idx = torch.arange(p + t - m, p + t, device=k.device) % self.slots
        self.wk[layer].index_copy_(2, idx, k[:, :, t - m :])
        self.wv[layer].index_copy_(2, idx, v[:, :, t - m :])
        return k_all, v_all, p - n_cached

    def update_global(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append the shared k, v [batch, n_heads, t, d_head]; return all of them so far."""
        s, t = self.length, k.shape[2]
        self.k[:, :, s : s + t] = k
        self.v[:, :, s : s + t] = v
        return self.k[:, :, : s + t], self.v[:, :, : s + t]
