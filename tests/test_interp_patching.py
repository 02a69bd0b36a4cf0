"""Activation patching: every batched sweep agrees with `transformer_lens.patching` on our model, runs as a
few forwards (not one per cell), has the right semantics on text prompts, and fails clearly."""

from __future__ import annotations

import pytest
import torch
import transformer_lens.patching as tlp

from tinygpt import GPT, GPTConfig
from tinygpt.interp import (
    PatchingError,
    PatchingResult,
    logit_diff,
    logit_diff_metric,
    patch_attn_out,
    patch_block_every,
    patch_heads,
    patch_heads_by_pos,
    patch_mlp_out,
    patch_resid,
    patch_resid_mid,
    patch_resid_pre,
    patch_sweep,
    patching_figure,
)

N_LAYERS, N_HEADS, POS = 3, 3, 9


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layers=N_LAYERS, d_model=48, n_heads=N_HEADS, n_ctx=32, init_std=0.2)).eval()


@pytest.fixture(scope="module")
def pair():
    gen = torch.Generator().manual_seed(3)
    clean = torch.randint(0, 256, (2, POS), generator=gen)
    corrupted = clean.clone()
    corrupted[:, 2] = torch.randint(0, 256, (2,), generator=gen)
    corrupted[:, 5] = torch.randint(0, 256, (2,), generator=gen)
    return clean, corrupted


def metric(logits):
    return logit_diff(logits, [5, 6], [7, 8])


SWEEPS = [
    (patch_resid_pre, tlp.get_act_patch_resid_pre, (N_LAYERS, POS)),
    (patch_resid_mid, tlp.get_act_patch_resid_mid, (N_LAYERS, POS)),
    (patch_attn_out, tlp.get_act_patch_attn_out, (N_LAYERS, POS)),
    (patch_mlp_out, tlp.get_act_patch_mlp_out, (N_LAYERS, POS)),
    (patch_heads, tlp.get_act_patch_attn_head_out_all_pos, (N_LAYERS, N_HEADS)),
    (patch_heads_by_pos, tlp.get_act_patch_attn_head_out_by_pos, (N_LAYERS, POS, N_HEADS)),
]


@pytest.mark.parametrize("ours, theirs, shape", SWEEPS, ids=lambda x: getattr(x, "__name__", ""))
@pytest.mark.parametrize("batch_cells", [None, 4])  # 4 does not divide the cell count: ragged chunks
def test_sweeps_match_transformer_lens(model, pair, ours, theirs, shape, batch_cells):
    clean, corrupted = pair
    _, clean_cache = model.run_with_cache(clean)
    expected = theirs(model, corrupted, clean_cache, metric)
    got = ours(model, clean, corrupted, metric, batch_cells=batch_cells)
    assert got.values.shape == shape == expected.shape
    torch.testing.assert_close(got.values, expected.float().cpu(), rtol=0, atol=1e-5)
    assert expected.abs().max() > 0.05  # the patches matter, so the comparison is not vacuous
    with torch.no_grad():
        assert got.clean_metric == pytest.approx(float(metric(model(clean))), abs=1e-6)
        assert got.corrupted_metric == pytest.approx(float(metric(model(corrupted))), abs=1e-6)


def test_block_every_matches_transformer_lens(model, pair):
    clean, corrupted = pair
    _, clean_cache = model.run_with_cache(clean)
    expected = tlp.get_act_patch_block_every(model, corrupted, clean_cache, metric)
    got = patch_block_every(model, clean, corrupted, metric)
    assert got.axes == ("site", "layer", "pos") and got.labels["site"] == ["resid_pre", "attn_out", "mlp_out"]
    torch.testing.assert_close(got.values, expected.float().cpu(), rtol=0, atol=1e-5)


def _changed_cells(model, clean, corrupted, name: str) -> int:
    """Cells (position x head) of hook_z where the clean and corrupted runs differ at all."""
    _, c = model.run_with_cache(clean, names_filter=[name])
    _, k = model.run_with_cache(corrupted, names_filter=[name])
    return int((c[name] != k[name]).any(-1).any(0).sum())


