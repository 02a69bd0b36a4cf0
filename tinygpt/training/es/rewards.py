"""Rewards for ES on generated text: any `reward(text) -> float`; `word_list_reward` is a ready-made one."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

from tinygpt.training.settings import SettingError

Reward = Callable[[str], float]

_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")


def words_of(text: str) -> list[str]:
    """The words of a text: runs of letters, with an inner apostrophe ("o'er", "thou'rt")."""
    return _WORD.findall(text)


def word_list_reward(
    words: Iterable[str] | str | os.PathLike,
    *,
    min_length: int = 3,
    min_words: int = 3,
    distinct: bool = False,
    case_sensitive: bool = False,
) -> Reward:
    """A non-differentiable reward: the fraction of a text's words that are in a word list.

    Words shorter than `min_length` letters are ignored, in the list and in the text: otherwise "a", "I" and "o"
    are the cheapest way to score (ES finds such loopholes within a few steps). A text with fewer than
    `min_words` counted words scores 0, so emitting no words is no way out either.

    Args:
        words: the list (an iterable of words), or a path to a text file whose words form it (one per line, or
            any text).
        min_length: the shortest word that counts.
        min_words: texts with fewer counted words score 0.
        distinct: count each listed word once per text (score = distinct listed words / counted words), so that
            repeating one common word ("the the the") does not pay.
        case_sensitive: compare words as written (default: lower-cased).
    Returns:
        `reward(text) -> float` in [0, 1].
    """
    if isinstance(words, (str, os.PathLike)):
        p = Path(words)
        if not p.is_file():
            raise SettingError(f"word list {words} is not a file; pass a file of words or a list of words")
        vocab_src: Iterable[str] = words_of(p.read_text(encoding="utf-8"))
    else:
        vocab_src = words

    def norm(w: str) -> str:
        return w if case_sensitive else w.lower()

    vocab = {norm(w) for w in vocab_src if len(w) >= min_length}
    if not vocab:
        raise SettingError(f"the word list has no words of {min_length} letters or more")

    def reward(text: str) -> float:
        ws = [w for w in words_of(text) if len(w) >= min_length]
        if not ws or len(ws) < min_words:
            return 0.0
        hits = [norm(w) for w in ws if norm(w) in vocab]
        return (len(set(hits)) if distinct else len(hits)) / len(ws)

    reward.vocab = vocab  # type: ignore[attr-defined]
    return reward


__all__ = ["Reward", "word_list_reward", "words_of"]
