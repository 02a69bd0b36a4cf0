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
`AutoModelForCausalLM` / `AutoTokenizer`) whose tokenizer has them: a `tinygpt.interop.causal_lm.CausalLM`. Both
run through the same sampling loop (`tinygpt.training.chat_turns.generate_turns`: `tinygpt.sampling.sample_next`
with a seeded generator and a KV cache), so the same weights give the same records either way.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinygpt.inputs import progress_enabled
from tinygpt.interop.causal_lm import CausalLM, GPTCausalLM, HFCausalLM, HFTokenizer, as_causal_lm
from tinygpt.io import atomic_write_text
from tinygpt.sampling import _check_args
from tinygpt.training.chat_turns import (
    Turn,
    chat,
    generate_turns,
    reply,
    resolve_template,
    seeded_generator,
    user_turn,
)
from tinygpt.training.settings import SettingError
from tinygpt.training.templates import Template, TemplateError, load_template

STATUSES = ("empty", "truncated", "malformed", "duplicate")

# The models Magpie samples from are `CausalLM`s (the names it used before the adapter was shared).
ChatBackend = CausalLM
GPTBackend = GPTCausalLM
HFBackend = HFCausalLM
_HFTokenizer = HFTokenizer
_resolve_template = resolve_template


def load_backend(model: Any, device: str | None = None) -> CausalLM:
    """A `CausalLM` from a tinygpt `GPT`, a `.tinygpt` path or a local Hugging Face model directory."""
    return as_causal_lm(model, device=device)


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
    progress: bool | None = None,
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
        progress: show a progress bar (None: the package default).
    Returns:
        `MagpieResult` (`.records`, `.stats`, `.settings`, `.figure()`).
    Raises:
        TemplateError: the model's tokenizer lacks the template's special tokens (fine-tune it with `sft` and
            this template first, or pick the template it was trained with).
    """
    from tqdm.auto import tqdm

    if not isinstance(count, int) or count < 1:
        raise SettingError(f"count must be a positive integer, got {count!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise SettingError(f"batch_size must be a positive integer, got {batch_size!r}")
    for name, v in (("max_instruction_tokens", max_instruction_tokens), ("max_response_tokens", max_response_tokens)):
        if not isinstance(v, int) or v < 1:
            raise SettingError(f"{name} must be a positive integer, got {v!r}")
    _check_args(max_instruction_tokens, temperature, top_k, top_p)
    _check_args(max_response_tokens, response_temperature, response_top_k, response_top_p)
    max_attempts = max_attempts if max_attempts is not None else 4 * count + 16
    t0 = time.perf_counter()
    backend = as_causal_lm(model, device=device)
    tmpl = load_template(template)
    tok = backend.tokenizer
    tmpl.check_tokenizer(tok)
    sys_msg = system if system is not None else tmpl.default_system
    pre_query = tmpl.encode_text(tok, tmpl.pre_query(system))
    if backend.n_ctx is not None and len(pre_query) >= backend.n_ctx:
        raise TemplateError(f"the pre-query prefix ({len(pre_query)} tokens) fills the model's context")
    ins_gen = seeded_generator(backend, seed)
    res_gen = seeded_generator(backend, seed + 1)
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
    bar = tqdm(total=count, desc="magpie", disable=not progress_enabled(progress), dynamic_ncols=True)
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
                        user_turn(text, sys_msg),
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


__all__ = [
    "STATUSES",
    "ChatBackend",
    "GPTBackend",
    "HFBackend",
    "MagpieResult",
    "Turn",
    "chat",
    "generate_turns",
    "load_backend",
    "magpie",
    "meta_path_for",
    "reply",
]
