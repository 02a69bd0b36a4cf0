"""`EvalMatrixResult`: the outputs and reference-answer losses of an evaluation matrix, and its views.

res = eval_matrix(base, qa, few_shot=..., lora=..., retrieval=...)   # tinygpt.eval.matrix
res.table()          # plain text: mean reference loss and match rate per setup, then every prompt
res.to_markdown()    # one row per prompt, the setups side by side
res                  # in a notebook: an HTML table (`to_html`)
res.figure()         # reference loss per setup (bars) and per prompt (points)
"""

from __future__ import annotations

import html
import math
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tinygpt.eval.perplexity import EvalError

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
            raise EvalError(f"cannot merge results with setups {other.setups} into {self.setups}")
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


__all__ = ["EvalMatrixResult", "normalize_answer"]
