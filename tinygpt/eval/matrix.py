"""The evaluation matrix: the same held-out prompts under several setups, outputs side by side, and the loss of
the reference answers under each.

    import tinygpt
    from tinygpt.eval.matrix import eval_matrix, load_qa

    qa = load_qa("data/eval_prompts.jsonl")                       # [{"instruction": ..., "response": ...}]
    res = eval_matrix(base, qa, few_shot=load_qa("data/eval_train_qa.jsonl")[:2],
                      lora="qa.lora",                             # an adapter file, or an adapted model
                      retrieval="data/shakespeare_notes.md", k=1)  # BM25 over chunks of this corpus
    print(res.table())                                            # mean reference loss per setup, then outputs
    res.figure()                                                  # reference loss per setup and prompt
    res                                                           # in a notebook: an HTML table, side by side

## Setups (the matrix's columns)
| name | model | text before the question |
|---|---|---|
| `base` | the base model | nothing |
| `few-shot` | the base model | worked examples: `Q: q1\\nA: a1\\n\\n...` |
| `lora` | base + LoRA adapter | nothing |
| `lora+retrieval` | base + LoRA adapter | the top-`k` BM25 chunks of the retrieval corpus |
| `retrieval`, `lora+few-shot` | (on request, `setups=`) | |

By default every setup whose ingredients are given is run (`few-shot` needs `few_shot=`, the `lora` ones `lora=`,
the retrieval ones `retrieval=`). The prompt is `context_template` (when there is context) + the few-shot block +
`template.format(instruction=...)`; the defaults are the plain-text `Q: {instruction}\\nA:` with answers
`" {response}"`. Pass `template=` / `answer_template=` to match the format a model was fine-tuned on (e.g. a chat
template's rendering).

## Reference-answer loss
For each prompt and setup: the mean negative log-likelihood (nats per token) of the reference answer's tokens
(`answer_template.format(response=...)`), teacher-forced after that setup's prompt; lower means the setup makes
the right answer more likely. Prompt and answer are tokenized separately and concatenated, so every setup scores
exactly the same answer tokens. When prompt + answer exceed the context, the prompt loses tokens from the left
(its oldest context first); `truncated` records how many. All of a setup's prompts are scored in one forward
(right-padded: the causal mask makes padding invisible to the real tokens).

## Outputs
Greedy (`temperature=0`) continuations of `max_new_tokens` tokens, cut at `stop` (default: the first newline), one
`generate` call per group of prompts of equal token length. `answer_match` says whether the normalised reference
(lower case, no punctuation) occurs in the normalised output.

## Retrieval
`BM25Retriever` indexes chunks (paragraphs packed up to `chunk_chars` characters) with `bm25s` (Lù 2024: a
sparse-matrix BM25, numpy only), English stop words removed; the query is the instruction. Chunks sharing no word
with the query (score 0) are not retrieved.
"""

from __future__ import annotations

import copy
import html
import math
import os
import re
import string
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tinygpt.io import iter_jsonl

DEFAULT_TEMPLATE = "Q: {instruction}\nA:"
DEFAULT_ANSWER = " {response}"
DEFAULT_CONTEXT = "{context}\n\n"
SETUPS = ("base", "few-shot", "retrieval", "lora", "lora+few-shot", "lora+retrieval")
DEFAULT_SETUPS = ("base", "few-shot", "lora", "lora+retrieval")


