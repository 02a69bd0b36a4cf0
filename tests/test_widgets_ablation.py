"""AblationExplorer (widgets/ablation.py), driven through its controls outside a kernel.

Observers run synchronously, so a callback that raises fails the test that set the control.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _widget_helpers import VARIANTS, tiny_model, variant_model

from tinygpt import GPT
from tinygpt.interp import AblationError, ablation_sweep
from tinygpt.sampling import generate
from tinygpt.widgets import AblationExplorer


@pytest.fixture(scope="module")
def model() -> GPT:
    return tiny_model()


@pytest.fixture(scope="module")
def explorer(model, tokens):
    return AblationExplorer(model, tokens, prompt="ab", max_new_tokens=12, progress=False)


def test_ablation_bars_are_the_sweep(explorer, model, tokens):
    ex = explorer
    ref = ablation_sweep(
        model, tokens, modes=("zero",), components=("layer", "attn", "mlp"), heads=True, progress=False
    )
    bar = ex.fig.data[0]
    assert list(bar.x) == [a.label for a in ref.ablations]
    np.testing.assert_allclose(bar.y, ref.deltas.numpy(), rtol=1e-5, atol=1e-6)
    assert len(bar.x) == 2 * (3 + 2)  # layer, attn, mlp and 2 heads per layer
    ex.mode.value = "mean"
    ref_mean = ablation_sweep(
        model, tokens, modes=("mean",), components=("layer", "attn", "mlp"), heads=True, progress=False
    )
    np.testing.assert_allclose(ex.fig.data[0].y, ref_mean.deltas.numpy(), rtol=1e-5, atol=1e-6)
    assert "mean ablation" in ex.fig.layout.title.text
    assert set(ex.sweeps) == {"zero", "mean"}
    ex.mode.value = "zero"  # back: the cached sweep
    np.testing.assert_allclose(ex.fig.data[0].y, ref.deltas.numpy(), rtol=1e-5, atol=1e-6)


def test_ablation_selection_highlights_its_bar_and_reports_its_loss(explorer):
    ex = explorer
    ex.mode.value = "zero"
    ex.component.value = "mlp"
    assert ex.head.disabled
    ex.layer.value = 1
    colors = list(ex.fig.data[0].marker.color)
    i = list(ex.fig.data[0].x).index("1.mlp")
    assert colors[i] == "#d62728" and colors.count("#d62728") == 1
    sweep = ex.sweeps["zero"]
    assert f"{float(sweep.losses[i]):.4f}" in ex.status.value
    ex.component.value = "head"
    assert not ex.head.disabled
    ex.head.value = 1
    assert ex.spec == "1.head1:zero"
    colors = list(ex.fig.data[0].marker.color)
    assert colors[list(ex.fig.data[0].x).index("1.head1")] == "#d62728"


def test_ablation_generations_with_and_without(explorer, model, tokens):
    ex = explorer
    ex.mode.value = "zero"
    ex.component.value = "layer"
    ex.layer.value = 0
    ex.prompt.value = "hello"
    ids = torch.tensor([list(b"hello")])
    opts = dict(max_new_tokens=12, temperature=0.0, seed=0)
    clean = generate(model, ids, **opts)
    ablated = generate(model, ids, ablate="0.layer", **opts)
    assert ex.sample_clean == model.to_string(clean[0, 5:])
    assert ex.sample_ablated == model.to_string(ablated[0, 5:])
    assert ex.sample_clean != ex.sample_ablated  # removing a whole block changes a random model's greedy text
    assert "with 0.layer:zero" in ex.samples.value and "without ablation" in ex.samples.value
    ex.mode.value = "resample"  # needs reference activations: the explorer passes its tokens
    assert "resample" in ex.sweeps and "0.layer:resample" in ex.samples.value
    ex.prompt.value = ""
    assert "type a prompt" in ex.status.value


def test_ablation_explorer_scores_only_the_given_targets(model, tokens):
    targets = torch.full_like(tokens, -100)
    targets[:, 20:-1] = tokens[:, 21:]
    ex = AblationExplorer(model, tokens, targets=targets, modes=("zero",), max_new_tokens=4, progress=False)
    ref = ablation_sweep(
        model, tokens, components=("layer", "attn", "mlp"), heads=True, targets=targets, progress=False
    )
    np.testing.assert_allclose(ex.fig.data[0].y, ref.deltas.numpy(), rtol=1e-5, atol=1e-6)
    assert f"{int((targets != -100).sum()):,} tokens" in ex.status.value
    assert ex.mode.options == ("zero",)


def test_ablation_explorer_checks_its_modes(model, tokens):
    with pytest.raises(AblationError, match="mode"):
        AblationExplorer(model, tokens, modes=("zero", "nope"), progress=False)
    with pytest.raises(AblationError, match="non-empty"):
        AblationExplorer(model, tokens, modes=(), progress=False)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ablation_explorer_on_every_architecture_variant(variant, tokens):
    m = variant_model(variant)
    ex = AblationExplorer(m, tokens[:2, :24], prompt="ab", max_new_tokens=4, progress=False)
    ex.mode.value = "resample"
    ref = ablation_sweep(
        m, tokens[:2, :24], modes=("resample",), components=("layer", "attn", "mlp"), heads=True, progress=False
    )
    np.testing.assert_allclose(ex.fig.data[0].y, ref.deltas.numpy(), rtol=1e-5, atol=1e-6)
    ex.component.value, ex.layer.value, ex.head.value = "head", 1, 1
    assert "1.head1:resample" in ex.samples.value and "⚠" not in ex.status.value
