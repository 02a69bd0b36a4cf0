"""Supervised fine-tuning on chat data (`sft`) and continued next-token training on new text (`finetune`).

    import tinygpt
    res = tinygpt.sft("tiny.tinygpt", "data/sft_small.jsonl", template="chatml", steps=200, out="chat.tinygpt")
    print(res.report)                     # records each quality filter dropped
    print(tinygpt.chat(res.model, "Who is Puck?"))

**Data.** JSONL, one record per line: `{"instruction": ..., "response": ...}` (optional `"input"`, appended to
the instruction after a blank line, and `"system"`; `"output"` is accepted for `"response"`), or chat style
`{"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}` (ShareGPT's
`{"conversations": [{"from": "human" | "gpt" | "system", "value": ...}]}` too). Blank lines are skipped; a
malformed line raises `SFTDataError` naming `file:line` and what to fix. A list of such dicts works as well.

**Template and special tokens.** Each conversation is rendered with a chat template (`tinygpt.templates`;
"chatml" by default). Special tokens the template needs are added to the tokenizer and to the embedding
and unembedding (new rows start at the mean of the existing rows, `cfg.d_vocab` grows), and the tokenizer
records them, so `save`/`load` round-trip the chat model. A model that already has them is left alone.

**Loss mask.** Only the tokens of assistant replies (their content and the template's end-of-turn, e.g.
`<|im_end|>`) are targets; prompt, system and template tokens and padding are -100 (`train_on_prompt=True`
adds the system and user turns' content and end-of-turn). The loss of an optimizer
step is the mean cross-entropy over *all* target tokens of its global batch (every micro-batch and process),
not a mean of per-sequence or per-micro-batch means, so long and short replies weigh by their tokens and the
loss does not depend on how the batch is split into micro-batches or processes.

**Padding or packing.** By default each conversation is one row, right-padded to the longest row of its
micro-batch (causal attention: padding never influences real tokens). `packing=True` instead concatenates
whole conversations greedily into rows of up to `ctx + 1` tokens. tinygpt's attention has no document
masking, so in a packed row a conversation can attend to the ones before it in the same row: faster on
short data, slightly different from training on each alone (the usual trade-off of packing without
variable-length attention). Validation always uses padding, so its loss is comparable across both modes.
A conversation longer than `ctx + 1` tokens is cut at the end; one whose reply would not start inside the
context is dropped and counted as `too_long`.

**Filters** (`min_length`, `max_repetition`, `dedup`, `near_dedup`) run before tokenization, in that order
after dropping empty replies; `SFTResult.report` says how many records each dropped.

Training is `tinygpt.training.loop.fit`: LR schedule, gradient clipping and accumulation, progress bar, atomic
checkpoints, exact `resume`, callbacks and `strategy=` under torchrun, as for `train()`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from tinygpt.checkpoint import CheckpointError, load
from tinygpt.io import iter_jsonl
from tinygpt.model import GPT
from tinygpt.training.loop import (
    TokenBatches,
    TrainConfig,
    TrainResult,
    _corpus_from_record,
    _corpus_record,
    _micro_shares,
    default_device,
    fit,
    resume_run,
)
from tinygpt.training.templates import Template, TemplateError, load_template

SFT_DEFAULTS: dict[str, Any] = {"steps": 200, "max_lr": 3e-4, "warmup": 20, "val_split": 0.05, "val_every": 50}
FINETUNE_DEFAULTS: dict[str, Any] = {"max_lr": 3e-4, "warmup": 20}
_FILTER_DEFAULTS: dict[str, Any] = {
    "min_length": 0,
    "max_repetition": None,
    "dedup": True,
    "near_dedup": None,
    "packing": False,
    "train_on_prompt": False,
}


class SFTDataError(ValueError):
    """An SFT data file or record is malformed, or no usable example is left."""


# ============================================================================================== records
@dataclass
class Conversation:
    """One training conversation.

    Attributes:
        messages: [{"role": "system" | "user" | "assistant", "content": str}, ...].
        where: where it came from ("FILE:LINE" or "record N"), for error messages.
    """

    messages: list[dict[str, str]]
    where: str = ""

    @property
    def response(self) -> str:
        """The assistant replies, joined by blank lines."""
        return "\n\n".join(m["content"] for m in self.messages if m["role"] == "assistant")

    @property
    def instruction(self) -> str:
        """The user messages, joined by blank lines."""
        return "\n\n".join(m["content"] for m in self.messages if m["role"] == "user")


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_EXAMPLE = '{"instruction": "Who is Puck?", "response": "A mischievous sprite in A Midsummer Night\'s Dream."}'


def record_to_messages(rec: Any, where: str) -> list[dict[str, str]]:
    """Normalise one record (instruction/response, messages, or ShareGPT conversations) to messages.

    Raises:
        SFTDataError: naming `where` and the expected shape.
    """
    if not isinstance(rec, dict):
        raise SFTDataError(f"{where}: expected a JSON object, got {type(rec).__name__}; e.g. {_EXAMPLE}")
    if "messages" in rec or "conversations" in rec:
        key = "messages" if "messages" in rec else "conversations"
        raw = rec[key]
        if not isinstance(raw, list) or not raw:
            raise SFTDataError(f"{where}: '{key}' must be a non-empty list of turns")
        msgs = []
        for i, m in enumerate(raw):
            if key == "conversations" and isinstance(m, dict) and "from" in m:
                m = {"role": _SHAREGPT_ROLES.get(str(m.get("from")), m.get("from")), "content": m.get("value")}
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise SFTDataError(f'{where}: turn {i} must be {{"role": ..., "content": "..."}}, got {m!r}')
            role = m.get("role")
            if role not in ("system", "user", "assistant"):
                raise SFTDataError(f"{where}: turn {i} has role {role!r}; use 'system', 'user' or 'assistant'")
            if role == "system" and i != 0:
                raise SFTDataError(f"{where}: turn {i}: a system message may only be the first turn")
            msgs.append({"role": role, "content": m["content"]})
        if not any(m["role"] == "assistant" for m in msgs):
            raise SFTDataError(f"{where}: the conversation has no assistant turn, so nothing to learn from")
        return msgs
    response_key = "response" if "response" in rec else "output" if "output" in rec else None
    if "instruction" not in rec or response_key is None:
        raise SFTDataError(
            f"{where}: a record needs 'instruction' and 'response' (or 'messages': [...]); it has keys "
            f"{sorted(rec)}. Example line: {_EXAMPLE}"
        )
    fields = {"instruction": rec["instruction"], response_key: rec[response_key]}
    for k in ("input", "system"):
        if rec.get(k) is not None:
            fields[k] = rec[k]
    for k, v in fields.items():
        if not isinstance(v, str):
            raise SFTDataError(f"{where}: '{k}' must be a string, got {type(v).__name__}")
    instruction = rec["instruction"] + (f"\n\n{rec['input']}" if rec.get("input") else "")
    msgs = [{"role": "user", "content": instruction}, {"role": "assistant", "content": rec[response_key]}]
    if rec.get("system"):
        msgs.insert(0, {"role": "system", "content": rec["system"]})
    return msgs


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) for each non-blank line; `SFTDataError` names `path:line` on bad JSON."""
    p = Path(path)
    if not p.is_file():
        raise SFTDataError(f"SFT data file {p} does not exist (or is not a file); pass a .jsonl file")
    hint = f"; each line must hold one JSON object, e.g. {_EXAMPLE}"
    yield from iter_jsonl(p, SFTDataError, hint)


