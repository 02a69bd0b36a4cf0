"""Tokenizers: the lossless byte tokenizer and trained byte-level BPE (save, reload, fingerprint, errors)."""

from __future__ import annotations

import json
import random

import pytest

from tinygpt import BPETokenizer, ByteTokenizer, TokenizerError, load_tokenizer, train_bpe

TRAIN_TEXT = [
    "To be, or not to be, that is the question:\n"
    "Whether 'tis nobler in the mind to suffer\n"
    "The slings and arrows of outrageous fortune,\n"
    "Or to take arms against a sea of troubles\n"
    "And by opposing end them. To die: to sleep;\n",
    "No more; and by a sleep to say we end\n"
    "The heart-ache and the thousand natural shocks\n"
    "That flesh is heir to, 'tis a consummation\n"
    "Devoutly to be wish'd. To die, to sleep;\n",
] * 3

OTHER_TEXT = [
    "def main():\n    for i in range(10):\n        print(i * i)\n    return None\n",
    "import numpy as np\nx = np.zeros((3, 4))\ny = x.sum(axis=0)\nprint(y.shape)\n",
] * 4

HARD_TEXTS = [
    "",
    "hello world",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\nand\u00a0nbsp",
    "emoji: 😀🎉👩‍👩‍👧 and flags 🇫🇷",
    "中文字符和日本語のテキスト、한국어",
    "combining: e\u0301 a\u0308 — dashes “quotes” …",
    "control \x00\x01\x1f\x7f chars",
    "never seen in training: Zyzzyva QXJ 0123456789 {}[]<>~^",
    "<|endoftext|> is written as plain text here",
]


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return train_bpe(TRAIN_TEXT, 320, progress=False)


