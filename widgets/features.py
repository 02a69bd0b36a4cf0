"""`FeatureDashboard`: browse a sparse dictionary's latents: top contexts, histogram, logit effects, steering.

    from tinygpt.widgets import FeatureDashboard
    dash = FeatureDashboard(model, sae)                      # builds the feature index (or index=path / index)
    dash                                                     # displays in a notebook
    dash.latent.value = 17                                   # or pick it / search for it with the controls
    dash.report                                              # the FeatureReport on show
    dash.search_text.value = "ROMEO:"                        # the latents firing most on a text
    dash.search_token.value = "R"                            # the latents promoting a token most
    dash.steer_button.click(); dash.steered                  # generate with the latent added

A thin layer over `tinygpt.dictionary`: the latent's `FeatureIndex.feature(i)` report (highlighted top
contexts and quantile samples as HTML, `FeatureReport.figure()`: the activation histogram and the logit
effects), `latents_for_text` / `latents_for_token` for the searches, and `tinygpt.generate(..., steer=
steering_vector(model, sae, latent=i) * coeff)` for the steering box.
"""

from __future__ import annotations

import html
import os
from typing import Any

import ipywidgets as W
import plotly.graph_objects as go

import tinygpt
from tinygpt.dictionary import (
    DictionaryError,
    FeatureIndex,
    FeatureReport,
    SparseDictionary,
    build_feature_index,
    latents_for_text,
    latents_for_token,
    load_feature_index,
    steering_vector,
)
from tinygpt.dictionary.index import display_token

from ._inputs import parse_tokens, prompt_box
from .base import Dashboard, show_figure

_ERRORS = (DictionaryError, ValueError, KeyError)


