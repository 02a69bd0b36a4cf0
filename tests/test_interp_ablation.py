"""Ablations: spec parsing and errors, zero / mean / resample semantics against hand-written hooks, hook
cleanup, generation under an ablation (cached == uncached), and the sweep."""

from __future__ import annotations

import pytest
import torch

import tinygpt
from tinygpt import GPT, GPTConfig
from tinygpt.interp import (
    Ablation,
    AblationError,
    ablate,
    ablated_loss,
    ablation_compare,
    ablation_sweep,
    parse_ablations,
)

N_LAYERS, N_HEADS = 2, 3


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # a larger init than GPT-2's so every component visibly moves the logits
    return GPT(GPTConfig(n_layers=N_LAYERS, d_model=36, n_heads=N_HEADS, n_ctx=48, init_std=0.3)).eval()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 256, (3, 11), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def reference():
    return torch.randint(0, 256, (6, 48), generator=torch.Generator().manual_seed(2))


def _no_hooks_left(model) -> bool:
    return not model._forward_pre_hooks and all(
        not hp._forward_hooks and not hp.fwd_hooks for hp in model.hook_dict.values()
    )


# ------------------------------------------------------------------------------------------------ specs
@pytest.mark.parametrize(
    "text, expected",
    [
        ("3.attn", Ablation(3, "attn", None, "zero")),
        ("2.head5", Ablation(2, "head", 5, "zero")),
        ("1.mlp", Ablation(1, "mlp", None, "zero")),
        ("0", Ablation(0, "layer", None, "zero")),
        ("4.layer:mean", Ablation(4, "layer", None, "mean")),
        ("2.head5:resample", Ablation(2, "head", 5, "resample")),
        ("L2H5", Ablation(2, "head", 5, "zero")),
        ("-1.attn", Ablation(-1, "attn", None, "zero")),
    ],
)
def test_parse(text, expected):
    assert Ablation.parse(text) == expected
    assert Ablation.parse(str(expected)) == expected  # str() round-trips


def test_parse_default_mode_and_lists():
    specs = parse_ablations("0.head1, 1.mlp:zero", mode="mean")
    assert specs == [Ablation(0, "head", 1, "mean"), Ablation(1, "mlp", None, "zero")]
    assert parse_ablations([Ablation(1, "attn"), "0.mlp"]) == [Ablation(1, "attn"), Ablation(0, "mlp")]


@pytest.mark.parametrize("bad", ["3.atn", "attn", "1.head", "1.mlp:foo", "1.2.3", ""])
def test_malformed_specs_are_rejected(bad):
    with pytest.raises(AblationError, match="ablation spec|ablation mode|no ablation"):
        parse_ablations(bad)


def test_out_of_range_layer_and_head(model, tokens):
    with pytest.raises(AblationError, match=r"layer 5 is out of range; the model has 2 layers"):
        ablated_loss(model, tokens, "5.attn")
    with pytest.raises(AblationError, match=r"head 3 is out of range; layer 1 has 3 heads \(0..2\)"):
        ablated_loss(model, tokens, "1.head3")
    with pytest.raises(AblationError, match="head=2 only applies"):
        Ablation(0, "attn", head=2)
    assert Ablation.parse("-1.mlp").resolve(model.cfg) == Ablation(1, "mlp")


# ------------------------------------------------------------------------------------------- semantics
def test_zero_head_equals_zeroing_hook_z_slice(model, tokens):
    def manual(z, hook):
        z = z.clone()
        z[:, :, 1] = 0
        return z

    expected = model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_z", manual)])
    with ablate(model, "1.head1"):
        got = model(tokens)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.allclose(got, model(tokens), atol=1e-4)  # the ablation did something


