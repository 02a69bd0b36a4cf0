"""Evaluation: bits per byte on known cases, sliding windows, leaderboard, memorization, CLI."""

from __future__ import annotations

import math
import os
import random
import re

import pytest
import torch

from tinygpt import GPT, CorpusError, GPTConfig, save, train_bpe
from tinygpt.cli import main
from tinygpt.eval.perplexity import (
    Text,
    evaluate,
    leaderboard,
    longest_common_prefix,
    longest_common_substring,
    memorization_test,
    scored_bytes,
    sliding_windows,
)
from tinygpt.tokenizer import unicode_to_bytes

TEXT = (
    "Hark, the café's crème brûlée — naïve Zoë said “to be or not to be” 🙂.\n"
    "First Citizen: Before we proceed any further, hear me speak.\n"
    "All: Speak, speak. Résumé: 東京 and Ünïcödé.\n"
) * 3


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYGPT_CACHE_DIR", str(tmp_path / "cache"))


def small(d_vocab=256, tokenizer=None, n_ctx=64, seed=0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layers=2, d_model=32, n_heads=2, n_ctx=n_ctx, d_vocab=d_vocab), tokenizer=tokenizer).eval()


def uniform(model: GPT) -> GPT:
    with torch.no_grad():
        model.unembed.weight.zero_()  # every logit 0: the uniform distribution over d_vocab
    return model


@pytest.fixture(scope="module")
def bpe():
    return train_bpe([TEXT * 4, "Speak, speak; hear me speak."], 300, progress=False)


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


def byte_identical_bpe_pair():
    """A byte model and a BPE model (256 byte tokens, no merges, another id order) with the same weights."""
    tok = train_bpe(["abc"], 256, special_tokens=(), progress=False)
    assert tok.vocab_size == 256
    perm = torch.empty(256, dtype=torch.long)
    for ch, b in unicode_to_bytes().items():
        perm[b] = tok.tok.token_to_id(ch)
    byte_model = small(seed=3)
    with torch.no_grad():
        byte_model.unembed.weight.mul_(20)  # far from uniform, so a mismatch would show
    bpe_model = small(256, tok, seed=4)
    sd = {k: v.clone() for k, v in byte_model.state_dict().items()}
    sd["embed.weight"][perm] = byte_model.embed.weight.detach()
    sd["unembed.weight"][perm] = byte_model.unembed.weight.detach()
    bpe_model.load_state_dict(sd)
    return byte_model, bpe_model


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


# ------------------------------------------------------------------------------------------- leaderboard
def test_leaderboard_ranks_byte_and_bpe_models_on_the_same_text_and_writes_a_report(tmp_path, bpe):
    folder = tmp_path / "models"
    save(uniform(small()), folder / "uniform.tinygpt")  # bpb 8
    save(uniform(small(bpe.vocab_size, bpe)), folder / "sub" / "bpe_uniform.tinygpt")
    byte_model, _ = byte_identical_bpe_pair()
    save(byte_model, folder / "peaked.tinygpt")
    (folder / "broken.tinygpt").write_bytes(b"not a checkpoint at all")
    held = tmp_path / "held.txt"
    held.write_text(TEXT)
    board = leaderboard(folder, held, progress=False)
    assert [r.file for r in board.rows] == sorted([r.file for r in board.rows], key=lambda f: board_bpb(board, f))
    assert {r.file for r in board.rows} == {"uniform.tinygpt", "sub/bpe_uniform.tinygpt", "peaked.tinygpt"}
    assert [f for f, _ in board.skipped] == ["broken.tinygpt"]
    by = {r.file: r for r in board.rows}
    assert by["uniform.tinygpt"].bpb == pytest.approx(8.0, abs=1e-6)
    assert by["sub/bpe_uniform.tinygpt"].tokenizer == f"bpe {bpe.vocab_size}"
    assert by["sub/bpe_uniform.tinygpt"].bpb < 8.0  # fewer tokens than bytes at log2(300) bits each
    assert board.n_bytes == len(TEXT.encode())
    fig = board.figure()
    assert sum(len(t.x) for t in fig.data) == 3
    md = board.write_report(tmp_path / "out" / "report.md")
    body = md.read_text()
    assert "| 1 |" in body and "uniform.tinygpt" in body and "broken.tinygpt" in body
    html = (tmp_path / "out" / "report.bpb.html").read_text()
    assert not re.search(r"<script[^>]*src=", html) and len(html) > 1_000_000  # plotly.js embedded: works offline
    assert not [f for f in (tmp_path / "out").iterdir() if f.name.startswith(".")]  # no temp files left
    mask = os.umask(0o022)
    os.umask(mask)
    assert md.stat().st_mode & 0o777 == 0o666 & ~mask  # readable like any other file (mkstemp makes 0600)