# ---------------------------------------------------------------------------------------------- data
def load_qa(path: str | os.PathLike) -> list[dict[str, str]]:
    """Read a JSONL file of `{"instruction": ..., "response": ...}` records (other fields are kept).

    Raises:
        ValueError: naming the file and line of a malformed record.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist; pass a JSONL file of {{'instruction', 'response'}} records")
    out = []
    for lineno, rec in iter_jsonl(path):
        if not isinstance(rec, dict) or not isinstance(rec.get("instruction"), str):
            raise ValueError(f"{path}:{lineno}: expected an object with a string field 'instruction'")
        if "response" in rec and not isinstance(rec["response"], str):
            raise ValueError(f"{path}:{lineno}: 'response' must be a string")
        out.append(rec)
    if not out:
        raise ValueError(f"{path} holds no records")
    return out


def _as_pairs(items: Any, answers: Sequence[str | None] | None = None) -> list[tuple[str, str | None]]:
    """(instruction, reference or None) pairs from records, (q, a) tuples, strings (+ answers), or a JSONL path."""
    if isinstance(items, (str, os.PathLike)) and Path(items).suffix.lower() in (".jsonl", ".ndjson"):
        items = load_qa(items)
    if isinstance(items, str):
        items = [items]
    items = list(items)
    pairs: list[tuple[str, str | None]] = []
    for x in items:
        if isinstance(x, dict):
            if not isinstance(x.get("instruction"), str):
                raise ValueError(f"a record needs a string 'instruction': {str(x)[:80]}")
            pairs.append((x["instruction"], x.get("response")))
        elif isinstance(x, (tuple, list)) and len(x) == 2:
            pairs.append((str(x[0]), None if x[1] is None else str(x[1])))
        elif isinstance(x, str):
            pairs.append((x, None))
        else:
            raise TypeError(f"cannot read a prompt from {type(x).__name__}: give strings, (q, a) pairs or records")
    if answers is not None:
        answers = list(answers)
        if len(answers) != len(pairs):
            raise ValueError(f"{len(pairs)} prompts but {len(answers)} answers")
        pairs = [(q, a) for (q, _), a in zip(pairs, answers)]
    return pairs


# ---------------------------------------------------------------------------------------------- retrieval
def chunk_text(text: str, chunk_chars: int = 300) -> list[str]:
    """Cut a text into chunks of at most `chunk_chars` characters: paragraphs (split at blank lines) packed
    together while they fit; a longer paragraph is cut at line ends, then at spaces."""
    if chunk_chars < 20:
        raise ValueError(f"chunk_chars must be >= 20, got {chunk_chars}")
    pieces: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        if not para:
            continue
        if len(para) <= chunk_chars:
            pieces.append(para)
            continue
        for line in para.splitlines():
            line = line.strip()
            while len(line) > chunk_chars:
                cut = line.rfind(" ", 0, chunk_chars)
                cut = cut if cut > chunk_chars // 2 else chunk_chars
                pieces.append(line[:cut].strip())
                line = line[cut:].strip()
            if line:
                pieces.append(line)
    chunks: list[str] = []
    for p in pieces:
        if chunks and len(chunks[-1]) + 2 + len(p) <= chunk_chars and "\n\n" not in p:
            # pack short paragraphs together (kept apart by a blank line)
            chunks[-1] = chunks[-1] + "\n\n" + p
        else:
            chunks.append(p)
    return chunks


class BM25Retriever:
    """BM25 search over text chunks (`bm25s`), English stop words removed.

    Args:
        chunks_or_corpus: a list of chunks (used as given), or a corpus (a path, `Corpus`, or a string of text)
            cut with `chunk_text`.
        chunk_chars: the chunk size when cutting a corpus.
    Attributes:
        chunks: the indexed texts.
    """

    def __init__(self, chunks_or_corpus: Any, chunk_chars: int = 300):
        import bm25s

        if isinstance(chunks_or_corpus, (list, tuple)) and all(isinstance(c, str) for c in chunks_or_corpus):
            chunks = [c for c in chunks_or_corpus if c.strip()]
        else:
            chunks = chunk_text(_corpus_text(chunks_or_corpus), chunk_chars)
        if not chunks:
            raise ValueError("the retrieval corpus is empty")
        self.chunks = list(chunks)
        self._bm25s = bm25s
        self.index = bm25s.BM25()
        self.index.index(self._tokenize(self.chunks), show_progress=False)

    def _tokenize(self, texts: list[str]):
        return self._bm25s.tokenize(texts, stopwords="en", show_progress=False, return_ids=False)

    def search(self, query: str, k: int = 3) -> list[tuple[str, float]]:
        """The best `k` chunks for `query` as (chunk, BM25 score), best first; chunks scoring 0 are left out."""
        if k < 1:
            return []
        k = min(int(k), len(self.chunks))
        q = self._tokenize([query])
        if not q[0]:
            return []
        idx, scores = self.index.retrieve(q, k=k, show_progress=False)
        return [(self.chunks[int(i)], float(s)) for i, s in zip(idx[0], scores[0]) if s > 0]

    def __len__(self) -> int:
        return len(self.chunks)

    def __repr__(self) -> str:
        return f"BM25Retriever({len(self.chunks)} chunks)"


def _corpus_text(corpus: Any) -> str:
    from tinygpt.data import Corpus
    from tinygpt.eval.perplexity import corpus_text

    if isinstance(corpus, str) and not os.path.exists(corpus) and ("\n" in corpus or " " in corpus):
        return corpus  # text given directly
    if corpus is None or isinstance(corpus, (str, os.PathLike, Corpus)):
        return corpus_text(corpus)
    raise TypeError(f"cannot build a retrieval corpus from {type(corpus).__name__}: give chunks, a path or text")


# ---------------------------------------------------------------------------------------------- result
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower case, no punctuation, single spaces (for `answer_match`)."""
    return " ".join(s.lower().translate(_PUNCT).split())