def random_unicode(rng: random.Random, n: int) -> str:
    """Random code points from several planes (no surrogates, which are not valid UTF-8)."""
    ranges = [(0x20, 0x7E), (0x00, 0x1F), (0xA0, 0x2FF), (0x4E00, 0x4FFF), (0x1F300, 0x1F6FF), (0xE000, 0xE0FF)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


# ------------------------------------------------------------------------------------------- bytes
@pytest.mark.parametrize("text", HARD_TEXTS)
def test_byte_tokenizer_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    assert tok.encode_array(text).tolist() == ids


def test_byte_tokenizer_multibyte_lengths():
    tok = ByteTokenizer()
    assert len(tok.encode("é")) == 2
    assert len(tok.encode("中")) == 3
    assert len(tok.encode("😀")) == 4


def test_byte_tokenizer_arbitrary_bytes():
    tok = ByteTokenizer()
    every = bytes(range(256))
    assert tok.encode_bytes(every) == list(range(256))
    assert tok.decode_bytes(tok.encode_bytes(every)) == every
    rng = random.Random(0)
    blob = bytes(rng.randrange(256) for _ in range(1000))
    assert tok.decode_bytes(tok.encode_bytes(blob)) == blob
    # Invalid UTF-8 still decodes to text (with replacement characters) instead of raising.
    assert "\ufffd" in tok.decode([0xFF, 0xFE, 0x41])


def test_byte_tokenizer_metadata():
    tok = ByteTokenizer()
    assert tok.vocab_size == len(tok) == 256
    assert tok.token_str(ord("a")) == "a"
    assert tok.token_str(0xC3) == "\\xc3"  # half of a multi-byte character stays readable
    assert load_tokenizer(tok.to_dict()).fingerprint == tok.fingerprint
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    assert isinstance(load_tokenizer(None), ByteTokenizer)


# --------------------------------------------------------------------------------------------- BPE
def test_bpe_trains_requested_vocab_and_merges(bpe):
    assert bpe.vocab_size == 320
    assert bpe.eos_id is not None and bpe.token_str(bpe.eos_id) == "<|endoftext|>"
    text = "To be, or not to be"
    assert len(bpe.encode(text)) < len(text.encode("utf-8"))  # it really learned merges


@pytest.mark.parametrize("text", HARD_TEXTS)
def test_bpe_round_trip_is_lossless(bpe, text):
    ids = bpe.encode(text)
    assert all(0 <= i < bpe.vocab_size for i in ids)
    assert bpe.decode(ids) == text


def test_bpe_round_trip_random_unicode(bpe):
    rng = random.Random(1234)
    for _ in range(50):
        text = random_unicode(rng, rng.randint(1, 60))
        assert bpe.decode(bpe.encode(text)) == text


def test_bpe_batch_encoding_matches_single(bpe):
    assert bpe.encode_batch(HARD_TEXTS) == [bpe.encode(t) for t in HARD_TEXTS]


def test_bpe_save_and_reload(bpe, tmp_path):
    path = bpe.save(tmp_path / "tok")
    assert path == tmp_path / "tok" / "tokenizer.json"
    json.loads(path.read_text(encoding="utf-8"))  # valid JSON, readable by other tools
    from_dir = load_tokenizer(tmp_path / "tok")
    from_file = load_tokenizer(str(path))
    for again in (from_dir, from_file):
        assert isinstance(again, BPETokenizer)
        assert again.vocab_size == bpe.vocab_size
        assert again.fingerprint == bpe.fingerprint
        assert again.eos_id == bpe.eos_id
        for text in HARD_TEXTS:
            assert again.encode(text) == bpe.encode(text)


def test_train_bpe_out_writes_directory(tmp_path):
    tok = train_bpe(TRAIN_TEXT, 300, out=tmp_path / "trained", progress=False)
    assert (tmp_path / "trained" / "tokenizer.json").is_file()
    assert tok.source == str(tmp_path / "trained" / "tokenizer.json")
    again = load_tokenizer(tmp_path / "trained")
    assert again.fingerprint == tok.fingerprint
    assert again.encode(TRAIN_TEXT[0]) == tok.encode(TRAIN_TEXT[0])


def test_bpe_to_dict_round_trip(bpe):
    record = bpe.to_dict()
    record = json.loads(json.dumps(record))  # as stored in a checkpoint manifest
    again = load_tokenizer(record)
    assert again.fingerprint == bpe.fingerprint
    for text in HARD_TEXTS:
        assert again.encode(text) == bpe.encode(text)


def test_fingerprint_depends_on_content_not_size(bpe):
    other = train_bpe(OTHER_TEXT, bpe.vocab_size, progress=False)
    assert other.vocab_size == bpe.vocab_size
    assert other.fingerprint != bpe.fingerprint
    assert train_bpe(TRAIN_TEXT, bpe.vocab_size, progress=False).fingerprint == bpe.fingerprint
    assert ByteTokenizer().fingerprint not in (bpe.fingerprint, other.fingerprint)


def test_load_tokenizer_passes_objects_through(bpe):
    assert load_tokenizer(bpe) is bpe
    wrapped = load_tokenizer(bpe.tok)  # a raw `tokenizers.Tokenizer`
    assert isinstance(wrapped, BPETokenizer) and wrapped.fingerprint == bpe.fingerprint


# ------------------------------------------------------------------------------------------ errors
def test_missing_path_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(TokenizerError, match="does not exist") as info:
        load_tokenizer(str(missing))
    assert str(missing) in str(info.value)


def test_directory_without_tokenizer_json_is_a_clear_error(tmp_path):
    (tmp_path / "README.txt").write_text("not a tokenizer")
    with pytest.raises(TokenizerError, match="no tokenizer.json") as info:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_other_load_errors(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match="could not parse"):
        load_tokenizer(bad)
    with pytest.raises(TokenizerError, match="unknown tokenizer record type 'wordpiece'"):
        load_tokenizer({"type": "wordpiece"})
    with pytest.raises(TokenizerError, match="cannot make a tokenizer from int"):
        load_tokenizer(42)


def test_train_bpe_rejects_too_small_vocab():
    with pytest.raises(TokenizerError, match="vocab_size must be an integer >= 257"):
        train_bpe(TRAIN_TEXT, 200, progress=False)


def test_train_bpe_checks_out_before_training(tmp_path):
    trained = train_bpe(TRAIN_TEXT, 300, out=tmp_path / "t", progress=False)
    before = (tmp_path / "t" / "tokenizer.json").read_bytes()
    with pytest.raises(TokenizerError, match=r"tokenizer.json already exists; pass overwrite=True"):
        train_bpe(TRAIN_TEXT, 400, out=tmp_path / "t", progress=False)
    assert (tmp_path / "t" / "tokenizer.json").read_bytes() == before
    (tmp_path / "f").write_text("x")
    with pytest.raises(TokenizerError, match=r"is a file; name a directory"):
        train_bpe(TRAIN_TEXT, 300, out=tmp_path / "f", progress=False)
    again = train_bpe(TRAIN_TEXT, 300, out=tmp_path / "t", overwrite=True, progress=False)
    assert again.vocab_size == trained.vocab_size
