"""bf16 weights with fp32 master weights (`param_dtype="bfloat16"`), and the compiled forward (`compile=True`).

**bf16 weights.** Autocast (`dtype="bfloat16"`) keeps fp32 weights and casts each one to bf16 at every use, in
the forward and again in the backward, and leaves the residual stream and every elementwise op in fp32. On a
CPU with bf16 matmul units (AVX-512-BF16 / AMX) and on GPUs it is cheaper to hold the weights in bf16 while
training: the forward and backward then run in bf16 throughout and the casts disappear. `MasterWeights` does
this the way mixed-precision trainers (Megatron-LM, DeepSpeed's bf16 mode) do:

- at the start, every trainable parameter's fp32 value becomes its **master copy**, and the parameter itself is
  cast to bf16 (frozen parameters and floating buffers too; their fp32 values are kept to be put back);
- after each backward the bf16 gradients are copied, in fp32, onto the masters; clipping and the optimizer
  (AdamW: its moments are fp32) update the masters, and the bf16 parameters are refreshed from them;
- checkpoints hold the fp32 masters (a resumed run starts from exactly the same values) and at the end the
  model gets its fp32 masters back: after training it is an fp32 model, as after autocast training.

**Compiled forward.** `compiled_forward(model)` installs a `torch.compile`d forward for the duration of a run that
is used only while nothing is hooked: any forward/backward (pre-)hook on any submodule, a global module hook, a
patched instance forward (nnsight) or a KV cache makes that call run the ordinary eager forward, so hooks
always see exactly what they see without compilation (the same rule as the fused attention path).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn

from tinygpt.model.layers import observed
from tinygpt.model.loss import linear_cross_entropy

__all__ = ["MasterWeights", "compiled_forward", "hooked"]


class MasterWeights:
    """The model's weights in bf16 during a run, with fp32 masters for the optimizer (see the module docstring).

    Args:
        model: the model (trained in place; already on its device).
        dtype: the training dtype of the weights (bf16).

    Attributes:
        params: the trainable parameters (now `dtype`), in `model.parameters()` order.
        masters: their fp32 masters (leaf tensors, what the optimizer updates), in the same order.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16):
        self.model, self.dtype = model, dtype
        self.params: list[nn.Parameter] = []
        self.masters: list[torch.Tensor] = []
        self._kept: list[tuple[torch.Tensor, torch.Tensor]] = []  # (tensor, its original data) to put back
        for p in model.parameters():
            if not p.is_floating_point():
                continue
            if p.requires_grad and p.dtype == torch.float32:
                self.params.append(p)
                self.masters.append(p.detach().clone())
            else:
                self._kept.append((p, p.data))
            p.data = p.data.to(dtype)
        for b in model.buffers():
            if b.is_floating_point() and b.dtype != dtype:
                self._kept.append((b, b.data))
                b.data = b.data.to(dtype)
        self._active = True

    def optimizer_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW groups over the masters: decay on matrices and embeddings, none on 1-D tensors."""
        decay = [m for m in self.masters if m.ndim >= 2]
        no_decay = [m for m in self.masters if m.ndim < 2]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def grads_to_masters(self) -> None:
        """Move each parameter's (bf16) gradient onto its master, in fp32; the parameter's is dropped."""
        for p, m in zip(self.params, self.masters):
            m.grad = None if p.grad is None else p.grad.float()
            p.grad = None

    def grad_norm(self, max_norm: float) -> float:
        """Clip the masters' global gradient norm to `max_norm` (0: measure only); the norm before clipping."""
        grads = [m for m in self.masters if m.grad is not None]
        if not grads:
            return 0.0
        return float(torch.nn.utils.clip_grad_norm_(grads, max_norm if max_norm > 0 else float("inf")))

    @torch.no_grad()
    def masters_to_params(self) -> None:
        """Refresh the bf16 parameters from the updated masters."""
        for p, m in zip(self.params, self.masters):
            p.data.copy_(m)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state dict at full precision (the masters and the kept fp32 values): what a checkpoint
        holds."""
        full = {id(p): m for p, m in zip(self.params, self.masters)}
        full.update({id(t): orig for t, orig in self._kept})
        named = dict(self.model.named_parameters(remove_duplicate=False))
        named.update(dict(self.model.named_buffers(remove_duplicate=False)))
        out = {}
        for k, v in self.model.state_dict().items():
            t = named.get(k)
            out[k] = full.get(id(t), v).detach() if t is not None else v
        return out

    def restore(self) -> None:
        """Give the model its fp32 weights back (the masters themselves) and the kept tensors their values."""
        if not self._active:
            return
        for p, m in zip(self.params, self.masters):
            p.data = m.data
            p.grad = None
        for t, orig in self._kept:
            t.data = orig
        self._active = False


def hooked(model: nn.Module) -> bool:
    """True when anything could observe the model's computation: a hook on the model or any submodule (forward,
    backward, pre-hooks), a global module hook, or a submodule's patched instance `forward` (nnsight's while one
    of its traces runs): `tinygpt.model.layers.observed` on every submodule."""
    if model._forward_hooks or model._forward_pre_hooks or model._backward_hooks or model._backward_pre_hooks:
        return True
    mod = nn.modules.module
    if mod._global_backward_hooks or mod._global_backward_pre_hooks:
        return True
    return any(observed(m) for m in model.modules() if m is not model)


@contextmanager
def compiled_forward(model: nn.Module, enabled: bool = True, **compile_options: Any) -> Iterator[nn.Module]:
    """While inside, `model(...)` runs a `torch.compile`d forward unless something is hooked (`hooked`) or a KV
    cache is passed; those calls run the eager forward. The model's own forward is back on exit.

    Args:
        model: the model.
        enabled: False: a no-op (so callers can write `with compiled_forward(model, cfg.compile):`).
        **compile_options: passed to `torch.compile` (e.g. `mode=`, `dynamic=`).
    """
    if not enabled or "forward" in model.__dict__:  # off, or somebody else's instance forward: leave it alone
        yield model
        return
    eager = model.forward
    linear_cross_entropy.prepare()  # the loss stays eager inside the compiled graph
    compiled = torch.compile(eager, **compile_options)

    def forward(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("past_kv_cache") is not None or hooked(model):
            return eager(*args, **kwargs)
        return compiled(*args, **kwargs)

    model.forward = forward
    try:
        yield model
    finally:
        if model.__dict__.get("forward") is forward:
            del model.forward
