"""One grammar for every training function: a `TrainResult` with `.figure()`, and `resume=` continuing the run.

Each function runs 2 steps into `out`, then `resume=True, steps=4` continues the same file to step 4; the resumed
run's first two records are the first run's (`start_run` and `resume_run` are shared by all of them).
"""

from __future__ import annotations

import pytest
import torch

import tinygpt
from tinygpt import GPT, CheckpointError, GPTConfig, TrainResult, read_checkpoint
from tinygpt.training.run import corpus_from_record, corpus_record, start_run
from tinygpt.training.settings import RunOptions

pytestmark = pytest.mark.usefixtures("isolated_cache")

FAST = dict(batch_size=2, ctx=16, warmup=1, val_every=0, val_split=0.1, device="cpu", progress=False)
RECORDS = [{"instruction": f"Who is number {i}?", "response": f"I am number {i}."} for i in range(6)]


def tiny_model(seed: int = 0, n_ctx: int = 32) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layers=1, d_model=32, n_heads=2, n_ctx=n_ctx))


def run_fn(name: str, corpus, out, **kw):
    """Call training function `name` with its model and data; `resume=True` passes no model (nor data, except
    what only memory held)."""
    resume = kw.get("resume", False)
    model = None if resume else tiny_model()
    if name == "train":
        return tinygpt.train(model, None if resume else corpus, **FAST, out=out, **kw)
    if name == "finetune":
        return tinygpt.finetune(model, None if resume else corpus, **FAST, out=out, **kw)
    if name == "sft":
        model = None if resume else tiny_model(n_ctx=96)
        return tinygpt.sft(model, RECORDS, **{**FAST, "ctx": 96}, out=out, **kw)  # records in memory: pass again
    if name == "distill":
        teacher = tiny_model(1)  # in memory: passed again (its fingerprint is checked)
        return tinygpt.distill(model, teacher, None if resume else corpus, **FAST, out=out, **kw)
    if name == "es":
        es_kw = dict(population=4, batch_size=2, ctx=16, val_every=0, progress=False)
        return tinygpt.es(model, None if resume else corpus, out=out, **es_kw, **kw)
    if name == "lora_finetune":
        return tinygpt.lora_finetune(tiny_model(), corpus, **FAST, out=out, rank=2, **kw)
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["train", "finetune", "sft", "distill", "es", "lora_finetune"])
def test_every_training_function_returns_a_train_result_and_resumes(name, make_corpus, tmp_path):
    corpus = make_corpus()
    out = tmp_path / ("run.lora" if name == "lora_finetune" else "run.tinygpt")
    first = run_fn(name, corpus, out, steps=2)
    assert isinstance(first, TrainResult) and first.step == 2 and len(first.history) == 2
    assert first.figure().data  # plotly, imported inside .figure()
    more = run_fn(name, corpus, out, steps=4, resume=True)
    assert isinstance(more, type(first)) and more.step == 4
    assert [h["step"] for h in more.history] == [1, 2, 3, 4]
    key = "reward" if name == "es" else "loss"
    assert [h[key] for h in more.history[:2]] == [h[key] for h in first.history]
    assert more.figure().data


def test_resuming_another_functions_checkpoint_says_which_function_wrote_it(make_corpus, tmp_path):
    out = tmp_path / "plain.tinygpt"
    tinygpt.train(tiny_model(), make_corpus(), steps=1, out=out, **FAST)
    with pytest.raises(CheckpointError, match=r"cannot resume sft from .*not written by sft\(\)"):
        tinygpt.sft(None, None, resume=True, out=out, device="cpu", progress=False)
    with pytest.raises(CheckpointError, match=r"not written by finetune\(\)"):
        start_run(RunOptions(out=out, resume=True), {}, what="finetune", record="finetune")
    run = start_run(RunOptions(out=out, resume=True), {"steps": 3}, what="train")
    assert run.config.steps == 3 and run.resumed.step == 1 and run.corpus(None) == str(make_corpus())
    assert read_checkpoint(out).train_state["corpus"] == str(make_corpus())


def test_corpus_records_round_trip(make_corpus):
    from tinygpt import load_corpus

    p = make_corpus()
    assert corpus_record(None, load_corpus(None)) is None and corpus_record(p, load_corpus(p)) == str(p)
    c = load_corpus(p)
    back = corpus_from_record(corpus_record(c, c))
    assert (back.name, back.files, back.kind, back.text_field) == (c.name, c.files, c.kind, c.text_field)