def test_sweep_is_batched(model, pair):
    """A few forwards per layer (position chunks; plus the clean and corrupted caching runs), not one per cell;
    cells whose clean and corrupted activations are identical (positions before the first difference) run none:
    the patch changes nothing, so their value is the corrupted run's."""
    clean, corrupted = pair
    calls = []
    handle = model.blocks[-1].register_forward_hook(lambda mod, inp, out: calls.append(out.shape[0]))
    try:
        res = patch_heads_by_pos(model, clean, corrupted, metric)
    finally:
        handle.remove()
    cells = N_LAYERS * POS * N_HEADS
    live = sum(_changed_cells(model, clean, corrupted, f"blocks.{i}.attn.hook_z") for i in range(N_LAYERS))
    assert 0 < live < cells - N_LAYERS * 2 * N_HEADS + 1  # positions 0 and 1 are shared by the prompts
    assert len(calls) <= N_LAYERS * 16 + 2 < cells
    assert sum(calls) == 2 * 2 + live * 2  # every live cell ran the whole corrupted batch of 2
    assert res.values.shape == (N_LAYERS, POS, N_HEADS)
    # the prompts differ from position 2: every earlier cell is the corrupted metric, exactly
    assert (res.values[:, :2] == res.corrupted_metric).all()


POSITION_SWEEPS = [patch_resid_pre, patch_resid_mid, patch_attn_out, patch_mlp_out]


