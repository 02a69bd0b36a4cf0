"""Induction-head toy task: data, a small attention-heavy config and a short training loop.

Induction heads (Olsson et al. 2022) complete `[A][B] ... [A] -> [B]`: a previous-token head in one layer
writes "the token before me was A" into each position, and a head in a later layer attends from the second
`A` to the position *after* the first `A` (K-composition) and copies its token. On sequences of random tokens
repeated twice this is the only way to predict the second copy, so a 2-layer model trained on them grows one.

    model = train_induction_model(seed=3)            # 500 steps: ~40 CPU-seconds
    scores = tinygpt.interp.induction_scores(model)  # [n_layers, n_heads]

The training sequences place the repeated segment at a random offset with a random length inside random
tokens, so no fixed positional shortcut predicts the copy; only the repeated copy's tokens are trained on.
(Starting every sequence with the repeat lets a 2-layer model solve it with positional arithmetic instead.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from tinygpt.config import GPTConfig
from tinygpt.inputs import progress_enabled
from tinygpt.model import GPT


def repeated_tokens(
    batch: int, seq_len: int, d_vocab: int, *, seed: int = 0, generator: torch.Generator | None = None
) -> Tensor:
    """Random tokens repeated twice, TransformerLens' induction-score input: [batch, 2 * seq_len]."""
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    first = torch.randint(0, d_vocab, (batch, seq_len), generator=generator)
    return torch.cat([first, first], dim=1)


