"""TransformerLens' hook switches (`tinygpt.model.heads`): each head's output (`attn.hook_result`) and inputs
(`hook_q_input` / `hook_k_input` / `hook_v_input`, `hook_attn_in`), and the MLP input (`hook_mlp_in`).

Off they are free (never called, the forward unchanged); on they are exact (logits equal the unswitched model's on
every architecture variant, with and without a KV cache), gradients flow through every per-head copy, an edit of
one head's copy changes that head only, and a variant that cannot express a switch says so."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from _model_helpers import BATCH, D_MODEL, N_HEADS, POS, SWITCH_HOOKS, make_model, single_thread

from tinygpt.model.heads import SWITCHES, SwitchError, head_results, project_heads

VARIANTS = {
    "dense": {},
    "diff_attn": {"diff_attn": True},
    "moe": {"moe_experts": 3, "moe_topk": 2},
    "mod": {"mod": True, "mod_capacity": 0.5},
    "yoco": {"yoco": True, "yoco_window": 3},
    "moe+mod+diff": {"moe_experts": 3, "mod": True, "mod_capacity": 0.5, "diff_attn": True},
    "yoco+mod+moe+diff": {"yoco": True, "yoco_window": 3, "mod": True, "moe_experts": 3, "diff_attn": True},
}
# What each variant cannot express (everything else must work).
REFUSED = {name: ({"use_split_qkv_input"} if "yoco" in name else set()) for name in VARIANTS}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    yield from single_thread()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 256, (BATCH, POS), generator=torch.Generator().manual_seed(1))


def variant(name: str):
    return make_model(n_layers=4, **VARIANTS[name])


def switch(model, on: bool = True, only: set[str] | None = None) -> set[str]:
    """Turn the switches on (or off); returns the ones that were set."""
    done = set()
    for name in SWITCHES:
        if only is not None and name not in only:
            continue
        getattr(model, f"set_{name}")(on)
        done.add(name)
    return done


@pytest.mark.parametrize("name", list(VARIANTS))
def test_switches_are_exact_on_every_variant_and_with_a_kv_cache(name, tokens):
    model = variant(name)
    with torch.no_grad():
        want = model(tokens)
    expressible = set(SWITCHES) - REFUSED[name]
    for sw in [{s} for s in sorted(expressible)] + [expressible]:  # each switch alone, then all together
        switch(model, True, sw)
        with torch.no_grad():
            got = model(tokens)
            cache = model.make_cache(BATCH)
            pieces = [model(tokens[:, a:b], past_kv_cache=cache) for a, b in ((0, 3), (3, 4), (4, POS))]
        torch.testing.assert_close(got, want, rtol=0, atol=2e-5, msg=f"{name} {sw}")
        torch.testing.assert_close(torch.cat(pieces, 1), want, rtol=0, atol=2e-5, msg=f"{name} {sw} cached")
        switch(model, False)
    for refused in REFUSED[name]:
        with pytest.raises(SwitchError, match=f"set_{refused}.*YOCO"):
            getattr(model, f"set_{refused}")(True)
        assert not getattr(model.cfg, refused)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_switched_hooks_have_transformer_lens_shapes(name, tokens):
    model = variant(name)
    on = switch(model, True, set(SWITCHES) - REFUSED[name])
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    dims = {"batch": BATCH, "pos": POS, "n_heads": N_HEADS, "d_model": D_MODEL}
    routed = {i for i in range(4) if "mod" in name and i % 2 == 1}
    for template, shape in SWITCH_HOOKS.items():
        needs = {
            "hook_result": "use_attn_result",
            "hook_attn_in": "use_attn_in",
            "hook_mlp_in": "use_hook_mlp_in",
        }.get(template.split(".")[-1], "use_split_qkv_input")
        for i in range(4):
            full = template.format(i=i)
            if needs not in on:
                assert full not in cache.cache_dict, full
                continue
            want = tuple(dims[d] for d in shape)
            if i in routed and template.endswith("attn.hook_result"):  # inside a routed block: routed tokens only
                want = (BATCH, cache[f"blocks.{i}.attn.hook_z"].shape[1], N_HEADS, D_MODEL)
            assert tuple(cache[full].shape) == want, full


def test_switches_are_off_by_default_and_not_saved(tokens):
    model = make_model()
    assert not any(getattr(model.cfg, s) for s in SWITCHES)
    with torch.no_grad():
        before = model(tokens)
        _, cache = model.run_with_cache(tokens)
    assert not any(k.endswith(("_input", "hook_attn_in", "hook_result", "hook_mlp_in")) for k in cache.keys())
    switch(model, True)
    assert all(getattr(model.cfg, s) for s in SWITCHES)
    assert not set(SWITCHES) & set(model.cfg.to_dict())  # runtime flags, not part of the saved config
    assert not any(getattr(model.cfg.replace(), s) for s in SWITCHES)
    switch(model, False)
    with torch.no_grad():
        assert torch.equal(model(tokens), before)  # off again: exactly the usual forward


def test_hook_result_is_each_heads_output(tokens):
    model = make_model()
    model.set_use_attn_result(True)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    for i, block in enumerate(model.blocks):
        result, z = cache[f"blocks.{i}.attn.hook_result"], cache[f"blocks.{i}.attn.hook_z"]
        torch.testing.assert_close(result.sum(2) + block.attn.b_O, cache[f"blocks.{i}.hook_attn_out"])
        for h in range(N_HEADS):
            torch.testing.assert_close(result[:, :, h], z[:, :, h] @ block.attn.W_O[h])
    # the TransformerLens helper that builds per-head results from hook_z agrees
    stacked = cache.stack_head_results(layer=-1, pos_slice=None)  # [n_layers * n_heads, batch, pos, d_model]
    torch.testing.assert_close(stacked[N_HEADS:], cache["blocks.1.attn.hook_result"].permute(2, 0, 1, 3))


def test_editing_one_heads_input_changes_that_head_only(tokens):
    model = make_model()
    model.set_use_split_qkv_input(True)
    seen = {}

    def zero_head_1(x, hook):
        x[:, :, 1] = 0.0  # in place: each head has its own copy

    def grab(x, hook):
        seen[hook.name] = x.detach().clone()

    names = [f"blocks.0.attn.hook_{n}" for n in "qkv"]
    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[(n, grab) for n in names])
        clean = dict(seen)
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_k_input", zero_head_1)] + [(n, grab) for n in names])
    q, k, v = (seen[n] for n in names)
    assert torch.equal(q, clean[names[0]]) and torch.equal(v, clean[names[2]])  # queries and values untouched
    assert torch.equal(k[:, :, 0], clean[names[1]][:, :, 0]) and torch.equal(k[:, :, 2], clean[names[1]][:, :, 2])
    ln1 = model.blocks[0].ln1
    torch.testing.assert_close(
        k[:, :, 1], model.blocks[0].attn.b_K[1].expand_as(k[:, :, 1]) + ln1.b @ model.blocks[0].attn.W_K[1]
    )


def test_gradients_flow_through_every_copy(tokens):
    """d loss / d resid_pre = d loss / d resid_mid + sum over heads of the gradients at the per-head inputs."""
    model = make_model()
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    grads = {}

    def keep(grad, hook):
        grads[hook.name] = grad.detach().clone()

    names = ["hook_resid_pre", "hook_resid_mid", "hook_q_input", "hook_k_input", "hook_v_input", "hook_mlp_in"]
    hooks = [(f"blocks.1.{n}", keep) for n in names]
    with model.hooks(bwd_hooks=hooks):
        model(tokens, return_type="loss").backward()
    g = {n: grads[f"blocks.1.{n}"] for n in names}
    heads = g["hook_q_input"].sum(2) + g["hook_k_input"].sum(2) + g["hook_v_input"].sum(2)
    torch.testing.assert_close(g["hook_resid_pre"], g["hook_resid_mid"] + heads, rtol=1e-4, atol=1e-7)
    assert all(g[n].abs().sum() > 0 for n in names)
    # and the gradient at resid_pre is the unsplit model's
    plain = make_model()
    with plain.hooks(bwd_hooks=[("blocks.1.hook_resid_pre", keep)]):
        plain(tokens, return_type="loss").backward()
    torch.testing.assert_close(grads["blocks.1.hook_resid_pre"], g["hook_resid_pre"], rtol=1e-4, atol=1e-7)


def test_attn_in_feeds_query_key_and_value_and_chains_into_the_split_inputs(tokens):
    model = make_model()
    model.set_use_attn_in(True)
    model.set_use_split_qkv_input(True)
    seen = {}

    def scale_head_0(x, hook):
        return x * torch.tensor([2.0, 1.0, 1.0])[None, None, :, None]

    def grab(x, hook):
        seen[hook.name] = x.detach().clone()

    with torch.no_grad():
        model.run_with_hooks(
            tokens,
            fwd_hooks=[("blocks.0.hook_attn_in", scale_head_0), ("blocks.0.hook_resid_pre", grab)]
            + [(f"blocks.0.hook_{n}_input", grab) for n in "qkv"],
        )
    resid = seen["blocks.0.hook_resid_pre"]
    for n in "qkv":  # the edit of hook_attn_in reached all three
        x = seen[f"blocks.0.hook_{n}_input"]
        torch.testing.assert_close(x[:, :, 0], 2 * resid)
        torch.testing.assert_close(x[:, :, 1], resid)


def test_run_from_and_packed_rows_with_switches_on(tokens):
    from tinygpt.model import PackedRows

    model = make_model(n_layers=3)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    switch(model, True)
    with torch.no_grad():
        for layer in range(3):
            resid = cache[f"blocks.{layer}.hook_resid_pre"]
            torch.testing.assert_close(model.run_from(layer, resid), logits, rtol=0, atol=2e-5)
            torch.testing.assert_close(model.run_from(layer, resid, last_only=True), logits[:, -1:], rtol=0, atol=2e-5)
        rows = PackedRows([2, 4], cache, BATCH, POS)
        x = rows.take(cache["blocks.1.hook_resid_pre"])[None]
        out = model.run_from(1, x, past_kv_cache=rows)[0]
    torch.testing.assert_close(out, logits[rows.prompt, rows.q], rtol=0, atol=2e-5)


class Affine(nn.Module):
    """A linear layer that is not an `nn.Linear` (like the surgery and LoRA swaps): the generic per-head path."""

    def __init__(self, inner: nn.Linear):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def test_per_head_projection_of_swapped_layers_is_exact():
    torch.manual_seed(0)
    lin = nn.Linear(D_MODEL, N_HEADS * 8)
    x = torch.randn(BATCH, POS, N_HEADS, D_MODEL)
    torch.testing.assert_close(project_heads(Affine(lin), x, N_HEADS, 8), project_heads(lin, x, N_HEADS, 8))
    same = x[:, :, :1].expand(-1, -1, N_HEADS, -1)  # every head the same input: the plain projection
    torch.testing.assert_close(project_heads(lin, same, N_HEADS, 8), lin(x[:, :, 0]).view(BATCH, POS, N_HEADS, 8))
    out = nn.Linear(N_HEADS * 8, D_MODEL)
    z = torch.randn(BATCH, POS, N_HEADS, 8)
    for o in (out, Affine(out)):
        result, bias = head_results(o, z)
        torch.testing.assert_close(result.sum(2) + bias, out(z.reshape(BATCH, POS, -1)))
        torch.testing.assert_close(result[:, :, 1], z[:, :, 1] @ out.weight.T[8:16])


def test_switches_on_a_model_with_swapped_projections(tokens):
    model = make_model()
    with torch.no_grad():
        want = model(tokens)
    for block in model.blocks:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(block.attn, name, Affine(getattr(block.attn, name)))
    switch(model, True)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), want, rtol=0, atol=2e-5)