@pytest.mark.parametrize("ours", POSITION_SWEEPS, ids=lambda f: f.__name__)
def test_position_sweeps_from_cached_activations(model, monkeypatch, ours):
    """Position sweeps of a plain model compute the patched block's output from the two runs' caches and run
    only later blocks, in a few batched calls; with the default logit-difference metric, only the final
    block's last position. Every token differs here (no cell is skipped): values equal TransformerLens' with
    the same metric, and the hook-based path taken when a hook is attached (which must then run)."""
    import tinygpt.interp.patching.engine as patching

    gen = torch.Generator().manual_seed(11)
    clean = torch.randint(0, 256, (2, POS), generator=gen)
    corrupted = torch.randint(0, 256, (2, POS), generator=gen)
    theirs = {
        patch_resid_pre: tlp.get_act_patch_resid_pre,
        patch_resid_mid: tlp.get_act_patch_resid_mid,
        patch_attn_out: tlp.get_act_patch_attn_out,
        patch_mlp_out: tlp.get_act_patch_mlp_out,
    }[ours]
    _, clean_cache = model.run_with_cache(clean)
    expected = theirs(model, corrupted, clean_cache, metric)
    assert expected.abs().max() > 0.05
    rows = []
    run_rows = patching._run_rows

    def spy(m, layer, x, packed, *args):
        rows.append((layer, packed.nb, x.shape[0], int((packed.q >= 0).sum())))
        return run_rows(m, layer, x, packed, *args)

    monkeypatch.setattr(patching, "_run_rows", spy)
    got = ours(model, clean, corrupted, correct=[5, 6], incorrect=[7, 8], batch_cells=4)
    torch.testing.assert_close(got.values, expected.float(), rtol=0, atol=1e-5)
    assert len(rows) == N_LAYERS * -(-POS // 4)  # ragged chunks of 4 cells per layer
    assert sum(r[1] for r in rows) == N_LAYERS * POS * 2  # replicas: one per cell and prompt
    assert {r[0] for r in rows} == set(range(1, N_LAYERS + 1))  # from the block after the patched one
    # packed: a cell at position p computes positions p.. only (the last alone after the final block)
    assert sum(r[3] for r in rows) == N_LAYERS * 2 * sum(POS - p for p in range(POS))
    assert all(r[2] in (r[1], r[3]) for r in rows)
    # with a hook attached, the blocks run (and the hook sees every patched forward)
    seen = []
    model.blocks[-1].hook_resid_post.add_hook(lambda act, hook: seen.append(act.shape[0]))
    try:
        hooked = ours(model, clean, corrupted, correct=[5, 6], incorrect=[7, 8], batch_cells=4)
    finally:
        model.reset_hooks()
    torch.testing.assert_close(hooked.values, got.values, rtol=0, atol=1e-5)
    assert sum(seen) == 2 * 2 + N_LAYERS * POS * 2


def test_text_prompts_default_metric_and_normalisation(model):
    clean, corrupted = "The cat sat on", "The dog sat on"  # bytes: same length, differ at positions 4..6
    correct, incorrect = "x", "y"
    res = patch_resid_pre(model, clean, corrupted, correct=correct, incorrect=incorrect, normalize=True)
    assert res.normalized and res.values.shape == (N_LAYERS, len(clean))
    # layer 0: patching a position the prompts share changes nothing; patching all differing positions at
    # once would restore the clean run, and each alone restores part of it
    same = [i for i in range(len(clean)) if clean[i] == corrupted[i]]
    # (1e-4: later position chunks run on the corrupted keys/values of the earlier positions, whose matmul
    # shapes differ from the full forward's, so the fp32 rounding does too)
    torch.testing.assert_close(res.values[0, same], torch.zeros(len(same)), rtol=0, atol=1e-4)
    # the pos labels show the clean token, and both where the prompts differ
    assert res.labels["pos"][0] == "0 'T'" and res.labels["pos"][4] == "4 'c'/'d'"
    # patching the final residual stream at the last position restores the clean metric exactly
    last = patch_resid(model, clean, corrupted, N_LAYERS, -1, correct=correct, incorrect=incorrect, normalize=True)
    assert last == pytest.approx(1.0, abs=1e-5)
    # the default answers are the clean and corrupted runs' own top predictions
    c_tok = int(model(clean)[0, -1].argmax())
    k_tok = int(model(corrupted)[0, -1].argmax())
    if c_tok != k_tok:
        auto = patch_resid_pre(model, clean, corrupted)
        explicit = patch_resid_pre(model, clean, corrupted, correct=c_tok, incorrect=k_tok)
        torch.testing.assert_close(auto.values, explicit.values)
        assert auto.clean_metric > auto.corrupted_metric


def test_patch_resid_matches_sweep_cell_and_normalized_metric(model, pair):
    clean, corrupted = pair
    sweep = patch_resid_pre(model, clean, corrupted, metric)
    for layer, pos in [(0, 2), (1, 5), (2, 8)]:
        assert patch_resid(model, clean, corrupted, layer, pos, metric) == pytest.approx(
            float(sweep.values[layer, pos]), abs=1e-5
        )
    norm = sweep.normalize()
    expected = (sweep.values - sweep.corrupted_metric) / (sweep.clean_metric - sweep.corrupted_metric)
    torch.testing.assert_close(norm.values, expected)
    # logit_diff_metric with baselines is the TransformerLens IOI-demo normalised metric
    fn = logit_diff_metric([5, 6], [7, 8], clean=sweep.clean_metric, corrupted=sweep.corrupted_metric)
    renorm = patch_resid_pre(model, clean, corrupted, fn)
    torch.testing.assert_close(renorm.values, expected, rtol=0, atol=1e-5)
    assert renorm.clean_metric == pytest.approx(1.0, abs=1e-5)
    assert renorm.corrupted_metric == pytest.approx(0.0, abs=1e-5)


def test_layers_subset_and_top(model, pair):
    clean, corrupted = pair
    full = patch_attn_out(model, clean, corrupted, metric)
    part = patch_sweep(model, clean, corrupted, "attn_out", metric, layers=[2, 0])
    torch.testing.assert_close(part.values, full.values[[2, 0]], rtol=0, atol=1e-5)
    (cell, value), *_ = full.top(3)
    assert value == pytest.approx(float(full.values.max()))
    assert full.values[cell["layer"], cell["pos"]] == value


def test_logit_diff():
    logits = torch.zeros(2, 3, 10)
    logits[0, -1, 4], logits[1, -1, 4], logits[1, -1, 1] = 3.0, 1.0, 2.0
    assert float(logit_diff(logits, 4, 1)) == pytest.approx((3.0 + (1.0 - 2.0)) / 2)
    torch.testing.assert_close(logit_diff(logits, [4, 1], [1, 4], per_prompt=True), torch.tensor([3.0, 1.0]))
    with pytest.raises(PatchingError, match="one token id per prompt"):
        logit_diff(logits, [1, 2, 3], 4)


def test_errors(model, pair):
    clean, corrupted = pair
    with pytest.raises(PatchingError, match="same shape"):
        patch_resid_pre(model, clean, corrupted[:, :-1], metric)
    with pytest.raises(PatchingError, match="different lengths"):
        patch_resid_pre(model, ["ab", "abc"], ["ab", "abd"], metric)
    with pytest.raises(PatchingError, match="coincide"):
        patch_resid_pre(model, clean, corrupted, correct=3, incorrect=3)
    with pytest.raises(PatchingError, match="not both"):
        patch_resid_pre(model, clean, corrupted, metric, correct=3)
    with pytest.raises(PatchingError, match="unknown site"):
        patch_sweep(model, clean, corrupted, "resid_post", metric)
    with pytest.raises(PatchingError, match="out of range"):
        patch_sweep(model, clean, corrupted, "resid_pre", metric, layers=[3])
    with pytest.raises(PatchingError, match="out of range"):
        patch_resid(model, clean, corrupted, 1, POS, metric)
    with pytest.raises(PatchingError, match="scalar"):
        patch_resid_pre(model, clean, corrupted, lambda logits: logits[:, -1, 0])
    with pytest.raises(PatchingError, match="one token per prompt"):
        patch_resid_pre(model, clean, corrupted, correct=[1, 2, 3], incorrect=4)
    with pytest.raises(ValueError, match="not one"):
        patch_resid_pre(model, "ab", "ac", correct="xy", incorrect="z")


def test_figures(model, pair):
    clean, corrupted = pair
    res = patch_resid_pre(model, "The cat sat", "The dog sat", correct="x", incorrect="y")
    fig = res.figure()
    assert list(fig.data[0].x) == res.labels["pos"] and list(fig.data[0].y) == ["L0", "L1", "L2"]
    by_pos = patch_heads_by_pos(model, clean, corrupted, metric).figure()
    assert len(by_pos.data[0].y) == N_LAYERS * N_HEADS and by_pos.data[0].y[1] == "L0H1"
    every = patch_block_every(model, clean, corrupted, metric).figure()
    assert len(every.data) == 3
    assert isinstance(patch_heads(model, clean, corrupted, metric), PatchingResult)


def test_patching_figure_puts_sweeps_side_by_side_on_one_scale(model, pair):
    clean, corrupted = pair
    results = {
        "resid_pre": patch_resid_pre(model, clean, corrupted, metric),
        "head": patch_heads(model, clean, corrupted, metric),
    }
    fig = patching_figure(results, title="two sweeps")
    assert [t.name for t in fig.data] == ["resid_pre", "head"] and fig.layout.title.text == "two sweeps"
    for trace, r in zip(fig.data, results.values()):
        torch.testing.assert_close(torch.tensor(trace.z, dtype=torch.float32), r.values.float())
    lim = max(float(r.values.abs().max()) for r in results.values())
    assert fig.layout.coloraxis.cmin == pytest.approx(-lim) and fig.layout.coloraxis.cmax == pytest.approx(lim)
    # a sequence of results is named by each result's site
    assert [t.name for t in patching_figure(list(results.values())).data] == ["resid_pre", "head"]
    with pytest.raises(PatchingError, match="at least one"):
        patching_figure({})


def test_default_answers_recorded_in_meta(model, pair):
    clean, corrupted = pair
    explicit = patch_resid_pre(model, clean, corrupted, correct=[5, 6], incorrect=[7, 8])
    assert explicit.meta["correct"] == [5, 6] and explicit.meta["incorrect"] == [7, 8]
    auto = patch_resid_pre(model, clean[:1], corrupted[:1], correct=5)
    assert auto.meta["correct"] == [5] and auto.meta["incorrect"] == [int(model(corrupted[:1])[0, -1].argmax())]
    assert "correct" not in patch_resid_pre(model, clean, corrupted, metric).meta  # a custom metric has no answers


# ------------------------------------------------------------------------------------------ mixture-of-depths
@pytest.fixture(scope="module")
def mod_model():
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layers=2, d_model=48, n_heads=N_HEADS, n_ctx=32, init_std=0.2, mod=True)).eval()
    with torch.no_grad():  # a decisive router: roughly half the tokens through block 1, depending on the input
        m.blocks[1].router.weight.normal_(0, 1.0)
    return m


