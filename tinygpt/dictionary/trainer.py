"""One dictionary's optimisation: data-dependent initialisation, the training step, its resumable state.

The loss of a step on a batch `x [batch, d_in]` with targets `y [batch, d_out]` (`y = x` for an SAE), both
normalised (`x * in_scale`, `y * out_scale`)::

    mse       = mean_rows ||recon - y||^2                          (summed over features, as SAELens)
    topk, batchtopk:  + aux_coef * min(n_dead / aux_k, 1) * mean_rows ||auxk_recon - (y - recon)||^2
                      AuxK (Gao et al. 2024): the aux_k largest pre-activations among dead latents, through a
                      ReLU, decoded without b_dec, predict the detached residual
    relu:             + l1_coef * mean_rows sum_i acts_i            (decoder rows have unit norm)
    jumprelu:         + l0_coef * mean_rows sum_i H(pre_i - theta_i) (straight-through gradient to theta)

The sparsity coefficient ramps up linearly over `sparsity_warmup` steps. Adam; the learning rate warms up
linearly, stays flat, then decays linearly to 0 over the last `decay` steps. Before each step the component of
each decoder row's gradient along the row is removed, after it every row is rescaled to unit norm. A latent is
dead once it has not fired for `dead_after` training tokens. BatchTopK's inference threshold follows
`theta <- (1 - threshold_lr) theta + threshold_lr * (smallest activation kept)` (SAELens' rule, started at the
first step's value rather than 0).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from tinygpt.dictionary.errors import DictionaryError
from tinygpt.dictionary.modules import SparseDictionary, batch_topk, jumprelu_l0

OPTIM_PREFIX = "optimizer."
STATE_PREFIX = "train."


def geometric_median(x: Tensor, *, iters: int = 100, tol: float = 1e-6) -> Tensor:
    """The geometric median of the rows of `x [n, d]` (Weiszfeld's algorithm, started at the mean): [d]."""
    m = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - m).norm(dim=-1).clamp_min(1e-8)
        new = (w[:, None] * x).sum(0) / w.sum()
        done = (new - m).norm() <= tol * max(1.0, float(m.norm()))
        m = new
        if done:
            break
    return m


@dataclass
class Schedule:
    """Learning-rate and sparsity-coefficient schedules over `total` steps (step numbers start at 1)."""

    lr: float
    total: int
    warmup: int
    decay: int
    sparsity_warmup: int

    def lr_at(self, step: int) -> float:
        f = min(1.0, step / self.warmup) if self.warmup else 1.0
        left = self.total - step
        if self.decay and left < self.decay:
            f = min(f, max(0.0, left + 1) / (self.decay + 1))
        return self.lr * f

    def sparsity_at(self, step: int) -> float:
        return min(1.0, step / self.sparsity_warmup) if self.sparsity_warmup else 1.0


