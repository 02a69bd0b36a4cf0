"""PatchingDashboard (widgets/patching.py), driven through its controls outside a kernel.

Observers run synchronously, so a callback that raises fails the test that set the control.
"""

from __future__ import annotations

import numpy as np
import pytest
from _widget_helpers import VARIANTS, as_array, tiny_model, variant_model

from tinygpt import GPT
from tinygpt.interp import PatchingError, patch_sweep
from tinygpt.widgets import PatchingDashboard

CLEAN, CORRUPTED = "abcdefgh abcdefg", "abcdefXh abcdefg"


@pytest.fixture(scope="module")
def model() -> GPT:
    return tiny_model()


@pytest.fixture(scope="module")
def patching(model):
    return PatchingDashboard(model, CLEAN, CORRUPTED, correct="h", incorrect="X", progress=False)


def test_patching_heatmaps_are_the_sweeps(patching, model):
    d = patching
    assert [tr.name for tr in d.fig.data] == ["resid_pre", "attn_out", "mlp_out", "head"]
    for tr in d.fig.data:
        ref = patch_sweep(model, CLEAN, CORRUPTED, tr.name, correct="h", incorrect="X", normalize=True)
        np.testing.assert_allclose(as_array(tr.z), ref.values.numpy(), rtol=1e-4, atol=1e-5)
    assert len(d.fig.data[0].x) == 16 and list(d.fig.data[3].x) == ["H0", "H1"]
    assert list(d.fig.data[0].y) == ["L0", "L1"]
    d.normalize.value = False
    for tr in d.fig.data:
        ref = patch_sweep(model, CLEAN, CORRUPTED, tr.name, correct="h", incorrect="X")
        np.testing.assert_allclose(as_array(tr.z), ref.values.numpy(), rtol=1e-4, atol=1e-5)
    r = d.results["head"]
    assert f"{r.clean_metric:.3f}" in d.status.value and f"{r.corrupted_metric:.3f}" in d.status.value
    d.normalize.value = True


def test_patching_recomputes_when_prompts_or_answers_change(patching, model):
    d = patching
    d.corrupted.value = "abcdYfgh abcdefg"
    ref = patch_sweep(model, CLEAN, "abcdYfgh abcdefg", "resid_pre", correct="h", incorrect="X", normalize=True)
    np.testing.assert_allclose(as_array(d.fig.data[0].z), ref.values.numpy(), rtol=1e-4, atol=1e-5)
    d.correct.value = ""  # blank: the clean run's own top prediction, as patch_sweep does with correct=None
    ref = patch_sweep(model, CLEAN, "abcdYfgh abcdefg", "mlp_out", incorrect="X", normalize=True)
    np.testing.assert_allclose(as_array(d.fig.data[2].z), ref.values.numpy(), rtol=1e-4, atol=1e-5)
    d.incorrect.value = ""
    try:
        ref = patch_sweep(model, CLEAN, "abcdYfgh abcdefg", "mlp_out", normalize=True)
    except PatchingError:  # both runs predict the same token: the dashboard says so
        assert "coincide" in d.status.value
    else:
        np.testing.assert_allclose(as_array(d.fig.data[2].z), ref.values.numpy(), rtol=1e-4, atol=1e-5)
    before = as_array(d.fig.data[0].z)
    d.corrupted.value = "abc"  # different length: a message, the heatmaps stay
    assert "same number of tokens" in d.status.value
    np.testing.assert_allclose(as_array(d.fig.data[0].z), before)
    d.corrupted.value = CORRUPTED
    d.correct.value = "hh"  # not a single token
    assert "not one" in d.status.value
    d.correct.value, d.incorrect.value = "h", "X"
    d.run_button.click()
    ref = patch_sweep(model, CLEAN, CORRUPTED, "head", correct="h", incorrect="X", normalize=True)
    np.testing.assert_allclose(as_array(d.fig.data[3].z), ref.values.numpy(), rtol=1e-4, atol=1e-5)


def test_patching_heads_by_position(model):
    d = PatchingDashboard(model, CLEAN, CORRUPTED, "h", "X", sites=("head_by_pos",), normalize=False, progress=False)
    ref = patch_sweep(model, CLEAN, CORRUPTED, "head_by_pos", correct="h", incorrect="X")  # [layer, pos, head]
    z = as_array(d.fig.data[0].z)  # rows L0H0, L0H1, L1H0, L1H1
    assert list(d.fig.data[0].y) == ["L0H0", "L0H1", "L1H0", "L1H1"]
    np.testing.assert_allclose(z[3], ref.values[1, :, 1].numpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="sites"):
        PatchingDashboard(model, CLEAN, CORRUPTED, sites=("nope",))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_patching_dashboard_on_every_architecture_variant(variant):
    m = variant_model(variant)
    sites = ("resid_pre", "attn_out", "mlp_out", "head", "head_by_pos")
    d = PatchingDashboard(m, CLEAN, CORRUPTED, correct="h", incorrect="X", sites=sites, progress=False)
    assert "⚠" not in d.status.value
    for tr, site in zip(d.fig.data, sites):
        want = patch_sweep(m, CLEAN, CORRUPTED, site, correct="h", incorrect="X", normalize=True).values
        if site == "head_by_pos":
            want = want.permute(0, 2, 1).reshape(-1, want.shape[1])  # rows L0H0, L0H1, ...
        np.testing.assert_allclose(as_array(tr.z), want.numpy(), rtol=1e-4, atol=1e-5)
