"""Sampling with temperature, top-k and top-p, a KV cache, seeds and streaming.

When a sequence outgrows the context, the model keeps its most recent `n_ctx - n_ctx // 4` tokens and
re-encodes them; the cached and uncached paths apply the same rule, so they produce the same tokens.

`generate(..., ablate=..., steer=...)` runs each forward under interventions: the sampling layer knows none
itself; `tinygpt.interp.ablation` registers its `ablate` specs and contexts and `tinygpt.dictionary.steering`
its steering vectors at import (`register_intervention(fn, kind=)`), and `import tinygpt` imports both.
This module registers `generate` as `GPT.generate`.
"""

from __future__ import annotations

import codecs
import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor

from tinygpt.errors import TinyGPTValueError
from tinygpt.inputs import as_tokens, eval_mode, model_device
from tinygpt.model import GPT, register_method

__all__ = ["SamplingError", "generate", "generate_tokens", "register_intervention", "sample_next", "stream"]


class SamplingError(TinyGPTValueError):
    """Bad sampling arguments (temperature, top_k, top_p, max_new_tokens), an empty prompt, no EOS token."""


Intervention = Callable[[GPT, Any], AbstractContextManager]
_interventions: dict[str, Intervention] = {}
_PROVIDERS = {"ablate": "tinygpt.interp", "steer": "tinygpt.dictionary"}


def register_intervention(fn: Intervention, kind: str = "ablate") -> None:
    """Register `fn(model, spec) -> context manager` that `generate(..., <kind>=spec)` enters around each
    forward; the context must be reusable (entered once per forward). Kinds: "ablate" (`tinygpt.interp.ablation`
    registers its ablations) and "steer" (`tinygpt.dictionary.steering` its steering vectors)."""
    if kind not in _PROVIDERS:
        raise SamplingError(f"unknown intervention kind {kind!r}; one of {', '.join(_PROVIDERS)}")
    _interventions[kind] = fn


