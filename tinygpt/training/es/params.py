"""The ES search space: which parameters evolve, their centre θ, the seeded antithetic noise, the update.

Member m of a step is pair m // 2 with sign +1 (m even) or −1 (m odd): θ + sign · σ · ε_pair, where ε of
parameter tensor k is drawn from a generator seeded with a hash of (seed, step, pair, k) and never stored.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from tinygpt.training.settings import SettingError


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
        raise SettingError(f"centred ranks need at least 2 rewards, got {n}")
    if not np.all(np.isfinite(x)):
        raise SettingError(f"rewards must be finite, got {x[~np.isfinite(x)][:3].tolist()}")
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
            raise SettingError("the model has no trainable parameters; pass params= to choose which ones ES evolves")
        return out
    pats = [s.strip() for s in params.split(",")] if isinstance(params, str) else [str(s) for s in params]
    pats = [p for p in pats if p]
    out = [(n, p) for n, p in named if any(fnmatch.fnmatchcase(n, pat) for pat in pats)]
    if not out:
        shown = ", ".join(n for n, _ in named[:8])
        raise SettingError(f"params={params!r} matches no parameter; names look like: {shown}, ...")
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
            raise SettingError(f"seed must be >= 0, got {seed}")
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


__all__ = ["ESParams", "centered_ranks", "noise_seed", "select_parameters"]
