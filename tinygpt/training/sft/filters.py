"""SFT quality filters, applied before tokenization: empty replies, length, repetition, exact and near duplicates.

kept, report = filter_conversations(convs, min_length=10, max_repetition=0.5, dedup=True, near_dedup=0.8)
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from tinygpt.training.settings import SettingError
from tinygpt.training.sft.data import Conversation


def _normalise(text: str) -> str:
    return " ".join(text.casefold().split())


def repetition_score(text: str, n: int = 3) -> float:
    """Fraction of repeated n-grams in `text`, in [0, 1): 0 for no repeats, near 1 for a loop.

    Word n-grams (n=3) for texts of 8 words or more, else character 6-grams (0 for under 16 characters).
    Ordinary prose scores near 0 (every reply in `data/sft_small.jsonl` scores 0.0); a generation stuck in a loop
    scores high ("the king, the king, the king, ..." 0.75; "aaaa..." 0.95). Short texts with deliberate
    repetition score in between ("I love thee, I love thee, I love thee, and more": 0.44).
    """
    words = text.split()
    if len(words) >= 8:
        grams: list[Any] = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    else:
        s = " ".join(words)
        if len(s) < 16:
            return 0.0
        grams = [s[i : i + 6] for i in range(len(s) - 5)]
    return 1.0 - len(set(grams)) / len(grams)


class MinHashDeduper:
    """Near-duplicate detection: MinHash signatures of character 5-gram shingles, LSH banding to find
    candidates, then the exact Jaccard similarity of the shingle sets to decide (pure Python + NumPy).

    Args:
        threshold: Jaccard similarity at or above which a text is a near duplicate of an earlier one.
        num_perm: MinHash permutations (bands × rows); rows per band are chosen so the LSH curve's midpoint
            lies about 0.1 below `threshold`, which makes a missed pair unlikely.
    """

    def __init__(self, threshold: float = 0.8, num_perm: int = 256, shingle: int = 5):
        if not 0.0 < threshold <= 1.0:
            raise SettingError(f"near_dedup threshold must be in (0, 1], got {threshold!r}")
        self.threshold, self.shingle = threshold, shingle
        rows = 1
        for r in (2, 4, 8, 16, 32):
            if (1 / (num_perm // r)) ** (1 / r) <= threshold - 0.1:
                rows = r
        self.rows, self.bands = rows, num_perm // rows
        self.seeds = np.random.default_rng(0).integers(0, 2**63, size=num_perm, dtype=np.uint64)
        self.buckets: dict[tuple[int, bytes], list[int]] = {}
        self.sets: list[set[str]] = []

    def shingles(self, text: str) -> set[str]:
        t = _normalise(text)
        k = self.shingle
        return {t[i : i + k] for i in range(max(1, len(t) - k + 1))}

    def _signature(self, sh: set[str]) -> np.ndarray:
        """[num_perm] minima of `num_perm` seeded splitmix64 hashes over the shingles (crc32 first: deterministic
        across processes, unlike Python's `hash`)."""
        h = np.fromiter((zlib.crc32(s.encode("utf-8")) for s in sh), dtype=np.uint64, count=len(sh))
        z = h[None, :] ^ self.seeds[:, None]
        with np.errstate(over="ignore"):  # uint64 arithmetic wraps modulo 2^64, as splitmix64 intends
            z = z + np.uint64(0x9E3779B97F4A7C15)
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            z = z ^ (z >> np.uint64(31))
        return z.min(axis=1)

    def add(self, text: str) -> bool:
        """Remember `text` unless it is a near duplicate of one already added; returns True if it is one."""
        sh = self.shingles(text)
        sig = self._signature(sh)
        keys = [(i, sig[i * self.rows : (i + 1) * self.rows].tobytes()) for i in range(self.bands)]
        seen: set[int] = set()
        for key in keys:
            for j in self.buckets.get(key, ()):
                if j in seen:
                    continue
                seen.add(j)
                other = self.sets[j]
                if len(sh & other) / len(sh | other) >= self.threshold:
                    return True
        idx = len(self.sets)
        self.sets.append(sh)
        for key in keys:
            self.buckets.setdefault(key, []).append(idx)
        return False


def filter_conversations(
    convs: Sequence[Conversation],
    *,
    min_length: int = 0,
    max_repetition: float | None = None,
    dedup: bool = True,
    near_dedup: float | None = None,
) -> tuple[list[Conversation], dict[str, int]]:
    """Apply the quality filters in order; returns (kept, {filter: records dropped}).

    Args:
        min_length: drop records whose reply (assistant text, stripped) has fewer characters (0: off).
        max_repetition: drop records whose reply's `repetition_score` exceeds this (None: off); 0.5 keeps
            ordinary prose and drops loops.
        dedup: drop exact duplicates (same turns after case-folding and collapsing whitespace).
        near_dedup: drop near duplicates, Jaccard similarity of character 5-grams of the whole conversation
            at or above this threshold, e.g. 0.8 (None: off); see `MinHashDeduper`.
    Returns:
        The kept conversations in their original order, and a report with a count for `empty` (always) and
        for each filter that is on.
    """
    report: dict[str, int] = {"empty": 0}
    if min_length:
        report["min_length"] = 0
    if max_repetition is not None:
        report["repetition"] = 0
    if dedup:
        report["exact_dup"] = 0
    if near_dedup is not None:
        report["near_dup"] = 0
    seen: set[tuple[tuple[str, str], ...]] = set()
    near = MinHashDeduper(near_dedup) if near_dedup is not None else None
    kept = []
    for c in convs:
        reply = c.response.strip()
        if not reply:
            report["empty"] += 1
            continue
        if min_length and len(reply) < min_length:
            report["min_length"] += 1
            continue
        if max_repetition is not None and repetition_score(reply) > max_repetition:
            report["repetition"] += 1
            continue
        if dedup:
            key = tuple((m["role"], _normalise(m["content"])) for m in c.messages)
            if key in seen:
                report["exact_dup"] += 1
                continue
            seen.add(key)
        if near is not None and near.add("\n".join(m["content"] for m in c.messages)):
            report["near_dup"] += 1
            continue
        kept.append(c)
    return kept, report


__all__ = ["MinHashDeduper", "filter_conversations", "repetition_score"]
