"""Loss, perplexity and bits per byte of a model on a text, and the text a corpus stands for.

    from tinygpt.eval import evaluate, Text

    res = evaluate(model, "held-out.txt")            # a path, a Corpus, a string of text, or None
    print(res)                                         # loss 1.234 | ppl 3.43 | bpb 1.78
    evaluate(model, Text("notes.txt"), ctx=64, stride=16)   # a string that looks like a path, as text
    res.figure()                                       # (per_token=True: the loss of every token)

The leaderboard over many models (`tinygpt.eval.leaderboard`) and the memorization test
(`tinygpt.eval.memorization`) score with `evaluate` and read text with `resolve_text`.

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

import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tinygpt.data import Corpus, CorpusError, load_corpus, shakespeare_to_text
from tinygpt.errors import TinyGPTError, TinyGPTValueError
from tinygpt.inputs import eval_mode, model_device, progress_enabled
from tinygpt.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, unicode_to_bytes

LN2 = math.log(2.0)
DEFAULT_HELDOUT = 0.01
_PATH_SUFFIXES = (".txt", ".md", ".jsonl", ".ndjson", ".json", ".text", ".rst", ".csv", ".tsv")


class EvalError(TinyGPTValueError):
    """Bad evaluation settings or data (a window longer than the context, too short a text, no models...)."""


class EvalTypeError(TinyGPTError, TypeError):
    """An evaluation input of a type that cannot be read (a `TypeError` too)."""


# ------------------------------------------------------------------------------------------------ text
def corpus_text(corpus: Corpus | str | os.PathLike | None, max_chars: int | None = None) -> str:
    """The whole text of a corpus: its documents joined by a blank line ("\\n\\n").

    Args:
        corpus: a path (text file, directory, .jsonl), a `Corpus`, or None for the built-in Shakespeare.
        max_chars: stop reading once this many characters are collected (the text is cut there).

    Raises:
        CorpusError: the corpus is missing, empty, or not UTF-8.
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
        raise EvalError(f"held-out fraction must be in (0, 1], got {fraction}")
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
        raise EvalTypeError(f"cannot evaluate on a {type(data).__name__}: pass text, a corpus path, a Corpus or tokens")
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
        raise EvalError(f"need at least 2 tokens to score one prediction, got {n_tokens}")
    if not 1 <= stride <= ctx:
        raise EvalError(f"stride must be in [1, ctx={ctx}], got {stride}")
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

    def details(self) -> str:
        """What was scored: tokens, bytes, tokenizer, windows and source (the CLI's second line)."""
        return (
            f"{self.n_tokens:,} tokens, {self.n_bytes:,} bytes, {self.tokenizer} tokenizer, ctx {self.ctx}, "
            f"stride {self.stride}, {self.source}"
        )

    def __repr__(self) -> str:
        return (
            f"EvalResult({self}, {self.n_tokens:,} tokens, {self.n_bytes:,} bytes, {self.tokenizer}, "
            f"ctx {self.ctx}, stride {self.stride}, {self.source})"
        )

    def figure(self, smooth: int = 64):
        """Plotly: the loss of every scored token in bits and its running mean over `smooth` tokens
        (with `per_token=True`); otherwise bars of bits per token and bits per byte."""
        import plotly.graph_objects as go

        fig = go.Figure()
        if self.token_nll is None:
            vals = [self.bits_per_token, self.bpb]
            fig.add_trace(go.Bar(x=["bits per token", "bits per byte"], y=vals, text=[f"{v:.3f}" for v in vals]))
            fig.update_layout(title=f"{self} on {self.source}", yaxis_title="bits", template="plotly_white")
            return fig
        bits = np.asarray(self.token_nll, dtype=np.float64) / LN2
        k = max(1, min(int(smooth), len(bits)))
        mean = np.convolve(bits, np.ones(k) / k, mode="valid")
        fig.add_trace(go.Scattergl(y=bits, mode="markers", name="token", marker={"size": 3, "opacity": 0.35}))
        fig.add_trace(go.Scatter(x=np.arange(k - 1, len(bits)), y=mean, name=f"mean of {k}"))
        fig.update_layout(
            title=f"loss per token on {self.source} ({self})",
            xaxis_title="target position",
            yaxis_title="bits",
            template="plotly_white",
        )
        return fig


def tokenizer_label(tok: Tokenizer | None) -> str:
    if tok is None:
        return "?"
    return "byte" if isinstance(tok, ByteTokenizer) else f"{tok.kind} {tok.vocab_size}"


