"""Analyses across training (`tinygpt.interp.circuits.across`): a live callback and saved checkpoints give the
same values, and the worked example: the toy induction model's phase change, where the induction score's jump
lines up with the loss's steepest drop."""

from __future__ import annotations

import pytest
import torch

from tinygpt import GPT, GPTConfig, train
from tinygpt.interp import (
    AcrossTraining,
    AnalysisCallback,
    CheckpointEvery,
    across_training,
    direct_logit_attribution,
    train_induction_model,
)
from tinygpt.interp.circuits import CircuitError

pytestmark = pytest.mark.usefixtures("isolated_cache")

PROBE = torch.tensor([[10, 20, 30, 40, 50, 60, 70, 80]])


def dla_total(model) -> float:
    return direct_logit_attribution(model, PROBE, 5, 7).total()


def test_live_callback_and_saved_checkpoints_agree(make_corpus, tmp_path):
    """`AnalysisCallback` analyses the model as it trains (every 2 steps, from step 0); `CheckpointEvery` saves
    it at the same steps and `across_training` analyses the files: the same values, the loss curve from the
    history, and training itself unchanged by the analyses (same final weights as a run without them)."""
    corpus = make_corpus()
    cfg = GPTConfig(n_layers=1, d_model=32, n_heads=2, n_ctx=32)

    def run(callbacks_for):
        torch.manual_seed(0)
        model = GPT(cfg)
        cbs = callbacks_for(model)
        train(model, corpus, steps=6, ctx=16, batch_size=4, progress=False, callbacks=cbs, val_every=0)
        return model, cbs

    live_cb = {}

    def with_callbacks(model):
        live_cb["analysis"] = AnalysisCallback({"dla": dla_total, "induction": "induction"}, every=2, model=model)
        live_cb["save"] = CheckpointEvery(model, tmp_path / "ckpts", every=2)
        return [live_cb["analysis"], live_cb["save"]]

    model, _ = run(with_callbacks)
    plain, _ = run(lambda model: [])
    for a, b in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the analyses changed nothing
    live = live_cb["analysis"].result()
    assert isinstance(live, AcrossTraining) and live.steps == [0, 2, 4, 6]
    assert live.loss_steps == list(range(1, 7)) and len(live.losses) == 6
    assert len(live_cb["save"].paths) == 3
    saved = across_training(tmp_path / "ckpts", {"dla": dla_total})
    assert saved.steps == [2, 4, 6] and len(saved.sources) == 3
    torch.testing.assert_close(saved.curve("dla"), live.curve("dla")[1:], rtol=0, atol=1e-5)
    assert saved.losses == pytest.approx(live.losses) and saved.loss_steps == live.loss_steps
    assert len(live.curve("induction")) == 4
    fig = live.figure()
    assert [t.name for t in fig.data] == ["training loss", "dla", "induction"]


def test_errors(tmp_path):
    with pytest.raises(CircuitError, match="unknown analysis"):
        AnalysisCallback({"x": "nope"})
    with pytest.raises(CircuitError, match="not callable"):
        AnalysisCallback({"x": 3})
    with pytest.raises(CircuitError, match="does not know the model"):
        AnalysisCallback("induction", every=1)({"step": 1, "loss": 1.0})
    with pytest.raises(CircuitError, match="no .tinygpt files"):
        across_training(tmp_path, "induction")
    with pytest.raises(CircuitError, match="tokenizer"):
        CheckpointEvery(GPT(GPTConfig(n_layers=1, d_model=16, n_heads=2, n_ctx=8, d_vocab=10)), tmp_path, 1)
    res = AcrossTraining([5], {"a": [1.0]})
    with pytest.raises(CircuitError, match="two analysed steps"):
        res.phase_change("a")
    with pytest.raises(CircuitError, match="no analysis"):
        res.curve("b")


@pytest.mark.slow
def test_induction_phase_change():
    """The worked example: training the toy induction model (seed 0, 500 steps) with the largest induction score
    of a layer-1 head analysed every 10 steps. The score stays near 0, then jumps (to > 0.4 by the end); the step
    of its steepest rise lies within 60 steps of the steepest drop of the (smoothed) training loss, which leaves
    its plateau at the same time (measured: score jump ~270, loss drop ~280)."""
    cb = AnalysisCallback({"induction": "induction"}, every=10)
    model = train_induction_model(seed=0, callbacks=[cb], progress=False)
    res = cb.result()
    assert cb.model is model and res.steps[0] == 10 and res.steps[-1] == 500 and len(res.losses) == 500
    score = res.curve("induction")
    assert score[:10].max() < 0.1 and score[-1] > 0.4, score
    jump, drop = res.phase_change("induction"), res.loss_drop_step()
    assert 100 < jump < 450 and abs(jump - drop) <= 60, (jump, drop)
    fig = res.figure()
    assert len(fig.data) == 2 and len(fig.layout.shapes) == 2  # the two marked steps
