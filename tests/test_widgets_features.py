"""FeatureDashboard (widgets/features.py), driven through its controls outside a kernel.

Each test sets a control and checks that the dashboard shows exactly what the library functions return for
that setting (`FeatureIndex.feature`, `latents_for_text`, `latents_for_token`, `generate(..., steer=)`).
"""

from __future__ import annotations

import html
import random

import numpy as np
import pytest
import torch

import tinygpt
from tinygpt import GPT, GPTConfig
from tinygpt.dictionary import (
    DictionaryConfig,
    build_feature_index,
    latents_for_text,
    latents_for_token,
    make_dictionary,
    steering_vector,
)
from tinygpt.dictionary.files import model_pin
from tinygpt.dictionary.index import display_token
from tinygpt.widgets import FeatureDashboard

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layers=2, d_model=32, n_heads=2, n_ctx=64)).eval()


@pytest.fixture(scope="module")
def sae(model):
    s = make_dictionary(DictionaryConfig(arch="topk", d_in=32, d_sae=48, hook=HOOK, k=4), seed=2)
    s.base = model_pin(model)
    return s


@pytest.fixture(scope="module")
def index(model, sae, tmp_path_factory):
    rng = random.Random(1)
    words = "the king is dead long live the queen of hearts and all her men".split()
    text = "\n".join(f"{rng.choice(['ROMEO:', 'NURSE:'])}\n{' '.join(rng.choices(words, k=9))}\n" for _ in range(200))
    d = tmp_path_factory.mktemp("features")
    (d / "plays.txt").write_text(text)
    return build_feature_index(
        model, sae, d / "plays.txt", tokens=4096, context=32, progress=False, cache_dir=d, out=d / "i.features"
    )


def test_picker_shows_the_latents_report(model, sae, index):
    d = FeatureDashboard(model, sae, index, latent=5)
    ref = index.feature(5)
    assert d.report.feature == 5 and d.report.hist_pos == ref.hist_pos
    np.testing.assert_allclose(d.fig.data[0].y, ref.hist_pos)  # the activation histogram
    logits = d.fig.data[-1]
    assert list(logits.x) == [v for _, v in ref.logits["bottom"][::-1] + ref.logits["top"][::-1]]
    assert d.examples.value == ref.html(8) and "border-bottom" in d.examples.value  # the highlighted token
    assert html.escape(display_token(ref.logits["top"][0][0])) in d.logits.value and "suppressed" in d.logits.value
    d.latent.value = 11
    assert d.report.feature == 11 and d.examples.value == index.feature(11).html(8)
    np.testing.assert_allclose(d.fig.data[0].y, index.feature(11).hist_pos)
    assert "latent 11: active on" in d.status.value
    first = FeatureDashboard(model, sae, index)  # default: the most often active latent
    assert first.latent.value == index.features[int(index.density.argmax())]


def test_searches_select_the_best_match(model, sae, index):
    d = FeatureDashboard(model, sae, index)
    d.search_text.value = "ROMEO:"
    found = latents_for_text(model, sae, "ROMEO:")
    assert d.latent.value == found[0][0] and str(found[-1][0]) in d.matches.value
    d.search_token.value = "q"
    promoted = latents_for_token(model, sae, "q")
    assert d.latent.value == promoted[0][0] and "promoting" in d.matches.value
    d.search_token.value = "two"  # three bytes: not one token
    assert "3 tokens" in d.status.value and d.latent.value == promoted[0][0]


def test_steering_box_generates_with_the_latent(model, sae, index, tmp_path):
    d = FeatureDashboard(model, sae, index, latent=3, prompt="ROMEO:", coeff=40.0, max_new_tokens=12, seed=0)
    d.steer_button.click()
    plain = tinygpt.generate(model, "ROMEO:", 12, seed=0)
    steered = tinygpt.generate(model, "ROMEO:", 12, seed=0, steer=steering_vector(model, sae, latent=3) * 40.0)
    assert d.plain == plain and d.steered == steered != plain
    assert "with latent 3 × 40" in d.generations.value
    d.coeff.value = 0.0
    d.steer_button.click()
    assert d.steered == plain
    d.prompt.value = ""
    d.steer_button.click()
    assert "type a prompt" in d.status.value


def test_index_files_are_checked_and_built_when_missing(model, sae, index, tmp_path):
    path = index.save(tmp_path / "i.features")
    d = FeatureDashboard(model, sae, path, latent=2)
    assert d.report.hist_pos == index.feature(2).hist_pos
    other = make_dictionary(DictionaryConfig(arch="topk", d_in=32, d_sae=48, hook=HOOK, k=4), seed=9)
    other.base = model_pin(model)
    with pytest.raises(Exception, match="different dictionary"):
        FeatureDashboard(model, other, path)
    built = FeatureDashboard(model, sae, None, index_tokens=1024)  # builds over the built-in corpus
    assert built.index.n_tokens >= 1024 and len(built.index) == 48
    with pytest.raises(Exception, match="not in the index"):
        FeatureDashboard(model, sae, index, latent=99)
