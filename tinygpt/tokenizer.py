"""Tokenizers: lossless bytes, and BPE through Hugging Face's `tokenizers` library.

Every tokenizer serialises to a small dict (`to_dict`) that is stored in each `.tinygpt` manifest, so a
checkpoint is self-contained; `load_tokenizer` accepts that dict, "byte", a `tokenizer.json` file or a
directory holding one (any local Hugging Face tokenizer), or a tokenizer object.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from tinygpt.errors import TinyGPTValueError
from tinygpt.inputs import progress_enabled
from tinygpt.io import atomic_write_text, check_output

EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>", "<|end_of_text|>")
BOS_NAMES = ("<s>", "<bos>", "<|begin_of_text|>", "<|bos|>")


class TokenizerError(TinyGPTValueError):
    """A tokenizer could not be loaded or built."""


class Tokenizer(ABC):
    """What the rest of tinygpt needs from a tokenizer."""

    kind: str
    bos_id: int | None = None
    eos_id: int | None = None

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str: ...

    @abstractmethod
    def token_str(self, i: int) -> str:
        """A readable string for one token (used by `to_str_tokens` and the dashboards)."""

    @abstractmethod
    def to_dict(self) -> dict[str, Any]: ...

    @abstractmethod
    def vocab_items(self) -> list[tuple[str, int]]:
        """(token, id) pairs: the vocabulary's content, for fingerprints and comparisons."""

    @property
    def special_tokens(self) -> dict[str, int]:
        """Added tokens {string: id}: `encode` maps each occurrence of the string in text to that one id."""
        return {}

    def with_special_tokens(self, tokens: Iterable[str]) -> Tokenizer:
        """A copy with `tokens` added as special tokens (new ids after the vocabulary; present ones keep theirs)."""
        raise TokenizerError(f"{type(self).__name__} cannot add special tokens")

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.int64)

    @property
    def fingerprint(self) -> str:
        """sha256 of the vocabulary content (not just its size)."""
        h = hashlib.sha256(self.kind.encode())
        h.update(json.dumps(sorted(self.vocab_items()), ensure_ascii=False).encode())
        return h.hexdigest()

    def __len__(self) -> int:
        return self.vocab_size


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens: vocab 256, lossless on any text and on arbitrary bytes.

    Special tokens (e.g. a chat template's `<|im_start|>`) can be added: they get ids 256, 257, ... in order,
    `encode` maps each literal occurrence of their string to that id, and `to_dict` records them, so a
    checkpoint rebuilds the same tokenizer.

    Args:
        added_tokens: special-token strings, in id order from 256.
    """

    kind = "byte"

    def __init__(self, added_tokens: Iterable[str] = ()):
        added = list(added_tokens)
        for t in added:
            if not isinstance(t, str) or not t:
                raise TokenizerError(f"a special token must be a non-empty string, got {t!r}")
        if len(set(added)) != len(added):
            raise TokenizerError(f"duplicate special tokens in {added}")
        self.added_tokens: tuple[str, ...] = tuple(added)
        self._added = {t: 256 + i for i, t in enumerate(added)}
        self._pattern = (
            re.compile("|".join(re.escape(t) for t in sorted(added, key=len, reverse=True))) if added else None
        )
        self.eos_id = next((self._added[n] for n in EOS_NAMES if n in self._added), None)
        self.bos_id = next((self._added[n] for n in BOS_NAMES if n in self._added), self.eos_id)

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.added_tokens)

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._added)

    def with_special_tokens(self, tokens: Iterable[str]) -> ByteTokenizer:
        new = [t for t in dict.fromkeys(tokens) if t not in self._added]
        return ByteTokenizer([*self.added_tokens, *new]) if new else self

    def encode(self, text: str) -> list[int]:
        if self._pattern is None:
            return list(text.encode("utf-8"))
        out: list[int] = []
        pos = 0
        for m in self._pattern.finditer(text):
            out.extend(text[pos : m.start()].encode("utf-8"))
            out.append(self._added[m.group()])
            pos = m.end()
        out.extend(text[pos:].encode("utf-8"))
        return out

    def encode_array(self, text: str) -> np.ndarray:
        if self._pattern is not None:
            return np.asarray(self.encode(text), dtype=np.int64)
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def encode_bytes(self, data: bytes) -> list[int]:
        return list(data)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        if not self.added_tokens:
            return bytes(int(i) for i in ids)
        out = bytearray()
        for i in ids:
            i = int(i)
            out.extend(self.added_tokens[i - 256].encode("utf-8") if i >= 256 else bytes([i]))
        return bytes(out)

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_str(self, i: int) -> str:
        i = int(i)
        if i >= 256:
            return self.added_tokens[i - 256]
        return bytes([i]).decode("utf-8", errors="backslashreplace")

    def vocab_items(self) -> list[tuple[str, int]]:
        return [(f"<0x{i:02X}>", i) for i in range(256)] + list(self._added.items())

    def to_dict(self) -> dict[str, Any]:
        return {"type": "byte", "added_tokens": list(self.added_tokens)} if self.added_tokens else {"type": "byte"}

    def __repr__(self) -> str:
        if self.added_tokens:
            return f"ByteTokenizer(vocab_size={self.vocab_size}, added_tokens={list(self.added_tokens)})"
        return "ByteTokenizer(vocab_size=256)"


class BPETokenizer(Tokenizer):
    """A Hugging Face `tokenizers.Tokenizer` (byte-level BPE when trained here)."""

    kind = "bpe"

    def __init__(self, tok, source: str | None = None):
        self.tok = tok
        self.source = source
        added = {t.content: i for i, t in tok.get_added_tokens_decoder().items()}
        self.eos_id = next((added[n] for n in EOS_NAMES if n in added), None)
        self.bos_id = next((added[n] for n in BOS_NAMES if n in added), self.eos_id)

    @classmethod
    def from_str(cls, data: str, source: str | None = None) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            return cls(HFTokenizer.from_str(data), source)
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise TokenizerError(f"could not parse tokenizer JSON from {source or 'string'}: {e}") from e

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> BPETokenizer:
        p = Path(path)
        if p.is_dir():
            if (p / "tokenizer.json").exists():
                p = p / "tokenizer.json"
            elif (p / "vocab.json").exists() and (p / "merges.txt").exists():
                return cls._from_vocab_merges(p)
            else:
                raise TokenizerError(
                    f"{path} holds no tokenizer.json (nor vocab.json + merges.txt); "
                    "point --tokenizer at a Hugging Face tokenizer directory or a tokenizer.json file"
                )
        if not p.exists():
            raise TokenizerError(f"tokenizer path {path} does not exist")
        return cls.from_str(p.read_text(encoding="utf-8"), source=str(p))

    @classmethod
    def _from_vocab_merges(cls, d: Path) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        tok = HFTokenizer(models.BPE.from_file(str(d / "vocab.json"), str(d / "merges.txt")))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        vocab = tok.get_vocab()
        specials = [n for n in EOS_NAMES + BOS_NAMES if n in vocab]
        if specials:
            tok.add_special_tokens(specials)
        return cls(tok, source=str(d))

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    @property
    def special_tokens(self) -> dict[str, int]:
        return {t.content: i for i, t in self.tok.get_added_tokens_decoder().items()}

    def with_special_tokens(self, tokens: Iterable[str]) -> BPETokenizer:
        have = self.special_tokens
        new = [t for t in dict.fromkeys(tokens) if t not in have]
        if not new:
            return self
        from tokenizers import Tokenizer as HFTokenizer

        tok = HFTokenizer.from_str(self.tok.to_str())  # a copy: other holders of this tokenizer are unaffected
        tok.add_special_tokens(new)
        return BPETokenizer(tok, self.source)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_str(self, i: int) -> str:
        return self.tok.decode([int(i)], skip_special_tokens=False)

    def vocab_items(self) -> list[tuple[str, int]]:
        return list(self.tok.get_vocab(with_added_tokens=True).items())

    def to_dict(self) -> dict[str, Any]:
        return {"type": "bpe", "json": self.tok.to_str()}

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `tokenizer.json` into `directory` (atomically) and return its path."""
        d = Path(directory)
        made = not d.exists()
        d.mkdir(parents=True, exist_ok=True)
        path = d / "tokenizer.json"
        try:
            atomic_write_text(path, self.tok.to_str(pretty=True))
        except BaseException:
            if made:  # leave no empty directory behind a failed write
                with contextlib.suppress(OSError):
                    d.rmdir()
            raise
        return path

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, source={self.source!r})"


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    *,
    special_tokens: tuple[str, ...] = ("<|endoftext|>",),
    min_frequency: int = 2,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> BPETokenizer:
    """Train a byte-level BPE tokenizer (lossless on any UTF-8) on texts.

    `tinygpt.train_bpe` (`tinygpt.data.train_bpe`) also takes a corpus (a path, or None for the built-in
    Shakespeare) and reads its texts.

    Args:
        texts: an iterable of strings (documents).
        vocab_size: target vocabulary size, including the 256 byte symbols and `special_tokens`.
        special_tokens: added first, as single tokens (the first EOS-like name becomes `eos_id`).
        min_frequency: the fewest occurrences a merge needs.
        out: optional directory to save `tokenizer.json` into (checked before training starts).
        overwrite: replace an existing `out/tokenizer.json`.
        progress: show the trainer's progress (None: the package default).
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    min_vocab = 256 + len(special_tokens)
    if not isinstance(vocab_size, int) or vocab_size < min_vocab:
        raise TokenizerError(
            f"vocab_size must be an integer >= {min_vocab} (256 bytes + special tokens), got {vocab_size!r}"
        )
    if texts is None or isinstance(texts, (str, os.PathLike)):
        raise TokenizerError(
            f"tinygpt.tokenizer.train_bpe takes texts (an iterable of strings), got {texts!r}; to train on a "
            "corpus path (or None for the built-in one) use tinygpt.train_bpe (tinygpt.data.train_bpe)"
        )
    if out is not None:
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise TokenizerError(f"out={out} is a file; name a directory to write tokenizer.json into")
        check_output(out / "tokenizer.json", overwrite=overwrite, error=TokenizerError)
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress_enabled(progress),
    )
    tok.train_from_iterator(_chunks(texts), trainer=trainer)
    result = BPETokenizer(tok, source="trained")
    if out is not None:
        result.save(out)
        result.source = str(Path(out) / "tokenizer.json")
    return result


def _chunks(texts: Iterable[str], size: int = 1 << 16) -> Iterator[str]:
    """Split long documents so the trainer streams them."""
    for t in texts:
        for i in range(0, len(t), size):
            yield t[i : i + size]


def load_tokenizer(spec: Any = None) -> Tokenizer:
    """A tokenizer from "byte"/None, a manifest dict, a tokenizer.json path or directory, or an object."""
    if spec is None or (isinstance(spec, str) and spec.lower() in ("byte", "bytes")):
        return ByteTokenizer()
    if isinstance(spec, Tokenizer):
        return spec
    if isinstance(spec, dict):
        kind = spec.get("type")
        if kind == "byte":
            added = spec.get("added_tokens", [])
            if not isinstance(added, list):
                raise TokenizerError(f"byte tokenizer record: added_tokens must be a list, got {added!r}")
            return ByteTokenizer(added)
        if kind == "bpe" and isinstance(spec.get("json"), str):
            return BPETokenizer.from_str(spec["json"], source="checkpoint")
        raise TokenizerError(f"unknown tokenizer record type {kind!r}")
    if isinstance(spec, (str, os.PathLike)):
        return BPETokenizer.from_file(spec)
    if type(spec).__module__.startswith("tokenizers"):
        return BPETokenizer(spec)
    raise TokenizerError(
        f"cannot make a tokenizer from {type(spec).__name__}; pass 'byte', a tokenizer.json path "
        "or a directory holding one"
    )


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters (byte-level BPE's
    vocabulary spells byte strings with these characters)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


@lru_cache(maxsize=1)
def unicode_to_bytes() -> dict[str, int]:
    """The inverse of `bytes_to_unicode`: the byte each printable character stands for."""
    return {c: b for b, c in bytes_to_unicode().items()}


# ------------------------------------------------------------------------------- identity by content
# Tokenizers compare by vocabulary *content*: every token is reduced to the bytes it stands for (`<0x41>` and the
# byte-level symbol "A" are both b"A", "Ġthe" is b" the"), so a tinygpt tokenizer and a Hugging Face one (anything
# with `get_vocab` and `encode(text, add_special_tokens=False)`) compare meaningfully whatever their spelling.
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
PROBE_TEXT = "ROMEO: But, soft! what light through yonder window breaks?\n\tIt is the east 1599 — ünïcödé 日本 🙂"


def _canonical_token(s: str) -> bytes | str:
    """The bytes a token stands for: `<0x41>` and byte-level "A" are b"A"; "Ġthe" is b" the"; else the string."""
    m = _BYTE_TOKEN.fullmatch(s)
    if m:
        return bytes([int(m[1], 16)])
    u2b = unicode_to_bytes()
    if s and all(c in u2b for c in s):
        return bytes(u2b[c] for c in s)
    return s


def canonical_vocab(tokenizer: Any) -> dict[int, bytes | str]:
    """id -> canonical content, for a tinygpt tokenizer (`vocab_items`) or a HF one (`get_vocab`)."""
    if hasattr(tokenizer, "vocab_items"):
        items = tokenizer.vocab_items()
    elif hasattr(tokenizer, "get_vocab"):
        items = tokenizer.get_vocab().items()
    else:
        raise TokenizerError(f"cannot read the vocabulary of a {type(tokenizer).__name__}")
    return {int(i): _canonical_token(s) for s, i in items}


def _encode(tokenizer: Any, text: str) -> list[int]:
    if isinstance(tokenizer, Tokenizer):
        return list(tokenizer.encode(text))
    return list(tokenizer.encode(text, add_special_tokens=False))


def describe_tokenizer(tokenizer: Any) -> str:
    """A short description: kind, vocabulary size and the start of the fingerprint."""
    if isinstance(tokenizer, Tokenizer):
        return f"{tokenizer.kind}, vocab {tokenizer.vocab_size}, fingerprint {tokenizer.fingerprint[:12]}"
    return f"{type(tokenizer).__name__}, vocab {len(tokenizer.get_vocab())}"


def vocab_mismatch(a: Any, b: Any) -> str | None:
    """None if two tokenizers have the same vocabulary content and encode a probe text identically; else why not.

    Works across kinds: tinygpt `ByteTokenizer` / `BPETokenizer` and Hugging Face tokenizers.
    """
    va, vb = canonical_vocab(a), canonical_vocab(b)
    if va != vb:
        ids = sorted(set(va) | set(vb))
        diff = [i for i in ids if va.get(i) != vb.get(i)]
        examples = ", ".join(f"id {i}: {va.get(i, '(none)')!r} vs {vb.get(i, '(none)')!r}" for i in diff[:3])
        return f"vocabularies differ ({len(va)} vs {len(vb)} tokens, {len(diff)} ids differ; e.g. {examples})"
    ea, eb = _encode(a, PROBE_TEXT), _encode(b, PROBE_TEXT)
    if ea != eb:
        return f"same vocabulary but different encodings of a probe text ({ea[:8]}... vs {eb[:8]}...)"
    return None
