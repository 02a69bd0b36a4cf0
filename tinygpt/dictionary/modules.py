"""Sparse dictionaries as hookable modules: TopK, BatchTopK, JumpReLU and ReLU (L1) SAEs, and transcoders.

Every dictionary is a TransformerLens `HookedRootModule` whose hook points carry SAELens' names, so
`run_with_cache`, hooks and nnsight work on latents as on any other site. Shapes: `x [..., d_in]` (an input of
`[..., n_heads, d_head]`, e.g. `attn.hook_z`, is flattened) -> `acts [..., d_sae]` -> `recon [..., d_out]`
(`d_out = d_in` for an SAE). The forward pass (SAELens' formulas, with the input normalisation inside)::

    x          = hook_sae_input(x)                                   raw activations at `cfg.hook`
    x~         = x * in_scale                                        in_scale = sqrt(d_in) / E||x|| (1: none)
    pre        = hook_sae_acts_pre((x~ - b_dec * apply_b_dec_to_input) @ W_enc + b_enc)
    acts       = hook_sae_acts_post(sigma(pre))
        topk       ReLU of the k largest entries of each row, 0 elsewhere
        batchtopk  training: the k*N largest entries of ReLU(pre) over the batch of N rows;
                   eval: ReLU(pre) * (pre > theta), one scalar theta (an EMA of the smallest kept activation)
        jumprelu   ReLU(pre) * (pre > theta_i), theta [d_sae] learned by a straight-through estimator
        relu       ReLU(pre)
    recon      = hook_sae_recons((acts @ W_dec + b_dec [+ x~ @ W_skip.T]) / out_scale)
    error      = hook_sae_error(target - recon)                      only with error_term=True
    output     = hook_sae_output(recon [+ error])

`W_enc [d_in, d_sae]`, `b_enc [d_sae]`, `W_dec [d_sae, d_out]`, `b_dec [d_out]` (SAELens' layout). Training keeps
every **row** of `W_dec` (one latent's decoder direction) at unit L2 norm, in the normalised space; the raw-space
direction a latent writes per unit of activation is `W_dec[i] / out_scale` (`latent_direction`). A transcoder
reads `cfg.hook` and writes `cfg.out_hook` (`b_dec` is then in the output space and not subtracted from the
input); `skip=True` adds a linear skip connection `W_skip [d_out, d_in]`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from tinygpt.dictionary.errors import DictionaryError
from tinygpt.model import observed

ARCHS = ("topk", "batchtopk", "jumprelu", "relu")
HOOK_NAMES = (
    "hook_sae_input",
    "hook_sae_acts_pre",
    "hook_sae_acts_post",
    "hook_sae_recons",
    "hook_sae_error",
    "hook_sae_output",
)


@dataclass
class DictionaryConfig:
    """What a dictionary is: its architecture, sizes and the model sites it reads and writes.

    Args:
        arch: "topk", "batchtopk", "jumprelu" or "relu" (ReLU + L1, SAELens' "standard").
        d_in: input width (the hook's last dimension, or n_heads * d_head for `attn.hook_z`-like hooks).
        d_sae: number of latents.
        hook: the hook point read (`blocks.2.hook_resid_post`).
        out_hook: the hook point written, for a transcoder (`blocks.2.hook_mlp_out`); None for an SAE.
        d_out: output width (default `d_in`).
        k: latents kept per row (topk) or on average per row (batchtopk); for jumprelu, the L0 its thresholds
            were initialised to give (informational).
        skip: a transcoder's linear skip connection.
        apply_b_dec_to_input: subtract `b_dec` from the input (default True for SAEs; always False for transcoders).
        bandwidth: the JumpReLU straight-through estimator's kernel width.
    """

    arch: str
    d_in: int
    d_sae: int
    hook: str
    out_hook: str | None = None
    d_out: int | None = None
    k: int | None = None
    skip: bool = False
    apply_b_dec_to_input: bool | None = None
    bandwidth: float = 0.05

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise DictionaryError(f"unknown dictionary architecture {self.arch!r}; choose one of {', '.join(ARCHS)}")
        for name in ("d_in", "d_sae"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise DictionaryError(f"{name} must be a positive integer, got {v!r}")
        if self.out_hook == self.hook:
            self.out_hook = None
        self.d_out = self.d_in if self.d_out is None else self.d_out
        if self.d_out != self.d_in and self.out_hook is None:
            raise DictionaryError(
                f"d_out={self.d_out} differs from d_in={self.d_in}: only a transcoder (out_hook=) can"
            )
        if self.arch in ("topk", "batchtopk") or self.k is not None:
            if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
                raise DictionaryError(f"arch={self.arch!r} needs k, a positive integer, got {self.k!r}")
            if self.k > self.d_sae:
                raise DictionaryError(f"k={self.k} is more than the {self.d_sae} latents (d_sae); lower k or widen")
        if self.skip and self.out_hook is None:
            raise DictionaryError("skip=True is a transcoder option: give out_hook= as well")
        if self.apply_b_dec_to_input is None:
            self.apply_b_dec_to_input = self.out_hook is None
        if self.apply_b_dec_to_input and self.out_hook is not None:
            raise DictionaryError("a transcoder's b_dec lives in the output space: apply_b_dec_to_input must be False")
        if not self.bandwidth > 0:
            raise DictionaryError(f"bandwidth must be > 0, got {self.bandwidth}")

    @property
    def transcoder(self) -> bool:
        return self.out_hook is not None

    @property
    def site(self) -> str:
        """The hook point the dictionary's output replaces (`out_hook` for a transcoder, else `hook`)."""
        return self.out_hook or self.hook

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DictionaryConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise DictionaryError(f"unknown dictionary settings {sorted(unknown)} (written by a newer tinygpt?)")
        return cls(**d)


# ------------------------------------------------------------------------------------ JumpReLU estimator
def _rect(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """ReLU(pre) * (pre > theta); d/dtheta by the rectangle-kernel straight-through estimator."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre.relu() * (pre > threshold)

    @staticmethod
    def backward(ctx, g: Tensor):
        pre, th = ctx.saved_tensors
        eps = ctx.bandwidth
        g_pre = ((pre > th) & (pre > 0)) * g
        g_th = (-(th / eps) * _rect((pre - th) / eps) * g).reshape(-1, th.shape[-1]).sum(0)
        return g_pre, g_th, None


class _Step(torch.autograd.Function):
    """H(pre - theta) (the L0 count); gradient only to theta, by the same estimator."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        pre, th = ctx.saved_tensors
        eps = ctx.bandwidth
        g_th = (-(1.0 / eps) * _rect((pre - th) / eps) * g).reshape(-1, th.shape[-1]).sum(0)
        return None, g_th, None


def jumprelu_l0(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """Per-row L0 `sum_i H(pre_i - theta_i)` [...], differentiable in `theta` (JumpReLU's sparsity penalty)."""
    return _Step.apply(pre, threshold, bandwidth).sum(-1)


def batch_topk(acts: Tensor, k: int) -> Tensor:
    """Keep the `k * rows` largest entries of a non-negative `acts [..., d_sae]` over the whole batch."""
    flat = acts.reshape(-1)
    n = min(flat.numel(), k * (acts.numel() // acts.shape[-1]))
    top = flat.topk(n, sorted=False)
    return torch.zeros_like(flat).scatter(0, top.indices, top.values).view(acts.shape)


# ------------------------------------------------------------------------------------------ the modules
class SparseDictionary(HookedRootModule):
    """Base class of every dictionary (see the module docstring for the forward pass and shapes).

    Args:
        cfg: a `DictionaryConfig`.
        seed: seeds the initialisation: unit-norm random decoder rows, `W_enc = W_dec.T` for an SAE.

    Attributes:
        base: the base-model pin written in `.sae` files (`fingerprint`, `config`, `source`), or None.
        training_state: how it was trained (filled by `train_sae` and by `load_sae`).
    """

    arch: ClassVar[str] = ""

    def __init__(self, cfg: DictionaryConfig, *, seed: int = 0):
        super().__init__()
        if cfg.arch != self.arch:
            raise DictionaryError(f"{type(self).__name__} is arch {self.arch!r}, the config says {cfg.arch!r}")
        self.cfg = cfg
        g = torch.Generator().manual_seed(seed)
        w_dec = torch.randn(cfg.d_sae, cfg.d_out, generator=g)
        self.W_dec = nn.Parameter(w_dec / w_dec.norm(dim=-1, keepdim=True))
        if cfg.transcoder:
            w_enc = torch.randn(cfg.d_in, cfg.d_sae, generator=g)
            self.W_enc = nn.Parameter(w_enc / w_enc.norm(dim=0, keepdim=True))
        else:
            self.W_enc = nn.Parameter(self.W_dec.detach().T.clone())
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_out))
        if cfg.skip:
            self.W_skip = nn.Parameter(torch.zeros(cfg.d_out, cfg.d_in))
        self.register_buffer("in_scale", torch.ones(()))
        self.register_buffer("out_scale", torch.ones(()))
        self.init_extra()
        for name in HOOK_NAMES:
            setattr(self, name, HookPoint())
        self._plain = False
        self.base: dict[str, Any] | None = None
        self.training_state: dict[str, Any] = {}
        self.setup()
        self.eval()

    def init_extra(self) -> None:
        """Parameters or buffers of an architecture (the JumpReLU / BatchTopK threshold)."""

    def activate(self, pre: Tensor) -> Tensor:
        """The architecture's activation: pre-activations [..., d_sae] -> latent activations [..., d_sae]."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ shapes
    d_in = property(lambda self: self.cfg.d_in)
    d_sae = property(lambda self: self.cfg.d_sae)
    d_out = property(lambda self: self.cfg.d_out)
    hook = property(lambda self: self.cfg.hook)
    out_hook = property(lambda self: self.cfg.out_hook)
    site = property(lambda self: self.cfg.site)

    def hook_points(self) -> tuple[HookPoint, ...]:
        return tuple(getattr(self, n) for n in HOOK_NAMES)

    def _flat(self, x: Tensor, d: int, what: str) -> Tensor:
        if x.shape[-1] == d:
            return x
        if x.ndim >= 2 and x.shape[-2] * x.shape[-1] == d:
            return x.flatten(-2)  # [..., n_heads, d_head] -> [..., n_heads * d_head]
        raise DictionaryError(f"this dictionary's {what} is [..., {d}], got a tensor of shape {tuple(x.shape)}")

    @contextlib.contextmanager
    def _hooks_off(self) -> Iterator[None]:
        old, self._plain = self._plain, True
        try:
            yield
        finally:
            self._plain = old

    def _h(self, hp: HookPoint, t: Tensor) -> Tensor:
        return t if self._plain else hp(t)

    # ------------------------------------------------------------------------------------------ forward
    def pre_acts(self, xn: Tensor) -> Tensor:
        """Pre-activations [..., d_sae] of normalised inputs `xn = x * in_scale` [..., d_in] (no hooks).

        `(xn - b_dec) @ W_enc + b_enc`, computed as `xn @ W_enc + (b_enc - b_dec @ W_enc)`: the same numbers up
        to rounding, and the backward pass needs no [rows, d_in] gradient for b_dec.
        """
        if self.cfg.apply_b_dec_to_input:
            return xn @ self.W_enc + (self.b_enc - self.b_dec @ self.W_enc)
        return xn @ self.W_enc + self.b_enc

    def encode(self, x: Tensor) -> Tensor:
        """Raw activations x [..., d_in] -> latent activations [..., d_sae] (through the hook points)."""
        x = self._h(self.hook_sae_input, self._flat(x, self.d_in, "input").to(self.W_enc.dtype))
        pre = self._h(self.hook_sae_acts_pre, self.pre_acts(x * self.in_scale))
        return self._h(self.hook_sae_acts_post, self.activate(pre))

    def decode(self, acts: Tensor, x: Tensor | None = None) -> Tensor:
        """Latent activations [..., d_sae] -> reconstruction [..., d_out] in raw units (`x`: a skip input)."""
        out = acts @ self.W_dec + self.b_dec
        if self.cfg.skip:
            if x is None:
                raise DictionaryError("a skip transcoder's decode needs the input x for its skip connection")
            out = out + (self._flat(x, self.d_in, "input").to(out.dtype) * self.in_scale) @ self.W_skip.T
        return self._h(self.hook_sae_recons, out / self.out_scale)

    def forward(self, x: Tensor, target: Tensor | None = None, *, error_term: bool = False) -> Tensor:
        """Reconstruct `x` [..., d_in] (a transcoder: predict its output site); returns [..., d_out].

        Args:
            x: raw activations at `cfg.hook`.
            target: the activations the output replaces (`cfg.out_hook`'s for a transcoder; default `x` for an
                SAE); the output takes its shape and dtype.
            error_term: add `target - recon` (through `hook_sae_error`), so the output equals `target` exactly
                unless a hook edits a latent, the reconstruction or the error. Gradients then reach `x` only
                through the dictionary (the error is a constant, as in SAELens).
        """
        ref = target if target is not None else (x if not self.cfg.transcoder else None)
        if error_term and ref is None:
            raise DictionaryError("a transcoder's error term needs target= (the activations at its out_hook)")
        if error_term and not torch.is_grad_enabled() and not any(observed(hp) for hp in self.hook_points()):
            return ref  # nothing reads or edits the dictionary: the output is the target, exactly
        xs = self._flat(x, self.d_in, "input").to(self.W_enc.dtype)
        acts = self.encode(xs)
        recon = self.decode(acts, xs)
        if error_term:
            tgt = self._flat(ref, self.d_out, "target").to(recon.dtype)
            with torch.no_grad():
                if any(observed(hp) for hp in self.hook_points()[:4]):
                    with self._hooks_off():
                        clean = self.decode(self.encode(xs), xs)
                else:
                    clean = recon.detach()
                err_c = tgt - clean
            err = self.hook_sae_error(err_c)
            # == recon + err, and exactly tgt when no hook changed anything (x + 0 == x)
            out = tgt.detach() + (recon - clean) + (err - err_c)
        else:
            out = recon
        out = self.hook_sae_output(out)
        if ref is not None:
            return out.reshape(ref.shape).to(ref.dtype)
        return out.to(x.dtype)

    # ------------------------------------------------------------------------------------------ weights
    def latent_direction(self, i: int) -> Tensor:
        """What latent `i` adds to the output site per unit of activation: `W_dec[i] / out_scale` [d_out]."""
        return (self.W_dec[i] / self.out_scale).detach()

    @torch.no_grad()
    def normalise_decoder_(self) -> None:
        """Rescale every row of `W_dec` to unit L2 norm (in place)."""
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def folded_weights(self) -> dict[str, Tensor]:
        """The weights with the input/output normalisation folded in: they act on raw activations.

        `W_enc * in_scale`, `W_dec / out_scale`, `b_dec / out_scale`, `W_skip * in_scale / out_scale`;
        `b_enc` and the thresholds are unchanged (pre-activations are the same numbers).
        """
        s_in, s_out = self.in_scale.item(), self.out_scale.item()
        if self.cfg.apply_b_dec_to_input and s_in != s_out:
            raise DictionaryError(f"in_scale {s_in} != out_scale {s_out} with apply_b_dec_to_input: cannot fold")
        out = {
            "W_enc": self.W_enc * s_in,
            "b_enc": self.b_enc.clone(),
            "W_dec": self.W_dec / s_out,
            "b_dec": self.b_dec / s_out,
        }
        if self.cfg.skip:
            out["W_skip"] = self.W_skip * (s_in / s_out)
        th = getattr(self, "threshold", None)
        if th is not None:
            out["threshold"] = th.detach().expand(self.d_sae).clone()
        return out

    def extra_repr(self) -> str:
        c = self.cfg
        k = f", k={c.k}" if c.k is not None else ""
        io = f"{c.hook} -> {c.out_hook}" if c.transcoder else c.hook
        pin = f", pinned to {self.base['fingerprint'][:12]}" if self.base and self.base.get("fingerprint") else ""
        return f"{c.arch}, d_in={c.d_in}, d_sae={c.d_sae}{k}, {io}{pin}"


class TopKSAE(SparseDictionary):
    """TopK (Gao et al. 2024): the k largest pre-activations of each row, through a ReLU."""

    arch = "topk"

    def activate(self, pre: Tensor) -> Tensor:
        top = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())


class BatchTopKSAE(SparseDictionary):
    """BatchTopK (Bussmann et al. 2024): k per row on average over a batch while training; a threshold at
    inference (`threshold`, a scalar buffer: the moving average of the smallest activation kept)."""

    arch = "batchtopk"

    def init_extra(self) -> None:
        self.register_buffer("threshold", torch.zeros(()))

    def activate(self, pre: Tensor) -> Tensor:
        if self.training:
            return batch_topk(pre.relu(), self.cfg.k)
        return pre.relu() * (pre > self.threshold)


class JumpReLUSAE(SparseDictionary):
    """JumpReLU (Rajamanoharan et al. 2024): `ReLU(pre) * (pre > threshold)`, `threshold [d_sae]` learned
    through a straight-through estimator with a rectangle kernel of width `cfg.bandwidth`."""

    arch = "jumprelu"

    def init_extra(self) -> None:
        self.threshold = nn.Parameter(torch.full((self.cfg.d_sae,), 0.01))

    def activate(self, pre: Tensor) -> Tensor:
        return _JumpReLU.apply(pre, self.threshold, self.cfg.bandwidth)


class ReLUSAE(SparseDictionary):
    """ReLU with an L1 penalty (SAELens' "standard" SAE)."""

    arch = "relu"

    def activate(self, pre: Tensor) -> Tensor:
        return pre.relu()


DICTIONARY_CLASSES: dict[str, type[SparseDictionary]] = {
    c.arch: c for c in (TopKSAE, BatchTopKSAE, JumpReLUSAE, ReLUSAE)
}


def make_dictionary(cfg: DictionaryConfig, *, seed: int = 0) -> SparseDictionary:
    """A fresh dictionary of `cfg.arch` (see `SparseDictionary` for the initialisation)."""
    return DICTIONARY_CLASSES[cfg.arch](cfg, seed=seed)


__all__ = [
    "ARCHS",
    "DICTIONARY_CLASSES",
    "BatchTopKSAE",
    "DictionaryConfig",
    "JumpReLUSAE",
    "ReLUSAE",
    "SparseDictionary",
    "TopKSAE",
    "batch_topk",
    "jumprelu_l0",
    "make_dictionary",
]