@pytest.mark.parametrize(
    "component, hooks",
    [
        ("attn", ["blocks.0.hook_attn_out"]),
        ("mlp", ["blocks.0.hook_mlp_out"]),
        ("layer", ["blocks.0.hook_attn_out", "blocks.0.hook_mlp_out"]),
    ],
)
def test_zero_component_equals_manual(model, tokens, component, hooks):
    expected = model.run_with_hooks(tokens, fwd_hooks=[(h, lambda x, hook: torch.zeros_like(x)) for h in hooks])
    with ablate(model, f"0.{component}"):
        got = model(tokens)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_mean_ablation_uses_reference_mean(model, tokens, reference):
    _, ref_cache = model.run_with_cache(reference, names_filter=["blocks.0.attn.hook_z", "blocks.1.hook_mlp_out"])
    head_mean = ref_cache["blocks.0.attn.hook_z"][:, :, 2].mean(dim=(0, 1))  # [d_head]
    mlp_mean = ref_cache["blocks.1.hook_mlp_out"].mean(dim=(0, 1))  # [d_model]
    _, plain = model.run_with_cache(tokens, names_filter=["blocks.0.attn.hook_z"])
    with ablate(model, "0.head2:mean, 1.mlp:mean", reference_tokens=reference):
        _, cache = model.run_with_cache(tokens, names_filter=["blocks.0.attn.hook_z", "blocks.1.hook_mlp_out"])
    z = cache["blocks.0.attn.hook_z"]
    torch.testing.assert_close(z[:, :, 2], head_mean.expand_as(z[:, :, 2]))
    torch.testing.assert_close(z[:, :, :2], plain["blocks.0.attn.hook_z"][:, :, :2])  # other heads untouched
    torch.testing.assert_close(cache["blocks.1.hook_mlp_out"], mlp_mean.expand_as(cache["blocks.1.hook_mlp_out"]))


def test_resample_draws_reference_rows_at_the_same_position_and_is_seeded(model, tokens, reference):
    _, ref_cache = model.run_with_cache(reference, names_filter=["blocks.1.hook_attn_out"])
    ref = ref_cache["blocks.1.hook_attn_out"]  # [6, 48, d]

    def run(seed):
        with ablate(model, "1.attn:resample", reference_tokens=reference, seed=seed):
            logits, cache = model.run_with_cache(tokens, names_filter=["blocks.1.hook_attn_out"])
        return logits, cache["blocks.1.hook_attn_out"]

    logits0, act0 = run(0)
    logits0b, act0b = run(0)
    logits1, _ = run(1)
    torch.testing.assert_close(logits0, logits0b, rtol=0, atol=0)
    assert not torch.allclose(logits0, logits1)
    rows = set()
    for b in range(act0.shape[0]):
        for p in range(act0.shape[1]):
            match = [r for r in range(ref.shape[0]) if torch.equal(act0[b, p], ref[r, p])]
            assert match, f"({b}, {p}) is not a reference activation at position {p}"
            rows.add(match[0])
    assert len(rows) > 1  # rows are drawn, not one fixed row


def test_mean_and_resample_need_reference(model, tokens):
    with pytest.raises(AblationError, match="reference_tokens"):
        ablated_loss(model, tokens, "0.attn:mean")
    short = torch.randint(0, 256, (2, 5))
    with pytest.raises(AblationError, match="only 5 positions"):
        ablated_loss(model, tokens, "0.attn:resample", reference_tokens=short)


def test_hooks_removed_after_context_even_on_error(model, tokens, reference):
    before = model(tokens)
    ctx = ablate(model, "0.head0, 1.layer:resample", reference_tokens=reference)
    with ctx:
        assert not _no_hooks_left(model)
    assert _no_hooks_left(model)
    with pytest.raises(RuntimeError, match="boom"):
        with ctx:
            raise RuntimeError("boom")
    assert _no_hooks_left(model)
    torch.testing.assert_close(model(tokens), before, rtol=0, atol=0)
    with ctx:  # re-enterable, nested with another ablation
        with ablate(model, "0.mlp"):
            pass
        assert not _no_hooks_left(model)
    assert _no_hooks_left(model)


def test_ablated_loss_matches_manual_loss(model, tokens):
    expected = model.run_with_hooks(
        tokens, return_type="loss", fwd_hooks=[("blocks.1.hook_mlp_out", lambda x, hook: torch.zeros_like(x))]
    )
    torch.testing.assert_close(ablated_loss(model, tokens, "1.mlp"), expected)
    per_tok = ablated_loss(model, tokens, "1.mlp", per_token=True)
    assert per_tok.shape == (3, 10)
    torch.testing.assert_close(per_tok.mean(), expected)


