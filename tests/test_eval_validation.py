"""The loss on fixed held-out windows (`tinygpt.eval.validation`): equal to a direct computation, the same windows
every time, reusable windows, any kind of input."""

from __future__ import annotations

import pytest
import torch
from _eval_helpers import TEXT, small

from tinygpt import save
from tinygpt.eval import EvalError, ValidationWindows, validation_loss, validation_windows

pytestmark = pytest.mark.usefixtures("isolated_cache")  # conftest: TINYGPT_CACHE_DIR in the test's tmp dir


def direct_loss(model, x, y) -> float:
    with torch.no_grad():
        return float(model(x, return_type="loss", targets=y))


def test_token_batches_are_scored_as_given(tokens):
    model = small()
    assert validation_loss(model, tokens) == pytest.approx(direct_loss(model, tokens[:, :-1], tokens[:, 1:]), abs=1e-6)
    with pytest.raises(EvalError, match="at least 2 positions"):
        validation_loss(model, tokens[:, :1])


def test_a_stream_is_cut_into_evenly_spaced_windows_and_they_can_be_reused():
    model = small()
    stream = torch.tensor(list(TEXT.encode("utf-8")) * 4)
    w = validation_windows(model, stream, ctx=32, n_windows=4, batch_size=3)
    assert isinstance(w, ValidationWindows) and w.x.shape == w.y.shape == (4, 32) and w.n_tokens == 128
    assert torch.equal(w.x[:, 1:], w.y[:, :-1])
    assert [len(x) for x, _ in w.batches()] == [3, 1]
    loss = validation_loss(model, stream, ctx=32, n_windows=4)
    assert validation_loss(model, w) == pytest.approx(loss, abs=1e-6)
    assert loss == pytest.approx(direct_loss(model, w.x, w.y), abs=1e-5)
    assert validation_windows(model, w) is w


def test_text_corpus_files_paths_and_the_training_flags(tmp_path):
    model = small()
    text = validation_loss(model, TEXT, ctx=16, n_windows=3)
    ids = torch.tensor(model.tokenizer.encode(TEXT))
    assert text == pytest.approx(validation_loss(model, ids, ctx=16, n_windows=3))
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT * 20)
    held = validation_windows(model, corpus, ctx=16, n_windows=3, progress=False)
    whole = validation_windows(model, corpus, ctx=16, n_windows=3, val_fraction=0, progress=False)
    assert held.x.shape == whole.x.shape == (3, 16) and not torch.equal(held.x, whole.x)
    path = save(model, tmp_path / "m.tinygpt")
    assert validation_loss(path, corpus, ctx=16, n_windows=3, progress=False) == pytest.approx(
        validation_loss(model, corpus, ctx=16, n_windows=3, progress=False), abs=1e-6
    )
    model.train()
    validation_loss(model, TEXT, ctx=16)
    assert all(m.training for m in model.modules())
    with pytest.raises(EvalError, match="at least 2"):
        validation_loss(model, [5])
    with pytest.raises(EvalError, match="1-D token stream"):
        validation_loss(model, torch.zeros(2, 2, 2, dtype=torch.long))