def sample_next(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw one token per row. logits: [batch, d_vocab] -> [batch]. temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _check_args(max_new_tokens, temperature, top_k, top_p) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise SamplingError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if temperature < 0:
        raise SamplingError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise SamplingError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise SamplingError(f"top_p must be in (0, 1], got {top_p}")


@torch.no_grad()
def generate_tokens(
    model: GPT,
    tokens: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    stop_tokens: set[int] | None = None,
    ablate=None,
    steer=None,
) -> Iterator[Tensor]:
    """Yield the next token [batch] for each step. tokens: [batch, pos] prompt (pos >= 1)."""
    _check_args(max_new_tokens, temperature, top_k, top_p)
    ablation = _intervention_context(model, ablate=ablate, steer=steer)
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.shape[1] == 0:
        raise SamplingError("the prompt is empty: give at least one token (e.g. a newline)")
    n_ctx = model.cfg.n_ctx
    keep = max(1, n_ctx - n_ctx // 4)
    device = model_device(model)
    tokens = tokens.to(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
    with eval_mode(model):
        seq = tokens
        start = 0
        cache = model.make_cache(seq.shape[0], n_ctx) if use_cache else None
        logits = None
        for i in range(max_new_tokens):
            if seq.shape[1] - start > n_ctx:
                start = seq.shape[1] - keep
                logits = None
            if logits is None or not use_cache:
                if cache is not None:
                    cache.length = 0
                with ablation:
                    logits = model(seq[:, start:], past_kv_cache=cache)[:, -1]
            nxt = sample_next(logits, temperature, top_k, top_p, gen)
            yield nxt
            if stop_tokens and all(int(t) in stop_tokens for t in nxt):
                return
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            if use_cache and i + 1 < max_new_tokens and seq.shape[1] - start <= n_ctx:
                with ablation:
                    logits = model(nxt[:, None], past_kv_cache=cache)[:, -1]
            else:
                logits = None


def generate(
    model: GPT,
    prompt: str | Tensor | list[int] = "\n",
    max_new_tokens: int = 100,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    stop_at_eos: bool = False,
    ablate=None,
    steer=None,
) -> str | Tensor:
    """Continue a prompt.

    Args:
        model: a tinygpt model (its tokenizer is used for text prompts).
        prompt: text, or tokens [pos] / [batch, pos].
        max_new_tokens: tokens to add.
        temperature: 0 for greedy; top_k / top_p filter the distribution.
        seed: the same seed gives the same text.
        use_cache: use the KV cache (same tokens as without, much faster).
        stop_at_eos: stop once the tokenizer's EOS token is produced.
        ablate: generate with components ablated: specs such as "1.attn" or "0.head3, 1.mlp", or a context
            from `tinygpt.interp.ablate(model, specs, reference_tokens=...)` (needed for mean / resample).
        steer: generate with vectors added at hooks: a `tinygpt.dictionary.SteeringVector` (times its
            `coeff`; `steering_vector(model, sae, latent=i) * 8.0`), a list of them, or a `steer(model, ...)`
            context. Every position of every forward is steered, so the KV cache gives the same tokens.
    Returns:
        For a text prompt, the prompt followed by the generated text (as TransformerLens does);
        for tokens, the tokens [batch, pos + new] (on the prompt tensor's device).
    """
    is_text = isinstance(prompt, str)
    tokens = _prompt_tokens(model, prompt)
    stop = _stop_tokens(model, stop_at_eos)
    out = [tokens]
    for nxt in generate_tokens(
        model,
        tokens,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        use_cache=use_cache,
        stop_tokens=stop,
        ablate=ablate,
        steer=steer,
    ):
        out.append(nxt[:, None].to(tokens.device))
    result = torch.cat(out, dim=1)
    if is_text:
        return model.to_string(result[0])
    return result.to(prompt.device) if isinstance(prompt, Tensor) else result


def stream(
    model: GPT,
    prompt: str = "\n",
    max_new_tokens: int = 100,
    **kwargs,
) -> Iterator[str]:
    """Yield the generated text piece by piece (for notebooks: `for s in stream(...): print(s, end="")`).

    Takes the same keyword arguments as `generate`. Multi-byte characters are held back until complete.
    """
    tok = model._require_tokenizer()
    tokens = _prompt_tokens(model, prompt)
    stop = _stop_tokens(model, kwargs.pop("stop_at_eos", False))
    if hasattr(tok, "decode_bytes"):
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for nxt in generate_tokens(model, tokens, max_new_tokens, stop_tokens=stop, **kwargs):
            if piece := dec.decode(tok.decode_bytes([int(nxt[0])])):  # added special tokens decode to their text
                yield piece
        if tail := dec.decode(b"", final=True):
            yield tail
        return
    ids: list[int] = []
    shown = ""
    for nxt in generate_tokens(model, tokens, max_new_tokens, stop_tokens=stop, **kwargs):
        ids.append(int(nxt[0]))
        text = tok.decode(ids)
        if not text.endswith("\ufffd") and len(text) > len(shown):
            yield text[len(shown) :]
            shown = text
    text = tok.decode(ids)
    if len(text) > len(shown):
        yield text[len(shown) :]


class _Stacked:
    """Several reusable contexts entered together (in order) around each forward."""

    def __init__(self, contexts: list[AbstractContextManager]):
        self.contexts = contexts
        self._open: list[contextlib.ExitStack] = []

    def __enter__(self) -> None:
        with contextlib.ExitStack() as stack:
            for c in self.contexts:
                stack.enter_context(c)
            self._open.append(stack.pop_all())

    def __exit__(self, *exc: Any) -> bool | None:
        return self._open.pop().__exit__(*exc)


def _intervention_context(model: GPT, **specs: Any) -> AbstractContextManager:
    """A reusable context manager applying the given interventions (None: nothing) around each forward."""
    contexts = []
    for kind, spec in specs.items():
        if spec is None:
            continue
        if kind not in _interventions:
            raise SamplingError(f"generate(..., {kind}=...) needs {_PROVIDERS[kind]} (import tinygpt)")
        contexts.append(_interventions[kind](model, spec))
    if not contexts:
        return contextlib.nullcontext()
    return contexts[0] if len(contexts) == 1 else _Stacked(contexts)


def _prompt_tokens(model: GPT, prompt: Any) -> Tensor:
    """The prompt as tokens [batch, pos] on the model's device (text, ids, or a tensor)."""
    return as_tokens(model, prompt, what="prompt", error=SamplingError)


def _stop_tokens(model: GPT, stop_at_eos: bool) -> set[int] | None:
    if not stop_at_eos:
        return None
    eos = getattr(model.tokenizer, "eos_id", None)
    if eos is None:
        raise SamplingError("stop_at_eos=True but the tokenizer has no EOS token")
    return {eos}


register_method("generate", generate)