def _masks(model, tokens):
    _, cache = model.run_with_cache(tokens, names_filter=["blocks.1.hook_routing_mask", "blocks.1.attn.hook_z"])
    return cache["blocks.1.hook_routing_mask"], cache["blocks.1.attn.hook_z"]


def _manual_routed_head_patch(model, clean, corrupted, head, positions):
    """Patch head `head` of routed block 1 at token `positions` (per row: where both runs route the token) by
    hand: a routed token's slot in hook_z is its rank among the row's routed tokens."""
    clean_mask, clean_z = _masks(model, clean)
    seen = {}

    def keep(mask, hook):
        seen["mask"] = mask

    def patch(z, hook):
        z = z.clone()
        for row in range(z.shape[0]):
            routed = seen["mask"][row].nonzero()[:, 0].tolist()
            clean_routed = clean_mask[row].nonzero()[:, 0].tolist()
            for p in positions:
                if p in routed and p in clean_routed:
                    z[row, routed.index(p), head] = clean_z[row, clean_routed.index(p), head]
        return z

    with torch.no_grad():
        logits = model.run_with_hooks(
            corrupted, fwd_hooks=[("blocks.1.hook_routing_mask", keep), ("blocks.1.attn.hook_z", patch)]
        )
    return float(metric(logits))


