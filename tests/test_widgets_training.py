"""TrainingDashboard (widgets/training.py): fed by `train()`'s callbacks, and its view controls."""

from __future__ import annotations

import pytest
from _widget_helpers import tiny_model

from tinygpt import train
from tinygpt.widgets import TrainingDashboard
from tinygpt.widgets.training import ema


@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text("First Citizen: Before we proceed any further, hear me speak.\nAll: Speak, speak.\n" * 40)
    return p


def test_training_dashboard_follows_train(corpus, tmp_path):
    dash = TrainingDashboard(min_interval=1e9)  # redraw only on validation steps (and on flush)
    draws = []
    res = train(
        tiny_model(),
        corpus,
        steps=10,
        batch_size=2,
        ctx=32,
        warmup=2,
        val_every=4,
        val_split=0.2,
        val_batches=1,
        device="cpu",
        progress=False,
        cache_dir=tmp_path / "cache",
        callbacks=[dash.callback, lambda r: draws.append(len(dash.fig.data[0].x or ()))],
    )
    assert len(dash.history) == 10
    # the first step draws, then only validation steps (4, 8, 10) do
    assert draws == [1, 1, 1, 4, 4, 4, 4, 8, 8, 10]
    fig = dash.figure
    steps = [h["step"] for h in res.history]
    assert list(fig.data[0].x) == steps and list(fig.data[0].y) == pytest.approx(res.losses)
    assert list(fig.data[2].x) == [s for s, _ in res.val_losses] == [4, 8, 10]
    assert list(fig.data[2].y) == pytest.approx([v for _, v in res.val_losses])
    assert list(fig.data[3].y) == pytest.approx([h["lr"] for h in res.history])
    assert list(fig.data[1].y) == pytest.approx(ema(res.losses, dash.smoothing.value))
    assert f"{res.history[-1]['loss']:.4f}" in dash.status.value


def test_training_dashboard_controls_and_throttle():
    dash = TrainingDashboard(steps=6, min_interval=1e9, smoothing=0.0)
    recs = [{"step": i, "loss": 4.0 - 0.3 * i + (0.2 if i % 2 else 0.0), "lr": 1e-3 * i} for i in range(1, 7)]
    for r in recs[:3]:
        dash.callback(r)
    assert dash.n_draws == 1 and list(dash.fig.data[0].x) == [1]  # throttled
    assert list(dash.figure.data[0].x) == [1, 2, 3]  # reading .figure flushes
    for r in recs[3:]:
        dash.callback(r)
    assert list(dash.fig.data[0].x) == [1, 2, 3, 4, 5, 6]  # the last step (steps=6) always draws
    assert dash.progress.value == 6
    losses = [r["loss"] for r in recs]
    assert list(dash.fig.data[1].y) == pytest.approx(losses)  # smoothing 0 = raw
    dash.smoothing.value = 0.9
    assert list(dash.fig.data[1].y) == pytest.approx(ema(losses, 0.9))
    assert list(dash.fig.data[1].y) != pytest.approx(losses)
    assert list(dash.fig.data[0].y) == pytest.approx(losses)
    dash.log_y.value = True
    assert dash.fig.layout.yaxis.type == "log"
    dash.reset()
    assert dash.history == [] and list(dash.fig.data[0].x or ()) == []
    assert ema([2.0, 2.0, 2.0], 0.5) == pytest.approx([2.0, 2.0, 2.0])  # bias-corrected: no warm-up dip