@torch.no_grad()
def evaluate(
    model: Any,
    corpus: Any = None,
    *,
    ctx: int | None = None,
    batch_size: int = 8,
    stride: int | None = None,
    heldout: float | None = None,
    max_chars: int | None = None,
    per_token: bool = False,
    progress: bool | None = None,
) -> EvalResult:
    """Loss, perplexity and bits per byte of `model` on a text (see the module docstring for the definitions).

    The text is tokenized once and every token but the first is scored exactly once, by windows of `ctx`
    tokens sliding with `stride` (see `sliding_windows`).

    Args:
        model: a tinygpt `GPT` (any architecture, also with LoRA adapters or surgery) with its tokenizer, or a
            `.tinygpt` path.
        corpus: text (a string, or a list of texts), a path (text file, directory, .jsonl), a `Corpus`,
            token ids [n], or None for the held-out end (last 1%) of the built-in Shakespeare. A string is a
            path when that file exists; `Text(s)` always means text.
        ctx: window length in tokens (default and maximum: the model's n_ctx).
        batch_size: windows per forward pass.
        stride: new targets per window (default `ctx`: non-overlapping windows); smaller values give every
            target more context at proportionally more compute.
        heldout: evaluate only the last fraction of the text (default: 0.01 for the built-in corpus, else all).
        max_chars: evaluate only the first `max_chars` characters (after `heldout`); useful on big corpora.
        per_token: keep per-token NLLs (and byte lengths) in the result.
        progress: show a progress bar (None: the package default).

    Returns:
        `EvalResult` (`.loss`, `.perplexity`, `.bpb`, `.n_tokens`, `.n_bytes`, `.figure()`).

    Raises:
        EvalError: bad `ctx` / `stride`, a text shorter than 2 tokens, ids outside the vocabulary.
        CorpusError: a path that does not exist.
    """
    from tqdm.auto import tqdm

    from tinygpt.checkpoint import as_model

    model = as_model(model)
    tok = getattr(model, "tokenizer", None)
    text, tokens, source = resolve_text(corpus, heldout, max_chars)
    if text is not None:
        if tok is None:
            raise EvalError("this model has no tokenizer attached; set model.tokenizer or pass token ids")
        tokens = torch.from_numpy(np.asarray(tok.encode_array(text), dtype=np.int64))
    elif tok is None:
        raise EvalError("bits per byte needs the model's tokenizer to count bytes; set model.tokenizer")
    n_ctx = model.cfg.n_ctx
    ctx = n_ctx if ctx is None else int(ctx)
    if not 1 <= ctx <= n_ctx:
        raise EvalError(f"ctx must be in [1, n_ctx={n_ctx}], got {ctx}")
    stride = ctx if stride is None else int(stride)
    if not 1 <= stride <= ctx:
        raise EvalError(f"stride must be in [1, ctx={ctx}], got {stride}")
    n = len(tokens)
    if n < 2:
        raise EvalError(f"the text is {n} token(s) long; at least 2 are needed (the first one is not scored)")
    if int(tokens.max()) >= model.cfg.d_vocab:
        raise EvalError(f"token id {int(tokens.max())} is outside the model's vocabulary of {model.cfg.d_vocab}")
    wins = sliding_windows(n, ctx, stride)
    n_bytes, per_bytes = scored_bytes(tok, tokens)
    if per_bytes is not None and not isinstance(tok, ByteTokenizer):
        decoded = len(tok.decode(tokens.tolist()).encode("utf-8"))
        if int(per_bytes.sum()) != decoded:  # a tokenizer whose decoder does more than map bytes: count decoded
            per_bytes = None
            n_bytes = decoded - len(tok.decode(tokens[:1].tolist()).encode("utf-8"))
    length = min(ctx, n - 1)
    device = model_device(model)
    nll = torch.zeros(n - 1, dtype=torch.float64)  # nll[i] is target index i + 1
    t0 = time.perf_counter()
    bar = tqdm(total=n - 1, desc="evaluate", unit="tok", disable=not progress_enabled(progress), dynamic_ncols=True)
    with eval_mode(model):
        try:
            for i in range(0, len(wins), batch_size):
                group = wins[i : i + batch_size]
                starts = torch.tensor([s for s, _ in group])
                seq = tokens[starts[:, None] + torch.arange(length + 1)[None]].to(device)
                # the per-token loss without the logits (chunked linear + cross-entropy, tinygpt.model.loss)
                lp = model(seq[:, :-1], targets=seq[:, 1:], return_type="loss", loss_per_token=True)
                lp = lp.view(len(group), length).double().cpu()
                for row, (s, k) in enumerate(group):  # window targets are s+1 .. s+length; the last k are new
                    nll[s + length - k : s + length] = lp[row, length - k :]
                bar.update(sum(k for _, k in group))
        finally:
            bar.close()
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


__all__ = [
    "DEFAULT_HELDOUT",
    "LN2",
    "EvalError",
    "EvalResult",
    "EvalTypeError",
    "Text",
    "corpus_text",
    "evaluate",
    "heldout_text",
    "resolve_text",
    "scored_bytes",
    "sliding_windows",
    "token_byte_lengths",
    "tokenizer_label",
]
