"""The model run from any layer (`GPT.run_from`, `tinygpt.model.stack`): from any block's resid_pre or resid_mid,
to any block, with the last position only, on the keys of earlier positions (`PrefixKV`) or on packed rows
(`PackedRows`), always equal to the full forward; every architecture variant, and the errors."""

from __future__ import annotations

import pytest
import torch
from _model_helpers import BATCH, POS, make_model, single_thread

from tinygpt.arch.mod import MoDBlock
from tinygpt.model import ModelError, PackedRows, PrefixKV, Stack
from tinygpt.model.cache import CacheError


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    yield from single_thread()


@pytest.fixture(scope="module")
def model():
    return make_model(n_layers=3)


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 256, (BATCH, POS), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def run(model, tokens):
    with torch.no_grad():
        return model.run_with_cache(tokens)


def close(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@torch.no_grad()
def test_run_from_every_layer_and_site_equals_the_forward(model, run):
    logits, cache = run
    n = model.cfg.n_layers
    assert isinstance(model.stack, Stack)
    for layer in range(n):
        close(model.run_from(layer, cache[f"blocks.{layer}.hook_resid_pre"]), logits)
        close(model.run_from(layer, cache[f"blocks.{layer}.hook_resid_mid"], start_at="resid_mid"), logits)
        close(model.run_from(layer, cache[f"blocks.{layer}.hook_resid_pre"], last_only=True), logits[:, -1:])
        mid = cache[f"blocks.{layer}.hook_resid_mid"]
        close(model.run_from(layer, mid, start_at="resid_mid", last_only=True), logits[:, -1:])
        for stop in range(layer, n + 1):
            want = cache[f"blocks.{stop}.hook_resid_pre"] if stop < n else cache[f"blocks.{n - 1}.hook_resid_post"]
            close(model.run_from(layer, cache[f"blocks.{layer}.hook_resid_pre"], stop_at=stop), want)
    close(model.run_from(n, cache[f"blocks.{n - 1}.hook_resid_post"]), logits)  # no block: the unembedding


@torch.no_grad()
def test_run_from_fires_the_hooks_of_the_blocks_it_runs(model, run):
    _, cache = run
    seen = []
    model.blocks[2].hook_resid_mid.add_hook(lambda act, hook: seen.append(tuple(act.shape)))
    try:
        model.run_from(1, cache["blocks.1.hook_resid_pre"])
        model.run_from(1, cache["blocks.1.hook_resid_pre"], last_only=True)  # the final block: the last position
    finally:
        model.reset_hooks()
    assert seen == [(BATCH, POS, model.cfg.d_model), (BATCH, 1, model.cfg.d_model)]


@torch.no_grad()
def test_run_from_a_prefix_cache_runs_the_later_positions_only(model, run):
    logits, cache = run
    n = model.cfg.n_layers
    for layer, first in [(0, 3), (1, 1), (2, POS - 1)]:
        prefix = PrefixKV.from_activations(cache, range(layer, n), first, repeat=2)
        resid = cache[f"blocks.{layer}.hook_resid_pre"][:, first:].repeat(2, 1, 1)
        close(model.run_from(layer, resid, past_kv_cache=prefix), logits[:, first:].repeat(2, 1, 1))
        close(model.run_from(layer, resid, past_kv_cache=prefix, last_only=True), logits[:, -1:].repeat(2, 1, 1))
        assert prefix.length == first  # read, never advanced


@torch.no_grad()
@pytest.mark.parametrize("known", [False, True])
def test_packed_rows_equal_the_forward_of_each_sequence(model, run, known):
    """Sequences computed from their own positions on, packed in one row axis; with `known` projections the
    first block takes its queries, keys and values from the activation cache instead of projecting."""
    logits, cache = run
    layer = 1
    start = torch.tensor([2, 0, 5, POS - 1]).repeat_interleave(BATCH)  # 4 sequences per prompt
    rows = PackedRows(start, cache, BATCH, POS)
    assert rows.nb == 4 * BATCH and rows.n_rows == int((POS - start).sum())
    assert torch.equal(rows.first, rows.q == start[rows.r]) and int(rows.last.sum()) == rows.nb
    if known:
        rows.known[layer] = tuple(rows.take(cache[f"blocks.{layer}.attn.hook_{x}"]) for x in "qkv")
    x = rows.take(cache[f"blocks.{layer}.hook_resid_pre"])[None]  # [1, N, d_model]
    close(model.run_from(layer, x, past_kv_cache=rows)[0], rows.take(logits))
    rows = PackedRows(start, cache, BATCH, POS, known=rows.known)
    out = model.run_from(layer, x, past_kv_cache=rows, last_only=True)[0]  # [nb, d_vocab]
    close(out, logits[:, -1].repeat(4, 1))


@torch.no_grad()
def test_every_variant_runs_from_a_layer(arch_model):
    tokens = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(2))
    logits, cache = arch_model.run_with_cache(tokens)
    for layer in (0, 1):
        resid = cache[f"blocks.{layer}.hook_resid_pre"]
        close(arch_model.run_from(layer, resid), logits)
        close(arch_model.run_from(layer, resid, last_only=True), logits[:, -1:])
        mid = cache[f"blocks.{layer}.hook_resid_mid"]
        if isinstance(arch_model.blocks[layer], MoDBlock):  # routed: the routing comes from resid_pre
            with pytest.raises(ModelError, match="routed"):
                arch_model.run_from(layer, mid, start_at="resid_mid")
        else:
            close(arch_model.run_from(layer, mid, start_at="resid_mid"), logits)
    close(arch_model.run_from(0, cache["blocks.0.hook_resid_pre"], stop_at=1), cache["blocks.1.hook_resid_pre"])


def test_run_from_errors(model, run):
    _, cache = run
    resid = cache["blocks.0.hook_resid_pre"]
    with pytest.raises(ModelError, match="start_at"):
        model.run_from(0, resid, start_at="resid_post")
    with pytest.raises(ModelError, match="cannot run from block 4"):
        model.run_from(4, resid)
    with pytest.raises(ModelError, match="cannot run from block 2"):
        model.run_from(2, resid, stop_at=1)
    yoco = make_model(n_layers=4, yoco=True, yoco_window=4)
    with pytest.raises(ModelError, match="n_self = 2"):
        yoco.run_from(3, torch.zeros(1, 3, yoco.cfg.d_model))
    with pytest.raises(CacheError, match="without a cache"):
        yoco.run_from(0, torch.zeros(1, 3, yoco.cfg.d_model), past_kv_cache=PrefixKV({}, {}, 0))