def test_head_sweeps_of_a_mixture_of_depths_block_patch_by_token_position(mod_model, pair):
    clean, corrupted = pair
    clean_mask, _ = _masks(mod_model, clean)
    corrupted_mask, _ = _masks(mod_model, corrupted)
    # the premise: the two runs route different tokens through block 1, with different counts per row
    assert not torch.equal(clean_mask, corrupted_mask)
    assert len(set(corrupted_mask.sum(1).tolist())) == 2  # rows of different lengths: padded sub-sequences
    by_pos = patch_heads_by_pos(mod_model, clean, corrupted, metric, batch_cells=5)
    heads = patch_heads(mod_model, clean, corrupted, metric)
    assert by_pos.values.shape == (2, POS, N_HEADS) and heads.values.shape == (2, N_HEADS)
    for h in range(N_HEADS):
        want = _manual_routed_head_patch(mod_model, clean, corrupted, h, range(POS))
        assert heads.values[1, h].item() == pytest.approx(want, abs=1e-5)
        for p in range(POS):
            want = _manual_routed_head_patch(mod_model, clean, corrupted, h, [p])
            assert by_pos.values[1, p, h].item() == pytest.approx(want, abs=1e-5)
    # a position that neither row routes in both runs: the patch changes nothing
    both = clean_mask & corrupted_mask
    never = [p for p in range(POS) if not both[:, p].any()]
    assert never
    for p in never:
        torch.testing.assert_close(by_pos.values[1, p], torch.full((N_HEADS,), by_pos.corrupted_metric))
    # layer 0 is dense: the usual semantics (TransformerLens' patch of z[:, p, h])
    _, clean_cache = mod_model.run_with_cache(clean, names_filter=["blocks.0.attn.hook_z"])
    for p, h in [(2, 0), (5, 2), (POS - 1, 1)]:

        def dense(z, hook, p=p, h=h):
            z = z.clone()
            z[:, p, h] = clean_cache["blocks.0.attn.hook_z"][:, p, h]
            return z

        with torch.no_grad():
            want = float(metric(mod_model.run_with_hooks(corrupted, fwd_hooks=[("blocks.0.attn.hook_z", dense)])))
        assert by_pos.values[0, p, h].item() == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "sequential"])
def test_llama_and_neox_style_sweeps_equal_transformer_lens(parallel):
    """Rotary + RMSNorm + SwiGLU + GQA, with and without the parallel residual (GPT-NeoX): the batched engine's
    block-output shortcuts (attn_out via `finish_from`, mlp_out from resid_post) equal one forward per cell."""
    torch.manual_seed(0)
    cfg = GPTConfig(
        n_layers=2,
        d_model=32,
        n_heads=4,
        n_ctx=32,
        parallel_attn_mlp=parallel,
        positional_embedding_type="rotary",
        normalization_type="RMS",
        gated_mlp=True,
        act_fn="silu",
        n_key_value_heads=2,
        bias=False,
    )
    model = GPT(cfg).eval()
    clean = torch.randint(0, 256, (2, 12))
    corrupted = clean.clone()
    corrupted[:, 3] = (corrupted[:, 3] + 7) % 256

    def metric(logits):
        return (logits[:, -1, 5] - logits[:, -1, 9]).mean()

    _, cache = model.run_with_cache(clean)
    for site, reference in [
        ("attn_out", tlp.get_act_patch_attn_out),
        ("mlp_out", tlp.get_act_patch_mlp_out),
        ("resid_pre", tlp.get_act_patch_resid_pre),
        ("head", tlp.get_act_patch_attn_head_out_all_pos),
    ]:
        ours = patch_sweep(model, clean, corrupted, site, metric, progress=False).values
        torch.testing.assert_close(ours, reference(model, corrupted, cache, metric), atol=1e-5, rtol=0)
    if parallel:
        with pytest.raises(PatchingError, match=r"no blocks.\{layer\}.hook_resid_mid hook \(parallel"):
            patch_sweep(model, clean, corrupted, "resid_mid", metric, progress=False)
