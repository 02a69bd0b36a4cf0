"""`tinygpt.surgery.restore`: exact undo, and the in-place / context-manager forms built from one function."""

from __future__ import annotations

import inspect

import pytest
import torch

from tinygpt import GPT, GPTConfig
from tinygpt.surgery import LowRankLinear, hqq, hqq_, laser, laser_, laser_compare, laser_greedy, restoring
from tinygpt.surgery.restore import one_thread


def make_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layers=2, d_model=32, n_heads=2, n_ctx=64)).eval()


def test_restoring_puts_weights_modules_and_the_log_back(snapshot, assert_bitwise_equal):
    model = make_model()
    snap, lin = snapshot(model), model.blocks[0].mlp.fc_in
    with restoring(model) as r:
        r.write_weight(lin, torch.zeros_like(lin.weight))
        r.write_weight(lin, torch.ones_like(lin.weight))  # the first write saved the original
        assert torch.equal(r.original(lin), snap["blocks.0.mlp.fc_in.weight"])
        r.swap("blocks.1.mlp.fc_out", LowRankLinear.from_linear(model.blocks[1].mlp.fc_out, 2))
        r.record({"op": "mine"})
        laser_(model, "attn.q_proj", [0], 0.5)  # an in-place call made inside the block: not this restorer's
    assert type(model.blocks[1].mlp.fc_out) is torch.nn.Linear
    assert model.mod_dict["blocks.1.mlp.fc_out"] is model.blocks[1].mlp.fc_out
    assert torch.equal(model.blocks[0].mlp.fc_in.weight, snap["blocks.0.mlp.fc_in.weight"])
    assert [e["op"] for e in model.surgery_log] == ["laser"]  # the restorer's own entry is gone, laser_'s stays
    assert not torch.equal(model.blocks[0].attn.q_proj.weight, snap["blocks.0.attn.q_proj.weight"])
    model.load_state_dict(snap)
    assert_bitwise_equal(model, snap)


def test_the_context_form_is_the_in_place_function_undone(tokens, snapshot, assert_bitwise_equal, loss_of):
    model = make_model()
    snap = snapshot(model)
    assert list(inspect.signature(laser).parameters) == list(inspect.signature(laser_).parameters)
    assert list(inspect.signature(hqq).parameters) == list(inspect.signature(hqq_).parameters)
    with hqq(model, 4, 32, "attn") as report:
        assert report.entries and not torch.equal(
            model.blocks[0].attn.q_proj.weight, snap["blocks.0.attn.q_proj.weight"]
        )
        kept = laser_(model, "mlp.fc_out", [1], 0.25)  # made inside the block, not by it: it stays
    assert torch.equal(model.blocks[0].attn.q_proj.weight, snap["blocks.0.attn.q_proj.weight"])
    assert kept.entries[0].rank_kept == 8 and int(torch.linalg.matrix_rank(model.blocks[1].mlp.fc_out.weight)) == 8
    assert [e["op"] for e in model.surgery_log] == ["laser"]
    model.load_state_dict(snap)
    with pytest.raises(TypeError), laser(model, "mlp", [0], 0.1, mystery=True):  # bound as laser_'s arguments
        pass
    assert_bitwise_equal(model, snap)


def test_reports_and_results_draw_themselves(tokens):
    model = make_model()
    with laser(model, "mlp", [0], 0.25) as lr, hqq(model, 3, 32, "attn", [1]) as hr:
        assert len(lr.figure().data[0].x) == 2 and len(hr.figure().data) == 2
    assert len(hqq_(make_model(), 4, 32, "mlp", optimize=False).figure().data) == 1  # RTN only: one bar series
    greedy = laser_greedy(model, tokens, "mlp.fc_in", [1], (0.5, 0.1), progress=False)
    assert len(greedy.figure().data) == 2
    cmp = laser_compare(model, "mlp.fc_in", 0, 0.5, tokens, max_new_tokens=4)
    assert list(cmp.figure().data[0].y) == [cmp.loss_before, cmp.loss_after]


def test_one_thread_restores_the_thread_count():
    n = torch.get_num_threads()
    with one_thread():
        assert torch.get_num_threads() == 1
    with one_thread(on=False):
        assert torch.get_num_threads() == n
    assert torch.get_num_threads() == n
