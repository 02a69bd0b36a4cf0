"""Evaluation: loss, perplexity and bits per byte; a leaderboard of many models; a memorization test.

    import tinygpt
    from tinygpt.eval.perplexity import evaluate, leaderboard, memorization_test

    res = evaluate(model, "held-out.txt")            # a path, a Corpus, a string of text, or None
    print(res)                                         # loss 1.234 | ppl 3.43 | bpb 1.78
    board = leaderboard("runs/", None)                 # every .tinygpt in runs/, on held-out Shakespeare
    board.write_report("report.md")                    # markdown table + a self-contained HTML bar chart
    mem = memorization_test(model, train_texts, heldout_texts, prefix_tokens=32, continuation_tokens=32)

## What is measured

The text is tokenized once, as a whole, and every token except the first is scored exactly once: the first
token has nothing to be predicted from (these models are trained without a BOS token), so it is **not scored
and its bytes are not counted**. Windows of `ctx` tokens slide over the text with `stride` (default `ctx`:
non-overlapping windows, the first target of each window sees only that token). With `stride < ctx` windows
overlap and only each window's last `stride` targets are scored, so every target after the first window has at
least `ctx - stride` tokens of context (the usual "sliding window perplexity"). The last window is aligned to
the end of the text and scores only the targets not yet scored.

- `loss`: mean negative log-likelihood per scored token, in nats; `perplexity = exp(loss)`.
- `bpb` (bits per byte): total NLL in bits over the scored tokens, divided by the number of UTF-8 bytes those
  tokens decode to. For the byte tokenizer that is one byte per token, so `bpb = loss / ln 2`. For a byte-level
  BPE tokenizer each token's byte length is read from its vocabulary entry (exact, also for tokens that hold
  part of a multi-byte character), so the bytes of all scored tokens add up to the text's UTF-8 length minus
  the first token's bytes. For other tokenizers, the scored bytes are `len(decode(all).encode()) -
  len(decode(first).encode())`. Two models scored on the same text therefore share (up to the first token)
  the same denominator, which makes bpb comparable across tokenizers where loss and perplexity are not.

Corpora are evaluated as one text: the documents (files, JSONL records, plays) joined by a blank line, the same
text for every tokenizer (training separates documents by the EOS token where the tokenizer has one; at
evaluation the bytes must be the same for every model). `heldout=0.01` evaluates only the last 1% of that text
(cut at a line start), which for the built-in Shakespeare is approximately the validation split `train()` holds
out (the last `val_split` of the tokens); `evaluate(model, None)` does that by default.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from tinygpt.data import Corpus, CorpusError, load_corpus, shakespeare_to_text
from tinygpt.io import atomic_write_text
from tinygpt.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, unicode_to_bytes

LN2 = math.log(2.0)
DEFAULT_HELDOUT = 0.01
_PATH_SUFFIXES = (".txt", ".md", ".jsonl", ".ndjson", ".json", ".text", ".rst", ".csv", ".tsv")


# ------------------------------------------------------------------------------------------------ text
def corpus_text(corpus: Corpus | str | os.PathLike | None, max_chars: int | None = None) -> str:
    """The whole text of a corpus: its documents joined by a blank line ("\\n\\n").

    Args:
        corpus: a path (text file, directory, .jsonl), a `Corpus`, or None for the built-in Shakespeare.
        max_chars: stop reading once this many characters are collected (the text is cut there).
    """
    c = load_corpus(corpus)
    docs: list[str] = []
    size = 0
    for f in c.files:
        if c.kind == "jsonl":
            from tinygpt.data import _iter_jsonl

            new = list(_iter_jsonl(f, c.text_field))
        elif c.kind == "shakespeare":
            new = [shakespeare_to_text(f.read_text(encoding="utf-8"))]
        else:
            try:
                new = [f.read_text(encoding="utf-8")]
            except UnicodeDecodeError as e:
                raise CorpusError(f"{f} is not UTF-8 text ({e}); convert it or leave it out of the corpus") from e
        docs.extend(new)
        size += sum(len(d) + 2 for d in new)
        if max_chars is not None and size >= max_chars:
            break
    text = "\n\n".join(docs)
    if not text:
        raise CorpusError(f"corpus {c.name} is empty")
    return text[:max_chars] if max_chars is not None else text


def heldout_text(corpus: Corpus | str | os.PathLike | None = None, fraction: float = DEFAULT_HELDOUT) -> str:
    """The last `fraction` of a corpus's text, starting at a line start (the held-out text of a leaderboard).

    For the built-in Shakespeare (`corpus=None`) and the default fraction this is approximately the validation
    split `train()` holds out (the last 1% of the tokens).
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"held-out fraction must be in (0, 1], got {fraction}")
    text = corpus_text(corpus)
    if fraction == 1.0:
        return text
    cut = len(text) - max(1, int(len(text) * fraction))
    nl = text.find("\n", cut)
    if 0 <= nl < len(text) - 1:
        cut = nl + 1
    return text[cut:]


