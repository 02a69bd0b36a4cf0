"""Evolution strategies: gradient-free optimisation of a model's weights for any reward (Salimans et al. 2017).

    import tinygpt
    from tinygpt.training.es import es, word_list_reward

    model = tinygpt.load("tiny.tinygpt")
    res = es(model, "corpus.txt", steps=50, population=40, sigma=0.02, lr=0.01)     # reward = -loss on a batch
    res = es(model, word_list_reward(["love", "night", "king"]), steps=30, population=16,
             prompts="\\n", samples=4, max_new_tokens=32)                           # a non-differentiable reward
    res.figure()                                                                  # reward / loss per step

## Algorithm
At step t the population holds N members (N even) in antithetic pairs: for each pair j a Gaussian direction ε_j
(one standard-normal tensor per parameter tensor) gives the members θ + σ ε_j and θ − σ ε_j. Every member is
scored; the rewards R_i are replaced by their **centred ranks** F_i = rank(R_i) / (N − 1) − 0.5 (ranks 0..N−1,
ties share their average rank), which makes the update invariant to any monotone change of the reward and
immune to outliers. The update is

    θ ← θ + lr / (N σ) · Σ_i F_i ε_i        (ε_i = ±ε_j; optionally − lr · weight_decay · θ on matrices)

i.e. `lr / (N σ) · Σ_j (F_j+ − F_j−) ε_j`, plain SGD on the smoothed-objective gradient estimate.

Scale: since the centred ranks have variance 1/12, each weight moves by about `lr / (σ √(12 N))` (root mean
square) per step whatever the reward, and mostly in random directions (the estimate's signal-to-noise ratio is
about √(N / parameters)). Keep that well below the weights' own scale (≈ 0.02 at initialisation): `lr=0.01,
sigma=0.02, population=40` moves each weight by ≈ 0.023 per step, fine from a random initialisation but enough
to wreck a trained model in a few steps; fine-tuning a trained model wants e.g. `sigma=0.01, lr=0.001`
(≈ 0.007 per step at N = 16), or fewer parameters (`params=`).

## Noise from seeds
ε_j of parameter tensor k at step t is drawn from a `torch.Generator` seeded with a hash of (seed, t, j, k) (numpy
`SeedSequence`), on the parameter's device. The noise is never stored: it is drawn again for the update, one
tensor at a time, so ES needs one copy of the weights (the centre θ) and one member's noise, whatever N is
(the vmapped path holds `member_batch` members' weights at a time). The same seed gives the same run on the same
device.

## Exactness
A member is evaluated by writing `θ ± σ ε` into the parameters and, afterwards, **copying the saved centre back**
(`ESParams.perturbed`, a context manager that restores also on an exception or Ctrl-C). Subtracting the noise
again would not give the original bits back in floating point. Outside an evaluation the parameters are bitwise
the centre, so `es(..., lr=0)` leaves the model bitwise unchanged (tested).

## What is evaluated together
- Loss reward (a corpus, or a token stream): every member and the centre are scored on the **same** batch of
  windows, drawn per step as `train()` draws them (common random numbers: members differ only by their weights,
  so batch-to-batch noise does not drown their differences). With `batched=True` (the default on CUDA) a chunk of
  `member_batch` members runs as one forward through `torch.func.vmap` over stacked weights
  (`functional_call`; the model's own parameters are not touched). Measured on one H100 (population 40, whole ES
  steps including noise generation and the update): `nano` 8×128 140 → 343 member evaluations/s (vmap, 20 per
  forward), `tiny` 8×256 97 → 182 (8 per forward), `small` 8×256 56 → 136 (40), with the same losses to 4
  decimals. On the CPU the default is one member after another: measured on 2 cores, the vmapped forward was
  1.3-2x slower than the loop (`scaled_dot_product_attention` has no CPU batching rule, and batched matmuls of
  small matrices gain nothing). A model whose forward vmap cannot trace (e.g. data-dependent routing) falls back
  to the loop with a warning.
- Text reward (a callable): each member generates all its texts in one batched `generate` call (prompts ×
  `samples` rows with the KV cache), with the same sampling seed for every member of a step; members run one
  after another (a KV cache belongs to one set of weights). The callable scores each completion (the generated
  text without its prompt); a member's reward is the mean.

## Which parameters
By default every parameter with `requires_grad=True`, so a model with LoRA adapters (`add_lora` freezes the base)
evolves only its adapters. `params="blocks.*.mlp.*,unembed.weight"` chooses by name (fnmatch patterns on
`model.named_parameters()` names). Fewer dimensions give ES a less noisy gradient estimate.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

Reward = Callable[[str], float]


# ---------------------------------------------------------------------------------------------- shaping
def centered_ranks(rewards: Sequence[float] | np.ndarray) -> np.ndarray:
    """Centred-rank fitness shaping: rank / (N − 1) − 0.5 in [−0.5, 0.5]; ties share their average rank.

    Args:
        rewards: [N] rewards (higher is better), N >= 2.
    Returns:
        [N] float64 shaped fitness summing to 0.
    """
    x = np.asarray(rewards, dtype=np.float64).reshape(-1)
    n = len(x)
    if n < 2:
        raise ValueError(f"centred ranks need at least 2 rewards, got {n}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"rewards must be finite, got {x[~np.isfinite(x)][:3].tolist()}")
    order = np.argsort(x, kind="stable")
    ranks = np.empty(n, dtype=np.float64)
    sorted_x = x[order]
    i = 0
    while i < n:  # average the ranks of each run of equal rewards
        j = i
        while j + 1 < n and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0
        i = j + 1
    return ranks / (n - 1) - 0.5


def noise_seed(seed: int, step: int, pair: int, tensor: int) -> int:
    """The generator seed of the noise of parameter tensor `tensor`, antithetic pair `pair`, step `step`."""
    ss = np.random.SeedSequence([int(seed), int(step), int(pair), int(tensor)])
    return int(ss.generate_state(1, dtype=np.uint64)[0] & np.uint64(2**63 - 1))


# ---------------------------------------------------------------------------------------------- parameters
def select_parameters(model: torch.nn.Module, params: str | Sequence[str] | None = None) -> list[tuple[str, Tensor]]:
    """(name, Parameter) pairs ES perturbs: all trainable ones by default, or those whose names match patterns.

    Args:
        model: the model.
        params: None (every parameter with `requires_grad`), or fnmatch patterns on parameter names as a list or
            a comma-separated string, e.g. "blocks.*.mlp.*,unembed.weight". Shared (tied) parameters appear once.
    """
    named = list(model.named_parameters())  # deduplicated: a tied weight appears once
    if params is None:
        out = [(n, p) for n, p in named if p.requires_grad]
        if not out:
            raise ValueError("the model has no trainable parameters; pass params= to choose which ones ES evolves")
        return out
    pats = [s.strip() for s in params.split(",")] if isinstance(params, str) else [str(s) for s in params]
    pats = [p for p in pats if p]
    out = [(n, p) for n, p in named if any(fnmatch.fnmatchcase(n, pat) for pat in pats)]
    if not out:
        shown = ", ".join(n for n, _ in named[:8])
        raise ValueError(f"params={params!r} matches no parameter; names look like: {shown}, ...")
    return out


class ESParams:
    """The parameters ES evolves, their centre θ (a bitwise copy) and the seeded antithetic noise.

    Member m of a step is pair m // 2 with sign +1 (m even) or −1 (m odd): θ + sign · σ · ε_pair.

    Attributes:
        names: parameter names, in `model.named_parameters()` order.
        params: the live Parameters (written during an evaluation, restored after).
        center: float copies of the centre θ, one per parameter (same dtype and device).
        seed: base seed of the noise.
    """

    def __init__(self, model: torch.nn.Module, params: str | Sequence[str] | None = None, seed: int = 0):
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        pairs = select_parameters(model, params)
        self.names = [n for n, _ in pairs]
        self.params = [p for _, p in pairs]
        self.seed = int(seed)
        self.center = [p.detach().clone() for p in self.params]

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    def noise(self, step: int, pair: int, index: int) -> Tensor:
        """ε of tensor `index` for (step, pair): standard normal, float32, on the parameter's device."""
        p = self.params[index]
        g = torch.Generator(device=p.device)
        g.manual_seed(noise_seed(self.seed, step, pair, index))
        return torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32)

    def member_value(self, index: int, eps: Tensor, sign: float, sigma: float) -> Tensor:
        c = self.center[index]
        return torch.add(c.float(), eps, alpha=sign * sigma).to(c.dtype)

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the centre back into the parameters (bit for bit)."""
        for p, c in zip(self.params, self.center):
            p.copy_(c)

    @contextlib.contextmanager
    def perturbed(self, step: int, member: int, sigma: float) -> Iterator[None]:
        """Inside the block the parameters are member `member`'s (θ ± σ ε); on exit (also on an error) they are
        the centre again, bitwise."""
        pair, sign = divmod(member, 2)[0], (1.0 if member % 2 == 0 else -1.0)
        try:
            with torch.no_grad():
                for i, p in enumerate(self.params):
                    p.copy_(self.member_value(i, self.noise(step, pair, i), sign, sigma))
            yield
        finally:
            self.restore()

    def stacked(self, step: int, members: Sequence[int], sigma: float) -> dict[str, Tensor]:
        """{name: [len(members), *shape]} member weights for a vmapped forward (the parameters are untouched)."""
        out: dict[str, Tensor] = {}
        pairs = sorted({m // 2 for m in members})
        for i, name in enumerate(self.names):
            eps = {j: self.noise(step, j, i) for j in pairs}
            out[name] = torch.stack(
                [self.member_value(i, eps[m // 2], 1.0 if m % 2 == 0 else -1.0, sigma) for m in members]
            )
        return out

    @torch.no_grad()
    def update(self, step: int, fitness: np.ndarray, sigma: float, lr: float, weight_decay: float = 0.0) -> float:
        """θ ← θ + lr / (N σ) Σ_i F_i ε_i − lr · weight_decay · θ (matrices only); returns ‖Δθ‖.

        The new centre is computed in full before it replaces the old one, so an interrupt leaves either.
        """
        n = len(fitness)
        w = [float(fitness[2 * j] - fitness[2 * j + 1]) for j in range(n // 2)]
        scale = lr / (n * sigma)
        new, sq = [], 0.0
        for i, c in enumerate(self.center):
            g = torch.zeros(c.shape, dtype=torch.float32, device=c.device)
            for j, wj in enumerate(w):
                if wj != 0.0:
                    g.add_(self.noise(step, j, i), alpha=wj)
            delta = g.mul_(scale)
            if weight_decay and c.ndim >= 2:
                delta.add_(c.float(), alpha=-lr * weight_decay)
            v = (c.float() + delta).to(c.dtype)
            sq += float((v.float() - c.float()).pow(2).sum())
            new.append(v)
        self.center = new
        self.restore()
        return math.sqrt(sq)


# ---------------------------------------------------------------------------------------------- rewards
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
            raise ValueError(f"word list {words} is not a file; pass a file of words or a list of words")
        vocab_src: Iterable[str] = words_of(p.read_text(encoding="utf-8"))
    else:
        vocab_src = words

    def norm(w: str) -> str:
        return w if case_sensitive else w.lower()

    vocab = {norm(w) for w in vocab_src if len(w) >= min_length}
    if not vocab:
        raise ValueError(f"the word list has no words of {min_length} letters or more")

    def reward(text: str) -> float:
        ws = [w for w in words_of(text) if len(w) >= min_length]
        if not ws or len(ws) < min_words:
            return 0.0
        hits = [norm(w) for w in ws if norm(w) in vocab]
        return (len(set(hits)) if distinct else len(hits)) / len(ws)

    reward.vocab = vocab  # type: ignore[attr-defined]
    return reward


# ---------------------------------------------------------------------------------------------- settings
@dataclass
class ESConfig:
    """Settings of an ES run (stored in the checkpoint it writes).

    Attributes:
        steps, population, sigma, lr: ES steps, members per step (even: antithetic pairs), noise scale, step size.
        weight_decay: decay of matrices, `θ ← θ − lr · weight_decay · θ` each step.
        params: parameter name patterns (None: all trainable).
        batch_size, ctx: the windows every member is scored on (loss reward); ctx defaults to the model's n_ctx.
        val_split, val_every, val_batches: held-out loss of the centre every `val_every` steps (loss reward).
        prompts, samples, max_new_tokens, temperature, top_k: generation for a text reward.
        batched: vmap members together (None: on CUDA only); member_batch: members per vmapped forward.
        seed: noise, batches and sampling.
    """

    steps: int = 50
    population: int = 40
    sigma: float = 0.02
    lr: float = 0.01
    weight_decay: float = 0.0
    params: str | list[str] | None = None
    batch_size: int = 8
    ctx: int | None = None
    val_split: float = 0.01
    val_every: int = 10
    val_batches: int = 4
    prompts: list[str] = field(default_factory=lambda: ["\n"])
    samples: int = 4
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int | None = None
    batched: bool | None = None
    member_batch: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.prompts, str):
            self.prompts = [self.prompts]
        self.prompts = list(self.prompts)
        checks = {
            "steps": self.steps >= 0,
            "population": self.population >= 2 and self.population % 2 == 0,
            "sigma": self.sigma > 0,
            "lr": self.lr >= 0,
            "weight_decay": self.weight_decay >= 0,
            "batch_size": self.batch_size >= 1,
            "ctx": self.ctx is None or self.ctx >= 1,
            "val_split": 0 <= self.val_split < 1,
            "val_every": self.val_every >= 0,
            "val_batches": self.val_batches >= 1,
            "prompts": bool(self.prompts) and all(isinstance(p, str) and p for p in self.prompts),
            "samples": self.samples >= 1,
            "max_new_tokens": self.max_new_tokens >= 1,
            "temperature": self.temperature >= 0,
            "member_batch": self.member_batch >= 1,
            "seed": self.seed >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                hint = " (an even number >= 2: members come in antithetic pairs)" if name == "population" else ""
                raise ValueError(f"invalid ES setting {name}={getattr(self, name)!r}{hint}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------- objectives
class _LossObjective:
    """Reward = −(mean next-token loss) on one batch of windows per step, the same batch for every member."""

    kind = "loss"

    def __init__(self, model, data: Any, cfg: ESConfig, cache_dir, progress: bool):
        from tinygpt.data import load_corpus, tokenize_corpus, val_starts

        self.cfg = cfg
        self.ctx = cfg.ctx or model.cfg.n_ctx
        if self.ctx > model.cfg.n_ctx:
            raise ValueError(f"ctx={self.ctx} exceeds the model's n_ctx={model.cfg.n_ctx}")
        if isinstance(data, (Tensor, np.ndarray)):
            tokens = np.asarray(torch.as_tensor(data).reshape(-1).cpu().numpy(), dtype=np.int64)
            self.source = f"{len(tokens)} tokens"
        else:
            tok = model._require_tokenizer()
            corpus = load_corpus(data)
            tokens = tokenize_corpus(corpus, tok, cache_dir=cache_dir, progress=progress).tokens
            self.source = corpus.name
        if len(tokens) and int(tokens.max()) >= model.cfg.d_vocab:
            raise ValueError(f"token id {int(tokens.max())} is outside the model's vocabulary of {model.cfg.d_vocab}")
        n_val = int(len(tokens) * cfg.val_split) if cfg.val_every else 0
        self.train_tokens, self.val_tokens = tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :]
        if len(self.train_tokens) <= self.ctx + 1:
            raise ValueError(f"{len(self.train_tokens)} training tokens are too few for ctx={self.ctx}; lower ctx")
        self.v_starts = None
        if n_val and len(self.val_tokens) > self.ctx + 1:
            self.v_starts = val_starts(len(self.val_tokens), self.ctx, cfg.val_batches * cfg.batch_size)
        self.device = None

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        from tinygpt.data import batch_starts, windows

        starts = batch_starts(len(self.train_tokens), self.ctx, self.cfg.batch_size, self.cfg.seed, step)
        return windows(self.train_tokens, starts, self.ctx, self.device)

    @torch.no_grad()
    def score(self, model, data) -> float:
        x, y = data
        return -float(model(x, return_type="loss", targets=y))

    @torch.no_grad()
    def score_stacked(self, model, stacked: dict[str, Tensor], data) -> list[float]:
        from torch.func import functional_call, vmap

        x, y = data

        def loss(p):
            return functional_call(model, p, (x,), {"return_type": "loss", "targets": y})

        with warnings.catch_warnings():  # CPU SDPA has no batching rule: vmap loops inside (and says so)
            warnings.filterwarnings("ignore", message=".*batching rule.*")
            return [-float(v) for v in vmap(loss)(stacked)]

    @torch.no_grad()
    def val_loss(self, model) -> float | None:
        from tinygpt.data import windows

        if self.v_starts is None:
            return None
        b = self.cfg.batch_size
        losses = []
        for i in range(0, len(self.v_starts), b):
            x, y = windows(self.val_tokens, self.v_starts[i : i + b], self.ctx, self.device)
            losses.append(float(model(x, return_type="loss", targets=y)) * len(x))
        return sum(losses) / len(self.v_starts)


class _TextObjective:
    """Reward = mean of `reward(completion)` over prompts × samples generated by the member."""

    kind = "reward"

    def __init__(self, model, reward: Reward, cfg: ESConfig):
        tok = model._require_tokenizer()
        self.reward, self.cfg = reward, cfg
        self.prompts = [tok.encode(p) for p in cfg.prompts]
        if any(not ids for ids in self.prompts):
            raise ValueError("a prompt encodes to no tokens; give at least one character (e.g. a newline)")
        self.tok = tok
        self.source = f"{reward.__name__ if hasattr(reward, '__name__') else type(reward).__name__} on generated text"
        self.device = None
        self.last_texts: list[str] = []

    def batch(self, step: int) -> int:
        return (self.cfg.seed * 1_000_003 + step) % (2**62)  # one sampling seed per step, shared by the members

    @torch.no_grad()
    def score(self, model, sample_seed: int) -> float:
        from tinygpt.sampling import generate_tokens

        texts: list[str] = []
        groups: dict[int, list[list[int]]] = {}  # prompts of equal length generate together
        for ids in self.prompts:
            groups.setdefault(len(ids), []).append(ids)
        for k, (_, group) in enumerate(sorted(groups.items())):
            rows = torch.tensor([ids for ids in group for _ in range(self.cfg.samples)], device=self.device)
            steps = list(
                generate_tokens(
                    model,
                    rows,
                    self.cfg.max_new_tokens,
                    temperature=self.cfg.temperature,
                    top_k=self.cfg.top_k,
                    seed=(sample_seed + k) % (2**62),
                )
            )
            gen = torch.stack(steps, dim=1).cpu().tolist()
            texts.extend(self.tok.decode(g) for g in gen)
        scores = [float(self.reward(t)) for t in texts]
        bad = [s for s in scores if not math.isfinite(s)]
        if bad:
            raise ValueError(f"the reward returned a non-finite value ({bad[0]}); return finite floats")
        self.last_texts = texts
        return float(np.mean(scores))

    def val_loss(self, model) -> None:
        return None


# ---------------------------------------------------------------------------------------------- result
@dataclass
class ESResult:
    """What `es` returns.

    Attributes:
        model: the evolved model (in eval mode; the same object that was passed in, updated in place).
        config: the `ESConfig`.
        objective: "loss" (reward = −loss on a batch) or "reward" (a callable on generated text).
        history: one dict per step: `step`, `reward` (the centre's, before the update, on that step's batch or
            sampling seed), `loss` (loss objective), `pop_mean`, `pop_std`, `pop_max`, `pop_min` (the members'
            rewards), `update_norm` and `update_rms` (‖Δθ‖ and its root mean square per weight),
            `evals_per_sec`, `elapsed`, and `val_loss` when validated.
        final_reward: the centre's reward after the last update (a fresh batch / sampling seed).
        final_val_loss: held-out loss after the last update (loss objective with a validation split).
        n_params: parameters evolved; path: checkpoint written (or None); elapsed; interrupted (Ctrl-C or a
            callback raising KeyboardInterrupt stops cleanly after restoring the centre).
        samples: the centre's completions at the end (text reward).
    """

    model: Any
    config: ESConfig
    objective: str
    history: list[dict[str, float]] = field(default_factory=list)
    final_reward: float | None = None
    final_val_loss: float | None = None
    n_params: int = 0
    path: Path | None = None
    elapsed: float = 0.0
    interrupted: bool = False
    samples: list[str] = field(default_factory=list, repr=False)

    @property
    def step(self) -> int:
        return int(self.history[-1]["step"]) if self.history else 0

    @property
    def rewards(self) -> list[float]:
        return [h["reward"] for h in self.history]

    @property
    def losses(self) -> list[float]:
        return [h["loss"] for h in self.history if "loss" in h]

    @property
    def val_losses(self) -> list[tuple[int, float]]:
        return [(int(h["step"]), h["val_loss"]) for h in self.history if "val_loss" in h]

    def figure(self):
        """Plotly figure: the centre's loss (or reward) per step, the population's range, validation loss."""
        import plotly.graph_objects as go

        steps = [h["step"] for h in self.history]
        loss = self.objective == "loss"
        sgn = -1.0 if loss else 1.0  # plot loss for the loss objective
        lo = [sgn * h["pop_max" if loss else "pop_min"] for h in self.history]
        hi = [sgn * h["pop_min" if loss else "pop_max"] for h in self.history]
        name = "loss" if loss else "reward"
        fig = go.Figure()
        fig.add_trace(go.Scatter(x=steps, y=hi, mode="lines", line={"width": 0}, showlegend=False, hoverinfo="skip"))
        fig.add_trace(
            go.Scatter(
                x=steps,
                y=lo,
                mode="lines",
                line={"width": 0},
                fill="tonexty",
                fillcolor="rgba(99,110,250,0.2)",
                name=f"population {name} (min-max)",
            )
        )
        fig.add_trace(go.Scatter(x=steps, y=[sgn * h["reward"] for h in self.history], name=f"centre {name}"))
        if self.val_losses:
            vs, vl = zip(*self.val_losses)
            fig.add_trace(go.Scatter(x=vs, y=vl, name="val loss", mode="lines+markers"))
        c = self.config
        fig.update_layout(
            title=f"evolution strategies: N={c.population}, σ={c.sigma:g}, lr={c.lr:g}",
            xaxis_title="step",
            yaxis_title=name,
            template="plotly_white",
        )
        return fig

    def __repr__(self) -> str:
        first = self.history[0]["reward"] if self.history else float("nan")
        if self.objective == "loss":
            what = f"loss {-first:.4f} -> {self.history[-1]['loss']:.4f}" if self.history else "no steps"
            if self.final_val_loss is not None:
                what += f", val loss {self.final_val_loss:.4f}"
        else:
            end = self.final_reward if self.final_reward is not None else float("nan")
            what = f"reward {first:.4f} -> {end:.4f}" if self.history else "no steps"
        flag = ", interrupted" if self.interrupted else ""
        return f"ESResult(step {self.step}, {what}, {self.n_params:,} params evolved, {self.elapsed:.1f}s{flag})"


# ---------------------------------------------------------------------------------------------- es
def es(
    model: Any,
    objective: Reward | Any = None,
    steps: int | None = None,
    population: int | None = None,
    sigma: float | None = None,
    lr: float | None = None,
    *,
    config: ESConfig | None = None,
    out: str | os.PathLike | None = None,
    callbacks: Sequence[Callable[[dict[str, float]], Any]] = (),
    device: str | None = None,
    progress: bool = True,
    cache_dir: str | os.PathLike | None = None,
    **settings: Any,
) -> ESResult:
    """Optimise a model's weights with antithetic evolution strategies (see the module docstring).

    Args:
        model: a `GPT`, or a `.tinygpt` path (loaded). Updated in place.
        objective: what to maximise: a callable `reward(text) -> float` scored on generated completions
            (non-differentiable rewards welcome), or data whose negative next-token loss is the reward: a corpus
            path (text file, directory, .jsonl), a `Corpus`, None (the built-in Shakespeare) or a 1-D token
            tensor / array.
        steps, population, sigma, lr: ES steps (default 50), members per step (even; default 40), noise scale
            (default 0.02) and step size (default 0.01); None keeps `config`'s value or the default.
        config, **settings: an `ESConfig` and/or its fields (`params`, `weight_decay`, `batch_size`, `ctx`,
            `val_every`, `prompts`, `samples`, `max_new_tokens`, `temperature`, `batched`, `member_batch`, `seed`).
        out: write the evolved model here (`.tinygpt`, also after an interrupt) with the run in its train state.
        callbacks: called with each step's history dict; raising KeyboardInterrupt stops the run cleanly.
        device: move the model there first (default: leave it where it is).
        progress: a tqdm progress bar.
        cache_dir: token cache directory (loss objective).
    Returns:
        `ESResult` (`.history`, `.rewards`, `.losses`, `.figure()`).
    """
    from tqdm.auto import tqdm

    from tinygpt.checkpoint import load, save

    base = dataclasses.asdict(config) if config is not None else {}
    given = {"steps": steps, "population": population, "sigma": sigma, "lr": lr}
    given = {k: v for k, v in given.items() if v is not None}
    cfg = ESConfig(**{**base, **given, **settings})
    if isinstance(model, (str, os.PathLike)):
        model = load(model)
    if device is not None:
        model.to(device)
    dev = next(model.parameters()).device
    if callable(objective) and not isinstance(objective, torch.nn.Module):
        obj: Any = _TextObjective(model, objective, cfg)
    else:
        obj = _LossObjective(model, objective, cfg, cache_dir, progress)
    obj.device = dev
    space = ESParams(model, cfg.params, cfg.seed)
    batched = (dev.type == "cuda") if cfg.batched is None else bool(cfg.batched)
    batched = batched and obj.kind == "loss"
    n = cfg.population
    history: list[dict[str, float]] = []
    model.eval()  # no dropout while members are compared; left in eval mode, as train() leaves it
    t0 = time.perf_counter()
    interrupted = False
    bar = tqdm(total=cfg.steps, desc="es", disable=not progress, dynamic_ncols=True)

    def score_members(step: int, data: Any) -> list[float]:
        nonlocal batched
        if batched:
            try:
                out: list[float] = []
                for i in range(0, n, cfg.member_batch):
                    members = list(range(i, min(n, i + cfg.member_batch)))
                    out.extend(obj.score_stacked(model, space.stacked(step, members, cfg.sigma), data))
                return out
            except (RuntimeError, NotImplementedError, ValueError) as e:
                warnings.warn(
                    f"ES could not vmap this model's forward ({type(e).__name__}: {str(e)[:200]}); "
                    "evaluating members one after another",
                    stacklevel=3,
                )
                batched = False
        scores = []
        for m in range(n):
            with space.perturbed(step, m, cfg.sigma):
                scores.append(obj.score(model, data))
        return scores

    step = 0
    try:
        for step in range(cfg.steps):
            t_step = time.perf_counter()
            data = obj.batch(step)
            centre = obj.score(model, data)
            rewards = np.asarray(score_members(step, data), dtype=np.float64)
            if not np.all(np.isfinite(rewards)):
                raise ValueError(f"non-finite rewards at step {step + 1}: {rewards[~np.isfinite(rewards)][:3]}")
            fitness = centered_ranks(rewards)
            norm = space.update(step, fitness, cfg.sigma, cfg.lr, cfg.weight_decay)
            dt = time.perf_counter() - t_step
            rec: dict[str, float] = {
                "step": step + 1,
                "reward": centre,
                "pop_mean": float(rewards.mean()),
                "pop_std": float(rewards.std()),
                "pop_max": float(rewards.max()),
                "pop_min": float(rewards.min()),
                "update_norm": norm,
                "update_rms": norm / math.sqrt(max(1, space.numel)),
                "evals_per_sec": (n + 1) / dt if dt > 0 else float("nan"),
                "elapsed": time.perf_counter() - t0,
            }
            if obj.kind == "loss":
                rec["loss"] = -centre
                if cfg.val_every and ((step + 1) % cfg.val_every == 0 or step + 1 == cfg.steps):
                    v = obj.val_loss(model)
                    if v is not None:
                        rec["val_loss"] = v
            history.append(rec)
            shown = f"loss {-centre:.3f}" if obj.kind == "loss" else f"reward {centre:.3f}"
            bar.set_postfix_str(f"{shown} | pop {rec['pop_mean']:.3f} | {rec['evals_per_sec']:.1f} evals/s")
            bar.update(1)
            for cb in callbacks:
                cb(rec)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
        space.restore()  # the centre, bitwise (after an interrupt too)
    res = ESResult(
        model,
        cfg,
        obj.kind,
        history,
        n_params=space.numel,
        elapsed=time.perf_counter() - t0,
        interrupted=interrupted,
    )
    if not interrupted:
        done = len(history)
        res.final_reward = obj.score(model, obj.batch(done))
        if obj.kind == "reward":
            res.samples = list(obj.last_texts)
        else:
            res.final_val_loss = obj.val_loss(model)
    if out is not None:
        model.train_state = {
            "es": {**cfg.to_dict(), "objective": obj.kind, "source": obj.source, "params_evolved": space.names},
            "step": len(history),
            "reward": history[-1]["reward"] if history else None,
            "history": history,
        }
        res.path = save(model, out)
    return res


__all__ = [
    "ESConfig",
    "ESParams",
    "ESResult",
    "centered_ranks",
    "es",
    "noise_seed",
    "select_parameters",
    "word_list_reward",
    "words_of",
]
