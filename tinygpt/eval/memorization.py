"""The memorization test: does a model continue its training text verbatim more often than unseen text?

    from tinygpt.eval import memorization_test

    mem = memorization_test(model, train_texts, heldout_texts, prefix_tokens=32, continuation_tokens=32)
    print(mem)                    # verbatim rate, longest common prefix / substring, train vs held-out
    mem.gap                       # verbatim rate on training examples minus that on held-out ones
    mem.figure()                  # histogram of the tokens reproduced before the first deviation

Each example's first `prefix_tokens` tokens prompt the model, which continues greedily (temperature 0) for
`continuation_tokens` tokens; the continuation is compared with the true one. Held-out examples are the control.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import Tensor

from tinygpt.eval.perplexity import EvalError, resolve_text
from tinygpt.inputs import as_tokens, progress_enabled
from tinygpt.sampling import generate


@dataclass
class MemorizationStats:
    """Greedy-continuation statistics of one set of examples.

    Attributes:
        n: examples.
        exact_rate: fraction whose greedy continuation equals the true one token for token (all of it).
        mean_lcp, max_lcp: longest common prefix, in tokens, of the generated and the true continuation
            (how far the model reproduces the text verbatim before it first deviates).
        mean_lcs, max_lcs: longest common substring, in tokens (the longest verbatim run anywhere in the
            continuation, also after a deviation or shifted).
        token_match: fraction of continuation positions where generated == true.
        lcp: per-example longest common prefix lengths.
    """

    n: int
    exact_rate: float
    mean_lcp: float
    max_lcp: int
    mean_lcs: float
    max_lcs: int
    token_match: float
    lcp: list[int] = field(default_factory=list, repr=False)
    lcs: list[int] = field(default_factory=list, repr=False)


@dataclass
class MemorizationResult:
    """Train vs held-out greedy-continuation statistics (`memorization_test`).

    Attributes:
        train, heldout: `MemorizationStats` of each set.
        prefix_tokens, continuation_tokens: prompt and continuation lengths.
        examples: {"train": [...], "heldout": [...]} dicts with `prefix`, `truth`, `generated` (texts), `lcp`.
    """

    train: MemorizationStats
    heldout: MemorizationStats
    prefix_tokens: int
    continuation_tokens: int
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict, repr=False)

    @property
    def gap(self) -> float:
        """Verbatim-continuation rate on training examples minus that on held-out ones."""
        return self.train.exact_rate - self.heldout.exact_rate

    def table(self) -> str:
        lines = [f"{'':<8} {'n':>5} {'verbatim':>9} {'mean lcp':>9} {'max lcp':>8} {'mean lcs':>9} {'tok match':>10}"]
        for name, s in (("train", self.train), ("heldout", self.heldout)):
            lines.append(
                f"{name:<8} {s.n:>5} {s.exact_rate:>9.1%} {s.mean_lcp:>9.2f} {s.max_lcp:>8} {s.mean_lcs:>9.2f} "
                f"{s.token_match:>10.1%}"
            )
        lines.append(
            f"(greedy continuation of {self.continuation_tokens} tokens after {self.prefix_tokens}-token prefixes; "
            "lcp/lcs in tokens)"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def figure(self):
        """Plotly histogram of the longest common prefix (tokens reproduced verbatim), train vs held-out."""
        import plotly.graph_objects as go

        fig = go.Figure()
        for name, s in (("train", self.train), ("held-out", self.heldout)):
            fig.add_trace(
                go.Histogram(
                    x=s.lcp,
                    name=f"{name} (verbatim {s.exact_rate:.0%})",
                    opacity=0.65,
                    xbins={"start": -0.5, "end": self.continuation_tokens + 0.5, "size": 1},
                )
            )
        fig.update_layout(
            barmode="overlay",
            title="memorization: tokens continued verbatim before the first deviation",
            xaxis_title=f"longest common prefix (tokens, of {self.continuation_tokens})",
            yaxis_title="examples",
            template="plotly_white",
        )
        return fig


def longest_common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def longest_common_substring(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest contiguous run shared by `a` and `b` (dynamic programming, O(len(a)·len(b)))."""
    best = 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, 1):
            if x == y:
                cur[j] = prev[j - 1] + 1
                best = max(best, cur[j])
        prev = cur
    return best


def _examples(model, data: Any, need: int, n: int, seed: int) -> list[list[int]]:
    """Token sequences of length `need`: the first `need` tokens of each text in a list (texts too short are
    dropped), or random windows of a single text / corpus / token stream. At most `n`, chosen with `seed`."""
    tok = model._require_tokenizer()
    rng = random.Random(seed)
    if isinstance(data, (list, tuple)) and data and all(isinstance(x, str) for x in data):
        seqs = [ids[:need] for ids in (tok.encode(t) for t in data) if len(ids) >= need]
        if not seqs:
            raise EvalError(f"no example is at least {need} tokens long; lower prefix_tokens/continuation_tokens")
        return rng.sample(seqs, n) if len(seqs) > n else seqs
    if isinstance(data, (list, tuple)) and data and all(isinstance(x, (list, tuple, Tensor)) for x in data):
        seqs = [[int(t) for t in x][:need] for x in data if len(x) >= need]
        return rng.sample(seqs, n) if len(seqs) > n else seqs
    text, tokens, _ = resolve_text(data)
    stream = tok.encode(text) if text is not None else tokens.tolist()
    if len(stream) < need:
        raise EvalError(f"the text is {len(stream)} tokens, fewer than prefix + continuation = {need}")
    starts = sorted(rng.sample(range(len(stream) - need + 1), min(n, len(stream) - need + 1)))
    return [stream[s : s + need] for s in starts]