# ------------------------------------------------------------------------------------------ generation
def test_generate_with_ablation_changes_output_and_cache_agrees(model, reference):
    prompt = torch.tensor([[10, 20, 30, 40]])
    plain = tinygpt.generate(model, prompt, 20, temperature=0)
    for spec in [
        "0.attn",
        "1.head2, 0.mlp",
        ablate(model, "0.head1:mean, 1.attn:resample", reference_tokens=reference, seed=5),
    ]:
        cached = tinygpt.generate(model, prompt, 20, temperature=0, ablate=spec)
        uncached = tinygpt.generate(model, prompt, 20, temperature=0, ablate=spec, use_cache=False)
        assert torch.equal(cached, uncached), spec
        assert not torch.equal(cached, plain), spec
        # the ablated continuation is what the ablated model predicts greedily, token by token
        with spec if not isinstance(spec, str) else ablate(model, spec):
            logits = model(cached[:, :-1])
        assert torch.equal(logits[0, 3:].argmax(-1), cached[0, 4:])
    assert _no_hooks_left(model)


def test_cached_generation_past_the_context_under_resample(model, reference):
    """Past n_ctx the window slides and the cache is rebuilt; positions restart at 0 in both paths."""
    ctx = ablate(model, "1.head0:resample, 0.mlp:mean", reference_tokens=reference, seed=1)
    prompt = torch.tensor([[1, 2, 3]])
    cached = tinygpt.generate(model, prompt, 60, temperature=1.0, seed=4, ablate=ctx)
    uncached = tinygpt.generate(model, prompt, 60, temperature=1.0, seed=4, ablate=ctx, use_cache=False)
    assert cached.shape == (1, 63) and torch.equal(cached, uncached)


def test_stream_and_sampling_under_ablation(model):
    a = "".join(tinygpt.stream(model, "Hi", 15, seed=3, ablate="1.mlp"))
    b = tinygpt.generate(model, "Hi", 15, seed=3, ablate="1.mlp")
    assert "Hi" + a == b
    assert b != tinygpt.generate(model, "Hi", 15, seed=3)
    with pytest.raises(AblationError, match="out of range"):
        tinygpt.generate(model, "Hi", 3, ablate="7.mlp")


# ------------------------------------------------------------------------------------------------ sweep
@pytest.fixture(scope="module")
def sweep(model, tokens, reference):
    """Zero and mean ablations of every layer, attention, MLP and head (read-only: tests share it)."""
    return ablation_sweep(
        model,
        tokens,
        modes=("zero", "mean"),
        components=("layer", "attn", "mlp"),
        heads=True,
        reference_tokens=reference,
        progress=False,
    )


def test_ablation_sweep(model, tokens, reference, sweep):
    per_mode = N_LAYERS * (3 + N_HEADS)
    assert len(sweep.ablations) == 2 * per_mode
    torch.testing.assert_close(torch.tensor(sweep.baseline_loss), model(tokens, return_type="loss"))
    for spec, loss in zip(sweep.ablations, sweep.losses):
        expected = ablated_loss(model, tokens, spec, reference_tokens=reference)
        assert abs(float(loss) - float(expected)) < 1e-5, spec
    heads = sweep.delta("head", "zero")
    assert heads.shape == (N_LAYERS, N_HEADS) and not heads.isnan().any()
    assert sweep.delta("attn", "mean").shape == (N_LAYERS,)
    top = sweep.top(3)
    assert [d for _, d in top] == sorted([d for _, d in top], reverse=True)
    assert top[0][1] == pytest.approx(float(sweep.deltas.max()))
    with pytest.raises(KeyError, match="no"):
        sweep.delta("attn", "resample")
    fig = sweep.figure("mean")
    assert {t.type for t in fig.data} == {"bar", "heatmap"}
    assert len(sweep.to_dataframe()) == 2 * per_mode


def test_ablation_sweep_targets_restrict_positions(model, tokens):
    targets = torch.full_like(tokens, -100)
    targets[:, 5:-1] = tokens[:, 6:]
    sweep = ablation_sweep(model, tokens, components=("attn",), targets=targets, progress=False)
    expected = ablated_loss(model, tokens, "1.attn", targets=targets)
    assert float(sweep.losses[1]) == pytest.approx(float(expected), abs=1e-6)
    with pytest.raises(AblationError, match="unknown component"):
        ablation_sweep(model, tokens, components=("atn",), progress=False)