@dataclass
class EvalMatrixResult:
    """Outputs and reference-answer losses of every (prompt, setup).

    Attributes:
        prompts: the instructions [n]; references: the reference answers [n] (None where not given).
        setups: the setup names (columns), in order.
        outputs: {setup: [n] generated answers (cut at `stop`)}.
        losses: {setup: [n] mean NLL of the reference answer's tokens, nats/token (nan without a reference)}.
        inputs: {setup: [n] the full text fed to the model}.
        truncated: {setup: [n] prompt tokens dropped from the left to fit the context}.
        retrieved: [n] lists of (chunk, score) for the retrieval setups ([] when none ran).
        settings: template, answer_template, k, max_new_tokens, temperature, stop, n few-shot examples.
        elapsed: seconds.
    """

    prompts: list[str]
    references: list[str | None]
    setups: list[str]
    outputs: dict[str, list[str]]
    losses: dict[str, list[float]]
    inputs: dict[str, list[str]] = field(default_factory=dict, repr=False)
    truncated: dict[str, list[int]] = field(default_factory=dict, repr=False)
    retrieved: list[list[tuple[str, float]]] = field(default_factory=list, repr=False)
    settings: dict[str, Any] = field(default_factory=dict)
    elapsed: float = 0.0

    def __len__(self) -> int:
        return len(self.prompts)

    def answer_match(self, setup: str) -> list[bool]:
        """Per prompt: the normalised reference occurs in the normalised output."""
        return [
            ref is not None and bool(normalize_answer(ref)) and normalize_answer(ref) in normalize_answer(out)
            for ref, out in zip(self.references, self.outputs[setup])
        ]

    def mean_loss(self, setup: str) -> float:
        """Mean reference-answer loss of a setup over the prompts that have a reference (nan if none)."""
        v = [x for x in self.losses[setup] if not math.isnan(x)]
        return float(np.mean(v)) if v else float("nan")

    def summary(self) -> dict[str, dict[str, float]]:
        """{setup: {"loss": mean reference loss, "match": answer-match rate}}."""
        return {
            s: {"loss": self.mean_loss(s), "match": float(np.mean(self.answer_match(s))) if len(self) else 0.0}
            for s in self.setups
        }

    def row(self, i: int) -> dict[str, Any]:
        """Everything about prompt `i`: prompt, reference, and per setup its output, loss, input and match."""
        return {
            "prompt": self.prompts[i],
            "reference": self.references[i],
            "retrieved": self.retrieved[i] if self.retrieved else [],
            "setups": {
                s: {
                    "output": self.outputs[s][i],
                    "loss": self.losses[s][i],
                    "input": self.inputs.get(s, [""] * len(self))[i],
                    "truncated": self.truncated.get(s, [0] * len(self))[i],
                    "match": self.answer_match(s)[i],
                }
                for s in self.setups
            },
        }

    def table(self, width: int = 60) -> str:
        """Plain text: the mean reference loss and match rate per setup, then each prompt's outputs."""
        summ = self.summary()
        w = max(len(s) for s in self.setups)
        lines = [f"{'setup':<{w}}  {'ref loss':>8}  {'match':>6}"]
        for s in self.setups:
            lines.append(f"{s:<{w}}  {summ[s]['loss']:>8.4f}  {summ[s]['match']:>6.0%}")
        for i, (q, ref) in enumerate(zip(self.prompts, self.references)):
            lines += ["", f"[{i}] {q}", f"{'reference':<{w}}  {'':>8}  {_clip(ref or '-', width)}"]
            for s in self.setups:
                loss = self.losses[s][i]
                shown = "" if math.isnan(loss) else f"{loss:.3f}"
                cut = " (cut)" if self.truncated.get(s, [0] * len(self))[i] else ""
                lines.append(f"{s:<{w}}  {shown:>8}  {_clip(self.outputs[s][i], width)}{cut}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def to_markdown(self) -> str:
        """A markdown table: one row per prompt, the reference and each setup's output (with its loss)."""
        head = "| # | prompt | reference | " + " | ".join(self.setups) + " |"
        sep = "|---:|---|---|" + "---|" * len(self.setups)
        lines = [head, sep]
        for i in range(len(self)):
            cells = []
            for s in self.setups:
                loss = self.losses[s][i]
                cells.append(_md(self.outputs[s][i]) + ("" if math.isnan(loss) else f" ({loss:.2f})"))
            lines.append(
                f"| {i} | {_md(self.prompts[i])} | {_md(self.references[i] or '')} | " + " | ".join(cells) + " |"
            )
        summ = self.summary()
        lines.append(
            "| | **mean reference loss** | | " + " | ".join(f"**{summ[s]['loss']:.3f}**" for s in self.setups) + " |"
        )
        return "\n".join(lines)

    def to_html(self, rows: Sequence[int] | None = None) -> str:
        """An HTML table, setups side by side (the reference loss under each output, best in bold)."""
        rows = range(len(self)) if rows is None else rows
        summ = self.summary()
        th = "".join(f"<th style='text-align:left'>{html.escape(s)}</th>" for s in self.setups)
        out = [
            "<table style='border-collapse:collapse;font-size:12px'>",
            f"<tr><th>#</th><th style='text-align:left'>prompt</th><th style='text-align:left'>reference</th>{th}</tr>",
        ]
        for i in rows:
            vals = [self.losses[s][i] for s in self.setups]
            finite = [v for v in vals if not math.isnan(v)]
            best = min(finite) if finite else None
            cells = []
            for s, v in zip(self.setups, vals):
                loss = "" if math.isnan(v) else f"{v:.3f}"
                if best is not None and v == best:
                    loss = f"<b>{loss}</b>"
                mark = " ✓" if self.answer_match(s)[i] else ""
                cells.append(
                    f"<td style='vertical-align:top'><code>{html.escape(self.outputs[s][i])}</code>{mark}"
                    f"<br><span style='color:#666'>ref loss {loss}</span></td>"
                )
            out.append(
                f"<tr style='border-top:1px solid #ddd'><td style='vertical-align:top'>{i}</td>"
                f"<td style='vertical-align:top'>{html.escape(self.prompts[i])}</td>"
                f"<td style='vertical-align:top'><i>{html.escape(self.references[i] or '')}</i></td>"
                f"{''.join(cells)}</tr>"
            )
        means = "".join(f"<td><b>{summ[s]['loss']:.3f}</b> ({summ[s]['match']:.0%} match)</td>" for s in self.setups)
        out.append(f"<tr style='border-top:2px solid #999'><td></td><td colspan=2>mean reference loss</td>{means}</tr>")
        out.append("</table>")
        return "".join(out)

    def _repr_html_(self) -> str:
        return self.to_html()

    def figure(self, highlight: int | None = None):
        """Plotly: mean reference-answer loss per setup (bars) and each prompt's loss (points; `highlight` one)."""
        import plotly.graph_objects as go

        fig = go.Figure()
        means = [self.mean_loss(s) for s in self.setups]
        fig.add_trace(
            go.Bar(
                x=self.setups,
                y=means,
                name="mean",
                text=[f"{m:.3f}" for m in means],
                textposition="outside",
                marker_color="rgba(99,110,250,0.45)",
            )
        )
        xs, ys, texts, sizes, colors = [], [], [], [], []
        for s in self.setups:
            for i, v in enumerate(self.losses[s]):
                xs.append(s)
                ys.append(v)
                texts.append(f"[{i}] {self.prompts[i]}<br>{html.escape(self.outputs[s][i])}")
                sizes.append(14 if i == highlight else 7)
                colors.append("#d62728" if i == highlight else "#444")
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                mode="markers",
                name="per prompt",
                text=texts,
                hovertemplate="%{text}<br>ref loss %{y:.3f}<extra></extra>",
                marker={"size": sizes, "color": colors, "opacity": 0.8},
            )
        )
        fig.update_layout(
            title="reference-answer loss per setup (nats/token; lower is better)",
            xaxis_title="setup",
            yaxis_title="loss of the reference answer",
            template="plotly_white",
            showlegend=False,
        )
        return fig

    def extend(self, other: EvalMatrixResult) -> EvalMatrixResult:
        """Append another result's prompts (same setups) in place; returns self."""
        if other.setups != self.setups:
            raise ValueError(f"cannot merge results with setups {other.setups} into {self.setups}")
        self.prompts += other.prompts
        self.references += other.references
        for s in self.setups:
            self.outputs[s] += other.outputs[s]
            self.losses[s] += other.losses[s]
            self.inputs.setdefault(s, []).extend(other.inputs.get(s, [""] * len(other)))
            self.truncated.setdefault(s, []).extend(other.truncated.get(s, [0] * len(other)))
        self.retrieved += other.retrieved or [[] for _ in range(len(other))]
        return self

    def __repr__(self) -> str:
        summ = self.summary()
        parts = ", ".join(f"{s} {summ[s]['loss']:.3f}" for s in self.setups)
        return f"EvalMatrixResult({len(self)} prompts; mean reference loss: {parts})"


