"""`train()`: learning, exact resumption, divergence handling, callbacks, schedules and settings."""

from __future__ import annotations

import math

import pytest
import torch

from tinygpt import (
    GPT,
    CheckpointError,
    CorpusError,
    GPTConfig,
    TrainConfig,
    TrainingDiverged,
    load,
    read_checkpoint,
    train,
)

SENTENCE = "The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs.\n"


pytestmark = pytest.mark.usefixtures("isolated_cache")


@pytest.fixture
def corpus(make_corpus):
    """~4 KB of varied English (several sentences, repeated)."""
    return make_corpus()


def run(corpus, tmp_path, **kw):
    """A tiny CPU run: nano preset (2 layers, d_model 64), short windows, no progress bar."""
    settings = dict(
        preset="nano",
        steps=4,
        batch_size=2,
        ctx=32,
        warmup=2,
        val_every=0,
        val_split=0.1,
        val_batches=2,
        device="cpu",
        progress=False,
        cache_dir=tmp_path / "cache",
    )
    settings.update(kw)
    return train(corpus=corpus, **settings)


def assert_same_weights(a: GPT, b: GPT) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ------------------------------------------------------------------------------------------------ learning
def test_overfits_repeated_text(tmp_path):
    p = tmp_path / "repeat.txt"
    p.write_text(SENTENCE * 60)  # ~5 KB
    res = run(
        p, tmp_path, steps=150, batch_size=8, ctx=64, max_lr=3e-3, lr_schedule="constant", warmup=0, weight_decay=0.0
    )
    assert res.losses[0] > 4.0  # starts near log(256) = 5.5
    tail = res.losses[-10:]
    assert sum(tail) / len(tail) < 0.1, tail
    # the trained model reproduces the text greedily
    from tinygpt import generate

    out = generate(res.model, "The quick brown fox", 40, temperature=0)
    assert out == (SENTENCE * 2)[: len("The quick brown fox") + 40]


# ------------------------------------------------------------------------------------------------ resume
def test_resume_is_exact(corpus, tmp_path):
    common = dict(steps=12, save_every=4, val_every=4)
    a = run(corpus, tmp_path, out=tmp_path / "a.tinygpt", **common)
    assert not a.interrupted and a.step == 12

    def interrupt(rec):
        if rec["step"] == 6:
            raise KeyboardInterrupt

    b_path = tmp_path / "b.tinygpt"
    b1 = run(corpus, tmp_path, out=b_path, callbacks=[interrupt], **common)
    assert b1.interrupted and b1.step == 6 and b1.path == b_path
    assert read_checkpoint(b_path).train_state["step"] == 6
    b2 = train(resume=True, out=b_path, device="cpu", progress=False, cache_dir=tmp_path / "cache")
    assert not b2.interrupted
    assert [h["step"] for h in b2.history] == list(range(1, 13))
    assert b2.losses == a.losses
    assert b2.val_losses == a.val_losses and [s for s, _ in a.val_losses] == [4, 8, 12]
    assert [h["lr"] for h in b2.history] == [h["lr"] for h in a.history]
    assert_same_weights(a.model, b2.model)
    assert_same_weights(load(tmp_path / "a.tinygpt"), load(b_path))
    assert read_checkpoint(b_path).train_state["step"] == 12


def test_resume_can_extend_a_finished_run(corpus, tmp_path):
    path = tmp_path / "m.tinygpt"
    first = run(corpus, tmp_path, out=path, steps=3)
    more = train(resume=True, out=path, steps=5, device="cpu", progress=False, cache_dir=tmp_path / "cache")
    assert [h["step"] for h in more.history] == [1, 2, 3, 4, 5]
    assert more.losses[:3] == first.losses
    assert read_checkpoint(path).train_state["step"] == 5


def test_resume_finds_a_corpus_object_again(tmp_path):
    """A `Corpus` object (here JSONL with another text field) is recorded so resume=True can rebuild it."""
    import json

    from tinygpt import load_corpus

    p = tmp_path / "docs.jsonl"
    p.write_text(
        "".join(json.dumps({"body": f"Document {i}: all the world's a stage. " * 3}) + "\n" for i in range(60))
    )
    path = tmp_path / "m.tinygpt"
    first = run(load_corpus(p, text_field="body"), tmp_path, out=path, steps=2)
    more = train(resume=True, out=path, steps=3, device="cpu", progress=False, cache_dir=tmp_path / "cache")
    assert more.losses[:2] == first.losses and more.step == 3
    p.unlink()
    with pytest.raises(CorpusError, match="no longer exist"):
        train(resume=True, out=path, steps=4, device="cpu", progress=False, cache_dir=tmp_path / "cache")


