"""Data: corpora, the on-disk token cache, deterministic batches, and which process builds the cache.

- `tinygpt.data.corpus`: a corpus is a text file, a directory of text files, a JSONL file with a text field, or
  the built-in Shakespeare plays (`load_corpus`); `train_bpe` trains a BPE tokenizer on one.
- `tinygpt.data.cache`: `tokenize_corpus` streams a corpus through a tokenizer into a cached safetensors file
  keyed by the corpus content and the tokenizer's vocabulary, so a second run skips tokenization.
- `tinygpt.data.batches`: window starts are a pure function of (seed, step), which makes resumed runs exact and
  lets data-parallel processes agree on the global batch.
- `tinygpt.data.processes`: the torchrun environment (rank, world, barrier); the first process of each machine
  builds the token cache while the others wait.
"""

from tinygpt.data import processes
from tinygpt.data.batches import batch_starts, val_starts, windows
from tinygpt.data.cache import CACHE_VERSION, TokenData, default_cache_dir, read_token_file, tokenize_corpus
from tinygpt.data.corpus import (  # noqa: F401  (used by tinygpt.eval)
    TEXT_SUFFIXES,
    Corpus,
    CorpusError,
    _iter_jsonl,
    _iter_text_chunks,
    corpus_texts,
    load_corpus,
    shakespeare_corpus,
    shakespeare_files,
    shakespeare_to_text,
    train_bpe,
)

__all__ = [
    "CACHE_VERSION",
    "TEXT_SUFFIXES",
    "Corpus",
    "CorpusError",
    "TokenData",
    "batch_starts",
    "corpus_texts",
    "default_cache_dir",
    "load_corpus",
    "processes",
    "read_token_file",
    "shakespeare_corpus",
    "shakespeare_files",
    "shakespeare_to_text",
    "tokenize_corpus",
    "train_bpe",
    "val_starts",
    "windows",
]
