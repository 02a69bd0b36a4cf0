"""Retrieval for the evaluation matrix: a corpus cut into chunks, searched with BM25.

    from tinygpt.eval.retrieval import BM25Retriever

    r = BM25Retriever("data/shakespeare_notes.md", chunk_chars=300)   # or a list of chunks, or text
    r.search("Who kills Polonius?", k=2)                               # [(chunk, score), ...], best first

`BM25Retriever` indexes chunks (paragraphs packed up to `chunk_chars` characters, `chunk_text`) with `bm25s`
(Lù 2024: a sparse-matrix BM25, numpy only), English stop words removed. Chunks sharing no word with the query
(score 0) are not retrieved.
"""

from __future__ import annotations

import os
import re
from typing import Any

from tinygpt.data import Corpus
from tinygpt.eval.perplexity import EvalError, EvalTypeError, corpus_text


def chunk_text(text: str, chunk_chars: int = 300) -> list[str]:
    """Cut a text into chunks of at most `chunk_chars` characters: paragraphs (split at blank lines) packed
    together while they fit; a longer paragraph is cut at line ends, then at spaces."""
    if chunk_chars < 20:
        raise EvalError(f"chunk_chars must be >= 20, got {chunk_chars}")
    pieces: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        if not para:
            continue
        if len(para) <= chunk_chars:
            pieces.append(para)
            continue
        for line in para.splitlines():
            line = line.strip()
            while len(line) > chunk_chars:
                cut = line.rfind(" ", 0, chunk_chars)
                cut = cut if cut > chunk_chars // 2 else chunk_chars
                pieces.append(line[:cut].strip())
                line = line[cut:].strip()
            if line:
                pieces.append(line)
    chunks: list[str] = []
    for p in pieces:
        if chunks and len(chunks[-1]) + 2 + len(p) <= chunk_chars and "\n\n" not in p:
            # pack short paragraphs together (kept apart by a blank line)
            chunks[-1] = chunks[-1] + "\n\n" + p
        else:
            chunks.append(p)
    return chunks


class BM25Retriever:
    """BM25 search over text chunks (`bm25s`), English stop words removed.

    Args:
        chunks_or_corpus: a list of chunks (used as given), or a corpus (a path, `Corpus`, or a string of text)
            cut with `chunk_text`.
        chunk_chars: the chunk size when cutting a corpus.
    Attributes:
        chunks: the indexed texts.
    """

    def __init__(self, chunks_or_corpus: Any, chunk_chars: int = 300):
        import bm25s

        if isinstance(chunks_or_corpus, (list, tuple)) and all(isinstance(c, str) for c in chunks_or_corpus):
            chunks = [c for c in chunks_or_corpus if c.strip()]
        else:
            chunks = chunk_text(_corpus_text(chunks_or_corpus), chunk_chars)
        if not chunks:
            raise EvalError("the retrieval corpus is empty")
        self.chunks = list(chunks)
        self._bm25s = bm25s
        self.index = bm25s.BM25()
        self.index.index(self._tokenize(self.chunks), show_progress=False)

    def _tokenize(self, texts: list[str]):
        return self._bm25s.tokenize(texts, stopwords="en", show_progress=False, return_ids=False)

    def search(self, query: str, k: int = 3) -> list[tuple[str, float]]:
        """The best `k` chunks for `query` as (chunk, BM25 score), best first; chunks scoring 0 are left out."""
        if k < 1:
            return []
        k = min(int(k), len(self.chunks))
        q = self._tokenize([query])
        if not q[0]:
            return []
        idx, scores = self.index.retrieve(q, k=k, show_progress=False)
        return [(self.chunks[int(i)], float(s)) for i, s in zip(idx[0], scores[0]) if s > 0]

    def __len__(self) -> int:
        return len(self.chunks)

    def __repr__(self) -> str:
        return f"BM25Retriever({len(self.chunks)} chunks)"


def _corpus_text(corpus: Any) -> str:
    if isinstance(corpus, str) and not os.path.exists(corpus) and ("\n" in corpus or " " in corpus):
        return corpus  # text given directly
    if corpus is None or isinstance(corpus, (str, os.PathLike, Corpus)):
        return corpus_text(corpus)
    raise EvalTypeError(f"cannot build a retrieval corpus from {type(corpus).__name__}: give chunks, a path or text")


__all__ = ["BM25Retriever", "chunk_text"]