def induction_batch(
    batch: int,
    n_ctx: int,
    d_vocab: int,
    *,
    min_len: int = 6,
    max_len: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Random tokens with one segment repeated right after itself, at a random offset and length per row.

    No fixed offset or position predicts the copy, so only "find the previous occurrence of this token and
    copy what followed it" does.

    Returns:
        tokens [batch, n_ctx] and targets [batch, n_ctx]: the next token where it lies in the copy and is
        predictable from the first occurrence (-100 elsewhere), for `model(tokens, targets=targets)`.
    """
    max_len = max_len if max_len is not None else n_ctx // 2 - 2
    if not 2 <= min_len <= max_len <= n_ctx // 2:
        raise ValueError(f"need 2 <= min_len <= max_len <= n_ctx // 2, got {min_len}, {max_len}, n_ctx={n_ctx}")
    noise = torch.randint(0, d_vocab, (batch, n_ctx), generator=generator)
    seg = torch.randint(min_len, max_len + 1, (batch, 1), generator=generator)  # segment length S
    start = (torch.rand((batch, 1), generator=generator) * (n_ctx - 2 * seg + 1)).long()  # offset p
    pos = torch.arange(n_ctx)[None]
    in_copy = (pos >= start + seg) & (pos < start + 2 * seg)
    tokens = noise.gather(1, torch.where(in_copy, pos - seg, pos))
    targets = torch.full_like(tokens, -100)
    # position t predicts tokens[t + 1]: predictable when both t and t + 1 lie in the copy
    predictable = (pos >= start + seg) & (pos < start + 2 * seg - 1)
    targets[:, :-1] = torch.where(predictable[:, :-1], tokens[:, 1:], -100)
    return tokens, targets


def induction_config(**overrides) -> GPTConfig:
    """A 2-layer, 4-head, d_model 64, n_ctx 64 config with a tiny MLP (attention-heavy) and 64 tokens."""
    base = dict(n_layers=2, d_model=64, n_heads=4, n_ctx=64, d_mlp=16, d_vocab=64)
    return GPTConfig(**{**base, **overrides})


def train_induction_model(
    cfg: GPTConfig | None = None,
    *,
    steps: int = 500,
    batch_size: int = 128,
    lr: float = 3e-3,
    warmup: int = 30,
    seed: int = 0,
    first_layer_head_dropout: float = 0.25,
    other_head_dropout: float = 0.5,
    sinusoidal: bool = True,
    progress: bool | None = None,
    callbacks: Sequence[Callable[[dict[str, float]], Any]] = (),
) -> GPT:
    """Train a small GPT on repeated random segments (see `induction_batch`) and return it in eval mode.

    Two choices make the circuit the textbook one, so that scores, ablations and patching can be checked
    against each other (left alone, every layer-1 head becomes a partial induction head and single layer-0
    heads carry the previous-token signal, so no one head is "the" induction head):

    - layer-0 head dropout: each layer-0 head's output is dropped (per sequence) with probability
      `first_layer_head_dropout`, so the previous-token signal is spread over several layer-0 heads;
    - one reliable head: in each later layer one head (drawn from `seed`) is always on and the others are
      dropped with probability `other_head_dropout`, so the model comes to rely on that head.

    Args:
        cfg: model config (default `induction_config()`).
        steps, batch_size, lr, warmup: AdamW (betas (0.9, 0.99); weight decay 0.01 on matrices and embeddings
            only, as `tinygpt.train` does), linear warmup, cosine decay to lr / 10, gradient clipping 1.0.
        seed: seeds the initialisation, the data and the lead heads.
        sinusoidal: initialise the positional embeddings with (small) sinusoids, which makes "attend to the
            previous position" easy to learn.
        progress: a progress bar with the loss (None: the package default, `tinygpt.inputs.DEFAULT_PROGRESS`).
        callbacks: functions called after each step with `{"step": step, "loss": loss, "model": model}` (as
            `train`'s are, plus the model being trained), e.g. `tinygpt.interp.AnalysisCallback` to follow the
            induction head's formation; the head dropout is off while a callback puts the model in eval mode.
    """
    from tqdm.auto import tqdm

    cfg = cfg or induction_config()
    torch.manual_seed(seed)
    model = GPT(cfg)
    if sinusoidal:
        model.pos_embed.weight.data.copy_(_sinusoidal(cfg.n_ctx, cfg.d_model) * 0.02)
    params = list(model.parameters())
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.01},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99), eps=1e-8, fused=True)
    gen = torch.Generator().manual_seed(seed)
    lead = torch.randint(0, cfg.n_heads, (cfg.n_layers,), generator=gen).tolist()

    def head_dropout(z: Tensor, hook) -> Tensor:  # z: [batch, pos, head, d_head]
        if not hook.training:  # a callback analysing the model (eval mode): no dropout, no draw from `gen`
            return z
        keep = torch.rand(z.shape[0], 1, z.shape[2], 1, generator=gen) >= first_layer_head_dropout
        return z * keep.to(z.dtype) / (1 - first_layer_head_dropout)

    def unreliable_others(z: Tensor, hook) -> Tensor:  # every head but the lead one may drop out
        if not hook.training:
            return z
        keep = torch.rand(z.shape[0], 1, z.shape[2], 1, generator=gen) >= other_head_dropout
        keep[:, :, lead[hook.layer()]] = True
        scale = torch.full((z.shape[2], 1), 1 / (1 - other_head_dropout), dtype=z.dtype)
        scale[lead[hook.layer()]] = 1.0
        return z * keep.to(z.dtype) * scale

    hooks = [(f"blocks.{i}.attn.hook_z", unreliable_others) for i in range(1, cfg.n_layers) if other_head_dropout]
    if first_layer_head_dropout > 0:
        hooks.append(("blocks.0.attn.hook_z", head_dropout))
    model.train()
    bar = tqdm(range(steps), desc="induction model", disable=not progress_enabled(progress), leave=False)
    with model.hooks(fwd_hooks=hooks):
        for step in bar:
            frac = step / max(1, steps - 1)
            cur = lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
            for group in opt.param_groups:
                group["lr"] = cur
            tokens, targets = induction_batch(batch_size, cfg.n_ctx, cfg.d_vocab, generator=gen)
            loss = model(tokens, return_type="loss", targets=targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            for cb in callbacks:
                cb({"step": step + 1, "loss": loss.item(), "model": model})
            if step % 10 == 0 or step == steps - 1:
                bar.set_postfix_str(f"loss {loss.item():.3f}", refresh=False)
    return model.eval()


def _sinusoidal(n_ctx: int, d_model: int) -> Tensor:
    pos = torch.arange(n_ctx, dtype=torch.float32)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, d_model, 2, dtype=torch.float32) / d_model)
    out = torch.zeros(n_ctx, d_model)
    out[:, 0::2] = torch.sin(pos * freq)
    out[:, 1::2] = torch.cos(pos * freq[: d_model // 2])
    return out
