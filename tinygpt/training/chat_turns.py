"""Chat turns: a model's reply in its chat template (`chat`), and the sampling loop Magpie shares.

    import tinygpt
    print(tinygpt.chat("chat.tinygpt", "Who is Puck?"))                     # the template from its SFT record
    print(tinygpt.chat(model, [{"role": "user", "content": "Hi"}], temperature=0))

The model is any `tinygpt.interop.causal_lm.CausalLM`: a tinygpt `GPT` / `.tinygpt` file or a local Hugging Face
causal-LM directory. `generate_turns` prefills the prompt once (a KV cache) and samples each row until the turn's
stop string (`tinygpt.sampling.sample_next` with a seeded generator), so the same weights give the same text
either way.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tinygpt.interop.causal_lm import CausalLM, as_causal_lm
from tinygpt.sampling import _check_args, sample_next
from tinygpt.training.templates import Template, load_template


@dataclass
class Turn:
    """One generated turn: its text (cut before the stop) and how it ended ("ok", "truncated", "malformed")."""

    text: str
    status: str
    n_tokens: int


def generate_turns(
    backend: CausalLM,
    template: Template,
    prompt: list[int],
    rows: int,
    max_new_tokens: int,
    *,
    stop: str,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> list[Turn]:
    """Sample `rows` continuations of the same prompt, each until `stop` (a string or its single token).

    A row ends "ok" at `stop` (as a token or as text) or the tokenizer's EOS, "malformed" at any other of the
    template's special tokens, and "truncated" when `max_new_tokens` (or the model's context) runs out.
    """
    _check_args(max_new_tokens, temperature, top_k, top_p)
    tok = backend.tokenizer
    ids = template.check_tokenizer(tok)
    stop_ids = set()
    stop_enc = template.encode_text(tok, stop)
    if len(stop_enc) == 1:
        stop_ids.add(stop_enc[0])
    if getattr(tok, "eos_id", None) is not None:
        stop_ids.add(int(tok.eos_id))
    bad_ids = {i for s, i in ids.items() if i not in stop_ids}
    budget = max_new_tokens if backend.n_ctx is None else min(max_new_tokens, backend.n_ctx - len(prompt))
    out: list[list[int]] = [[] for _ in range(rows)]
    status: list[str | None] = [None] * rows
    if budget > 0:
        logits = backend.start(torch.tensor([prompt] * rows, dtype=torch.long))
        vocab = tok.vocab_size
        for i in range(budget):
            if logits.shape[-1] > vocab:  # ids past the tokenizer (a padded embedding) are never sampled
                logits[:, vocab:] = float("-inf")
            nxt = sample_next(logits, temperature, top_k, top_p, generator).cpu()
            for r in range(rows):
                if status[r] is not None:
                    continue
                t = int(nxt[r])
                if t in stop_ids:
                    status[r] = "ok"
                elif t in bad_ids:
                    status[r] = "malformed"
                else:
                    out[r].append(t)
                    if stop in tok.decode(out[r]):
                        status[r] = "ok"
            if all(s is not None for s in status) or i + 1 == budget:
                break
            logits = backend.step(nxt.to(backend.device))
    turns = []
    for r in range(rows):
        text = tok.decode(out[r])
        if status[r] == "ok" and stop in text:
            text = text[: text.index(stop)]
        turns.append(Turn(text, status[r] or "truncated", len(out[r])))
    return turns


def chat(
    model: Any,
    messages: str | Sequence[dict[str, str]],
    *,
    template: str | os.PathLike | Template | None = None,
    system: str | None = None,
    max_new_tokens: int = 200,
    temperature: float = 0.7,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    device: str | None = None,
) -> str:
    """The model's reply to a message (or a conversation) in its chat template.

    Args:
        model: a tinygpt `GPT` / `.tinygpt` path, or a local Hugging Face model directory.
        messages: a user message, or [{"role": ..., "content": ...}, ...] ending with a user turn.
        template: default: the template the model was fine-tuned with (its SFT record), else "chatml".
        system: a system message to put first (when `messages` is a string).
        max_new_tokens, temperature, top_k, top_p, seed: sampling (temperature 0 is greedy).
    Returns:
        The reply text, cut before the template's end-of-turn (what was generated if it never ended).
    """
    backend = as_causal_lm(model, device=device)
    tmpl = resolve_template(template, backend)
    msgs = user_turn(messages, system) if isinstance(messages, str) else [dict(m) for m in messages]
    gen = seeded_generator(backend, seed)
    return reply(
        backend, tmpl, msgs, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, generator=gen
    ).text


def reply(
    backend: CausalLM,
    template: Template,
    messages: Sequence[dict[str, str]],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Turn:
    """The assistant's next turn after `messages` (the template's generation prompt appended), cut at its
    end-of-turn (`template.stop`)."""
    prompt, _ = template.encode(list(messages), backend.tokenizer, add_generation_prompt=True)
    return generate_turns(
        backend,
        template,
        prompt,
        1,
        max_new_tokens,
        stop=template.stop,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        generator=generator,
    )[0]


def user_turn(text: str, system: str | None) -> list[dict[str, str]]:
    """[system message (when given), user message `text`]."""
    return ([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": text}]


def resolve_template(template: Any, backend: CausalLM) -> Template:
    """`template` when given, else the one the model was fine-tuned with (its SFT record), else "chatml"."""
    if template is not None:
        return load_template(template)
    rec = backend.train_state.get("sft")
    saved = rec.get("template") if isinstance(rec, dict) else None
    return Template.from_dict(saved) if saved else load_template("chatml")


def seeded_generator(backend: CausalLM, seed: int | None) -> torch.Generator:
    """A generator on the model's device, seeded with `seed` (a random seed for None)."""
    gen = torch.Generator(device=backend.device)
    gen.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
    return gen


__all__ = ["Turn", "chat", "generate_turns", "reply", "resolve_template", "seeded_generator", "user_turn"]