class Text(str):
    """A string that is text to evaluate, never a path: `evaluate(model, Text("notes.txt"))`."""


def _looks_like_path(s: str) -> bool:
    return "\n" not in s and len(s) < 4096 and (s.lower().endswith(_PATH_SUFFIXES) or os.sep in s) and " " not in s


def resolve_text(
    data: Any, heldout: float | None = None, max_chars: int | None = None
) -> tuple[str | None, Tensor | None, str]:
    """(text, tokens, description) for `evaluate`'s input: exactly one of text / tokens is set.

    Args:
        data: a string of text (`Text(s)` forces a string that looks like a path to be text); a path (str or
            Path) to a text file, directory or .jsonl; a `Corpus`; a list of texts (joined by a blank line); None
            or "shakespeare" (the built-in corpus); or token ids (a 1-D tensor, array or list of ints).
        heldout: evaluate only the last fraction of a corpus's text (default: 0.01 for the built-in corpus,
            the whole text otherwise). Applies to text too.
        max_chars: cut the text to its first `max_chars` characters (after taking the held-out part).
    """
    if isinstance(data, (list, tuple)) and data and all(isinstance(x, str) for x in data):
        data = Text("\n\n".join(data))  # documents, joined as a corpus's are
    if isinstance(data, (Tensor, np.ndarray, list, tuple)):
        t = torch.as_tensor(np.asarray(data) if not isinstance(data, Tensor) else data).long().flatten()
        return None, t, f"{len(t)} tokens"
    if isinstance(data, Text):
        desc, text = "text", str(data)
        if heldout is not None:
            text = text[len(text) - max(1, int(len(text) * heldout)) :]
    elif data is None or data == "shakespeare":
        desc = "built-in Shakespeare"
        frac = DEFAULT_HELDOUT if heldout is None else heldout
        text = heldout_text(None, frac)
    elif isinstance(data, Corpus) or isinstance(data, os.PathLike) or (isinstance(data, str) and os.path.exists(data)):
        c = load_corpus(data)
        desc = str(c.files[0]) if len(c.files) == 1 else f"{c.name} ({len(c.files)} files)"
        text = heldout_text(c, heldout) if heldout is not None else corpus_text(c)
    elif isinstance(data, str):
        if _looks_like_path(data):
            raise CorpusError(
                f"{data} does not exist; to evaluate this string as text rather than as a file, wrap it: "
                "tinygpt.eval.perplexity.Text(...)"
            )
        desc = "text"
        text = data
        if heldout is not None:
            text = text[len(text) - max(1, int(len(text) * heldout)) :]
    else:
        raise TypeError(f"cannot evaluate on a {type(data).__name__}: pass text, a corpus path, a Corpus or tokens")
    if max_chars is not None:
        text = text[:max_chars]
    if heldout is not None and data is not None:
        desc += f", last {heldout:g}"
    return text, None, desc


# ------------------------------------------------------------------------------------------------ bytes
_LENGTHS: dict[str, np.ndarray | None] = {}


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray | None:
    """UTF-8 byte length of every token id [vocab_size] (int64), or None when it cannot be read exactly.

    Exact for the byte tokenizer (all ones) and for byte-level BPE (the vocabulary entries are byte strings
    written with GPT-2's byte-to-character table; added/special tokens count the bytes of their content, which
    is what they decode to).
    """
    if isinstance(tokenizer, ByteTokenizer):  # bytes, then added special tokens (the bytes of their content)
        return np.array([1] * 256 + [len(t.encode("utf-8")) for t in tokenizer.added_tokens], dtype=np.int64)
    if not isinstance(tokenizer, BPETokenizer):
        return None
    key = tokenizer.fingerprint
    if key in _LENGTHS:
        return _LENGTHS[key]
    out: np.ndarray | None = None
    spec = json.loads(tokenizer.tok.to_str())
    dec = spec.get("decoder") or {}
    types = {dec.get("type")} | {d.get("type") for d in dec.get("decoders", []) or []}
    if "ByteLevel" in types and (spec.get("model") or {}).get("type") == "BPE":
        table = unicode_to_bytes()
        added = {i: t.content for i, t in tokenizer.tok.get_added_tokens_decoder().items()}
        out = np.zeros(tokenizer.vocab_size, dtype=np.int64)
        for s, i in tokenizer.tok.get_vocab(with_added_tokens=True).items():
            if i in added:
                out[i] = len(added[i].encode("utf-8"))
            elif all(ch in table for ch in s):
                out[i] = len(s)
            else:
                out = None
                break
    _LENGTHS[key] = out
    return out


