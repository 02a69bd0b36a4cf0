"""Path patching (`tinygpt.interp.circuits.path`, Wang et al. 2023): on the induction model the previous-token
heads reach the induction head through its key input only (K-composition), patching a last-layer head along
all its paths equals patching the head, and bad receivers are refused."""

from __future__ import annotations

import pytest
import torch
from _circuit_helpers import induction_pair

from tinygpt.config import GPTConfig
from tinygpt.interp.circuits.graph import CircuitError, edge_graph
from tinygpt.interp.circuits.path import path_patch
from tinygpt.interp.patching import PatchingError, patch_heads
from tinygpt.model import GPT

INDUCTION = "L1H0"  # the induction head of train_induction_model(seed=3) (tests/test_interp_toy.py)


@pytest.fixture(scope="module")
def pair():
    return induction_pair(8, seed=1)


def test_previous_token_heads_reach_the_induction_head_through_its_key(induction_model, pair):
    clean, corrupted, y, n = pair
    by_part = {
        p: path_patch(
            induction_model, clean, corrupted, receivers=[f"{INDUCTION}.{p}"], correct=y, incorrect=n, progress=False
        ).normalized
        for p in "qkv"
    }
    layer0 = [f"L0H{h}" for h in range(induction_model.cfg.n_heads)]
    # the corruption changes a key only: nothing reaches the query; each previous-token head carries part
    assert max(abs(by_part["q"][s]) for s in by_part["q"]) < 1e-4
    assert all(by_part["k"][s] > 0.08 for s in layer0), by_part["k"]  # (redundant: together they do more)
    assert sum(by_part["k"][s] for s in layer0) > 0.4
    assert sum(by_part["k"][s] for s in layer0) > 5 * sum(abs(by_part["v"][s]) for s in layer0)


def test_last_layer_head_along_all_its_paths_equals_patching_the_head(induction_model, pair):
    clean, corrupted, y, n = pair
    heads = patch_heads(induction_model, clean, corrupted, correct=y, incorrect=n, progress=False)
    res = path_patch(
        induction_model, clean, corrupted, sender=INDUCTION, receivers=["MLP1", "logits"], correct=y, incorrect=n
    )
    assert res.value == pytest.approx(float(heads.values[1, 0]), abs=1e-4)
    assert res.clean_metric == pytest.approx(heads.clean_metric, abs=1e-5)
    direct = path_patch(induction_model, clean, corrupted, receivers="logits", correct=y, incorrect=n, progress=False)
    assert direct.top(1)[0][0] == INDUCTION and direct.normalized[INDUCTION] > 0.5
    assert list(direct.values) == edge_graph(induction_model).senders  # embed, 8 heads, 2 MLPs
    fig = direct.figure()
    assert list(fig.data[0].x)[:2] == ["embed", "L0H0"]


def test_noising_direction_and_embed_sender(induction_model, pair):
    clean, corrupted, y, n = pair
    res = path_patch(
        induction_model,
        clean,
        corrupted,
        sender=["embed", INDUCTION],
        receivers="logits",
        correct=y,
        incorrect=n,
        direction="noising",
    )
    assert res.base_metric == res.clean_metric
    assert res.normalized[INDUCTION] > 0.3  # corrupting the induction head's direct path loses much of the answer
    # the embeddings' direct path to the logits: the same tokens at the last position, so no change
    assert abs(res.normalized["embed"]) < 1e-4


def test_bad_input_is_refused():
    model = GPT(GPTConfig(n_layers=2, d_model=32, n_heads=2, n_ctx=16, d_vocab=32))
    a, b = torch.randint(0, 32, (2, 8)), torch.randint(0, 32, (2, 8))
    with pytest.raises(CircuitError, match="not downstream"):
        path_patch(model, a, b, sender="L1H0", receivers=["L1H1.k"], correct=1, incorrect=2)
    with pytest.raises(CircuitError, match="cannot read the node name"):
        path_patch(model, a, b, sender="L1X0", receivers="logits", correct=1, incorrect=2)
    with pytest.raises(CircuitError, match="not a receiver"):
        path_patch(model, a, b, sender="L0H0", receivers="L5H0.q", correct=1, incorrect=2)
    with pytest.raises(ValueError, match="same number of tokens"):
        path_patch(model, a, b[:, :5], sender="L0H0", receivers="logits", correct=1, incorrect=2)
    with pytest.raises(PatchingError, match="scalar"):
        path_patch(model, a, b, sender="L0H0", receivers="logits", metric=lambda logits: logits[:, -1, 0])
    yoco = GPT(GPTConfig(n_layers=2, d_model=32, n_heads=2, n_ctx=16, d_vocab=32, yoco=True, yoco_window=4))
    with pytest.raises(CircuitError, match="yoco"):
        path_patch(yoco, a, b, sender="L0H0", receivers="logits", correct=1, incorrect=2)