def _clip(s: str, n: int) -> str:
    s = s.replace("\n", "⏎")
    return s if len(s) <= n else s[: n - 1] + "…"


def _md(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


# ---------------------------------------------------------------------------------------------- the matrix
class EvalMatrix:
    """The ingredients of an evaluation matrix, ready to run on any prompts (`eval_matrix` builds and runs one).

    Args:
        model: the base model (a `GPT` or a `.tinygpt` path). Never modified.
        lora: an adapter file (applied to a copy of the base), or an adapted / fine-tuned model, or None.
        retrieval: a `BM25Retriever`, a list of chunks, or a corpus (path, `Corpus`, text) to chunk; or None.
        few_shot: worked examples (records, (q, a) pairs, or a JSONL path); or None.
        setups: which setups to run (default: those of `DEFAULT_SETUPS` whose ingredients are given).
        k: retrieved chunks per prompt.
        chunk_chars: chunk size when `retrieval` is a corpus.
        template, answer_template, context_template: the prompt layout (see the module docstring); a template may
            also be a callable `(instruction) -> str`.
        max_new_tokens, temperature, top_k, seed: generation (greedy by default).
        stop: cut outputs at the first occurrence of this string (None: keep everything).
    """

    def __init__(
        self,
        model: Any,
        *,
        lora: Any = None,
        retrieval: Any = None,
        few_shot: Any = None,
        setups: Sequence[str] | None = None,
        k: int = 2,
        chunk_chars: int = 300,
        template: str | Callable[[str], str] = DEFAULT_TEMPLATE,
        answer_template: str = DEFAULT_ANSWER,
        context_template: str = DEFAULT_CONTEXT,
        max_new_tokens: int = 48,
        temperature: float = 0.0,
        top_k: int | None = None,
        seed: int = 0,
        stop: str | None = "\n",
    ):
        from tinygpt.checkpoint import load

        self.model = load(model) if isinstance(model, (str, os.PathLike)) else model
        self.model._require_tokenizer()
        if lora is not None and lora is self.model:
            raise ValueError(
                "lora= is the base model itself; pass the base and the adapted model separately "
                "(lora_finetune adapts in place: fine-tune a copy.deepcopy(base))"
            )
        self.lora_model = self._lora_model(lora) if lora is not None else None
        if retrieval is None or isinstance(retrieval, BM25Retriever):
            self.retriever = retrieval
        else:
            self.retriever = BM25Retriever(retrieval, chunk_chars)
        self.few_shot = _as_pairs(few_shot) if few_shot is not None else []
        if any(a is None for _, a in self.few_shot):
            raise ValueError("few-shot examples need answers: give records with 'response' or (q, a) pairs")
        have = {"few-shot": bool(self.few_shot), "lora": self.lora_model is not None, "retrieval": bool(self.retriever)}
        if setups is None:
            setups = [s for s in DEFAULT_SETUPS if all(have[p] for p in s.split("+") if p != "base")]
        setups = list(setups)
        for s in setups:
            if s not in SETUPS:
                raise ValueError(f"unknown setup {s!r}; choose from {', '.join(SETUPS)}")
            missing = [p for p in s.split("+") if p != "base" and not have[p]]
            if missing:
                arg = {"few-shot": "few_shot", "lora": "lora", "retrieval": "retrieval"}[missing[0]]
                raise ValueError(f"setup {s!r} needs {arg}=")
        if not setups:
            raise ValueError("no setups to run")
        self.setups = setups
        if k < 0 or max_new_tokens < 1 or temperature < 0:
            raise ValueError(
                f"need k >= 0, max_new_tokens >= 1, temperature >= 0 (got {k}, {max_new_tokens}, {temperature})"
            )
        self.k = int(k)
        self.template, self.answer_template, self.context_template = template, answer_template, context_template
        self.max_new_tokens, self.temperature, self.top_k, self.seed, self.stop = (
            int(max_new_tokens),
            float(temperature),
            top_k,
            seed,
            stop,
        )

    def _lora_model(self, lora: Any):
        if isinstance(lora, torch.nn.Module):
            if lora.cfg.d_vocab != self.model.cfg.d_vocab:
                raise ValueError("the LoRA model's vocabulary differs from the base model's")
            return lora
        from tinygpt.training.lora import load_lora

        m = copy.deepcopy(self.model)
        load_lora(m, lora)
        return m.eval()

    # ------------------------------------------------------------------ prompts
    def prompt(self, instruction: str) -> str:
        t = self.template
        return t(instruction) if callable(t) else t.format(instruction=instruction)

    def answer(self, response: str) -> str:
        return self.answer_template.format(response=response)

    def few_shot_block(self) -> str:
        return "".join(self.prompt(q) + self.answer(a) + "\n\n" for q, a in self.few_shot)

    def context(self, hits: list[tuple[str, float]]) -> str:
        if not hits:
            return ""
        return self.context_template.format(context="\n".join(c for c, _ in hits))

    def input_text(self, setup: str, instruction: str, hits: list[tuple[str, float]]) -> str:
        parts = setup.split("+")
        ctx = self.context(hits) if "retrieval" in parts else ""
        shots = self.few_shot_block() if "few-shot" in parts else ""
        return ctx + shots + self.prompt(instruction)

    # ------------------------------------------------------------------ run
    def run(self, prompts: Any, answers: Sequence[str | None] | None = None, *, progress: bool = True):
        """Run every setup on `prompts` (records, (q, a) pairs, strings with `answers`, or a JSONL path)."""
        from tqdm.auto import tqdm

        pairs = _as_pairs(prompts, answers)
        if not pairs:
            raise ValueError("no prompts to evaluate")
        t0 = time.perf_counter()
        uses_retrieval = any("retrieval" in s for s in self.setups)
        hits = [self.retriever.search(q, self.k) if uses_retrieval else [] for q, _ in pairs]
        outputs: dict[str, list[str]] = {}
        losses: dict[str, list[float]] = {}
        inputs: dict[str, list[str]] = {}
        truncated: dict[str, list[int]] = {}
        bar = tqdm(total=len(self.setups), desc="eval matrix", disable=not progress)
        try:
            for s in self.setups:
                model = self.lora_model if s.startswith("lora") else self.model
                texts = [self.input_text(s, q, h) for (q, _), h in zip(pairs, hits)]
                inputs[s] = texts
                losses[s], truncated[s] = self._reference_losses(model, texts, [a for _, a in pairs])
                outputs[s] = self._generate(model, texts)
                bar.update(1)
        finally:
            bar.close()
        return EvalMatrixResult(
            prompts=[q for q, _ in pairs],
            references=[a for _, a in pairs],
            setups=list(self.setups),
            outputs=outputs,
            losses=losses,
            inputs=inputs,
            truncated=truncated,
            retrieved=hits,
            settings={
                "template": self.template if isinstance(self.template, str) else repr(self.template),
                "answer_template": self.answer_template,
                "k": self.k,
                "max_new_tokens": self.max_new_tokens,
                "temperature": self.temperature,
                "stop": self.stop,
                "few_shot": len(self.few_shot),
                "retrieval_chunks": len(self.retriever) if self.retriever else 0,
            },
            elapsed=time.perf_counter() - t0,
        )

    @torch.no_grad()
    def _reference_losses(self, model, texts: list[str], refs: list[str | None]) -> tuple[list[float], list[int]]:
        tok = model._require_tokenizer()
        n_ctx = model.cfg.n_ctx
        seqs, spans, cut = [], [], []
        for text, ref in zip(texts, refs):
            p = tok.encode(text)
            if ref is None:
                seqs.append(None)
                spans.append(None)
                cut.append(0)
                continue
            a = tok.encode(self.answer(ref))
            if not a:
                raise ValueError(f"the reference answer {ref!r} encodes to no tokens")
            if not p:
                raise ValueError(f"the prompt {text!r} encodes to no tokens")
            a = a[: n_ctx - 1]
            drop = max(0, len(p) + len(a) - n_ctx)  # a <= n_ctx - 1 tokens, so p keeps at least one
            p = p[drop:]
            seqs.append(p + a)
            spans.append((len(p), len(a)))
            cut.append(drop)
        out = [float("nan")] * len(texts)
        live = [i for i, s in enumerate(seqs) if s is not None]
        if live:
            device = next(model.parameters()).device
            width = max(len(seqs[i]) for i in live)
            x = torch.zeros(len(live), width, dtype=torch.long)
            y = torch.full((len(live), width), -100, dtype=torch.long)
            for r, i in enumerate(live):
                s = torch.tensor(seqs[i])
                x[r, : len(s)] = s
                start, n = spans[i]
                y[r, start - 1 : start - 1 + n] = s[start : start + n]  # position t predicts token t + 1
            was = model.training
            model.eval()
            try:
                logits = model(x.to(device)).float()
            finally:
                model.train(was)
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.to(device).reshape(-1), reduction="none")
            nll = nll.view(len(live), width).cpu()
            mask = (y != -100).float()
            per = (nll * mask).sum(1) / mask.sum(1)
            for r, i in enumerate(live):
                out[i] = float(per[r])
        return out, cut

    @torch.no_grad()
    def _generate(self, model, texts: list[str]) -> list[str]:
        from tinygpt.sampling import generate_tokens

        tok = model._require_tokenizer()
        keep = max(1, model.cfg.n_ctx - self.max_new_tokens)
        ids = [tok.encode(t)[-keep:] or tok.encode("\n") for t in texts]
        groups: dict[int, list[int]] = {}
        for i, x in enumerate(ids):
            groups.setdefault(len(x), []).append(i)
        device = next(model.parameters()).device
        out = [""] * len(texts)
        for _, members in sorted(groups.items()):
            batch = torch.tensor([ids[i] for i in members], device=device)
            steps = list(
                generate_tokens(
                    model, batch, self.max_new_tokens, temperature=self.temperature, top_k=self.top_k, seed=self.seed
                )
            )
            gen = torch.stack(steps, dim=1).cpu().tolist()
            for i, g in zip(members, gen):
                out[i] = cut_at_stop(tok.decode(g), self.stop)
        return out


