"""LensDashboard (widgets/lens.py), driven through its controls outside a kernel.

Each test sets a control (`.value = ...`, `button.click()`) and checks that the figure holds exactly what the
pure function returns for that setting. Observers run synchronously, so a callback that raises fails the test
that set the control.
"""

from __future__ import annotations

import numpy as np
import pytest
from _lens_helpers import random_lens
from _widget_helpers import PROMPT, VARIANTS, as_array, tiny_model, variant_model

from tinygpt import GPT
from tinygpt.interp import logit_lens
from tinygpt.widgets import LensDashboard


@pytest.fixture(scope="module")
def model() -> GPT:
    return tiny_model()


def test_lens_heatmap_is_the_logit_lens_of_the_typed_prompt(model):
    d = LensDashboard(model, prompt=PROMPT)
    ref = logit_lens(model, PROMPT)
    heat = d.fig.data[0]
    np.testing.assert_allclose(as_array(heat.z), ref.kl.numpy(), rtol=1e-6, atol=1e-7)
    assert list(heat.text[1]) == [ref.top_strs[1][p][0] for p in range(len(ref.str_tokens))]  # top-1 in cells
    assert "logit lens" in d.fig.layout.title.text
    # the hover of each cell lists the top-5 with probabilities
    top5 = ref.top(1, 3)
    for tok, p in top5:
        assert f"{p:.3f}" in heat.customdata[1][3] and repr(tok)[1:-1] in heat.customdata[1][3]
    d.prompt.value = "To be, or not to be"
    ref2 = logit_lens(model, "To be, or not to be")
    np.testing.assert_allclose(as_array(d.fig.data[0].z), ref2.kl.numpy(), rtol=1e-6, atol=1e-7)
    assert len(d.fig.data[0].z[0]) == len("To be, or not to be") == len(d.result.str_tokens)
    d.metric.value = "entropy"
    np.testing.assert_allclose(as_array(d.fig.data[0].z), ref2.entropy.numpy(), rtol=1e-6)
    d.metric.value = "prob"
    np.testing.assert_allclose(as_array(d.fig.data[0].z), ref2.target_prob.numpy(), rtol=1e-6)  # NaN at the end
    assert d.fig.data[0].zmax == 1.0
    d.metric.value = "kl"
    assert d.fig.data[0].zmax is None  # no stale zmax from the previous metric


def test_lens_toggle_and_loading_a_lenses_file(model, tmp_path):
    lens = random_lens(model, scale=0.5)
    path = lens.save(tmp_path / "m.lenses")
    d = LensDashboard(model, prompt=PROMPT)
    logit_kl = as_array(d.fig.data[0].z)
    d.lens_kind.value = "tuned"  # no lens yet: stays on the logit lens, with an explanation
    assert d.lens_kind.value == "logit" and "no tuned lens" in d.status.value
    np.testing.assert_allclose(as_array(d.fig.data[0].z), logit_kl)

    d.lens_path.value = str(tmp_path / "missing.lenses")
    d.load_button.click()
    assert "no such file" in d.status.value and d.lens is None

    d.lens_path.value = str(path)
    d.load_button.click()
    assert d.lens is not None and d.lens_kind.value == "tuned"
    tuned = logit_lens(model, PROMPT, lens=d.lens)
    z = as_array(d.fig.data[0].z)
    np.testing.assert_allclose(z, tuned.kl.numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(z[:-1], logit_kl[:-1])  # the translators change every layer but the last
    assert "tuned lens" in d.fig.layout.title.text
    d.lens_kind.value = "logit"
    np.testing.assert_allclose(as_array(d.fig.data[0].z), logit_kl)

    other = tiny_model(seed=5)
    d2 = LensDashboard(other, prompt=PROMPT)
    d2.lens_path.value = str(path)
    d2.load_button.click()  # a lens for another model: refused with the pin error
    assert "different model" in d2.status.value and d2.lens is None and d2.lens_kind.value == "logit"


def test_lens_dashboard_takes_a_lens_and_reports_bad_prompts(model):
    lens = random_lens(model, seed=3, scale=0.5)
    d = LensDashboard(model, lens=lens, prompt="abc", metric="entropy")
    assert d.lens_kind.value == "tuned"
    np.testing.assert_allclose(
        as_array(d.fig.data[0].z), logit_lens(model, "abc", lens=lens).entropy.numpy(), rtol=1e-5
    )
    before = as_array(d.fig.data[0].z)
    d.prompt.value = ""  # an empty prompt: a message, the figure stays
    assert "at least one token" in d.status.value
    np.testing.assert_allclose(as_array(d.fig.data[0].z), before)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lens_dashboard_on_every_architecture_variant(variant):
    m = variant_model(variant)
    lens = LensDashboard(m, prompt=PROMPT)
    np.testing.assert_allclose(as_array(lens.fig.data[0].z), logit_lens(m, PROMPT).kl.numpy(), rtol=1e-5, atol=1e-6)
