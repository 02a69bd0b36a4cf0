"""SFT examples as tokens: conversations encoded with a template (loss mask on the replies), packed or padded
into micro-batches for `fit`, and the token-weighted loss.

The loss of an optimizer step is the mean cross-entropy over *all* target tokens of its global batch (every
micro-batch and process), not a mean of per-sequence or per-micro-batch means, so long and short replies weigh by
their tokens and the loss does not depend on how the batch is split into micro-batches or processes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from tinygpt.training.loop import _micro_shares, check_global_batch
from tinygpt.training.settings import TrainConfig
from tinygpt.training.sft.data import Conversation, SFTDataError
from tinygpt.training.templates import Template


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
    if callable(getattr(model, "logits_unobserved", None)):  # a GPT: per-token losses without the logits
        nll = model(x, targets=y, return_type="loss", loss_per_token=True).sum()  # (0 where ignored)
    else:  # any module returning logits (a wrapper, a test double)
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
        check_global_batch(total, self.cfg, world)
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


__all__ = ["Example", "SFTBatches", "collate", "encode_conversations", "pack_examples", "sft_loss", "split_examples"]
