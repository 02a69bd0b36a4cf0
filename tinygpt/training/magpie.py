"""Magpie (Xu et al. 2024): instruction data synthesised by a chat model from nothing but its own template.

    import tinygpt
    res = tinygpt.magpie("chat.tinygpt", count=500, template="chatml", temperature=0.9, out="magpie.jsonl")
    print(res.stats)                      # kept, and dropped as empty / truncated / malformed / duplicate
    tinygpt.sft("base.tinygpt", "magpie.jsonl", steps=300, out="chat2.tinygpt")   # the output feeds sft

An aligned chat model, given only the part of its template that precedes a user message (the *pre-query*
prefix: `bos`, a system turn if any, then the user prefix, e.g. `<|im_start|>user\\n`), writes a plausible
user query. Magpie samples that query until the user turn's end (`<|im_end|>`), then wraps it in the full
template with the assistant prefix and decodes a response until the assistant turn's end. As in the Magpie
release, instructions are sampled at temperature 1 and top-p 1, responses greedily (`response_temperature=0`).

Records are dropped when the instruction or the response is **empty** (after stripping), **truncated** (no
stop within the token budget or the model's context), **malformed** (another of the template's special
tokens, e.g. `<|im_start|>`, appears before the stop), or a **duplicate** instruction (case-folded,
whitespace-collapsed). `MagpieResult.stats` counts each; sampling continues until `count` records are kept
or `max_attempts` instructions were tried.

The output is JSONL `{"instruction": ..., "response": ...}` (plus `"system"` when one was given), which
`tinygpt sft --data` reads directly; the generation settings and the counts go to a sidecar
`<name>.meta.json` next to it.

Magpie needs a model that has learned what a user turn looks like and that it ends with the user role's
`end`. Large aligned models have; a tiny model fine-tuned with loss on replies only has never been trained
to write (or close) a user turn, so nearly every instruction comes back truncated. Fine-tune it with
`sft(..., train_on_prompt=True)` (`tinygpt sft --train-on-prompt`) first for the round trip at small scale.

The model is a tinygpt `GPT` (or `.tinygpt` file) whose tokenizer has the template's special tokens (i.e. after
`sft` with that template), or any local Hugging Face causal-LM directory (loaded offline with
`AutoModelForCausalLM` / `AutoTokenizer`) whose tokenizer has them. Both run through the same sampling loop
(`tinygpt.sampling.sample_next` with a seeded generator and a KV cache), so the same weights give the same
records either way.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tinygpt.io import atomic_write_text
from tinygpt.model import GPT
from tinygpt.sampling import _check_args, sample_next
from tinygpt.training.templates import Template, TemplateError, load_template

STATUSES = ("empty", "truncated", "malformed", "duplicate")


# ============================================================================================== backends
class _HFTokenizer:
    """A `transformers` tokenizer seen through the interface templates use (`encode`, `special_tokens`)."""

    def __init__(self, tok: Any):
        self.tok = tok
        self.eos_id = tok.eos_token_id

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self.tok.get_added_vocab())

    @property
    def vocab_size(self) -> int:
        return len(self.tok)

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)


class ChatBackend:
    """One interface over a tinygpt model and a Hugging Face causal LM: prefill, then one token at a time.

    Attributes:
        kind: "tinygpt" or "hf".
        source: the file or directory it came from (None for an in-memory model).
        tokenizer: has `encode`, `decode`, `special_tokens`, `vocab_size`, `eos_id`.
        n_ctx: the longest sequence the model accepts (None if unknown).
        device: where the model computes.
    """

    kind = "?"
    source: str | None = None
    tokenizer: Any
    n_ctx: int | None = None
    device: torch.device

    def start(self, tokens: Tensor) -> Tensor:
        """Run the prompt tokens [batch, pos]; returns the next-token logits [batch, vocab] (float32)."""
        raise NotImplementedError

    def step(self, tokens: Tensor) -> Tensor:
        """Feed one new token per row [batch]; returns the next logits [batch, vocab]."""
        raise NotImplementedError

    def sft_template(self) -> dict[str, Any] | None:
        """The template a tinygpt model was fine-tuned with (its SFT record), if any."""
        return None


class GPTBackend(ChatBackend):
    kind = "tinygpt"

    def __init__(self, model: GPT, source: str | None = None):
        self.model = model.eval()
        self.tokenizer = model._require_tokenizer()
        self.source = source
        self.n_ctx = model.cfg.n_ctx
        self.device = model.embed.weight.device
        self.cache = None

    def start(self, tokens: Tensor) -> Tensor:
        self.cache = self.model.make_cache(tokens.shape[0], self.n_ctx)
        with torch.no_grad():
            return self.model(tokens.to(self.device), past_kv_cache=self.cache)[:, -1].float()

    def step(self, tokens: Tensor) -> Tensor:
        with torch.no_grad():
            return self.model(tokens[:, None].to(self.device), past_kv_cache=self.cache)[:, -1].float()

    def sft_template(self) -> dict[str, Any] | None:
        rec = (self.model.train_state or {}).get("sft")
        return rec.get("template") if isinstance(rec, dict) else None


class HFBackend(ChatBackend):
    kind = "hf"

    def __init__(self, model: Any, tokenizer: Any, source: str | None = None):
        self.model = model.eval()
        self.tokenizer = _HFTokenizer(tokenizer)
        self.source = source
        c = model.config
        self.n_ctx = getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None)
        self.device = next(model.parameters()).device
        self.past = None

    def start(self, tokens: Tensor) -> Tensor:
        with torch.no_grad():
            out = self.model(input_ids=tokens.to(self.device), use_cache=True)
        self.past = out.past_key_values
        return out.logits[:, -1].float()

    def step(self, tokens: Tensor) -> Tensor:
        with torch.no_grad():
            out = self.model(input_ids=tokens[:, None].to(self.device), past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        return out.logits[:, -1].float()


def load_backend(model: Any, device: str | None = None) -> ChatBackend:
    """A `ChatBackend` from a tinygpt `GPT`, a `.tinygpt` path or a local Hugging Face model directory."""
    if isinstance(model, ChatBackend):
        return model
    if isinstance(model, GPT):
        if device:
            model.to(device)
        return GPTBackend(model, getattr(model, "source_path", None))
    if isinstance(model, (str, os.PathLike)):
        p = Path(model)
        if p.is_dir():
            from tinygpt.interop.hf import load_hf_causal_lm

            hf, tok = load_hf_causal_lm(p, device=device)
            return HFBackend(hf, tok, str(p))
        if p.exists():
            from tinygpt.checkpoint import load

            return GPTBackend(load(p, device=device), str(p))
        raise FileNotFoundError(f"model {model} does not exist; pass a .tinygpt file or a Hugging Face model directory")
    if hasattr(model, "config") and hasattr(model, "generate"):
        raise TypeError("pass a Hugging Face model as its directory (the tokenizer is loaded from there)")
    raise TypeError(f"cannot generate with a {type(model).__name__}; pass a GPT, a .tinygpt path or a directory")


# ============================================================================================== sampling
@dataclass
class Turn:
    """One generated turn: its text (cut before the stop) and how it ended ("ok", "truncated", "malformed")."""

    text: str
    status: str
    n_tokens: int


def generate_turns(
    backend: ChatBackend,
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
    backend = load_backend(model, device)
    tmpl = _resolve_template(template, backend)
    msgs = _user_turn(messages, system) if isinstance(messages, str) else [dict(m) for m in messages]
    gen = _generator(backend, seed)
    return reply(
        backend, tmpl, msgs, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, generator=gen
    ).text


def reply(
    backend: ChatBackend,
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


def _user_turn(text: str, system: str | None) -> list[dict[str, str]]:
    """[system message (when given), user message `text`]."""
    return ([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": text}]


def _resolve_template(template: Any, backend: ChatBackend) -> Template:
    if template is not None:
        return load_template(template)
    rec = backend.sft_template()
    return Template.from_dict(rec) if rec else load_template("chatml")


def _generator(backend: ChatBackend, seed: int | None) -> torch.Generator:
    gen = torch.Generator(device=backend.device)
    gen.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
    return gen


# ============================================================================================== magpie()
@dataclass
class MagpieResult:
    """What `magpie` returns.

    Attributes:
        records: [{"instruction", "response"} (+ "system")], the kept records in generation order.
        stats: {"attempts", "kept", "empty", "truncated", "malformed", "duplicate"}.
        settings: the generation settings (also written to `meta_path`).
        path: the JSONL written (None without `out`); meta_path: its sidecar settings file.
        elapsed: seconds.
    """

    records: list[dict[str, str]]
    stats: dict[str, int]
    settings: dict[str, Any]
    path: Path | None = None
    meta_path: Path | None = None
    elapsed: float = 0.0
    lengths: list[tuple[int, int]] = field(default_factory=list, repr=False)

    def __len__(self) -> int:
        return len(self.records)

    def figure(self):
        """Plotly: what happened to each attempt, and the instruction / response lengths of the kept records."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        fig = make_subplots(rows=1, cols=2, subplot_titles=("attempts", "kept records: length (characters)"))
        keys = ["kept", *STATUSES]
        fig.add_trace(go.Bar(x=keys, y=[self.stats.get(k, 0) for k in keys], showlegend=False), row=1, col=1)
        fig.add_trace(go.Histogram(x=[len(r["instruction"]) for r in self.records], name="instruction"), row=1, col=2)
        fig.add_trace(go.Histogram(x=[len(r["response"]) for r in self.records], name="response"), row=1, col=2)
        fig.update_layout(title="Magpie", template="plotly_white", barmode="overlay", height=350)
        fig.update_traces(opacity=0.7, selector=dict(type="histogram"))
        return fig

    def __repr__(self) -> str:
        dropped = ", ".join(f"{k} {self.stats.get(k, 0)}" for k in STATUSES)
        return (
            f"MagpieResult({len(self.records)} records from {self.stats.get('attempts', 0)} attempts; dropped: "
            f"{dropped}; {self.elapsed:.1f}s, path={self.path})"
        )