def scored_bytes(tokenizer: Tokenizer, tokens: Tensor) -> tuple[int, np.ndarray | None]:
    """(UTF-8 bytes that tokens[1:] decode to, per-token byte lengths [n] or None)."""
    ids = tokens.cpu().numpy()
    lengths = token_byte_lengths(tokenizer)
    if lengths is not None and (ids.size == 0 or ids.max() < len(lengths)):
        per = lengths[ids]
        return int(per[1:].sum()), per
    total = len(tokenizer.decode(ids.tolist()).encode("utf-8"))
    first = len(tokenizer.decode(ids[:1].tolist()).encode("utf-8"))
    return total - first, None


# ------------------------------------------------------------------------------------------------ windows
def sliding_windows(n_tokens: int, ctx: int, stride: int) -> list[tuple[int, int]]:
    """(start, n_scored) of each window over a stream of `n_tokens` tokens.

    A window feeds tokens[start : start + L] (L = min(ctx, n_tokens - 1)) and predicts tokens[start + 1 :
    start + L + 1]; only its last `n_scored` targets are scored. Every target index 1..n_tokens-1 is scored
    exactly once.
    """
    if n_tokens < 2:
        raise ValueError(f"need at least 2 tokens to score one prediction, got {n_tokens}")
    if not 1 <= stride <= ctx:
        raise ValueError(f"stride must be in [1, ctx={ctx}], got {stride}")
    length = min(ctx, n_tokens - 1)
    out = [(0, length)]
    done = length  # targets 1..done are scored
    while done < n_tokens - 1:
        end = min(done + stride, n_tokens - 1)  # last target index of this window
        out.append((end - length, end - done))
        done = end
    return out


# ------------------------------------------------------------------------------------------------ evaluate
@dataclass
class EvalResult:
    """Loss, perplexity and bits per byte of a model on a text.

    Attributes:
        loss: mean NLL per scored token (nats).
        n_tokens: scored tokens (all but the first token of the text).
        n_bytes: UTF-8 bytes those tokens decode to.
        total_nll: summed NLL of the scored tokens (nats).
        tokenizer: "byte" or "bpe" with the vocabulary size, e.g. "bpe 4096".
        ctx, stride: the window length and step used.
        source: what was evaluated (a path, "text", "built-in Shakespeare, last 0.01").
        elapsed: seconds.
        token_nll: per-token NLL [n_tokens] (float32, target positions 1..) when `per_token=True`.
        token_bytes: per-token byte lengths [n_tokens] when known and `per_token=True`.
    """

    loss: float
    n_tokens: int
    n_bytes: int
    total_nll: float
    tokenizer: str = ""
    ctx: int = 0
    stride: int = 0
    source: str = ""
    elapsed: float = 0.0
    token_nll: np.ndarray | None = field(default=None, repr=False)
    token_bytes: np.ndarray | None = field(default=None, repr=False)

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else float("inf")

    ppl = perplexity

    @property
    def bits_per_token(self) -> float:
        return self.loss / LN2

    @property
    def bpb(self) -> float:
        """Bits per byte: total NLL in bits / bytes of the scored tokens."""
        return self.total_nll / LN2 / self.n_bytes if self.n_bytes else float("nan")

    bits_per_byte = bpb

    @property
    def bytes_per_token(self) -> float:
        return self.n_bytes / self.n_tokens if self.n_tokens else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "loss": self.loss,
            "perplexity": self.perplexity,
            "bpb": self.bpb,
            "n_tokens": self.n_tokens,
            "n_bytes": self.n_bytes,
            "tokenizer": self.tokenizer,
            "ctx": self.ctx,
            "stride": self.stride,
            "source": self.source,
        }

    def __str__(self) -> str:
        return f"loss {self.loss:.3f} | ppl {self.perplexity:.2f} | bpb {self.bpb:.3f}"

    def __repr__(self) -> str:
        return (
            f"EvalResult({self}, {self.n_tokens:,} tokens, {self.n_bytes:,} bytes, {self.tokenizer}, "
            f"ctx {self.ctx}, stride {self.stride}, {self.source})"
        )