def _continue(model, seqs: list[list[int]], p: int, c: int, batch_size: int, bar) -> list[list[int]]:
    """Greedy continuations [c] of the first `p` tokens of every sequence, `batch_size` prompts at a time."""
    out: list[list[int]] = []
    for i in range(0, len(seqs), batch_size):
        prefix = as_tokens(model, [s[:p] for s in seqs[i : i + batch_size]], what="prefix")
        out.extend(generate(model, prefix, c, temperature=0.0, seed=0)[:, p:].cpu().tolist())
        bar.update(len(prefix))
    return out


def _stats(seqs: list[list[int]], gens: list[list[int]], p: int) -> MemorizationStats:
    truths = [s[p:] for s in seqs]
    lcp = [longest_common_prefix(g, t) for g, t in zip(gens, truths)]
    lcs = [longest_common_substring(g, t) for g, t in zip(gens, truths)]
    c = len(truths[0])
    match = sum(sum(x == y for x, y in zip(g, t)) for g, t in zip(gens, truths)) / (len(truths) * c)
    return MemorizationStats(
        n=len(seqs),
        exact_rate=sum(v == c for v in lcp) / len(lcp),
        mean_lcp=float(np.mean(lcp)),
        max_lcp=max(lcp),
        mean_lcs=float(np.mean(lcs)),
        max_lcs=max(lcs),
        token_match=match,
        lcp=lcp,
        lcs=lcs,
    )


def memorization_test(
    model: Any,
    train_data: Any,
    heldout: Any,
    *,
    prefix_tokens: int = 32,
    continuation_tokens: int = 32,
    n: int = 100,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool | None = None,
) -> MemorizationResult:
    """Does the model continue training text verbatim more often than held-out text?

    For each example the first `prefix_tokens` tokens are the prompt; the model continues greedily
    (temperature 0) for `continuation_tokens` tokens, which are compared with the true continuation. Held-out
    examples are the control: the gap between the two rates is memorization, not just good modelling.

    Args:
        model: a tinygpt model with its tokenizer (or a `.tinygpt` path).
        train_data, heldout: a list of example texts (each example's first tokens are used; examples shorter
            than prefix + continuation are dropped), a list of token lists, or one text / corpus path / `Corpus`
            / None (built-in Shakespeare's held-out end) from which `n` random windows are drawn.
        prefix_tokens: prompt length (30–50 is usual).
        continuation_tokens: tokens generated and compared.
        n: examples per set at most (drawn with `seed` when there are more).
        batch_size: prompts continued together.
        progress: a progress bar (None: the package default).

    Returns:
        `MemorizationResult` with `.train`, `.heldout` (`exact_rate`, `mean_lcp`, `max_lcp`, `mean_lcs`, ...),
        `.gap`, `.table()`, `.figure()` and the examples as text.

    Raises:
        EvalError: non-positive lengths, or no example long enough.
    """
    from tqdm.auto import tqdm

    from tinygpt.checkpoint import as_model

    model = as_model(model)
    p, c = int(prefix_tokens), int(continuation_tokens)
    if p < 1 or c < 1:
        raise EvalError(f"prefix_tokens and continuation_tokens must be >= 1, got {p} and {c}")
    if p + c > model.cfg.n_ctx:
        warnings.warn(
            f"prefix + continuation = {p + c} tokens exceed n_ctx={model.cfg.n_ctx}; generation slides its window",
            stacklevel=2,
        )
    sets = {"train": _examples(model, train_data, p + c, n, seed), "heldout": _examples(model, heldout, p + c, n, seed)}
    tok = model.tokenizer
    bar = tqdm(total=sum(len(s) for s in sets.values()), desc="memorization", disable=not progress_enabled(progress))
    stats, examples = {}, {}
    try:
        for name, seqs in sets.items():
            gens = _continue(model, seqs, p, c, batch_size, bar)
            stats[name] = _stats(seqs, gens, p)
            examples[name] = [
                {
                    "prefix": tok.decode(s[:p]),
                    "truth": tok.decode(s[p:]),
                    "generated": tok.decode(g),
                    "lcp": stats[name].lcp[i],
                }
                for i, (s, g) in enumerate(zip(seqs, gens))
            ]
    finally:
        bar.close()
    return MemorizationResult(stats["train"], stats["heldout"], p, c, examples)


__all__ = [
    "MemorizationResult",
    "MemorizationStats",
    "longest_common_prefix",
    "longest_common_substring",
    "memorization_test",
]