def cut_at_stop(text: str, stop: str | None) -> str:
    """The answer in a continuation: leading stop strings and spaces skipped, cut before the next stop."""
    if stop:
        rest = text.lstrip(" ")
        while rest.startswith(stop):
            rest = rest[len(stop) :].lstrip(" ")
        text = rest.split(stop, 1)[0]
    return text.strip()


def eval_matrix(
    model: Any,
    prompts: Any,
    answers: Sequence[str | None] | None = None,
    *,
    lora: Any = None,
    retrieval: Any = None,
    few_shot: Any = None,
    setups: Sequence[str] | None = None,
    k: int = 2,
    progress: bool = True,
    **options: Any,
) -> EvalMatrixResult:
    """Run held-out prompts under base / few-shot / LoRA / LoRA + retrieval and compare (see the module docstring).

    Args:
        model: the base model (`GPT` or `.tinygpt` path); never modified.
        prompts: records `{"instruction", "response"}`, (question, answer) pairs, strings (with `answers`), or a
            JSONL path.
        answers: reference answers when `prompts` are strings.
        lora: an adapter file (applied to a copy of the base) or an adapted model.
        retrieval: a corpus (path, text, `Corpus`), a list of chunks, or a `BM25Retriever`.
        few_shot: worked examples prepended in the few-shot setups.
        setups: the columns (default: base, few-shot, lora, lora+retrieval, those whose ingredients are given).
        k: retrieved chunks per prompt.
        progress: a progress bar over the setups.
        **options: `EvalMatrix` options: chunk_chars, template, answer_template, context_template, max_new_tokens,
            temperature, top_k, seed, stop.
    Returns:
        `EvalMatrixResult` (`.table()`, `.to_html()`, `.figure()`, `.summary()`, `.row(i)`).
    """
    m = EvalMatrix(model, lora=lora, retrieval=retrieval, few_shot=few_shot, setups=setups, k=k, **options)
    return m.run(prompts, answers, progress=progress)


def few_shot_pool(records: Iterable[dict[str, str]], n: int, seed: int = 0) -> list[dict[str, str]]:
    """`n` examples drawn (reproducibly) from a list of records, for `few_shot=`."""
    records = list(records)
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(records), size=min(n, len(records)), replace=False)
    return [records[int(i)] for i in sorted(idx)]


__all__ = [
    "BM25Retriever",
    "EvalMatrix",
    "EvalMatrixResult",
    "chunk_text",
    "eval_matrix",
    "few_shot_pool",
    "load_qa",
    "normalize_answer",
]