def tokenizer_label(tok: Tokenizer | None) -> str:
    if tok is None:
        return "?"
    return "byte" if isinstance(tok, ByteTokenizer) else f"{tok.kind} {tok.vocab_size}"


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    corpus_or_text: Any = None,
    ctx: int | None = None,
    batch_size: int = 8,
    stride: int | None = None,
    *,
    heldout: float | None = None,
    max_chars: int | None = None,
    per_token: bool = False,
    progress: bool = True,
) -> EvalResult:
    """Loss, perplexity and bits per byte of `model` on a text (see the module docstring for the definitions).

    Args:
        model: a tinygpt `GPT` (any architecture, also with LoRA adapters or surgery) with its tokenizer.
        corpus_or_text: text (a string, or a list of texts), a path (text file, directory, .jsonl), a `Corpus`,
            token ids, or None for the held-out end (last 1%) of the built-in Shakespeare. A string is a path
            when that file exists; `Text(s)` always means text.
        ctx: window length in tokens (default and maximum: the model's n_ctx).
        batch_size: windows per forward pass.
        stride: new targets per window (default `ctx`: non-overlapping windows); smaller values give every
            target more context at proportionally more compute.
        heldout: evaluate only the last fraction of the text (default: 0.01 for the built-in corpus, else all).
        max_chars: evaluate only the first `max_chars` characters (after `heldout`); useful on big corpora.
        per_token: keep per-token NLLs (and byte lengths) in the result.
        progress: show a progress bar.
    Returns:
        `EvalResult` (`.loss`, `.perplexity`, `.bpb`, `.n_tokens`, `.n_bytes`).
    """
    from tqdm.auto import tqdm

    tok = getattr(model, "tokenizer", None)
    text, tokens, source = resolve_text(corpus_or_text, heldout, max_chars)
    if text is not None:
        if tok is None:
            raise ValueError("this model has no tokenizer attached; set model.tokenizer or pass token ids")
        tokens = torch.from_numpy(np.asarray(tok.encode_array(text), dtype=np.int64))
    elif tok is None:
        raise ValueError("bits per byte needs the model's tokenizer to count bytes; set model.tokenizer")
    n_ctx = model.cfg.n_ctx
    ctx = n_ctx if ctx is None else int(ctx)
    if not 1 <= ctx <= n_ctx:
        raise ValueError(f"ctx must be in [1, n_ctx={n_ctx}], got {ctx}")
    stride = ctx if stride is None else int(stride)
    if not 1 <= stride <= ctx:
        raise ValueError(f"stride must be in [1, ctx={ctx}], got {stride}")
    n = len(tokens)
    if n < 2:
        raise ValueError(f"the text is {n} token(s) long; at least 2 are needed (the first one is not scored)")
    if int(tokens.max()) >= model.cfg.d_vocab:
        raise ValueError(f"token id {int(tokens.max())} is outside the model's vocabulary of {model.cfg.d_vocab}")
    n_bytes, per_bytes = scored_bytes(tok, tokens)
    if per_bytes is not None and not isinstance(tok, ByteTokenizer):
        decoded = len(tok.decode(tokens.tolist()).encode("utf-8"))
        if int(per_bytes.sum()) != decoded:  # a tokenizer whose decoder does more than map bytes: count decoded
            per_bytes = None
            n_bytes = decoded - len(tok.decode(tokens[:1].tolist()).encode("utf-8"))
    wins = sliding_windows(n, ctx, stride)
    length = min(ctx, n - 1)
    device = next(model.parameters()).device
    nll = torch.zeros(n - 1, dtype=torch.float64)  # nll[i] is target index i + 1
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    bar = tqdm(total=n - 1, desc="evaluate", unit="tok", disable=not progress, dynamic_ncols=True)
    try:
        for i in range(0, len(wins), batch_size):
            group = wins[i : i + batch_size]
            starts = torch.tensor([s for s, _ in group])
            idx = starts[:, None] + torch.arange(length + 1)[None]
            seq = tokens[idx].to(device)
            logits = model(seq[:, :-1])
            lp = F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), seq[:, 1:].reshape(-1), reduction="none"
            ).view(len(group), length)
            lp = lp.double().cpu()
            for row, (s, k) in enumerate(group):
                # window targets are indices s+1 .. s+length; the last k are new
                nll[s + length - k : s + length] = lp[row, length - k :]
            bar.update(sum(k for _, k in group))
    finally:
        bar.close()
        model.train(was_training)
    total = float(nll.sum())
    res = EvalResult(
        loss=total / (n - 1),
        n_tokens=n - 1,
        n_bytes=n_bytes,
        total_nll=total,
        tokenizer=tokenizer_label(tok),
        ctx=length,
        stride=stride,
        source=source,
        elapsed=time.perf_counter() - t0,
    )
    if per_token:
        res.token_nll = nll.float().numpy()
        res.token_bytes = per_bytes[1:] if per_bytes is not None else None
    return res