def test_resume_errors(tmp_path):
    with pytest.raises(ValueError, match="out="):
        train(resume=True, device="cpu", progress=False)
    with pytest.raises(CheckpointError, match="does not exist"):
        train(resume=True, out=tmp_path / "none.tinygpt", device="cpu", progress=False)
    inference_only = GPT(GPTConfig(n_layers=1, d_model=32, n_heads=2, n_ctx=32)).save(tmp_path / "inf.tinygpt")
    with pytest.raises(CheckpointError, match="no training state"):
        train(resume=True, out=inference_only, device="cpu", progress=False)


# ------------------------------------------------------------------------------------------------ NaN
def test_nan_loss_raises_and_keeps_checkpoint(corpus, tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layers=2, d_model=32, n_heads=2, n_ctx=32))
    path = tmp_path / "m.tinygpt"
    saved = {}

    def poison(rec):
        if rec["step"] == 2:  # just after the step-2 checkpoint
            saved["bytes"] = path.read_bytes()
            with torch.no_grad():
                model.blocks[0].mlp.fc_in.weight[0, 0] = float("nan")

    with pytest.raises(TrainingDiverged) as info:
        train(
            model,
            corpus,
            steps=6,
            batch_size=2,
            ctx=32,
            save_every=2,
            val_every=0,
            out=path,
            callbacks=[poison],
            device="cpu",
            progress=False,
            cache_dir=tmp_path / "cache",
        )
    msg = str(info.value)
    assert "nan" in msg and "step 3" in msg
    assert str(path) in msg and "(step 2)" in msg and "kept" in msg
    assert "max-lr" in msg  # says what to do
    assert path.read_bytes() == saved["bytes"]
    good = load(path)
    assert good.train_state["step"] == 2
    assert all(torch.isfinite(t).all() for t in good.state_dict().values())


def test_huge_learning_rate_diverges(corpus, tmp_path):
    with pytest.raises(TrainingDiverged, match="Lower --max-lr"):
        run(corpus, tmp_path, steps=30, warmup=0, max_lr=1e6, min_lr=1e6, grad_clip=0.0, lr_schedule="constant")


# ------------------------------------------------------------------------------------------------ callbacks
def test_callbacks_receive_metrics(corpus, tmp_path):
    seen = []
    res = run(corpus, tmp_path, steps=5, val_every=2, callbacks=[seen.append])
    assert [r["step"] for r in seen] == [1, 2, 3, 4, 5]
    assert seen == res.history
    for r in seen:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_sec", "tokens_seen", "elapsed"} <= set(r)
        assert math.isfinite(r["loss"]) and r["tokens_per_sec"] > 0
        assert r["lr"] == res.config.lr_at(r["step"] - 1)
        assert r["tokens_seen"] == r["step"] * 2 * 32
    assert [r["step"] for r in seen if "val_loss" in r] == [2, 4, 5]  # every 2 steps and at the end
    assert all(math.isfinite(r["val_loss"]) for r in seen if "val_loss" in r)

    fig = res.figure()
    names = [t.name for t in fig.data]
    assert {"train loss", "val loss", "lr"} <= set(names)
    train_trace = fig.data[names.index("train loss")]
    assert list(train_trace.y) == res.losses
    assert list(fig.data[names.index("val loss")].x) == [2, 4, 5]


def test_figure_rows_traces_smoothing_and_log_scale():
    from tinygpt.training import TrainResult
    from tinygpt.training.curves import ema

    history = [{"step": s, "loss": 4.0 / s + (0.3 if s % 2 else 0.0), "lr": 1e-3 * s} for s in range(1, 9)]
    for s in (4, 8):
        history[s - 1]["val_loss"] = 3.0 / s
    res = TrainResult(model=None, config=None, history=history)
    fig = res.figure(smoothing=0.9, log_y=True, title="run 1")
    assert [t.name for t in fig.data] == ["train loss", "train loss (smoothed)", "val loss", "lr"]
    losses = [h["loss"] for h in history]
    assert list(fig.data[0].x) == list(range(1, 9)) and list(fig.data[0].y) == losses
    assert list(fig.data[1].y) == pytest.approx(ema(losses, 0.9)) and list(fig.data[1].y) != pytest.approx(losses)
    assert (list(fig.data[2].x), list(fig.data[2].y)) == ([4, 8], [0.75, 0.375])
    assert list(fig.data[3].y) == [h["lr"] for h in history]
    # losses in row 1 (the top), the learning rate in row 2 below, sharing the step axis
    assert [t.yaxis for t in fig.data] == ["y", "y", "y", "y2"] and fig.layout.yaxis.domain[
        0
    ] > fig.layout.yaxis2.domain[1]
    assert fig.layout.yaxis.type == "log" and fig.layout.title.text == "run 1"
    plain = res.figure()  # the defaults: linear, smoothing 0.6
    assert plain.layout.yaxis.type == "linear" and list(plain.data[1].y) == pytest.approx(ema(losses, 0.6))
    assert list(res.figure(smoothing=0).data[1].y) == pytest.approx(losses)
    empty = TrainResult(model=None, config=None).figure()  # no steps yet (the live dashboard's start)
    assert [len(t.x) for t in empty.data] == [0, 0, 0, 0] and not any(t.showlegend for t in empty.data)
    with pytest.raises(ValueError, match="smoothing"):
        res.figure(smoothing=1.0)