def load_sft_data(data: str | os.PathLike | Sequence[Any]) -> list[Conversation]:
    """Conversations from a JSONL path, or from a list of records / `Conversation`s.

    Raises:
        SFTDataError: a malformed line (named `FILE:LINE`) or record, or no records at all.
    """
    if isinstance(data, (str, os.PathLike)):
        out = [Conversation(record_to_messages(rec, f"{data}:{n}"), f"{data}:{n}") for n, rec in read_jsonl(data)]
        where = str(data)
    elif isinstance(data, Iterable):
        out = []
        for i, rec in enumerate(data):
            if isinstance(rec, Conversation):
                out.append(rec)
            else:
                out.append(Conversation(record_to_messages(rec, f"record {i}"), f"record {i}"))
        where = "the records given"
    else:
        raise SFTDataError(f"cannot read SFT data from a {type(data).__name__}; pass a .jsonl path or a list of dicts")
    if not out:
        raise SFTDataError(f"{where} holds no records")
    return out


# ============================================================================================== filters
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
            raise ValueError(f"near_dedup threshold must be in (0, 1], got {threshold!r}")
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


# ============================================================================================== tokens
@dataclass
class Example:
    """A tokenized conversation: ids [n] and mask [n] (True on the reply tokens the loss covers)."""

    ids: np.ndarray
    mask: np.ndarray
    where: str = ""
    truncated: bool = False

    @property
    def n_targets(self) -> int:
        """Positions with a loss (a target is token i + 1 for input position i)."""
        return int(self.mask[1:].sum())