def test_sweep_bars_highlight_one_ablation(sweep):
    fig = sweep.figure("mean", highlight="1.head2")
    (bar,) = fig.data
    mean = [(a, float(d)) for a, d in zip(sweep.ablations, sweep.deltas) if a.mode == "mean"]
    assert bar.type == "bar" and list(bar.x) == [a.label for a, _ in mean]
    assert list(bar.y) == pytest.approx([d for _, d in mean])
    colors = {"layer": "#7f7f7f", "attn": "#1f77b4", "mlp": "#2ca02c", "head": "#9467bd"}
    want = ["#d62728" if a == Ablation(1, "head", 2, "mean") else colors[a.component] for a, _ in mean]
    assert list(bar.marker.color) == want and want.count("#d62728") == 1
    assert fig.layout.title.text == f"mean ablation: loss increase (baseline {sweep.baseline_loss:.4f}); red = selected"
    assert fig.layout.xaxis.type == "category" and fig.layout.xaxis.tickangle == -60 and fig.layout.height == 360
    # the mode defaults to the highlighted ablation's; an Ablation and a negative layer work too
    assert list(sweep.figure(highlight=Ablation(-1, "attn")).data[0].marker.color).count("#d62728") == 1
    assert "red = selected" not in sweep.bars("zero").layout.title.text
    assert list(sweep.bars("zero").data[0].y) == pytest.approx(sweep.deltas[: len(mean)].tolist())
    with pytest.raises(AblationError, match="not one of"):
        sweep.figure("mean", highlight="1.attn:zero")
    with pytest.raises(AblationError, match="no 'resample'"):
        sweep.bars("resample")


def test_ablation_compare_is_two_seeded_generations_and_two_losses(model, tokens, reference):
    prompt = torch.tensor([[10, 20, 30, 40]])
    opts = dict(temperature=1.0, seed=3)
    cmp = ablation_compare(model, "0.head1:mean", prompt, max_new_tokens=12, reference_tokens=reference, **opts)
    ctx = ablate(model, "0.head1:mean", reference_tokens=reference, seed=3)
    clean = tinygpt.generate(model, prompt, 12, **opts)[0, 4:].tolist()
    ablated = tinygpt.generate(model, prompt, 12, ablate=ctx, **opts)[0, 4:].tolist()
    assert (cmp.clean_tokens, cmp.ablated_tokens) == (clean, ablated) and clean != ablated
    assert cmp.sample_clean == model.to_string(clean) and cmp.sample_ablated == model.to_string(ablated)
    assert cmp.prompt == model.to_string(prompt[0]) and cmp.ablation == Ablation(0, "head", 1, "mean")
    assert cmp.diverges_at == next(i for i, (a, b) in enumerate(zip(clean, ablated)) if a != b)
    assert cmp.loss_clean is None and cmp.delta is None
    with pytest.raises(AblationError, match="tokens="):
        cmp.figure()
    html = cmp.to_html()
    assert "without ablation" in html and "with 0.head1:mean (diverges after" in html
    # with evaluation tokens: both losses, and they are the reference batch of mean / resample by default
    cmp = ablation_compare(model, "-1.attn", "Hi", max_new_tokens=5, tokens=tokens)
    assert cmp.loss_clean == pytest.approx(float(model(tokens, return_type="loss").detach()), abs=1e-6)
    assert cmp.loss_ablated == pytest.approx(float(ablated_loss(model, tokens, "1.attn")), abs=1e-6)
    assert cmp.n_tokens == 3 * 10 and cmp.sample_clean == tinygpt.generate(model, "Hi", 5, temperature=0)[2:]
    fig = cmp.figure()
    assert list(fig.data[0].y) == [cmp.loss_clean, cmp.loss_ablated] and cmp.delta > 0
    cmp = ablation_compare(model, "1.mlp:resample", "Hi", max_new_tokens=3, tokens=tokens, seed=2)
    expected = ablated_loss(model, tokens, "1.mlp:resample", reference_tokens=tokens, seed=2)
    assert cmp.loss_ablated == pytest.approx(float(expected), abs=1e-6)
    with pytest.raises(AblationError, match="one ablation"):
        ablation_compare(model, "0.attn, 1.mlp", "Hi")
    with pytest.raises(AblationError, match="reference"):
        ablation_compare(model, "0.attn:mean", "Hi", max_new_tokens=2)
    assert _no_hooks_left(model)


