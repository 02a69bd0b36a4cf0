"""Evaluation: loss, perplexity and bits per byte, leaderboards, memorization, validation windows, the matrix.

    from tinygpt.eval import evaluate, leaderboard, memorization_test, validation_loss, eval_matrix

| module | holds |
|---|---|
| `perplexity` | `evaluate` → `EvalResult` (loss, perplexity, bits per byte); `corpus_text`, `heldout_text`, `Text` |
| `leaderboard` | `leaderboard` → `LeaderboardResult`: many models, the same text, ranked by bits per byte |
| `memorization` | `memorization_test` → `MemorizationResult`: verbatim continuation, train vs held-out |
| `validation` | `validation_loss`, `validation_windows`: the loss on fixed held-out windows (surgery sweeps) |
| `retrieval` | `BM25Retriever`, `chunk_text`: BM25 over chunks of a corpus |
| `matrix`, `matrix_result` | `eval_matrix` / `EvalMatrix` → `EvalMatrixResult`: setups side by side |

Every result has `.figure()`; errors are `EvalError` (a `TinyGPTError` and a `ValueError`).
Note: `tinygpt.eval.leaderboard` is the function (as `tinygpt.leaderboard`); its module is
`sys.modules["tinygpt.eval.leaderboard"]`, imported as `from tinygpt.eval.leaderboard import LeaderboardResult`.
"""

from tinygpt.eval.leaderboard import LeaderboardResult, LeaderboardRow, leaderboard
from tinygpt.eval.matrix import (
    DEFAULT_ANSWER,
    DEFAULT_CONTEXT,
    DEFAULT_SETUPS,
    DEFAULT_TEMPLATE,
    SETUPS,
    EvalMatrix,
    cut_at_stop,
    eval_matrix,
    few_shot_pool,
    load_qa,
)
from tinygpt.eval.matrix_result import EvalMatrixResult, normalize_answer
from tinygpt.eval.memorization import (
    MemorizationResult,
    MemorizationStats,
    longest_common_prefix,
    longest_common_substring,
    memorization_test,
)
from tinygpt.eval.perplexity import (
    DEFAULT_HELDOUT,
    LN2,
    EvalError,
    EvalResult,
    EvalTypeError,
    Text,
    corpus_text,
    evaluate,
    heldout_text,
    resolve_text,
    scored_bytes,
    sliding_windows,
    token_byte_lengths,
    tokenizer_label,
)
from tinygpt.eval.retrieval import BM25Retriever, chunk_text
from tinygpt.eval.validation import ValidationWindows, validation_loss, validation_windows

__all__ = [
    "DEFAULT_ANSWER",
    "DEFAULT_CONTEXT",
    "DEFAULT_HELDOUT",
    "DEFAULT_SETUPS",
    "DEFAULT_TEMPLATE",
    "LN2",
    "SETUPS",
    "BM25Retriever",
    "EvalError",
    "EvalMatrix",
    "EvalMatrixResult",
    "EvalResult",
    "EvalTypeError",
    "LeaderboardResult",
    "LeaderboardRow",
    "MemorizationResult",
    "MemorizationStats",
    "Text",
    "ValidationWindows",
    "chunk_text",
    "corpus_text",
    "cut_at_stop",
    "eval_matrix",
    "evaluate",
    "few_shot_pool",
    "heldout_text",
    "leaderboard",
    "load_qa",
    "longest_common_prefix",
    "longest_common_substring",
    "memorization_test",
    "normalize_answer",
    "resolve_text",
    "scored_bytes",
    "sliding_windows",
    "token_byte_lengths",
    "tokenizer_label",
    "validation_loss",
    "validation_windows",
]
