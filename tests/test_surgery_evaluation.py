"""`tinygpt.surgery.evaluation`: the validation windows and loss every surgery analysis uses."""

from __future__ import annotations

import pytest
import torch
from _surgery_helpers import make_model

from tinygpt.surgery import hqq, hqq_, validation_loss


# ------------------------------------------------------------------------------------- validation_loss
def test_validation_loss_matches_a_direct_evaluation_and_works_on_packed_models(tokens, loss_of):
    m = make_model(seed=5)
    assert validation_loss(m, tokens) == pytest.approx(loss_of(m, tokens), abs=1e-6)
    with hqq(m, 4, 32) as _:
        dense = validation_loss(m, tokens)
    hqq_(m, 4, 32, packed=True)
    assert validation_loss(m, tokens) == pytest.approx(dense, abs=1e-5)
    stream = torch.randint(0, 256, (500,), generator=torch.Generator().manual_seed(2))
    assert validation_loss(m, stream, ctx=32, n_windows=4) == pytest.approx(
        validation_loss(m, torch.stack([stream[s : s + 33] for s in (0, 155, 311, 467)])), abs=1e-6
    )