def test_ablation_compare_without_a_tokenizer_shows_token_ids():
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layers=2, d_model=32, n_heads=2, n_ctx=64, d_vocab=20), tokenizer=None).eval()
    cmp = ablation_compare(m, "0.layer", [5, 17, 3], max_new_tokens=5)
    assert cmp.prompt == "5 17 3" and cmp.sample_clean == " ".join(map(str, cmp.clean_tokens))
    assert f"<b>5 17 3</b> {cmp.sample_clean}</pre>" in cmp.to_html()


# ------------------------------------------------------------------------------------------ mixture-of-depths
@pytest.fixture(scope="module")
def mod_model():
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layers=2, d_model=36, n_heads=N_HEADS, n_ctx=48, init_std=0.3, mod=True)).eval()
    with torch.no_grad():  # a decisive router: about half the tokens through block 1, depending on the input
        m.blocks[1].router.weight.normal_(0, 1.0)
    return m


def _routed_z(model, tokens):
    """Per row: {position: hook_z [H, d_head]} of the tokens routed block 1 computes (slot j = j-th routed)."""
    _, cache = model.run_with_cache(tokens, names_filter=["blocks.1.hook_routing_mask", "blocks.1.attn.hook_z"])
    mask, z = cache["blocks.1.hook_routing_mask"], cache["blocks.1.attn.hook_z"]
    return [{p: z[r, j] for j, p in enumerate(mask[r].nonzero()[:, 0].tolist())} for r in range(mask.shape[0])]


def test_head_ablations_in_a_mixture_of_depths_block_act_on_routed_tokens(mod_model, tokens, reference):
    ref = _routed_z(mod_model, reference)
    assert 0 < sum(len(r) for r in ref) < reference.numel()  # the router skips some tokens
    routed_mean = torch.stack([z[2] for row in ref for z in row.values()]).mean(0)
    with ablate(mod_model, "1.head2:mean", reference_tokens=reference):
        ablated = _routed_z(mod_model, tokens)
    plain = _routed_z(mod_model, tokens)
    for row, plain_row in zip(ablated, plain):
        for p, z in row.items():
            torch.testing.assert_close(z[2], routed_mean)  # the mean over routed reference tokens only
            torch.testing.assert_close(z[:2], plain_row[p][:2])  # other heads untouched

    # resample: a token at position p gets head 0's output at p of a reference row that routed p
    by_pos = {}
    for row in ref:
        for p, z in row.items():
            by_pos.setdefault(p, []).append(z[0])
    draws = []
    for seed in (0, 0, 1):
        with ablate(mod_model, "1.head0:resample", reference_tokens=reference, seed=seed):
            draws.append(_routed_z(mod_model, tokens))
    n_checked = 0
    for row in draws[0]:
        for p, z in row.items():
            if p in by_pos:
                assert any(torch.equal(z[0], cand) for cand in by_pos[p]), p
                n_checked += 1
    assert n_checked > 5
    same = all(torch.equal(a[p], b[p]) for a, b in zip(draws[0], draws[1]) for p in a)
    differ = any(not torch.equal(a[p], b[p]) for a, b in zip(draws[0], draws[2]) for p in a)
    assert same and differ  # seeded


def test_generation_under_routed_head_ablations_cached_equals_uncached(mod_model, reference):
    prompt = torch.tensor([[10, 20, 30, 40]])
    plain = tinygpt.generate(mod_model, prompt, 25, temperature=0)
    ctx = ablate(mod_model, "1.head0:resample, 1.head1:mean", reference_tokens=reference, seed=2)
    cached = tinygpt.generate(mod_model, prompt, 25, temperature=0, ablate=ctx)
    uncached = tinygpt.generate(mod_model, prompt, 25, temperature=0, ablate=ctx, use_cache=False)
    assert torch.equal(cached, uncached) and not torch.equal(cached, plain)
    sweep = ablation_sweep(
        mod_model, reference[:3, :20], modes=("resample",), components=(), heads=True, progress=False
    )
    assert sweep.deltas.isfinite().all() and len(sweep.ablations) == 2 * N_HEADS
    assert _no_hooks_left(mod_model)