class FeatureDashboard(Dashboard):
    """Latent picker, text / token search, top contexts, activation histogram, logit effects, steering box.

    Attributes:
        index (FeatureIndex): the max-activating examples of every latent (built or loaded once).
        report (FeatureReport | None): what is on show (the selected latent's).
        plain, steered (str | None): the last generations of the steering box, without and with the latent.
        Controls: `latent` (Dropdown over the indexed latents, by index; labels show each one's density),
        `search_text` and `search_token` (Text, apply on Enter; the best match is selected and every match
        listed in `matches`), `prompt`, `coeff`, `tokens` and `steer_button`. Outputs: `examples` (HTML),
        `logits` (HTML), `fig` (plotly FigureWidget), `generations` (HTML), `status`, `output`.
    """

    def __init__(
        self,
        model,
        sae: SparseDictionary,
        index: FeatureIndex | str | os.PathLike | None = None,
        *,
        latent: int | None = None,
        prompt: str = "ROMEO:",
        coeff: float = 8.0,
        max_new_tokens: int = 60,
        seed: int = 0,
        temperature: float = 1.0,
        corpus: Any = None,
        index_tokens: int = 65_536,
        examples: int = 8,
    ):
        """
        Args:
            model: the base model (its tokenizer renders the contexts).
            sae: the dictionary (pinned to `model`: another model's is refused).
            index: a `FeatureIndex`, an index file (`build_feature_index(..., out=)`) checked against the model
                and the dictionary, or None to build one over `corpus` (`index_tokens` tokens).
            latent: the latent shown first (default: the most often active one).
            prompt, coeff, max_new_tokens, seed, temperature: the steering box's generation.
            examples: top contexts shown (and three per quantile band).
        """
        super().__init__()
        self.model, self.sae, self.n_examples = model, sae, examples
        self.seed, self.temperature = seed, temperature
        if isinstance(index, FeatureIndex):
            self.index = index
        elif index is not None:
            self.index = load_feature_index(index, model, sae)
        else:
            self.index = build_feature_index(model, sae, corpus, tokens=index_tokens, progress=False)
        self.report: FeatureReport | None = None
        self.plain: str | None = None
        self.steered: str | None = None
        self._plain_key: tuple | None = None

        density = self.index.density
        order = density.argsort(descending=True).tolist()
        feats = self.index.features
        options = [(f"latent {f} ({100 * float(density[i]):.2f}%)", f) for i, f in enumerate(feats)]
        first = latent if latent is not None else feats[order[0]]
        if first not in feats:
            raise DictionaryError(f"latent {first} is not in the index ({len(feats)} latents)")
        self.latent = W.Dropdown(options=options, value=first, description="latent")
        self.search_text = W.Text(
            description="fires on", placeholder="a text: latents firing most on it", continuous_update=False
        )
        self.search_token = W.Text(
            description="promotes", placeholder="a token: latents raising its logit most", continuous_update=False
        )
        self.matches = W.HTML()
        self.examples = W.HTML()
        self.logits = W.HTML()
        self.fig = go.FigureWidget()
        self.prompt = prompt_box(model, prompt, description="steer", width="45%")
        self.coeff = W.FloatText(value=coeff, description="coeff", layout=W.Layout(width="160px"))
        self.tokens = W.BoundedIntText(
            value=max_new_tokens, min=1, max=1000, description="tokens", layout=W.Layout(width="160px")
        )
        self.steer_button = W.Button(description="generate", icon="play", tooltip="generate with the latent added")
        self.generations = W.HTML()

        self._observe(self.update, self.latent, errors=_ERRORS)
        self._observe(self._search_text, self.search_text, errors=_ERRORS)
        self._observe(self._search_token, self.search_token, errors=_ERRORS)
        self._on_click(self.steer_button, self.generate, errors=_ERRORS)
        self._layout(
            f"Features of {sae.cfg.arch} {sae.d_sae} @ {sae.site}",
            W.HBox([self.latent, self.search_text, self.search_token]),
            self.matches,
            self.status,
            self.output,
            self.fig,
            W.HBox([self.examples, self.logits]),
            W.HBox([self.prompt, self.coeff, self.tokens, self.steer_button]),
            self.generations,
        )
        with self._reporting(*_ERRORS):
            self.update()

    # ------------------------------------------------------------------ actions
    def update(self) -> FeatureReport | None:
        """Show the selected latent: its top contexts, histogram and logit effects."""
        rep = self.index.feature(int(self.latent.value))
        self.report = rep
        show_figure(self.fig, rep.figure())
        self.examples.value = rep.html(self.n_examples)
        self.logits.value = _logits_html(rep)
        self._say(
            f"latent {rep.feature}: active on {rep.density:.3%} of {self.index.n_tokens:,} indexed tokens, "
            f"max {rep.max:.3g}, mean {rep.mean:.3g}"
        )
        return rep

    def select(self, latent: int) -> FeatureReport | None:
        """Show `latent` (an indexed latent)."""
        if latent not in self.index.features:
            raise DictionaryError(f"latent {latent} is not in the index ({len(self.index)} latents)")
        if self.latent.value == latent:
            return self.update()
        self.latent.value = latent  # redraws
        return self.report

    def _show_matches(self, what: str, found: list[tuple[int, float]]) -> None:
        if not found:
            raise DictionaryError(f"no latent {what}")
        cells = ", ".join(f"{i} ({v:.3g})" for i, v in found)
        self.matches.value = f"<span style='color:#555'>latents {html.escape(what)}: {cells}</span>"
        self.select(found[0][0])

    def _search_text(self) -> None:
        text = self.search_text.value
        if not text:
            return
        tokens = parse_tokens(self.model, text)
        self._show_matches(f"firing on {text!r}", latents_for_text(self.model, self.sae, tokens))

    def _search_token(self) -> None:
        text = self.search_token.value
        if not text:
            return
        ids = parse_tokens(self.model, text)[0].tolist()
        if len(ids) != 1:
            raise DictionaryError(f"{text!r} is {len(ids)} tokens; type a single token")
        self._show_matches(f"promoting {text!r}", latents_for_token(self.model, self.sae, ids[0]))

    def generate(self) -> str:
        """Generate from the prompt with and without `coeff` times the latent's decoder direction added."""
        latent, coeff, n = int(self.latent.value), float(self.coeff.value), int(self.tokens.value)
        prompt = parse_tokens(self.model, self.prompt.value)
        opts = dict(seed=self.seed, temperature=self.temperature)
        key = (self.prompt.value, n, self.seed, self.temperature)
        if self._plain_key != key:
            self.plain = _text(self.model, tinygpt.generate(self.model, prompt, n, **opts))
            self._plain_key = key
        vec = steering_vector(self.model, self.sae, latent=latent) * coeff
        self.steered = _text(self.model, tinygpt.generate(self.model, prompt, n, steer=vec, **opts))
        self.generations.value = (
            f"<b>without</b><pre>{html.escape(self.plain)}</pre>"
            f"<b>with latent {latent} × {coeff:g}</b><pre>{html.escape(self.steered)}</pre>"
        )
        self._say(f"generated {n} tokens with latent {latent} × {coeff:g} added at {self.sae.site}")
        return self.steered

    def __repr__(self) -> str:
        return f"FeatureDashboard({self.sae.cfg.arch} {self.sae.d_sae} @ {self.sae.site}, latent {self.latent.value})"


def _text(model, tokens) -> str:
    from ._inputs import decode

    return decode(model, tokens[0].tolist())


def _logits_html(rep: FeatureReport) -> str:
    if not rep.logits:
        return "<i>no direct logit effect (not a residual-stream site)</i>"
    rows = []
    for label, pairs in (("promoted", rep.logits["top"]), ("suppressed", rep.logits["bottom"])):
        cells = "".join(
            f"<tr><td><code>{html.escape(display_token(t))}</code></td><td>{v:+.3f}</td></tr>" for t, v in pairs
        )
        rows.append(f"<div style='margin:0 12px'><b>{label}</b><table>{cells}</table></div>")
    return f"<div style='display:flex'>{''.join(rows)}</div>"


__all__ = ["FeatureDashboard"]