def encode_conversations(
    convs: Sequence[Conversation], template: Template, tokenizer: Any, ctx: int, train_on_prompt: bool = False
) -> tuple[list[Example], int]:
    """Tokenize conversations with `template`, cut each to `ctx + 1` tokens.

    Args:
        train_on_prompt: the loss also covers system and user turns (see `Template.pieces`).
    Returns:
        (examples, number dropped because no target token fits in the context).
    """
    out, too_long = [], 0
    for c in convs:
        ids, mask = template.encode(c.messages, tokenizer, train_on_prompt=train_on_prompt)
        ex = Example(np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool), c.where)
        if len(ids) > ctx + 1:
            ex = Example(ex.ids[: ctx + 1], ex.mask[: ctx + 1], c.where, truncated=True)
        if ex.n_targets == 0:
            too_long += 1
            continue
        out.append(ex)
    return out, too_long


def pack_examples(examples: Sequence[Example], ctx: int) -> list[Example]:
    """Concatenate whole examples, in order, into rows of at most `ctx + 1` tokens (greedy, never split)."""
    rows: list[Example] = []
    ids: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    size = 0
    for ex in examples:
        if ids and size + len(ex.ids) > ctx + 1:
            rows.append(Example(np.concatenate(ids), np.concatenate(masks), f"packed row {len(rows)}"))
            ids, masks, size = [], [], 0
        ids.append(ex.ids)
        masks.append(ex.mask)
        size += len(ex.ids)
    if ids:
        rows.append(Example(np.concatenate(ids), np.concatenate(masks), f"packed row {len(rows)}"))
    return rows


