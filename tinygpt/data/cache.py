"""The on-disk token cache: a corpus streamed through a tokenizer into a safetensors file, read memory-mapped.

`tokenize_corpus(corpus, tokenizer)` keys the file by the corpus content and the tokenizer's vocabulary, so a
second run skips tokenization. Under torchrun the first process of each machine builds the file while the others
wait (`tinygpt.data.processes.local_main_first`), then read it.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinygpt.data import processes
from tinygpt.data.corpus import Corpus, CorpusError, load_corpus
from tinygpt.errors import TinyGPTValueError
from tinygpt.inputs import progress_enabled
from tinygpt.io import atomic_writer
from tinygpt.tokenizer import Tokenizer

CACHE_VERSION = 1


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
            raise TinyGPTValueError(f"val_split must be in [0, 1), got {val_fraction}")
        n_val = int(len(self.tokens) * val_fraction)
        return self.tokens[: len(self.tokens) - n_val], self.tokens[len(self.tokens) - n_val :]


def tokenize_corpus(
    corpus: Corpus | str | os.PathLike | None,
    tokenizer: Tokenizer,
    *,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    progress: bool | None = None,
) -> TokenData:
    """Tokenize a corpus (streaming, with a progress bar) into a cached safetensors file.

    Documents are separated by the tokenizer's EOS token when it has one, else by a blank line. Under
    torchrun, the first process of each machine builds the cache while the others wait, then read it.
    """
    with processes.local_main_first() as first:
        show = progress_enabled(progress) and first and processes.is_main()
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
        CorpusError: the file is damaged (truncated, empty, or not a token cache file).
    """
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise CorpusError(f"header length {n} does not fit a {size}-byte file")
            header = json.loads(f.read(n))
        info = header["tokens"]
        dtype = {"U16": np.uint16, "U32": np.uint32}[info["dtype"]]
        count = int(info["shape"][0])
    except (struct.error, KeyError, TypeError, IndexError, ValueError) as e:
        raise CorpusError(f"token cache {path} is damaged ({e!r})") from e
    if size < 8 + n + count * np.dtype(dtype).itemsize:
        raise CorpusError(f"token cache {path} is truncated")
    return np.memmap(path, dtype=dtype, mode="r", offset=8 + n, shape=(count,))


__all__ = ["CACHE_VERSION", "TokenData", "default_cache_dir", "read_token_file", "tokenize_corpus"]
