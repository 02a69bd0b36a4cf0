"""The feature index's objects: `FeatureIndex` (per-feature tensors), `FeatureReport` and `FeatureExample`.

`build_feature_index` (in `tinygpt.dictionary.features`) fills them; `FeatureIndex.feature(i)` reads one
feature's top contexts, quantile samples, histogram, density and logit effects back as a `FeatureReport`,
which renders as HTML in a notebook (every token shaded by its activation, the example token underlined) and
draws a plotly figure.
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tinygpt.checkpoint import write_tensor_file
from tinygpt.dictionary.errors import DictionaryError

FORMAT = "feature_index"
FORMAT_VERSION = 1
HIST_EDGES = torch.linspace(-4.0, 4.0, 65)  # log10 |activation| bin edges (values outside go to the end bins)


def display_token(t: str) -> str:
    """A token string quoted for a label: newlines and tabs escaped, the rest as the tokenizer shows it."""
    return "'" + t.replace("\n", "\\n").replace("\t", "\\t") + "'"


@dataclass
class FeatureExample:
    """One context: `tokens` (strings), `acts` (the feature at each, NaN outside the window), `center` (the
    example token's index in `tokens`), its `value`, and where it is (`window`, `pos`)."""

    tokens: list[str]
    acts: list[float]
    center: int
    value: float
    window: int
    pos: int

    def html(self) -> str:
        top = max([abs(a) for a in self.acts if a == a] + [1e-9])
        spans = []
        for i, (t, a) in enumerate(zip(self.tokens, self.acts)):
            alpha = 0.0 if a != a else max(0.0, a) / top
            border = "border-bottom:2px solid #d62728;" if i == self.center else ""
            tip = "" if a != a else f"{a:.3g}"
            text = html.escape(t).replace("\n", "↵")
            spans.append(f'<span title="{tip}" style="background:rgba(255,140,0,{alpha:.2f});{border}">{text}</span>')
        return f'<div style="font-family:monospace;white-space:pre">{"".join(spans)}  <b>{self.value:.3g}</b></div>'


class FeatureIndex:
    """Per-feature statistics and examples from `build_feature_index` (tensors have a leading feature axis)."""

    def __init__(self, tensors: dict[str, Tensor], manifest: dict[str, Any], tokenizer=None):
        self.t, self.manifest, self.tokenizer = tensors, manifest, tokenizer
        self.features: list[int] = manifest["features"]
        self._row = {f: i for i, f in enumerate(self.features)}

    def __len__(self) -> int:
        return len(self.features)

    hook = property(lambda self: self.manifest["hook"])
    n_tokens = property(lambda self: int(self.t["n_tokens"]))

    @property
    def density(self) -> Tensor:
        """Fraction of indexed tokens where each feature is active [n_features]."""
        return (self.t["active"] / self.n_tokens).float()

    def _tok(self, i: int) -> str:
        if self.tokenizer is None:
            return f"<{i}>"
        return self.tokenizer.token_str(i) if hasattr(self.tokenizer, "token_str") else self.tokenizer.decode([i])

    def _examples(self, row: int, prefix: str, order: Tensor | None = None) -> list[FeatureExample]:
        idx, ctx = self.t[f"{prefix}_index"][row], self.t[f"{prefix}_context"][row]
        vals = self.t["top_values" if prefix == "top" else "sample_values"][row]
        if prefix == "top" and self.manifest["source"]["kind"] != "directions" and bool((vals > 0).any()):
            idx = torch.where(vals > 0, idx, -1)  # a rarely active latent: show only where it fires
        toks, T = self.t["tokens"], self.t["tokens"].shape[1]
        b, a = self.manifest["before"], self.manifest["after"]
        out = []
        for j in order.tolist() if order is not None else range(idx.numel()):
            g = int(idx[j])
            if g < 0:
                continue
            w, p = divmod(g, T)
            lo, hi = max(0, p - b), min(T, p + a + 1)
            out.append(
                FeatureExample(
                    [self._tok(int(x)) for x in toks[w, lo:hi]],
                    ctx[j, lo - p + b : hi - p + b].tolist(),
                    p - lo,
                    float(vals[j]),
                    w,
                    p,
                )
            )
        return out

    def feature(self, f: int, *, bands: int = 4) -> FeatureReport:
        """The report of feature `f` (a latent / neuron index, or a direction's row)."""
        if f not in self._row:
            raise DictionaryError(f"feature {f} is not in this index ({len(self)} features)")
        r = self._row[f]
        vals = self.t["sample_values"][r]
        live = (self.t["sample_index"][r] >= 0).nonzero().squeeze(-1)
        order = live[vals[live].argsort(descending=True)]
        quant = []
        for q, chunk in enumerate(order.tensor_split(bands) if order.numel() else []):
            lo, hi = 100 * q / bands, 100 * (q + 1) / bands
            quant.append((f"samples ranked {lo:.0f}-{hi:.0f}% by value", self._examples(r, "sample", chunk)))
        logits = None
        if "logit_top_ids" in self.t:
            logits = {
                "top": [
                    (self._tok(int(i)), float(v))
                    for i, v in zip(self.t["logit_top_ids"][r], self.t["logit_top_values"][r])
                ],
                "bottom": [
                    (self._tok(int(i)), float(v))
                    for i, v in zip(self.t["logit_bottom_ids"][r], self.t["logit_bottom_values"][r])
                ],
            }
        return FeatureReport(
            feature=f,
            hook=self.hook,
            density=float(self.density[r]),
            max=float(self.t["max"][r]),
            mean=float(self.t["sum"][r] / self.n_tokens),
            top=self._examples(r, "top"),
            quantiles=quant,
            hist_edges=HIST_EDGES.tolist(),
            hist_pos=self.t["hist_pos"][r].tolist(),
            hist_neg=self.t["hist_neg"][r].tolist(),
            logits=logits,
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write the index (safetensors + manifest, atomically)."""
        return write_tensor_file(
            path,
            self.t,
            {**self.manifest, "format": FORMAT, "format_version": FORMAT_VERSION},
            key=FORMAT,
            error=DictionaryError,
            what="the index record",
        )

    def __repr__(self) -> str:
        kind = self.manifest["source"]["kind"]
        return f"FeatureIndex({kind} at {self.hook}: {len(self)} features, {self.n_tokens:,} tokens)"


@dataclass
class FeatureReport:
    """One feature's dashboard data (see `FeatureIndex.feature`)."""

    feature: int
    hook: str
    density: float
    max: float
    mean: float
    top: list[FeatureExample]
    quantiles: list[tuple[str, list[FeatureExample]]]
    hist_edges: list[float]
    hist_pos: list[float]
    hist_neg: list[float]
    logits: dict[str, list[tuple[str, float]]] | None

    def html(self, n: int = 10) -> str:
        head = f"<h4>feature {self.feature} @ {self.hook}: density {self.density:.3%}, max {self.max:.3g}</h4>"
        body = "".join(e.html() for e in self.top[:n])
        for label, ex in self.quantiles:
            body += f"<p><i>{html.escape(label)}</i></p>" + "".join(e.html() for e in ex[:3])
        return head + body

    def _repr_html_(self) -> str:
        return self.html()

    def figure(self):
        """Plotly: the activation histogram (log10 bins; negative values mirrored) and the logit effects."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        fig = make_subplots(rows=1, cols=2, subplot_titles=("activations (log10 |a|)", "logit effects"))
        mids = [(a + b) / 2 for a, b in zip(self.hist_edges[:-1], self.hist_edges[1:])]
        fig.add_trace(go.Bar(x=mids, y=self.hist_pos, name="a > 0"), row=1, col=1)
        if any(self.hist_neg):
            fig.add_trace(go.Bar(x=mids, y=[-c for c in self.hist_neg], name="a < 0"), row=1, col=1)
        if self.logits:
            pairs = self.logits["bottom"][::-1] + self.logits["top"][::-1]
            fig.add_trace(
                go.Bar(
                    y=[display_token(t) for t, _ in pairs],
                    x=[v for _, v in pairs],
                    orientation="h",
                    name="logit effect",
                ),
                row=1,
                col=2,
            )
        fig.update_layout(height=380, title=f"feature {self.feature} @ {self.hook} (density {self.density:.3%})")
        return fig


__all__ = ["FORMAT", "FORMAT_VERSION", "HIST_EDGES", "FeatureExample", "FeatureIndex", "FeatureReport", "display_token"]