def collate(examples: Sequence[Example], pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Right-padded inputs and targets: x [b, L], y [b, L] with y = -100 off the reply tokens and on padding.

    L is the longest example minus one: x holds tokens 0..n-2 of each example, y tokens 1..n-1.
    """
    width = max(len(e.ids) for e in examples) - 1
    x = torch.full((len(examples), width), pad_id, dtype=torch.long)
    y = torch.full((len(examples), width), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.ids) - 1
        x[i, :n] = torch.from_numpy(e.ids[:-1])
        y[i, :n] = torch.from_numpy(np.where(e.mask[1:], e.ids[1:], -100))
    return x, y


def sft_loss(model: Any, batch: tuple[Tensor, Tensor, float]) -> Tensor:
    """Summed cross-entropy over the batch's target tokens times the batch's `scale`.

    `SFTBatches` sets `scale` so that what `fit` optimises and logs per step is the mean over every target
    token of the global batch (see the module docstring); called directly with `scale = 1 / n_targets` it is
    the batch's own masked mean cross-entropy.
    """
    x, y, scale = batch
    logits = model(x)
    nll = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100, reduction="sum"
    )
    loss = nll * scale
    if model.training and getattr(model, "_aux_modules", None):
        loss = loss + model.aux_loss()  # e.g. MoE router balance; zero for dense models
    return loss


class SFTBatches:
    """Micro-batches of SFT examples (or packed rows) for `fit`, a pure function of (seed, step).

    Each epoch visits the training units in a fresh seeded order; the global batch of step s is units
    `s·G .. (s+1)·G - 1` of that sequence (G = batch_size × accum), so a resumed run sees the same batches.
    Under torchrun, process r takes the r-th contiguous share of the global batch. Micro-batches are
    `(x, y, scale)`; see `sft_loss`.
    """

    def __init__(self, units: Sequence[Example], val_units: Sequence[Example], cfg: TrainConfig, pad_id: int = 0):
        if not units:
            raise SFTDataError("no training examples (all were filtered out or held out for validation)")
        self.units, self.val_units, self.cfg, self.pad_id = list(units), list(val_units), cfg, pad_id
        self.global_batch = cfg.batch_size * cfg.accum
        self.has_val = cfg.val_every > 0 and bool(self.val_units)
        self.device = None
        mean_len = float(np.mean([len(u.ids) - 1 for u in self.units]))
        self.tokens_per_step = int(round(self.global_batch * mean_len))
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            self._perms[epoch] = np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.units))
        return self._perms[epoch]

    def step_units(self, step: int) -> list[Example]:
        """The global batch of optimizer step `step` (0-based)."""
        n = len(self.units)
        ks = range(step * self.global_batch, (step + 1) * self.global_batch)
        return [self.units[int(self._perm(k // n)[k % n])] for k in ks]

    def epoch_at(self, step: int) -> float:
        """Epochs completed after `step` optimizer steps."""
        return step * self.global_batch / len(self.units)

    def train(self, step: int) -> list[tuple[Tensor, Tensor, float]]:
        return self.train_shard(step, 0, 1)

    def train_shard(self, step: int, rank: int, world: int) -> list[tuple[Tensor, Tensor, float]]:
        """Process `rank`'s micro-batches (at most `batch_size` rows each) of step `step`'s global batch."""
        units = self.step_units(step)
        total, b = len(units), self.cfg.batch_size
        if total % world:
            raise ValueError(
                f"the global batch of {total} sequences (batch {b} x accum {self.cfg.accum}) cannot be split "
                f"evenly across {world} processes; choose --batch and --accum with a product divisible by {world}"
            )
        n_targets = sum(u.n_targets for u in units)
        k = total // world
        mine = units[rank * k : (rank + 1) * k]
        parts = [mine[i : i + b] for i in range(0, k, b)]
        shares = _micro_shares([(torch.empty(len(p)),) for p in parts]) or [1 / len(parts)] * len(parts)
        out = []
        for p, w in zip(parts, shares):
            x, y = collate(p, self.pad_id)
            out.append((self._to(x), self._to(y), world / (n_targets * w)))
        return out

    def val(self) -> Iterator[tuple[Tensor, Tensor, float]]:
        b = self.cfg.batch_size
        parts = [self.val_units[i : i + b] for i in range(0, len(self.val_units), b)]
        n_targets = sum(u.n_targets for u in self.val_units)
        for p in parts:
            x, y = collate(p, self.pad_id)
            yield self._to(x), self._to(y), len(parts) / n_targets

    def _to(self, t: Tensor) -> Tensor:
        return t.to(self.device) if self.device is not None else t


# ============================================================================================== special tokens
def add_special_tokens(model: GPT, tokens: Template | str | Iterable[str] = "chatml") -> dict[str, int]:
    """Give `model` the special tokens of a template (or a list of token strings); returns {token: id}.

    Missing tokens are added to a copy of the tokenizer (new ids after its vocabulary); when the vocabulary
    outgrows `cfg.d_vocab`, `embed` and `unembed` get new rows and `cfg.d_vocab` grows. The rows of newly added
    tokens start at the mean of the existing rows (so a new token is neither favoured nor impossible). The
    tokenizer's record lists the tokens, so `save`/`load` rebuild the same model. Idempotent: a model that
    already has every token is not changed.
    """
    if isinstance(tokens, (Template, dict)) or isinstance(tokens, (str, os.PathLike)):
        strings = list(load_template(tokens).special_tokens)
    else:
        strings = list(tokens)
    tok = model._require_tokenizer()
    have = tok.special_tokens
    if all(s in have for s in strings):
        return {s: have[s] for s in strings}
    new_tok = tok.with_special_tokens(strings)
    new_ids = sorted({new_tok.special_tokens[s] for s in strings if s not in have} - set(range(tok.vocab_size)))
    resize_token_embeddings(model, max(model.cfg.d_vocab, new_tok.vocab_size), init_rows=new_ids)
    model.tokenizer = new_tok
    return {s: new_tok.special_tokens[s] for s in strings}


@torch.no_grad()
def resize_token_embeddings(model: GPT, d_vocab: int, init_rows: Sequence[int] = ()) -> None:
    """Grow `embed`/`unembed` to `d_vocab` rows (in place; hook names unchanged) and set `init_rows` of both
    to the mean of the rows of the tokenizer's original vocabulary."""
    old = model.cfg.d_vocab
    if d_vocab < old:
        raise ValueError(f"cannot shrink the vocabulary from {old} to {d_vocab}")
    tok = model.tokenizer
    n_mean = min(old, tok.vocab_size) if tok is not None else old
    tied = model.unembed.weight is model.embed.weight
    if d_vocab > old:
        w = model.embed.weight
        new = torch.zeros(d_vocab, w.shape[1], device=w.device, dtype=w.dtype)
        new[:old] = w
        model.embed.weight = nn.Parameter(new, requires_grad=w.requires_grad)
        model.embed.num_embeddings = d_vocab
        if tied:
            model.unembed.weight = model.embed.weight
        else:
            u = model.unembed.weight
            new_u = torch.zeros(d_vocab, u.shape[1], device=u.device, dtype=u.dtype)
            new_u[:old] = u
            model.unembed.weight = nn.Parameter(new_u, requires_grad=u.requires_grad)
        model.unembed.out_features = d_vocab
        model._zero_b_U = torch.zeros(d_vocab, device=model._zero_b_U.device, dtype=model._zero_b_U.dtype)
        model.cfg.d_vocab = d_vocab
    rows = list(init_rows)
    if rows:
        for w in [model.embed.weight] + ([] if tied else [model.unembed.weight]):
            w[rows] = w[:n_mean].float().mean(0).to(w.dtype)


# ============================================================================================== results
@dataclass(repr=False)
class SFTResult(TrainResult):
    """What `sft` returns: a `TrainResult` (model, history, path, `.figure()`) plus the data's story.

    Attributes:
        template: the chat template used.
        report: records dropped, by filter: `empty`, `min_length`, `repetition`, `exact_dup`, `near_dup`
            (those switched on), and `too_long` (no reply token fits in the context).
        n_records: records read.
        n_train, n_val: examples trained on and held out (before packing).
        n_rows: training rows (= n_train without packing).
        truncated: examples cut at the context length (kept).
        packing: whether rows were packed.
    """

    template: Template | None = None
    report: dict[str, int] = field(default_factory=dict)
    n_records: int = 0
    n_train: int = 0
    n_val: int = 0
    n_rows: int = 0
    truncated: int = 0
    packing: bool = False

    def describe_data(self) -> str:
        """One line: records read, dropped per filter, kept for training and validation."""
        dropped = ", ".join(f"{k} {v}" for k, v in self.report.items())
        rows = f" in {self.n_rows} packed rows" if self.packing else ""
        return (
            f"{self.n_records} records; dropped: {dropped or 'none'}; {self.n_train} train{rows} + {self.n_val} val "
            f"examples ({self.truncated} truncated to the context)"
        )

    def __repr__(self) -> str:
        return super().__repr__().replace("TrainResult(", "SFTResult(", 1) + f" [{self.describe_data()}]"


# ============================================================================================== sft()
def sft(
    model: GPT | str | os.PathLike | None,
    data: str | os.PathLike | Sequence[Any] | None = None,
    *,
    template: str | os.PathLike | Template | None = None,
    packing: bool | None = None,
    min_length: int | None = None,
    max_repetition: float | None = None,
    dedup: bool | None = None,
    near_dedup: float | None = None,
    train_on_prompt: bool | None = None,
    config: TrainConfig | None = None,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    callbacks: Sequence[Callable[[dict[str, float]], Any]] = (),
    device: str | None = None,
    progress: bool = True,
    strategy: str = "ddp",
    **settings: Any,
) -> SFTResult:
    """Supervised fine-tuning on instruction / chat data with a chat template; loss on the replies only.

    Args:
        model: a `GPT` (changed in place: special tokens, then training) or a `.tinygpt` path. Ignored with
            `resume=True`.
        data: a JSONL path or a list of records (see the module docstring). With `resume=True`, None reads
            the file the run recorded.
        template: a chat template name ("chatml", "alpaca"), JSON path or `Template` (default "chatml"; on
            resume, the run's).
        packing: pack several conversations per row instead of padding (default False).
        min_length, max_repetition, dedup, near_dedup: quality filters (see `filter_conversations`;
            defaults 0, None, True, None). On resume, the run's unless given.
        train_on_prompt: also train on the system and user turns (their content and end-of-turn), as
            "train on inputs" options elsewhere do (default False: replies only). A tiny model needs it before
            Magpie can sample user queries from it (see `tinygpt.magpie`).
        config, **settings: a `TrainConfig` and/or its fields (`steps`, `max_lr`, `batch_size`, `ctx`, ...);
            the defaults are `train()`'s except `SFT_DEFAULTS` (200 steps, max_lr 3e-4, warmup 20, 5%
            validation every 50 steps). `ctx` (default: the model's n_ctx) is the longest row.
        out, resume, callbacks, device, progress, strategy: as for `train()`. Each step's record also holds
            `epoch` (passes over the training examples so far).
    Returns:
        `SFTResult`; `.model.train_state["sft"]` (also in the saved file) records the template, the data and
        the filter report, so `chat(model, ...)` finds the template again.
    Raises:
        SFTDataError: malformed data (`FILE:LINE` named), or no example left after filtering.
        TemplateError: an unknown or malformed template.
    """
    device = device or default_device()
    out = Path(out) if out is not None else None
    given = {
        k: v
        for k, v in dict(
            packing=packing,
            min_length=min_length,
            max_repetition=max_repetition,
            dedup=dedup,
            near_dedup=near_dedup,
            train_on_prompt=train_on_prompt,
        ).items()
        if v is not None
    }
    run = resume_run(out, config, settings) if resume else None
    if run is not None:
        rec = run.train_state.get("sft")
        if not isinstance(rec, dict):
            raise CheckpointError(f"cannot resume SFT from {out}: it is not an SFT checkpoint")
        cfg, model = run.config, run.model
        tmpl = Template.from_dict(rec["template"])
        if template is not None and load_template(template).to_dict() != tmpl.to_dict():
            raise TemplateError(f"cannot resume with template {template!r}: the run used {tmpl.name!r}")
        opts = {**_FILTER_DEFAULTS, **rec.get("options", {})}
        if changed := sorted(k for k, v in given.items() if opts.get(k) != v):
            warnings.warn(
                f"resuming with changed data options {changed}: the run will not reproduce an uninterrupted one",
                stacklevel=2,
            )
        opts.update(given)
        if data is None:
            data = rec.get("data")
            if data is None:
                raise ValueError("the run's data was given in memory; pass data= to resume it")
    else:
        if data is None:
            raise ValueError("sft needs data: a .jsonl file or a list of records")
        model = _as_model(model)
        cfg = dataclasses.replace(config, **settings) if config else TrainConfig(**{**SFT_DEFAULTS, **settings})
        tmpl = load_template(template if template is not None else "chatml")
        opts = {**_FILTER_DEFAULTS, **given}
        torch.manual_seed(cfg.seed)
        add_special_tokens(model, tmpl)
    tok = model._require_tokenizer()
    tmpl.check_tokenizer(tok)
    ctx = cfg.ctx or model.cfg.n_ctx
    if ctx > model.cfg.n_ctx:
        raise ValueError(f"ctx={ctx} exceeds the model's n_ctx={model.cfg.n_ctx}; lower --ctx")
    cfg.ctx = ctx
    convs = load_sft_data(data)
    kept, report = filter_conversations(
        convs,
        min_length=opts["min_length"],
        max_repetition=opts["max_repetition"],
        dedup=opts["dedup"],
        near_dedup=opts["near_dedup"],
    )
    examples, report["too_long"] = encode_conversations(kept, tmpl, tok, ctx, opts["train_on_prompt"])
    if not examples:
        hint = "relax the filters"
        if report["too_long"]:
            hint += ", or raise ctx (too_long: the prompt fills the context)"
        raise SFTDataError(f"no usable example left in {_data_name(data)} (dropped: {report}); {hint}")
    train_ex, val_ex = split_examples(examples, cfg.val_split, cfg.seed)
    units = pack_examples(train_ex, ctx) if opts["packing"] else train_ex
    batches = SFTBatches(units, val_ex[: cfg.val_batches * cfg.batch_size], cfg)
    record = {
        "template": tmpl.to_dict(),
        "data": str(data) if isinstance(data, (str, os.PathLike)) else None,
        "data_sha256": _data_hash(data),
        "options": opts,
        "report": report,
        "n_train": len(train_ex),
        "n_val": len(val_ex),
    }
    if run is not None and record["data_sha256"] != run.train_state["sft"].get("data_sha256"):
        warnings.warn(
            "the SFT data changed since the run started: it will not reproduce an uninterrupted run", stacklevel=2
        )

    def log_epoch(rec: dict[str, float]) -> None:
        rec["epoch"] = batches.epoch_at(int(rec["step"]))

    res = fit(
        model,
        cfg,
        batches,
        loss_fn=sft_loss,
        val_loss_fn=sft_loss,
        out=out,
        run=run,
        callbacks=[log_epoch, *callbacks],
        device=device,
        progress=progress,
        state={"sft": record},
        desc="sft",
        strategy=strategy,
    )
    res.model.train_state["sft"] = record
    return SFTResult(
        **{f.name: getattr(res, f.name) for f in dataclasses.fields(TrainResult)},
        template=tmpl,
        report=report,
        n_records=len(convs),
        n_train=len(train_ex),
        n_val=len(val_ex),
        n_rows=len(units),
        truncated=sum(e.truncated for e in examples),
        packing=bool(opts["packing"]),
    )


def split_examples(examples: Sequence[Example], val_split: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded split: `val_split` of the examples (at least one when > 0 and there are two or more) held out."""
    n = len(examples)
    n_val = int(round(n * val_split)) if val_split > 0 else 0
    if val_split > 0 and n >= 2:
        n_val = max(1, n_val)
    n_val = min(n_val, n - 1)
    order = np.random.default_rng([seed, 7]).permutation(n)
    val = sorted(order[:n_val].tolist())
    held = set(val)
    return [examples[i] for i in range(n) if i not in held], [examples[i] for i in val]


def _as_model(model: Any) -> GPT:
    if isinstance(model, GPT):
        return model
    if isinstance(model, (str, os.PathLike)):
        if not Path(model).exists():
            raise CheckpointError(f"model {model} does not exist; pass a .tinygpt file (e.g. from `tinygpt train`)")
        return load(model)
    raise ValueError(f"expected a tinygpt GPT or a .tinygpt path, got {type(model).__name__}")


def _data_name(data: Any) -> str:
    return str(data) if isinstance(data, (str, os.PathLike)) else "the records given"


def _data_hash(data: Any) -> str:
    h = hashlib.sha256()
    if isinstance(data, (str, os.PathLike)):
        with open(data, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    else:
        for rec in data:
            msgs = rec.messages if isinstance(rec, Conversation) else rec
            h.update(json.dumps(msgs, sort_keys=True, ensure_ascii=False).encode())
    return h.hexdigest()


# ============================================================================================== finetune()
def finetune(
    model: GPT | str | os.PathLike | None,
    corpus: Any = None,
    *,
    config: TrainConfig | None = None,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    callbacks: Sequence[Callable[[dict[str, float]], Any]] = (),
    device: str | None = None,
    progress: bool = True,
    cache_dir: str | os.PathLike | None = None,
    strategy: str = "ddp",
    **settings: Any,
) -> TrainResult:
    """Continue next-token training of an existing model on new text (all weights train).

    Args:
        model: a `GPT` (trained in place) or a `.tinygpt` path. Ignored with `resume=True`.
        corpus: a text file, directory, `.jsonl` or `Corpus` (None: the built-in Shakespeare); on resume, the
            run's unless given.
        config, **settings: a `TrainConfig` and/or its fields; defaults are `train()`'s except
            `FINETUNE_DEFAULTS` (max_lr 3e-4, warmup 20).
        out, resume, callbacks, device, progress, cache_dir, strategy: as for `train()`.
    Returns:
        `TrainResult`; the checkpoint's training state records the base model's path under "finetune" (and
        keeps the model's SFT record, so a fine-tuned chat model still knows its template).
    """
    from tinygpt.data import load_corpus, tokenize_corpus

    device = device or default_device()
    out = Path(out) if out is not None else None
    run = resume_run(out, config, settings) if resume else None
    if run is not None:
        rec = run.train_state.get("finetune")
        if not isinstance(rec, dict):
            raise CheckpointError(f"cannot resume fine-tuning from {out}: it is not a finetune checkpoint")
        cfg, model = run.config, run.model
        corpus = corpus if corpus is not None else _corpus_from_record(run.train_state.get("corpus"))
        kept = {k: v for k, v in run.train_state.items() if k == "sft"}
    else:
        base = str(model) if isinstance(model, (str, os.PathLike)) else getattr(model, "source_path", None)
        model = _as_model(model)
        cfg = dataclasses.replace(config, **settings) if config else TrainConfig(**{**FINETUNE_DEFAULTS, **settings})
        torch.manual_seed(cfg.seed)
        rec = {"base": base, "base_step": (model.train_state or {}).get("step")}
        kept = {k: v for k, v in (model.train_state or {}).items() if k == "sft"}
    tok = model._require_tokenizer()
    corpus_obj = load_corpus(corpus)
    data = tokenize_corpus(corpus_obj, tok, cache_dir=cache_dir, progress=progress)
    batches = TokenBatches(data, cfg, model.cfg.n_ctx)
    state = {"corpus": _corpus_record(corpus, corpus_obj), "finetune": rec, **kept}
    res = fit(
        model,
        cfg,
        batches,
        out=out,
        run=run,
        callbacks=callbacks,
        device=device,
        progress=progress,
        state=state,
        desc="finetune",
        strategy=strategy,
    )
    res.model.train_state.update({"finetune": rec, **kept})
    return res


__all__ = [
    "SFT_DEFAULTS",
    "FINETUNE_DEFAULTS",
    "SFTDataError",
    "SFTResult",
    "SFTBatches",
    "Conversation",
    "Example",
    "MinHashDeduper",
    "add_special_tokens",
    "collate",
    "encode_conversations",
    "filter_conversations",
    "finetune",
    "load_sft_data",
    "pack_examples",
    "record_to_messages",
    "repetition_score",
    "resize_token_embeddings",
    "sft",
    "sft_loss",
    "split_examples",
]