def board_bpb(board, file):
    return next(r.bpb for r in board.rows if r.file == file)


# ------------------------------------------------------------------------------------------- memorization
def test_overlap_measures():
    assert longest_common_prefix([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert longest_common_prefix([5], [1]) == 0
    assert longest_common_substring([9, 1, 2, 3, 7], [1, 2, 3, 8, 7]) == 3
    assert longest_common_substring([1, 2], [3, 4]) == 0


def test_memorization_separates_training_examples_from_held_out_ones():
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    train_texts = ["".join(rng.choice(letters) for _ in range(32)) for _ in range(8)]
    held_texts = ["".join(rng.choice(letters) for _ in range(32)) for _ in range(8)]
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layers=2, d_model=64, n_heads=4, n_ctx=32))
    x = torch.tensor([list(t.encode()) for t in train_texts])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(400):
        loss = model(x, return_type="loss")
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.02:
            break
    model.eval()
    res = memorization_test(model, train_texts, held_texts, prefix_tokens=12, continuation_tokens=16, progress=False)
    assert res.train.n == res.heldout.n == 8
    assert res.train.exact_rate >= 0.75, res.table()
    assert res.heldout.exact_rate == 0.0 and res.heldout.mean_lcp < 2, res.table()
    assert res.train.mean_lcp > 12 and res.gap >= 0.75
    assert res.train.max_lcs >= res.train.max_lcp
    ex = res.examples["train"][0]
    assert any(t.startswith(ex["prefix"] + ex["truth"]) for t in train_texts)
    assert len(res.figure().data) == 2
    assert "verbatim" in res.table()


def test_memorization_draws_windows_from_a_single_text():
    model = small()
    res = memorization_test(model, TEXT, TEXT[::-1], prefix_tokens=8, continuation_tokens=4, n=5, progress=False)
    assert res.train.n == 5 and res.heldout.n == 5
    assert all(len(model.tokenizer.encode(e["prefix"])) == 8 for e in res.examples["train"] if e["prefix"].isascii())


# ------------------------------------------------------------------------------------------- CLI
def test_cli_eval_and_leaderboard(tmp_path, capsys, bpe):
    model = small(seed=5)
    path = save(model, tmp_path / "m" / "a.tinygpt")
    save(uniform(small(bpe.vocab_size, bpe)), tmp_path / "m" / "b.tinygpt")
    held = tmp_path / "held.txt"
    held.write_text(TEXT)
    assert main(["eval", str(path), "--corpus", str(held), "--no-progress"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    m = re.fullmatch(r"loss (\d+\.\d{3}) \| ppl (\d+\.\d{2}) \| bpb (\d+\.\d{3})", first)
    assert m, first
    ref = evaluate(model, TEXT, progress=False)
    assert float(m.group(1)) == pytest.approx(ref.loss, abs=1e-3)
    assert float(m.group(3)) == pytest.approx(ref.bpb, abs=1e-3)
    out = tmp_path / "report.md"
    assert main(["leaderboard", str(tmp_path / "m"), "--corpus", str(held), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "a.tinygpt" in printed and "b.tinygpt" in printed and out.exists()
    assert main(["eval", str(path), "--corpus", str(tmp_path / "missing.txt"), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err
    import json

    for name, texts in (("t", TEXT.splitlines()), ("h", [ln[::-1] for ln in TEXT.splitlines()])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:3]))
    args = ["memorization", str(path), "--train", str(tmp_path / "t.jsonl"), "--heldout", str(tmp_path / "h.jsonl")]
    assert main([*args, "--prefix", "6", "--continuation", "5", "-n", "3", "--no-progress"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[1].split()[:2] == ["train", "3"] and rows[2].split()[:2] == ["heldout", "3"]
