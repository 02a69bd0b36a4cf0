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
`BM25Retriever` (`tinygpt.eval.retrieval`) indexes chunks of the retrieval corpus with BM25; the query is the
instruction. The result and its views (`EvalMatrixResult`) live in `tinygpt.eval.matrix_result`.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tinygpt.eval.matrix_result import EvalMatrixResult, normalize_answer
from tinygpt.eval.perplexity import EvalError, EvalTypeError
from tinygpt.eval.retrieval import BM25Retriever, chunk_text
from tinygpt.inputs import eval_mode, model_device, progress_enabled
from tinygpt.io import iter_jsonl
from tinygpt.sampling import generate

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
        raise EvalError(f"{path} does not exist; pass a JSONL file of {{'instruction', 'response'}} records")
    out = []
    for lineno, rec in iter_jsonl(path):
        if not isinstance(rec, dict) or not isinstance(rec.get("instruction"), str):
            raise EvalError(f"{path}:{lineno}: expected an object with a string field 'instruction'")
        if "response" in rec and not isinstance(rec["response"], str):
            raise EvalError(f"{path}:{lineno}: 'response' must be a string")
        out.append(rec)
    if not out:
        raise EvalError(f"{path} holds no records")
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
                raise EvalError(f"a record needs a string 'instruction': {str(x)[:80]}")
            pairs.append((x["instruction"], x.get("response")))
        elif isinstance(x, (tuple, list)) and len(x) == 2:
            pairs.append((str(x[0]), None if x[1] is None else str(x[1])))
        elif isinstance(x, str):
            pairs.append((x, None))
        else:
            raise EvalTypeError(f"cannot read a prompt from {type(x).__name__}: give strings, (q, a) pairs or records")
    if answers is not None:
        answers = list(answers)
        if len(answers) != len(pairs):
            raise EvalError(f"{len(pairs)} prompts but {len(answers)} answers")
        pairs = [(q, a) for (q, _), a in zip(pairs, answers)]
    return pairs


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
        from tinygpt.checkpoint import as_model

        self.model = as_model(model, what="base model")
        self.model._require_tokenizer()
        if lora is not None and lora is self.model:
            raise EvalError(
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
            raise EvalError("few-shot examples need answers: give records with 'response' or (q, a) pairs")
        have = {"few-shot": bool(self.few_shot), "lora": self.lora_model is not None, "retrieval": bool(self.retriever)}
        if setups is None:
            setups = [s for s in DEFAULT_SETUPS if all(have[p] for p in s.split("+") if p != "base")]
        setups = list(setups)
        for s in setups:
            if s not in SETUPS:
                raise EvalError(f"unknown setup {s!r}; choose from {', '.join(SETUPS)}")
            missing = [p for p in s.split("+") if p != "base" and not have[p]]
            if missing:
                arg = {"few-shot": "few_shot", "lora": "lora", "retrieval": "retrieval"}[missing[0]]
                raise EvalError(f"setup {s!r} needs {arg}=")
        if not setups:
            raise EvalError("no setups to run")
        self.setups = setups
        if k < 0 or max_new_tokens < 1 or temperature < 0:
            raise EvalError(
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
                raise EvalError("the LoRA model's vocabulary differs from the base model's")
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
    def run(
        self, prompts: Any, answers: Sequence[str | None] | None = None, *, progress: bool | None = None
    ) -> EvalMatrixResult:
        """Run every setup on `prompts` (records, (q, a) pairs, strings with `answers`, or a JSONL path)."""
        from tqdm.auto import tqdm

        pairs = _as_pairs(prompts, answers)
        if not pairs:
            raise EvalError("no prompts to evaluate")
        t0 = time.perf_counter()
        uses_retrieval = any("retrieval" in s for s in self.setups)
        hits = [self.retriever.search(q, self.k) if uses_retrieval else [] for q, _ in pairs]
        outputs: dict[str, list[str]] = {}
        losses: dict[str, list[float]] = {}
        inputs: dict[str, list[str]] = {}
        truncated: dict[str, list[int]] = {}
        bar = tqdm(total=len(self.setups), desc="eval matrix", disable=not progress_enabled(progress))
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
                raise EvalError(f"the reference answer {ref!r} encodes to no tokens")
            if not p:
                raise EvalError(f"the prompt {text!r} encodes to no tokens")
            a = a[: n_ctx - 1]
            drop = max(0, len(p) + len(a) - n_ctx)  # a <= n_ctx - 1 tokens, so p keeps at least one
            p = p[drop:]
            seqs.append(p + a)
            spans.append((len(p), len(a)))
            cut.append(drop)
        out = [float("nan")] * len(texts)
        live = [i for i, s in enumerate(seqs) if s is not None]
        if live:
            device = model_device(model)
            width = max(len(seqs[i]) for i in live)
            x = torch.zeros(len(live), width, dtype=torch.long)
            y = torch.full((len(live), width), -100, dtype=torch.long)
            for r, i in enumerate(live):
                s = torch.tensor(seqs[i])
                x[r, : len(s)] = s
                start, n = spans[i]
                y[r, start - 1 : start - 1 + n] = s[start : start + n]  # position t predicts token t + 1
            with eval_mode(model):
                logits = model(x.to(device)).float()
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.to(device).reshape(-1), reduction="none")
            nll = nll.view(len(live), width).cpu()
            mask = (y != -100).float()
            per = (nll * mask).sum(1) / mask.sum(1)
            for r, i in enumerate(live):
                out[i] = float(per[r])
        return out, cut

    def _generate(self, model, texts: list[str]) -> list[str]:
        tok = model._require_tokenizer()
        keep = max(1, model.cfg.n_ctx - self.max_new_tokens)
        ids = [tok.encode(t)[-keep:] or tok.encode("\n") for t in texts]
        groups: dict[int, list[int]] = {}
        for i, x in enumerate(ids):
            groups.setdefault(len(x), []).append(i)
        device = model_device(model)
        out = [""] * len(texts)
        for n, members in sorted(groups.items()):
            batch = torch.tensor([ids[i] for i in members], device=device)
            gen = generate(
                model, batch, self.max_new_tokens, temperature=self.temperature, top_k=self.top_k, seed=self.seed
            )
            for i, g in zip(members, gen[:, n:].cpu().tolist()):
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
    progress: bool | None = None,
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
        progress: a progress bar over the setups (None: the package default).
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
    "DEFAULT_ANSWER",
    "DEFAULT_CONTEXT",
    "DEFAULT_SETUPS",
    "DEFAULT_TEMPLATE",
    "SETUPS",
    "BM25Retriever",
    "EvalMatrix",
    "EvalMatrixResult",
    "chunk_text",
    "cut_at_stop",
    "eval_matrix",
    "few_shot_pool",
    "load_qa",
    "normalize_answer",
]
