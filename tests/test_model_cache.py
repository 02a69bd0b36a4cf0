"""Key/value caches (`tinygpt.model.cache`): incremental decoding in chunks equals the full forward, and the
hook shapes under a cache."""

from __future__ import annotations

import pytest
import torch
from _model_helpers import BATCH, D_HEAD, D_VOCAB, N_HEADS, make_model, single_thread  # noqa: F401

from tinygpt import KVCache


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    yield from single_thread()


@pytest.mark.parametrize("impl", ["auto", "eager"])
def test_kv_cache_chunks_equal_full_forward(impl):
    m = make_model(attn_impl=impl)
    toks = torch.randint(0, D_VOCAB, (BATCH, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = m(toks)
        cache = KVCache(m.cfg, BATCH, 16, "cpu", torch.float32)
        pieces, start = [], 0
        for size in (3, 1, 5, 1, 2):  # prefill, single steps and multi-token chunks after a prefix
            pieces.append(m(toks[:, start : start + size], past_kv_cache=cache))
            start += size
    assert cache.length == 12
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)


def test_kv_cache_hook_shapes():
    m = make_model()
    toks = torch.randint(0, D_VOCAB, (1, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        kv = KVCache(m.cfg, 1, 8, "cpu", torch.float32)
        m(toks[:, :4], past_kv_cache=kv)
        _, cache = m.run_with_cache(toks[:, 4:], past_kv_cache=kv)
    assert cache["blocks.0.attn.hook_k"].shape == (1, 2, N_HEADS, D_HEAD)  # only the new positions
    assert cache["blocks.0.attn.hook_pattern"].shape == (1, N_HEADS, 2, 6)  # new queries x all keys
    assert torch.all(cache["blocks.0.attn.hook_pattern"][0, :, 0, 5] == 0)  # still causal