# ------------------------------------------------------------------------------------------------ leaderboard
@dataclass
class LeaderboardRow:
    file: str
    tokenizer: str
    params: int
    loss: float
    perplexity: float
    bpb: float
    n_tokens: int
    n_bytes: int
    ctx: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class LeaderboardResult:
    """Models scored on the same held-out text, best (lowest bits per byte) first.

    Attributes:
        rows: one `LeaderboardRow` per model, sorted by bpb.
        source: what the text was; n_chars / n_bytes / text_sha256 describe it.
        skipped: (file, reason) for files that could not be evaluated.
        settings: ctx, stride, heldout, max_chars used.
    """

    rows: list[LeaderboardRow]
    source: str
    n_chars: int
    n_bytes: int
    text_sha256: str
    skipped: list[tuple[str, str]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_markdown(self) -> str:
        head = "| rank | file | tokenizer | params | ctx | loss | ppl | bpb |\n|---:|---|---|---:|---:|---:|---:|---:|"
        lines = [head]
        for i, r in enumerate(self.rows, 1):
            lines.append(
                f"| {i} | {r.file} | {r.tokenizer} | {r.params:,} | {r.ctx} | {r.loss:.4f} | {r.perplexity:.3f} "
                f"| {r.bpb:.4f} |"
            )
        return "\n".join(lines)

    def table(self) -> str:
        """A plain-text table (what the CLI prints)."""
        w = max([len("file"), *(len(r.file) for r in self.rows)])
        lines = [f"{'file':<{w}}  {'tokenizer':<10} {'params':>11} {'ctx':>5} {'loss':>7} {'ppl':>9} {'bpb':>7}"]
        for r in self.rows:
            lines.append(
                f"{r.file:<{w}}  {r.tokenizer:<10} {r.params:>11,} {r.ctx:>5} {r.loss:>7.4f} {r.perplexity:>9.3f} "
                f"{r.bpb:>7.4f}"
            )
        for f, why in self.skipped:
            lines.append(f"skipped {f}: {why}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def _repr_markdown_(self) -> str:
        return self.to_markdown()

    def figure(self):
        """Plotly bar chart of bits per byte per model, coloured by tokenizer kind (lower is better)."""
        import plotly.graph_objects as go

        fig = go.Figure()
        kinds = sorted({r.tokenizer.split()[0] for r in self.rows})
        for kind in kinds:
            rows = [r for r in self.rows if r.tokenizer.split()[0] == kind]
            fig.add_trace(
                go.Bar(
                    x=[r.file for r in rows],
                    y=[r.bpb for r in rows],
                    name=kind,
                    text=[f"{r.bpb:.3f}" for r in rows],
                    textposition="outside",
                    customdata=[[r.tokenizer, r.params, r.loss, r.perplexity] for r in rows],
                    hovertemplate="%{x}<br>bpb %{y:.4f}<br>%{customdata[0]}, %{customdata[1]:,} params"
                    "<br>loss %{customdata[2]:.4f}, ppl %{customdata[3]:.3f}<extra></extra>",
                )
            )
        fig.update_layout(
            title=f"bits per byte on {self.source} ({self.n_bytes:,} bytes; lower is better)",
            xaxis_title="model",
            yaxis_title="bits per byte",
            template="plotly_white",
            xaxis={"categoryorder": "array", "categoryarray": [r.file for r in self.rows]},
        )
        return fig

    def write_report(self, path: str | os.PathLike) -> Path:
        """Write a markdown report to `path` and the bar chart beside it as a self-contained HTML file.

        The HTML embeds plotly.js (no download when it is opened). Both files are written atomically.
        Returns the markdown path; the figure is `<stem>.bpb.html`.
        """
        path = Path(path)
        html_path = path.with_name(path.stem + ".bpb.html")
        html = self.figure().to_html(include_plotlyjs=True, full_html=True)
        atomic_write_text(html_path, html)
        s = self.settings
        lines = [
            "# Leaderboard: bits per byte on held-out text",
            "",
            f"Text: {self.source}: {self.n_chars:,} characters, {self.n_bytes:,} UTF-8 bytes, "
            f"sha256 `{self.text_sha256[:16]}`.",
            f"Windows: ctx {s.get('ctx') or 'each model n_ctx'}, stride {s.get('stride') or 'ctx'}; "
            "the first token is not scored.",
            "",
            "Bits per byte = total negative log-likelihood in bits / UTF-8 bytes of the scored tokens; it compares "
            "byte-level and BPE models on the same text (loss and perplexity are per token and do not).",
            "",
            self.to_markdown(),
            "",
            f"Figure: [{html_path.name}]({html_path.name})",
        ]
        if self.skipped:
            lines += ["", "## Skipped", ""] + [f"- {f}: {why}" for f, why in self.skipped]
        atomic_write_text(path, "\n".join(lines) + "\n")
        return path


def _model_files(folder: str | os.PathLike) -> list[Path]:
    p = Path(folder)
    if p.is_dir():
        files = sorted(p.rglob("*.tinygpt"))
        if not files:
            raise ValueError(f"{p} holds no .tinygpt files")
        return files
    if p.exists():
        return [p]
    raise ValueError(f"{p} does not exist; pass a folder of .tinygpt files or a list of them")


def leaderboard(
    folder_or_paths: str | os.PathLike | Iterable[str | os.PathLike],
    corpus: Any = None,
    *,
    ctx: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    heldout: float | None = None,
    max_chars: int | None = None,
    device: str | None = None,
    progress: bool = True,
) -> LeaderboardResult:
    """Score every `.tinygpt` file of a folder (searched recursively) on the same held-out text.

    Args:
        folder_or_paths: a folder, one file, or a list of files (also `GPT` objects, labelled by their index).
        corpus: the held-out text: a path, a `Corpus`, a string, or None for the last 1% of the built-in
            Shakespeare.
        ctx: window length for every model (default: each model's n_ctx, capped at it).
        stride, batch_size, heldout, max_chars: as for `evaluate`.
        device: where to run (default: CPU).
    Returns:
        `LeaderboardResult`, sorted by bits per byte; files that fail to load are listed in `.skipped`.
    """
    from tinygpt.checkpoint import load

    if _is_model(folder_or_paths):
        items: list[Any] = [folder_or_paths]
    elif isinstance(folder_or_paths, (str, os.PathLike)):
        items = list(_model_files(folder_or_paths))
    else:
        items = [x if _is_model(x) else Path(x) for x in folder_or_paths]
    if not items:
        raise ValueError("no models to score")
    text, tokens, source = resolve_text(corpus, heldout, max_chars)
    if text is None:
        raise ValueError("a leaderboard needs text (models with different tokenizers cannot share token ids)")
    root = Path(folder_or_paths) if isinstance(folder_or_paths, (str, os.PathLike)) else None
    rows, skipped = [], []
    for i, item in enumerate(items):
        if _is_model(item):
            name, model = f"model {i}", item
        else:
            name = str(item.relative_to(root)) if root is not None and root.is_dir() else str(item)
            try:
                model = load(item, device=device)
            except (ValueError, OSError) as e:
                skipped.append((name, str(e)))
                continue
        try:
            c = min(ctx, model.cfg.n_ctx) if ctx else None
            s = min(stride, c or model.cfg.n_ctx) if stride else None
            r = evaluate(model, Text(text), c, batch_size, s, progress=progress)
        except (ValueError, RuntimeError) as e:
            skipped.append((name, str(e)))
            continue
        n_params = sum(p.numel() for p in model.parameters())
        rows.append(
            LeaderboardRow(name, r.tokenizer, n_params, r.loss, r.perplexity, r.bpb, r.n_tokens, r.n_bytes, r.ctx)
        )
    rows.sort(key=lambda r: r.bpb)
    return LeaderboardResult(
        rows=rows,
        source=source,
        n_chars=len(text),
        n_bytes=len(text.encode("utf-8")),
        text_sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
        skipped=skipped,
        settings={"ctx": ctx, "stride": stride, "heldout": heldout, "max_chars": max_chars},
    )


def _is_model(x: Any) -> bool:
    return isinstance(x, torch.nn.Module)


# ------------------------------------------------------------------------------------------------ memorization
@dataclass
class MemorizationStats:
    """Greedy-continuation statistics of one set of examples.

    Attributes:
        n: examples.
        exact_rate: fraction whose greedy continuation equals the true one token for token (all of it).
        mean_lcp, max_lcp: longest common prefix, in tokens, of the generated and the true continuation
            (how far the model reproduces the text verbatim before it first deviates).
        mean_lcs, max_lcs: longest common substring, in tokens (the longest verbatim run anywhere in the
            continuation, also after a deviation or shifted).
        token_match: fraction of continuation positions where generated == true.
        lcp: per-example longest common prefix lengths.
    """

    n: int
    exact_rate: float
    mean_lcp: float
    max_lcp: int
    mean_lcs: float
    max_lcs: int
    token_match: float
    lcp: list[int] = field(default_factory=list, repr=False)
    lcs: list[int] = field(default_factory=list, repr=False)


@dataclass
class MemorizationResult:
    """Train vs held-out greedy-continuation statistics (`memorization_test`).

    Attributes:
        train, heldout: `MemorizationStats` of each set.
        prefix_tokens, continuation_tokens: prompt and continuation lengths.
        examples: {"train": [...], "heldout": [...]} dicts with `prefix`, `truth`, `generated` (texts), `lcp`.
    """

    train: MemorizationStats
    heldout: MemorizationStats
    prefix_tokens: int
    continuation_tokens: int
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict, repr=False)

    @property
    def gap(self) -> float:
        """Verbatim-continuation rate on training examples minus that on held-out ones."""
        return self.train.exact_rate - self.heldout.exact_rate

    def table(self) -> str:
        lines = [f"{'':<8} {'n':>5} {'verbatim':>9} {'mean lcp':>9} {'max lcp':>8} {'mean lcs':>9} {'tok match':>10}"]
        for name, s in (("train", self.train), ("heldout", self.heldout)):
            lines.append(
                f"{name:<8} {s.n:>5} {s.exact_rate:>9.1%} {s.mean_lcp:>9.2f} {s.max_lcp:>8} {s.mean_lcs:>9.2f} "
                f"{s.token_match:>10.1%}"
            )
        lines.append(
            f"(greedy continuation of {self.continuation_tokens} tokens after {self.prefix_tokens}-token prefixes; "
            "lcp/lcs in tokens)"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def figure(self):
        """Plotly histogram of the longest common prefix (tokens reproduced verbatim), train vs held-out."""
        import plotly.graph_objects as go

        fig = go.Figure()
        for name, s in (("train", self.train), ("held-out", self.heldout)):
            fig.add_trace(
                go.Histogram(
                    x=s.lcp,
                    name=f"{name} (verbatim {s.exact_rate:.0%})",
                    opacity=0.65,
                    xbins={"start": -0.5, "end": self.continuation_tokens + 0.5, "size": 1},
                )
            )
        fig.update_layout(
            barmode="overlay",
            title="memorization: tokens continued verbatim before the first deviation",
            xaxis_title=f"longest common prefix (tokens, of {self.continuation_tokens})",
            yaxis_title="examples",
            template="plotly_white",
        )
        return fig


def longest_common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def longest_common_substring(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest contiguous run shared by `a` and `b` (dynamic programming, O(len(a)·len(b)))."""
    best = 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, 1):
            if x == y:
                cur[j] = prev[j - 1] + 1
                best = max(best, cur[j])
        prev = cur
    return best


def _examples(model, data: Any, need: int, n: int, seed: int) -> list[list[int]]:
    """Token sequences of length `need`: the first `need` tokens of each text in a list (texts too short are
    dropped), or random windows of a single text / corpus / token stream. At most `n`, chosen with `seed`."""
    tok = model._require_tokenizer()
    rng = random.Random(seed)
    if isinstance(data, (list, tuple)) and data and all(isinstance(x, str) for x in data):
        seqs = [ids[:need] for ids in (tok.encode(t) for t in data) if len(ids) >= need]
        if not seqs:
            raise ValueError(f"no example is at least {need} tokens long; lower prefix_tokens/continuation_tokens")
        return rng.sample(seqs, n) if len(seqs) > n else seqs
    if isinstance(data, (list, tuple)) and data and all(isinstance(x, (list, tuple, Tensor)) for x in data):
        seqs = [[int(t) for t in x][:need] for x in data if len(x) >= need]
        return rng.sample(seqs, n) if len(seqs) > n else seqs
    text, tokens, _ = resolve_text(data)
    stream = tok.encode(text) if text is not None else tokens.tolist()
    if len(stream) < need:
        raise ValueError(f"the text is {len(stream)} tokens, fewer than prefix + continuation = {need}")
    starts = sorted(rng.sample(range(len(stream) - need + 1), min(n, len(stream) - need + 1)))
    return [stream[s : s + need] for s in starts]


@torch.no_grad()
def _continue(model, seqs: list[list[int]], p: int, c: int, batch_size: int, bar) -> list[list[int]]:
    from tinygpt.sampling import generate_tokens

    device = next(model.parameters()).device
    out: list[list[int]] = []
    for i in range(0, len(seqs), batch_size):
        prefix = torch.tensor([s[:p] for s in seqs[i : i + batch_size]], device=device)
        steps = list(generate_tokens(model, prefix, c, temperature=0.0, seed=0))
        gen = torch.stack(steps, dim=1).cpu()
        out.extend(gen.tolist())
        bar.update(len(prefix))
    return out


def _stats(seqs: list[list[int]], gens: list[list[int]], p: int) -> MemorizationStats:
    truths = [s[p:] for s in seqs]
    lcp = [longest_common_prefix(g, t) for g, t in zip(gens, truths)]
    lcs = [longest_common_substring(g, t) for g, t in zip(gens, truths)]
    c = len(truths[0])
    match = sum(sum(x == y for x, y in zip(g, t)) for g, t in zip(gens, truths)) / (len(truths) * c)
    return MemorizationStats(
        n=len(seqs),
        exact_rate=sum(v == c for v in lcp) / len(lcp),
        mean_lcp=float(np.mean(lcp)),
        max_lcp=max(lcp),
        mean_lcs=float(np.mean(lcs)),
        max_lcs=max(lcs),
        token_match=match,
        lcp=lcp,
        lcs=lcs,
    )


def memorization_test(
    model: torch.nn.Module,
    train_data: Any,
    heldout: Any,
    prefix_tokens: int = 32,
    continuation_tokens: int = 32,
    n: int = 100,
    seed: int = 0,
    *,
    batch_size: int = 16,
    progress: bool = True,
) -> MemorizationResult:
    """Does the model continue training text verbatim more often than held-out text?

    For each example the first `prefix_tokens` tokens are the prompt; the model continues greedily
    (temperature 0) for `continuation_tokens` tokens, which are compared with the true continuation. Held-out
    examples are the control: the gap between the two rates is memorization, not just good modelling.

    Args:
        model: a tinygpt model with its tokenizer.
        train_data, heldout: a list of example texts (each example's first tokens are used; examples shorter
            than prefix + continuation are dropped), a list of token lists, or one text / corpus path / `Corpus`
            / None (built-in Shakespeare's held-out end) from which `n` random windows are drawn.
        prefix_tokens: prompt length (30–50 is usual).
        continuation_tokens: tokens generated and compared.
        n: examples per set at most (drawn with `seed` when there are more).
        batch_size: prompts continued together.
    Returns:
        `MemorizationResult` with `.train`, `.heldout` (`exact_rate`, `mean_lcp`, `max_lcp`, `mean_lcs`, ...),
        `.gap`, `.table()`, `.figure()` and the examples as text.
    """
    from tqdm.auto import tqdm

    p, c = int(prefix_tokens), int(continuation_tokens)
    if p < 1 or c < 1:
        raise ValueError(f"prefix_tokens and continuation_tokens must be >= 1, got {p} and {c}")
    if p + c > model.cfg.n_ctx:
        warnings.warn(
            f"prefix + continuation = {p + c} tokens exceed n_ctx={model.cfg.n_ctx}; generation slides its window",
            stacklevel=2,
        )
    sets = {"train": _examples(model, train_data, p + c, n, seed), "heldout": _examples(model, heldout, p + c, n, seed)}
    tok = model.tokenizer
    bar = tqdm(total=sum(len(s) for s in sets.values()), desc="memorization", disable=not progress)
    stats, examples = {}, {}
    try:
        for name, seqs in sets.items():
            gens = _continue(model, seqs, p, c, batch_size, bar)
            stats[name] = _stats(seqs, gens, p)
            examples[name] = [
                {
                    "prefix": tok.decode(s[:p]),
                    "truth": tok.decode(s[p:]),
                    "generated": tok.decode(g),
                    "lcp": stats[name].lcp[i],
                }
                for i, (s, g) in enumerate(zip(seqs, gens))
            ]
    finally:
        bar.close()
    return MemorizationResult(stats["train"], stats["heldout"], p, c, examples)
