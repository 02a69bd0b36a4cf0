"""Loss, perplexity and bits per byte (`tinygpt.eval.perplexity`): bits per byte on known cases, sliding windows,
inputs and errors, the result's figure."""

from __future__ import annotations

import math

import pytest
import torch
from _eval_helpers import TEXT, byte_identical_bpe_pair, small, uniform

from tinygpt import GPT, CorpusError, save
from tinygpt.errors import TinyGPTError
from tinygpt.eval import EvalError, EvalResult, Text, evaluate, scored_bytes, sliding_windows

pytestmark = pytest.mark.usefixtures("isolated_cache")  # conftest: TINYGPT_CACHE_DIR in the test's tmp dir


# ------------------------------------------------------------------------------------------- bits per byte
def test_uniform_byte_model_scores_exactly_8_bits_per_byte():
    res = evaluate(uniform(small()), TEXT, progress=False)
    n = len(TEXT.encode("utf-8"))
    assert res.n_tokens == n - 1 and res.n_bytes == n - 1  # the first byte is not scored
    assert res.loss == pytest.approx(math.log(256), abs=1e-6)
    assert res.bpb == pytest.approx(8.0, abs=1e-6)
    assert res.perplexity == pytest.approx(256.0, rel=1e-5)


def test_uniform_bpe_model_scores_tokens_times_log2_vocab_over_bytes(bpe):
    model = uniform(small(bpe.vocab_size, bpe))
    ids = bpe.encode(TEXT)
    assert len(ids) < len(TEXT.encode()) - 20  # merges happened: tokens are not bytes
    res = evaluate(model, TEXT, progress=False)
    n_bytes = len(TEXT.encode("utf-8")) - len(bpe.decode(ids[:1]).encode("utf-8"))
    assert res.n_tokens == len(ids) - 1
    assert res.n_bytes == n_bytes
    assert res.bpb == pytest.approx((len(ids) - 1) * math.log2(bpe.vocab_size) / n_bytes, rel=1e-6)  # fp32 log-softmax


def test_byte_tokenizer_with_chat_tokens_counts_their_bytes():
    from tinygpt import ByteTokenizer

    tok = ByteTokenizer(["<|im_start|>", "<|im_end|>"])
    text = "<|im_start|>user\nSpeak, speak.<|im_end|>\n" * 4
    ids = tok.encode(text)
    assert max(ids) == 257 and len(ids) < len(text.encode())  # the special tokens are single ids
    res = evaluate(uniform(small(tok.vocab_size, tok)), text, progress=False)
    n_bytes = len(text.encode("utf-8")) - len(tok.decode(ids[:1]).encode("utf-8"))
    assert res.n_bytes == n_bytes
    assert res.bpb == pytest.approx((len(ids) - 1) * math.log2(258) / n_bytes, rel=1e-6)


def test_bpe_byte_lengths_are_exact_also_for_split_multibyte_characters(bpe):
    text = "🙂東" + TEXT + "🙂"
    ids = bpe.encode(text)
    # the emoji is rare: it must be split into several tokens that each hold part of its 4 bytes
    assert len(bpe.encode("🙂")) > 1
    n, per = scored_bytes(bpe, torch.tensor(ids))
    assert per is not None and int(per.sum()) == len(text.encode("utf-8"))
    assert n == len(text.encode("utf-8")) - int(per[0])
    assert (per >= 1).all()


def test_byte_and_bpe_models_agree_on_bits_per_byte_when_they_are_the_same_model():
    byte_model, bpe_model = byte_identical_bpe_pair()
    a = evaluate(byte_model, TEXT, ctx=32, progress=False)
    b = evaluate(bpe_model, TEXT, ctx=32, progress=False)
    assert a.n_bytes == b.n_bytes == len(TEXT.encode()) - 1
    assert a.loss != pytest.approx(math.log(256), abs=0.1)
    assert b.bpb == pytest.approx(a.bpb, rel=1e-5)
    assert a.bpb == pytest.approx(a.loss / math.log(2), rel=1e-12)  # bytes: one byte per token


# ------------------------------------------------------------------------------------------- windows
def test_sliding_windows_score_every_target_exactly_once():
    for n in range(2, 30):
        for ctx in range(1, 9):
            for stride in range(1, ctx + 1):
                seen = []
                length = min(ctx, n - 1)
                for start, k in sliding_windows(n, ctx, stride):
                    assert 0 <= start and start + length <= n - 1 and 1 <= k <= length
                    seen.extend(range(start + length - k + 1, start + length + 1))
                assert seen == list(range(1, n)), (n, ctx, stride)


def reference_nll(model: GPT, ids: list[int], context) -> list[float]:
    """-log p(ids[i] | ids[context(i) : i]) for every i >= 1, one forward per target."""
    out = []
    with torch.no_grad():
        for i in range(1, len(ids)):
            x = torch.tensor(ids[context(i) : i])[None]
            out.append(-torch.log_softmax(model(x)[0, -1].double(), -1)[ids[i]].item())
    return out


