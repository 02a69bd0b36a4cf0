"""A leaderboard: many models scored on the same held-out text, ranked by bits per byte.

    from tinygpt.eval import leaderboard

    board = leaderboard("runs/", None)                 # every .tinygpt in runs/, on held-out Shakespeare
    print(board)                                       # a plain-text table, best first
    board.write_report("report.md")                    # markdown table + a self-contained HTML bar chart
    board.figure()                                     # bits per byte per model, coloured by tokenizer

Bits per byte divides by the UTF-8 bytes of the text, the same for every tokenizer, so byte-level and BPE
models compare on one scale (loss and perplexity are per token and do not); see `tinygpt.eval.perplexity`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tinygpt.errors import TinyGPTError
from tinygpt.eval.perplexity import EvalError, Text, evaluate, resolve_text
from tinygpt.io import atomic_write_text


@dataclass
class LeaderboardRow:
    """One model's scores: its file (or "model i"), tokenizer label, parameter count, loss (nats/token),
    perplexity, bits per byte, scored tokens and bytes, and the window length used."""

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
            raise EvalError(f"{p} holds no .tinygpt files")
        return files
    if p.exists():
        return [p]
    raise EvalError(f"{p} does not exist; pass a folder of .tinygpt files or a list of them")


def leaderboard(
    models: str | os.PathLike | Iterable[Any] | torch.nn.Module,
    corpus: Any = None,
    *,
    ctx: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    heldout: float | None = None,
    max_chars: int | None = None,
    device: str | None = None,
    progress: bool | None = None,
) -> LeaderboardResult:
    """Score every `.tinygpt` file of a folder (searched recursively) on the same held-out text.

    Args:
        models: a folder, one file, or a list of files (also `GPT` objects, labelled by their index).
        corpus: the held-out text: a path, a `Corpus`, a string, or None for the last 1% of the built-in
            Shakespeare.
        ctx: window length for every model (default: each model's n_ctx, capped at it).
        stride, batch_size, heldout, max_chars: as for `evaluate`.
        device: where to load the files (default: CPU).
        progress: progress bars (None: the package default).

    Returns:
        `LeaderboardResult`, sorted by bits per byte; files that fail to load are listed in `.skipped`.

    Raises:
        EvalError: no models, a folder without `.tinygpt` files, or token ids instead of text.
    """
    from tinygpt.checkpoint import as_model

    if _is_model(models):
        items: list[Any] = [models]
    elif isinstance(models, (str, os.PathLike)):
        items = list(_model_files(models))
    else:
        items = [x if _is_model(x) else Path(x) for x in models]
    if not items:
        raise EvalError("no models to score")
    text, tokens, source = resolve_text(corpus, heldout, max_chars)
    if text is None:
        raise EvalError("a leaderboard needs text (models with different tokenizers cannot share token ids)")
    root = Path(models) if isinstance(models, (str, os.PathLike)) else None
    rows, skipped = [], []
    for i, item in enumerate(items):
        if _is_model(item):
            name, model = f"model {i}", item
        else:
            name = str(item.relative_to(root)) if root is not None and root.is_dir() else str(item)
            try:
                model = as_model(item, device=device)
            except (TinyGPTError, ValueError, OSError) as e:
                skipped.append((name, str(e)))
                continue
        try:
            c = min(ctx, model.cfg.n_ctx) if ctx else None
            s = min(stride, c or model.cfg.n_ctx) if stride else None
            r = evaluate(model, Text(text), ctx=c, batch_size=batch_size, stride=s, progress=progress)
        except (TinyGPTError, ValueError, RuntimeError) as e:
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


__all__ = ["LeaderboardResult", "LeaderboardRow", "leaderboard"]
