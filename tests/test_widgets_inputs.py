"""Prompts typed into the dashboards (widgets/_inputs.py): token ids for a model without a tokenizer."""

from __future__ import annotations

import numpy as np
import torch
from _widget_helpers import as_array, tiny_model

from tinygpt.interp import logit_lens, patch_sweep
from tinygpt.sampling import generate
from tinygpt.widgets import AblationExplorer, AttentionViewer, LensDashboard, PatchingDashboard


def test_dashboards_take_token_ids_for_a_model_without_tokenizer(tokens):
    m = tiny_model(d_vocab=64)  # a toy model over token ids: no tokenizer
    assert m.tokenizer is None
    ids = [5, 17, 3, 40, 5, 17]
    lens = LensDashboard(m, prompt=torch.tensor(ids))
    assert lens.prompt.value == "5 17 3 40 5 17"
    np.testing.assert_allclose(as_array(lens.fig.data[0].z), logit_lens(m, ids).kl.numpy(), rtol=1e-6, atol=1e-7)
    lens.prompt.value = "1, 2, 3"
    assert lens.result.tokens.tolist() == [1, 2, 3]
    lens.prompt.value = "one two"
    assert "type token ids" in lens.status.value
    lens.prompt.value = "1 99"
    assert "[0, 64)" in lens.status.value

    view = AttentionViewer(m, "5 17 3 40 5 17", layer=1)
    pat = m.run_with_cache(torch.tensor([ids]), names_filter=["blocks.1.attn.hook_pattern"])[1]
    np.testing.assert_allclose(
        as_array(view.fig.data[0].z), pat["blocks.1.attn.hook_pattern"][0, 0].numpy(), rtol=1e-5, atol=1e-7
    )
    assert list(view.fig.data[0].x)[:2] == ["0 '5'", "1 '17'"]

    ex = AblationExplorer(m, tokens % 64, prompt=ids, max_new_tokens=5, modes=("zero",), progress=False)
    out = generate(m, torch.tensor([ids]), max_new_tokens=5, temperature=0.0, seed=0)
    assert ex.sample_clean == " ".join(str(i) for i in out[0, len(ids) :].tolist())

    clean, corrupted = torch.tensor([ids]), torch.tensor([[5, 17, 9, 40, 5, 17]])
    d = PatchingDashboard(m, clean, corrupted, correct=3, incorrect=9, sites=("head",), progress=False)
    assert (d.clean.value, d.correct.value) == ("5 17 3 40 5 17", "3")
    ref = patch_sweep(m, clean, corrupted, "head", correct=3, incorrect=9, normalize=True)
    np.testing.assert_allclose(as_array(d.fig.data[0].z), ref.values.numpy(), rtol=1e-4, atol=1e-5)
    assert d.answers == (3, 9) and "logit(&#x27;3&#x27;)" in d.status.value