def test_overlapping_windows_match_a_one_forward_per_token_reference():
    model = small(n_ctx=16)
    text = TEXT[:70]
    ids = model.tokenizer.encode(text)
    ctx, stride = 12, 3
    res = evaluate(model, text, ctx=ctx, stride=stride, per_token=True, progress=False)
    # with stride s every target after the first window sees at least ctx - s previous tokens; with
    # stride 1 exactly ctx of them (or all before it)
    ref1 = reference_nll(model, ids, lambda i: max(0, i - ctx))
    res1 = evaluate(model, text, ctx=ctx, stride=1, per_token=True, progress=False)
    assert res1.token_nll.tolist() == pytest.approx(ref1, abs=1e-4)
    # the first window's targets are shared by both; later ones see more context with stride 1
    assert res.token_nll[:ctx].tolist() == pytest.approx(ref1[:ctx], abs=1e-4)
    assert res.loss == pytest.approx(sum(res.token_nll) / len(ids[1:]), rel=1e-5)


def test_non_overlapping_windows_equal_the_model_loss_on_those_windows():
    model = small(n_ctx=16)
    ids = model.tokenizer.encode(TEXT)[: 4 * 16 + 1]
    res = evaluate(model, torch.tensor(ids), progress=False)
    x = torch.tensor([ids[i * 16 : i * 16 + 16] for i in range(4)])
    y = torch.tensor([ids[i * 16 + 1 : i * 16 + 17] for i in range(4)])
    with torch.no_grad():
        loss = model(x, return_type="loss", targets=y).item()
    assert res.n_tokens == 64 and res.ctx == 16 and res.stride == 16
    assert res.loss == pytest.approx(loss, rel=1e-5)


def test_inputs_and_errors(tmp_path):
    model = small()
    p = tmp_path / "held.txt"
    p.write_text(TEXT)
    assert evaluate(model, str(p), progress=False).loss == pytest.approx(evaluate(model, TEXT, progress=False).loss)
    with pytest.raises(CorpusError, match="does not exist"):
        evaluate(model, "nope/missing.txt", progress=False)
    assert evaluate(model, Text("x.txt"), progress=False).n_bytes == 4
    docs = evaluate(model, ["first doc", "second"], progress=False)
    assert docs.n_bytes == len("first doc\n\nsecond") - 1
    with pytest.raises(ValueError, match="ctx must be"):
        evaluate(model, TEXT, ctx=65, progress=False)
    with pytest.raises(ValueError, match="stride"):
        evaluate(model, TEXT, ctx=8, stride=9, progress=False)
    with pytest.raises(ValueError, match="at least 2"):
        evaluate(model, "a", progress=False)
    tail = evaluate(model, TEXT, heldout=0.5, progress=False)
    assert tail.n_tokens == pytest.approx(len(TEXT.encode()) / 2, abs=10)


# ------------------------------------------------------------------------------------------- grammar
def test_options_are_keyword_only_errors_are_tinygpt_errors_and_a_path_is_a_model(tmp_path):
    model = small()
    with pytest.raises(TypeError):
        evaluate(model, TEXT, 32)  # ctx, batch_size, stride are keyword-only
    with pytest.raises(EvalError, match="ctx must be") as info:
        evaluate(model, TEXT, ctx=0, progress=False)
    assert isinstance(info.value, TinyGPTError) and isinstance(info.value, ValueError)
    path = save(model, tmp_path / "m.tinygpt")
    assert evaluate(path, TEXT, progress=False).loss == pytest.approx(evaluate(model, TEXT, progress=False).loss)
    model.train()
    evaluate(model, TEXT, progress=False)
    assert all(m.training for m in model.modules())  # every module's training flag is restored


def test_result_details_and_figures():
    res = evaluate(small(), TEXT, ctx=32, per_token=True, progress=False)
    assert isinstance(res, EvalResult)
    assert res.details().startswith(f"{res.n_tokens:,} tokens, {res.n_bytes:,} bytes, byte tokenizer, ctx 32")
    fig = res.figure(smooth=8)
    assert len(fig.data) == 2 and len(fig.data[0].y) == res.n_tokens
    assert len(fig.data[1].y) == res.n_tokens - 7
    assert fig.data[0].y[0] == pytest.approx(res.token_nll[0] / math.log(2), rel=1e-6)  # bits
    whole = evaluate(small(), TEXT, progress=False)
    assert list(whole.figure().data[0].y) == pytest.approx([whole.bits_per_token, whole.bpb], rel=1e-6)


def test_old_module_paths_still_import():
    from tinygpt.evaluate import Text as OldText
    from tinygpt.evaluate import corpus_text, heldout_text

    assert OldText is Text
    assert heldout_text(None).endswith(corpus_text(None)[-100:])