# ------------------------------------------------------------------------------------------------ schedule
def test_lr_warmup_is_linear():
    cfg = TrainConfig(steps=100, warmup=10, max_lr=1e-3, min_lr=1e-4)
    warm = [cfg.lr_at(s) for s in range(10)]
    assert warm == pytest.approx([1e-3 * (s + 1) / 10 for s in range(10)])
    assert cfg.lr_at(10) == pytest.approx(1e-3)


def test_lr_cosine_decays_to_min_lr():
    cfg = TrainConfig(steps=100, warmup=10, max_lr=1e-3, min_lr=1e-4)
    lrs = [cfg.lr_at(s) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # non-increasing after warmup
    assert cfg.lr_at(55) == pytest.approx(5.5e-4)  # halfway: the midpoint of max and min
    assert cfg.lr_at(99) == pytest.approx(1e-4, abs=1e-3 * 1e-3)  # the last step is at min_lr
    assert cfg.lr_at(100) == pytest.approx(1e-4) and cfg.lr_at(500) == pytest.approx(1e-4)
    assert TrainConfig(max_lr=1e-3).min_lr == pytest.approx(1e-4)  # default min_lr = max_lr / 10


def test_lr_constant():
    cfg = TrainConfig(steps=50, warmup=5, max_lr=2e-3, lr_schedule="constant")
    assert [cfg.lr_at(s) for s in range(5, 50)] == [2e-3] * 45
    assert cfg.lr_at(0) == pytest.approx(4e-4)
    assert TrainConfig(steps=3, warmup=0, max_lr=1e-3, lr_schedule="constant").lr_at(0) == 1e-3


# --------------------------------------------------------------------------------------- accumulation
def test_gradient_accumulation_matches_larger_batch(corpus, tmp_path):
    a = run(corpus, tmp_path, steps=4, batch_size=2, accum=2)
    b = run(corpus, tmp_path, steps=4, batch_size=4, accum=1)
    assert a.losses == pytest.approx(b.losses, abs=1e-5)
    assert [h["grad_norm"] for h in a.history] == pytest.approx([h["grad_norm"] for h in b.history], rel=1e-4)
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.allclose(va, vb, atol=1e-5), k
    assert a.history[-1]["tokens_seen"] == b.history[-1]["tokens_seen"] == 4 * 4 * 32


def test_bfloat16_autocast(corpus, tmp_path):
    res = run(corpus, tmp_path, steps=3, dtype="bfloat16", val_every=3)
    assert len(res.losses) == 3 and all(math.isfinite(x) for x in res.losses + [res.final_val_loss])
    assert res.model.embed.weight.dtype == torch.float32  # autocast, fp32 master weights
    fp32 = run(corpus, tmp_path, steps=1)
    assert res.losses[0] == pytest.approx(fp32.losses[0], rel=0.05)  # same batch, same init


# ------------------------------------------------------------------------------------------------ settings
def test_bad_settings(corpus, tmp_path):
    with pytest.raises(ValueError, match="steps=0"):
        run(corpus, tmp_path, steps=0)
    with pytest.raises(ValueError, match="lr_schedule"):
        run(corpus, tmp_path, lr_schedule="linear")
    with pytest.raises(ValueError, match="dtype"):
        run(corpus, tmp_path, dtype="float16")
    with pytest.raises(ValueError, match="min_lr"):
        run(corpus, tmp_path, max_lr=1e-3, min_lr=1e-2)
    model = GPT(GPTConfig(n_layers=1, d_model=32, n_heads=2, n_ctx=32))
    with pytest.raises(ValueError, match=r"ctx=64 exceeds the model's n_ctx=32"):
        train(model, corpus, steps=1, ctx=64, device="cpu", progress=False, cache_dir=tmp_path / "cache")
    with pytest.raises(TypeError, match="bogus"):
        run(corpus, tmp_path, bogus=1)


def test_corpus_too_small(tmp_path):
    p = tmp_path / "small.txt"
    p.write_text("tiny corpus\n")
    with pytest.raises(ValueError, match="too few"):
        run(p, tmp_path, val_split=0.0)


def test_new_model_sized_for_tokenizer_and_ctx(corpus, tmp_path):
    res = run(corpus, tmp_path, steps=1, ctx=160, batch_size=1, val_split=0.2)  # nano has n_ctx 128
    assert res.model.cfg.n_ctx == 160 and res.config.ctx == 160
    assert res.model.cfg.d_vocab == 256 and res.model.cfg.n_layers == 2
    assert repr(res).startswith("TrainResult(step 1, loss ")