def meta_path_for(out: str | os.PathLike) -> Path:
    """The sidecar settings file of a Magpie output: `x.jsonl` -> `x.meta.json`."""
    p = Path(out)
    return p.with_name(p.stem + ".meta.json")


def magpie(
    model: Any,
    count: int,
    template: str | os.PathLike | Template = "chatml",
    temperature: float = 1.0,
    top_p: float | None = 1.0,
    top_k: int | None = None,
    *,
    response_temperature: float = 0.0,
    response_top_p: float | None = 1.0,
    response_top_k: int | None = None,
    max_instruction_tokens: int = 128,
    max_response_tokens: int = 256,
    system: str | None = None,
    seed: int = 0,
    batch_size: int = 16,
    max_attempts: int | None = None,
    out: str | os.PathLike | None = None,
    device: str | None = None,
    progress: bool = True,
) -> MagpieResult:
    """Synthesise `count` instruction/response records with Magpie.

    Args:
        model: a tinygpt chat `GPT` / `.tinygpt` path (fine-tuned with `template`), or a local Hugging Face
            chat model directory.
        count: records to keep.
        template: the model's chat template (name, JSON path or `Template`).
        temperature, top_p, top_k: instruction sampling (Magpie: 1.0, 1.0).
        response_temperature, response_top_p, response_top_k: response decoding (default greedy, as Magpie).
        max_instruction_tokens, max_response_tokens: token budgets; a turn without its stop within the budget
            (or the model's context) is truncated and dropped.
        system: a system message in the pre-query prefix (and recorded in each record); default: the
            template's `default_system`.
        seed: seeds both samplers; the same settings give the same records.
        batch_size: instructions sampled at once (they share the pre-query prefix); responses are decoded one
            at a time. A different batch size gives different (equally valid) records.
        max_attempts: instructions to try at most (default `4 * count + 16`).
        out: write the records here as JSONL (atomically) and the settings to `<name>.meta.json`.
        device: for a model loaded from a path.
        progress: show a progress bar.
    Returns:
        `MagpieResult` (`.records`, `.stats`, `.settings`, `.figure()`).
    Raises:
        TemplateError: the model's tokenizer lacks the template's special tokens (fine-tune it with `sft` and
            this template first, or pick the template it was trained with).
    """
    from tqdm.auto import tqdm

    if not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive integer, got {count!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    for name, v in (("max_instruction_tokens", max_instruction_tokens), ("max_response_tokens", max_response_tokens)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    _check_args(max_instruction_tokens, temperature, top_k, top_p)
    _check_args(max_response_tokens, response_temperature, response_top_k, response_top_p)
    max_attempts = max_attempts if max_attempts is not None else 4 * count + 16
    t0 = time.perf_counter()
    backend = load_backend(model, device)
    tmpl = load_template(template)
    tok = backend.tokenizer
    tmpl.check_tokenizer(tok)
    sys_msg = system if system is not None else tmpl.default_system
    pre_query = tmpl.encode_text(tok, tmpl.pre_query(system))
    if backend.n_ctx is not None and len(pre_query) >= backend.n_ctx:
        raise TemplateError(f"the pre-query prefix ({len(pre_query)} tokens) fills the model's context")
    ins_gen = _generator(backend, seed)
    res_gen = _generator(backend, seed + 1)
    settings: dict[str, Any] = {
        "method": "magpie (Xu et al. 2024)",
        "model": backend.source,
        "backend": backend.kind,
        "template": tmpl.name,
        "pre_query": tmpl.pre_query(system),
        "count": count,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "response_temperature": response_temperature,
        "response_top_p": response_top_p,
        "response_top_k": response_top_k,
        "max_instruction_tokens": max_instruction_tokens,
        "max_response_tokens": max_response_tokens,
        "system": system,
        "seed": seed,
        "batch_size": batch_size,
        "max_attempts": max_attempts,
    }
    stats = {"attempts": 0, "kept": 0, **{k: 0 for k in STATUSES}}
    records: list[dict[str, str]] = []
    lengths: list[tuple[int, int]] = []
    seen: set[str] = set()
    bar = tqdm(total=count, desc="magpie", disable=not progress, dynamic_ncols=True)
    try:
        while len(records) < count and stats["attempts"] < max_attempts:
            rows = min(batch_size, max_attempts - stats["attempts"])
            instructions = generate_turns(
                backend,
                tmpl,
                pre_query,
                rows,
                max_instruction_tokens,
                stop=tmpl.instruction_stop,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                generator=ins_gen,
            )
            for ins in instructions:
                if len(records) >= count:
                    break
                stats["attempts"] += 1
                text = ins.text.strip()
                why = _drop_reason(ins, text)
                key = " ".join(text.casefold().split())
                if why is None and key in seen:
                    why = "duplicate"
                if why is None:
                    resp = reply(
                        backend,
                        tmpl,
                        _user_turn(text, sys_msg),
                        max_response_tokens,
                        temperature=response_temperature,
                        top_k=response_top_k,
                        top_p=response_top_p,
                        generator=res_gen,
                    )
                    answer = resp.text.strip()
                    why = _drop_reason(resp, answer)
                if why is not None:
                    stats[why] += 1
                else:
                    seen.add(key)
                    rec = {"instruction": text, "response": answer}
                    if system is not None:
                        rec["system"] = system
                    records.append(rec)
                    lengths.append((ins.n_tokens, resp.n_tokens))
                    stats["kept"] += 1
                    bar.update(1)
                bar.set_postfix_str(f"{stats['attempts']} tried", refresh=False)
    finally:
        bar.close()
    settings["stats"] = stats
    result = MagpieResult(records, stats, settings, elapsed=time.perf_counter() - t0, lengths=lengths)
    if len(records) < count:
        warnings.warn(
            f"magpie kept {len(records)} of the {count} records asked for after {stats['attempts']} attempts "
            f"(dropped: {', '.join(f'{k} {stats[k]}' for k in STATUSES)}); raise max_attempts or the token budgets",
            stacklevel=2,
        )
    if out is not None:
        result.path, result.meta_path = Path(out), meta_path_for(out)
        atomic_write_text(result.path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        atomic_write_text(result.meta_path, json.dumps(settings, indent=2, ensure_ascii=False) + "\n")
    return result


def _drop_reason(turn: Turn, text: str) -> str | None:
    if turn.status == "truncated":
        return "truncated"
    if turn.status == "malformed":
        return "malformed"
    if not text:
        return "empty"
    return None