def steps_of(value: float | int, total: int, what: str) -> int:
    """`warmup=0.05` (a fraction of the run) or `warmup=100` (steps) -> steps."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise DictionaryError(f"{what} must be a fraction of the run in [0, 1) or a number of steps, got {value!r}")
    return int(round(value * total)) if isinstance(value, float) and value < 1 else min(int(value), total)


class Trainer:
    """Trains one dictionary; `step(x, y)` returns that step's metrics.

    Args:
        sae: the dictionary (moved to the data's device by the caller).
        schedule: the `Schedule`.
        coef: the sparsity coefficient (`l1_coef` for relu, `l0_coef` for jumprelu; unused otherwise).
        aux_coef, aux_k: AuxK's weight and number of dead latents it uses (topk / batchtopk).
        dead_after: tokens without firing after which a latent counts as dead.
        threshold_lr: BatchTopK's threshold moving-average rate.
    """

    def __init__(
        self,
        sae: SparseDictionary,
        schedule: Schedule,
        *,
        coef: float,
        aux_coef: float,
        aux_k: int,
        dead_after: int,
        threshold_lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
    ):
        self.sae, self.schedule = sae, schedule
        self.coef, self.aux_coef, self.aux_k = coef, aux_coef, aux_k
        self.dead_after, self.threshold_lr = dead_after, threshold_lr
        self.opt = torch.optim.Adam(sae.parameters(), lr=schedule.lr_at(1), betas=betas)
        self.since_fired = torch.zeros(sae.d_sae, dtype=torch.long, device=sae.W_dec.device)
        self.history: list[dict[str, float]] = []

    # --------------------------------------------------------------------------------- initialisation
    @torch.no_grad()
    def init_from(
        self, x: Tensor, y: Tensor | None, *, normalize: bool, b_dec_init: str, target_l0: int | None = None
    ) -> None:
        """Set the normalisation constants and `b_dec` from a sample of inputs (and targets) [n, d].

        With `target_l0` (JumpReLU), every latent's threshold starts at its `1 - target_l0 / d_sae` quantile of
        the sample's pre-activations, so the run starts at about that L0 (the L0 penalty then holds it).
        """
        sae = self.sae
        y = x if y is None else y
        if normalize:
            sae.in_scale.fill_(math.sqrt(sae.d_in) / float(x.norm(dim=-1).mean().clamp_min(1e-12)))
            sae.out_scale.fill_(math.sqrt(sae.d_out) / float(y.norm(dim=-1).mean().clamp_min(1e-12)))
            if not sae.cfg.transcoder:
                sae.out_scale.copy_(sae.in_scale)
        ys = y[:8192] * sae.out_scale
        if b_dec_init == "geometric_median":
            sae.b_dec.copy_(geometric_median(ys))
        elif b_dec_init == "mean":
            sae.b_dec.copy_(ys.mean(0))
        if target_l0 is not None and sae.cfg.arch == "jumprelu":
            pre = sae.pre_acts(x[:8192] * sae.in_scale)
            q = 1.0 - min(target_l0, sae.d_sae) / sae.d_sae
            sae.threshold.copy_(torch.quantile(pre, q, dim=0).clamp_min(0.0))

    # --------------------------------------------------------------------------------- the step
    def step(self, step: int, x: Tensor, y: Tensor | None) -> dict[str, float]:
        sae, cfg = self.sae, self.sae.cfg
        sae.train()
        xn = x * sae.in_scale
        yn = xn if y is None else y * sae.out_scale
        pre = sae.pre_acts(xn)
        skip = (xn @ sae.W_skip.T) if cfg.skip else 0.0
        losses: dict[str, Tensor] = {}
        if cfg.arch == "topk":
            top = pre.topk(cfg.k, dim=-1, sorted=False)
            vals = top.values.relu()
            recon = F.embedding_bag(top.indices, sae.W_dec, per_sample_weights=vals, mode="sum") + sae.b_dec + skip
            fired = top.indices[vals > 0]
            l0 = (vals > 0).sum(-1).float().mean()
        else:
            if cfg.arch == "batchtopk":
                acts = batch_topk(pre.relu(), cfg.k)
            else:
                acts = sae.activate(pre)
            recon = acts @ sae.W_dec + sae.b_dec + skip
            active = acts > 0
            fired = active.any(0).nonzero().squeeze(-1)
            l0 = active.sum(-1).float().mean()
            ramp = self.coef * self.schedule.sparsity_at(step)
            if cfg.arch == "relu":
                losses["l1"] = ramp * acts.sum(-1).mean()
            elif cfg.arch == "jumprelu":
                losses["l0_penalty"] = ramp * jumprelu_l0(pre, sae.threshold, cfg.bandwidth).mean()
        err = recon - yn
        losses["mse"] = err.pow(2).sum(-1).mean()
        dead = self.since_fired > self.dead_after
        n_dead = int(dead.sum())
        if cfg.arch in ("topk", "batchtopk") and n_dead and self.aux_coef:
            k_aux = min(self.aux_k, n_dead)
            aux = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1, sorted=False)
            aux_recon = F.embedding_bag(aux.indices, sae.W_dec, per_sample_weights=aux.values.relu(), mode="sum")
            scale = min(n_dead / self.aux_k, 1.0)
            losses["aux"] = self.aux_coef * scale * (aux_recon + err.detach()).pow(2).sum(-1).mean()
        loss = sum(losses.values())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            g, w = sae.W_dec.grad, sae.W_dec
            if g is not None:
                g.sub_((g * w).sum(-1, keepdim=True) * w)
            lr = self.schedule.lr_at(step)
            for group in self.opt.param_groups:
                group["lr"] = lr
            self.opt.step()
            sae.normalise_decoder_()
            if cfg.arch == "jumprelu":
                sae.threshold.clamp_(min=0.0)
            if cfg.arch == "batchtopk" and bool((acts > 0).any()):
                smallest = acts[acts > 0].min()
                if sae.threshold.item() == 0.0:  # the first step: start the average at the first value
                    sae.threshold.copy_(smallest)
                else:
                    sae.threshold.mul_(1 - self.threshold_lr).add_(self.threshold_lr * smallest)
            self.since_fired += x.shape[0]
            self.since_fired[fired] = 0
            var = (yn - yn.mean(0)).pow(2).sum()
            rec = {
                "step": step,
                "lr": lr,
                "loss": float(loss),
                "mse": float(losses["mse"]),
                "explained_variance": float(1 - err.pow(2).sum() / var.clamp_min(1e-12)),
                "l0": float(l0),
                "dead_fraction": n_dead / sae.d_sae,
            }
            rec.update({k: float(v) for k, v in losses.items() if k != "mse"})
        self.history.append(rec)
        sae.eval()
        return rec

    # --------------------------------------------------------------------------------- state
    def state_tensors(self) -> dict[str, Tensor]:
        """Optimizer state and dead-latent counters as named tensors (for a `.sae` file)."""
        sd = self.opt.state_dict()
        out = {STATE_PREFIX + "since_fired": self.since_fired.detach().cpu()}
        for idx, st in sd["state"].items():
            for k, v in st.items():
                out[f"{OPTIM_PREFIX}{idx}.{k}"] = (v if isinstance(v, Tensor) else torch.tensor(v)).detach().cpu()
        return out

    def state_record(self) -> dict[str, Any]:
        groups = json.loads(json.dumps(self.opt.state_dict()["param_groups"]))  # tuples become lists
        return {"class": type(self.opt).__name__, "param_groups": groups}

    def load_state(self, tensors: dict[str, Tensor], record: dict[str, Any], history: list[dict]) -> None:
        state: dict[int, dict[str, Tensor]] = {}
        for name, t in tensors.items():
            if name.startswith(OPTIM_PREFIX):
                idx, key = name[len(OPTIM_PREFIX) :].split(".", 1)
                state.setdefault(int(idx), {})[key] = t
        groups = record["param_groups"]
        for gr in groups:
            if isinstance(gr.get("betas"), list):
                gr["betas"] = tuple(gr["betas"])
        self.opt.load_state_dict({"state": state, "param_groups": groups})
        self.since_fired = tensors[STATE_PREFIX + "since_fired"].to(self.since_fired.device)
        self.history = list(history)


__all__ = ["Schedule", "Trainer", "geometric_median", "steps_of"]
