"""The router readout (`tinygpt.interp.routing`): a routed block's sub-sequence back at token positions, and
`read_routing` against the hook points it reads, for mixture-of-experts and mixture-of-depths models."""

from __future__ import annotations

import math

import pytest
import torch

from tinygpt import GPT, GPTConfig
from tinygpt.interp import Routing, read_routing
from tinygpt.interp.routing import at_positions, moe_layers, routed_layers, routed_slots, scatter_routed


def test_layout_helpers_agree_with_a_loop():
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    idx, valid = routed_slots(mask)
    assert idx.shape == valid.shape == (3, 3)
    assert idx[0].tolist() == [0, 2, 3] and valid.sum(1).tolist() == [3, 1, 0] and idx[1, 0] == 2
    x = torch.arange(3 * 3 * 2, dtype=torch.float32).reshape(3, 3, 2)  # [batch, slots, d]
    out = at_positions(x, mask.float(), fill=-1.0)  # float masks: > 0.5 = routed
    for r in range(3):
        pos = mask[r].nonzero()[:, 0].tolist()
        for p in range(5):
            want = x[r, pos.index(p)] if p in pos else torch.full((2,), -1.0)
            assert torch.equal(out[r, p], want), (r, p)
    pattern = torch.rand(3, 2, 3, 3)
    full = scatter_routed(pattern, mask)
    assert full.shape == (3, 2, 5, 5)
    torch.testing.assert_close(full[0][:, [0, 2, 3]][:, :, [0, 2, 3]], pattern[0])
    assert full[0, :, 1].isnan().all() and full[2].isnan().all()


@pytest.fixture(scope="module")
def routed_moe():
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layers=2, d_model=32, n_heads=2, n_ctx=48, moe_experts=4, moe_topk=2, mod=True)).eval()
    with torch.no_grad():
        m.blocks[1].router.weight.normal_(0, 1.0)  # block 1 routes some tokens and skips others
    return m


def test_read_routing_matches_the_hook_points(routed_moe):
    m = routed_moe
    assert routed_layers(m) == [1] and moe_layers(m) == [0, 1]
    prompt = "To be, or not to be"
    m.train()
    r = read_routing(m, prompt)
    assert m.training  # the mode is restored
    m.eval()
    assert r and r.n_experts == 4 and r.str_tokens == list(prompt)
    names = ["blocks.1.hook_routing_mask", "blocks.1.hook_router_scores"]
    names += [f"blocks.{i}.moe.hook_{w}" for i in (0, 1) for w in ("expert_indices", "expert_weights", "router_logits")]
    _, cache = m.run_with_cache(m.to_tokens(prompt), names_filter=names)
    mask = cache["blocks.1.hook_routing_mask"][0]
    assert 0 < int(mask.sum()) < len(prompt)
    assert torch.equal(r.mod[1][0], mask) and torch.equal(r.mod[1][1], cache["blocks.1.hook_router_scores"][0])
    assert torch.equal(r.experts[0][0], cache["blocks.0.moe.hook_expert_indices"][0])  # a dense block: as is
    idx, w = r.experts[1]  # inside the routed block: at token positions, -1 / 0 / NaN where skipped
    pos = mask.nonzero()[:, 0]
    k = len(pos)
    assert torch.equal(idx[pos], cache["blocks.1.moe.hook_expert_indices"][0, :k])
    assert (idx[~mask] == -1).all() and (w[~mask] == 0).all() and r.probs[1][~mask].isnan().all()
    torch.testing.assert_close(r.probs[1][pos], cache["blocks.1.moe.hook_router_logits"][0, :k].softmax(-1))
    load = r.load()
    assert load.shape == (2, 4)
    torch.testing.assert_close(load.sum(1), torch.ones(2))
    fig = r.figure(layer=1)
    assert [t.name for t in fig.data] == ["experts", "load", "routing"]
    assert "layer 1" in fig.layout.annotations[0].text
    assert fig.data[0].customdata[0][int((~mask).nonzero()[0, 0])] is None  # skipped token: a blank hover
    assert math.isclose(fig.data[1].z[0][0], float(load[0, 0]))


def test_read_routing_of_a_dense_model_is_empty():
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layers=1, d_model=16, n_heads=2, n_ctx=16)).eval()
    r = read_routing(m, [1, 2, 3])
    assert not r and isinstance(r, Routing) and r.str_tokens == ["\x01", "\x02", "\x03"]
    with pytest.raises(ValueError, match="one sequence"):
        read_routing(m, torch.zeros(2, 3, dtype=torch.long))
