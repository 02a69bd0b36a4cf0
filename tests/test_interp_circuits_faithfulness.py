"""Faithfulness (`tinygpt.interp.circuits.faithfulness`): on the induction model a circuit of the 20 strongest
EAP edges recovers >= 80% of the logit-difference gap; the engine is exact at both ends (no edge kept = the
corrupted run, every edge kept = the clean run, on every variant edge methods accept), a single patched edge
equals path patching it, and mean ablation over identical prompts equals corrupted ablation."""

from __future__ import annotations

import pytest
import torch
from _circuit_helpers import induction_pair

from tinygpt.config import GPTConfig
from tinygpt.interp.circuits.edges import edge_attribution_patch
from tinygpt.interp.circuits.faithfulness import faithfulness
from tinygpt.interp.circuits.graph import CircuitError, edge_graph
from tinygpt.interp.circuits.path import path_patch
from tinygpt.model import GPT

INDUCTION = "L1H0"


@pytest.fixture(scope="module")
def pair():
    return induction_pair(8, seed=1)


def test_twenty_edges_recover_most_of_the_gap(induction_model, pair):
    clean, corrupted, y, n = pair
    for method in ("eap", "eap-ig"):
        res = edge_attribution_patch(
            induction_model, clean, corrupted, method=method, correct=y, incorrect=n, progress=False
        )
        f = faithfulness(induction_model, res.circuit(20), clean, corrupted, correct=y, incorrect=n)
        assert f.sizes == [0, 1, 2, 3, 5, 10, 20] and len(f.edges) == 20
        assert f.recovered >= 0.8, (method, list(zip(f.sizes, f.curve)))
        assert f.curve[0] == 0.0 and f.empty_metric == pytest.approx(f.corrupted_metric, abs=1e-4)
        assert f.size_for(0.8) is not None and f.size_for(0.8) <= 20
    whole = faithfulness(induction_model, res, clean, corrupted, correct=y, incorrect=n)
    assert whole.sizes[-1] == whole.n_edges == 110
    assert whole.values[-1] == pytest.approx(whole.clean_metric, abs=1e-4) and whole.recovered == pytest.approx(1.0)
    # a random circuit of 20 edges recovers far less
    edges = [e[:2] for e in res.edges]
    pick = torch.randperm(len(edges), generator=torch.Generator().manual_seed(0))[:20].tolist()
    rand = faithfulness(induction_model, [edges[i] for i in pick], clean, corrupted, correct=y, incorrect=n, sizes=[20])
    assert rand.recovered < 0.5
    fig = whole.figure()
    assert list(fig.data[0].y) == whole.curve and fig.layout.xaxis.type == "log"


def test_one_patched_edge_equals_path_patching_it(induction_model, pair):
    clean, corrupted, y, n = pair
    everything = edge_graph(induction_model).edges()
    for edge in [("L0H1", "L1H0.k"), (INDUCTION, "logits"), ("embed", "L0H2.v"), ("L1H0", "MLP1")]:
        rest = [e for e in everything if e != edge]  # keep every edge but one: only that one is corrupted
        f = faithfulness(induction_model, rest, clean, corrupted, correct=y, incorrect=n, sizes=[len(rest)])
        p = path_patch(
            induction_model,
            clean,
            corrupted,
            sender=edge[0],
            receivers=[edge[1]],
            correct=y,
            incorrect=n,
            direction="noising",
        )
        assert f.values[0] == pytest.approx(p.value, abs=1e-4), edge
    assert abs(p.value - p.clean_metric) > 0.1  # the last one matters (not a vacuous equality)


def test_mean_ablation(induction_model, pair):
    clean, corrupted, y, n = pair
    res = edge_attribution_patch(induction_model, clean, corrupted, correct=y, incorrect=n)
    one = dict(correct=y[:1], incorrect=n[:1])
    # the mean over copies of the one corrupted prompt is that prompt: the same as corrupted ablation
    c = faithfulness(induction_model, res.circuit(10), clean[:1], corrupted[:1], **one)
    m = faithfulness(
        induction_model,
        res.circuit(10),
        clean[:1],
        corrupted[:1],
        ablation="mean",
        reference=corrupted[:1].repeat(4, 1),
        **one,
    )
    assert m.values == pytest.approx(c.values, abs=1e-4)
    # over the batch the mean differs from each prompt: the empty circuit is no longer the corrupted run
    mb = faithfulness(induction_model, res.circuit(20), clean, corrupted, ablation="mean", correct=y, incorrect=n)
    assert abs(mb.empty_metric - mb.corrupted_metric) > 0.1 and mb.ablation == "mean"
    with pytest.raises(CircuitError, match="same length"):
        faithfulness(
            induction_model,
            res.circuit(5),
            clean,
            corrupted,
            ablation="mean",
            reference=clean[:, :5],
            correct=y,
            incorrect=n,
        )


VARIANTS = {
    "dense": {},
    "gqa": dict(n_key_value_heads=2),
    "parallel": dict(parallel_attn_mlp=True),
    "rotary_swiglu_rms": dict(
        positional_embedding_type="rotary", gated_mlp=True, act_fn="silu", normalization_type="RMS"
    ),
    "moe": dict(moe_experts=3, moe_topk=2),
    "diff_attn": dict(diff_attn=True),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_exact_at_both_ends_on_every_variant(variant):
    torch.manual_seed(0)
    cfg = GPTConfig(n_layers=2, d_model=32, n_heads=4, n_ctx=16, d_vocab=32, init_std=0.3, **VARIANTS[variant])
    model = GPT(cfg).eval()  # large weights: a random model whose metric moves when a token changes
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 32, (3, 10), generator=g)
    corrupted = clean.clone()
    corrupted[:, 3:6] = (corrupted[:, 3:6] + 5) % 32
    res = edge_attribution_patch(model, clean, corrupted, correct=1, incorrect=2)
    f = faithfulness(model, res, clean, corrupted, correct=1, incorrect=2, sizes=[0, res.graph.n_edges])
    assert f.values[0] == pytest.approx(f.corrupted_metric, abs=1e-5)
    assert f.values[1] == pytest.approx(f.clean_metric, abs=1e-5)
    assert abs(f.clean_metric - f.corrupted_metric) > 0.1


def test_bad_circuits_are_refused(induction_model, pair):
    clean, corrupted, y, n = pair
    kw = dict(correct=y, incorrect=n)
    with pytest.raises(CircuitError, match="not an edge"):
        faithfulness(induction_model, [("L1H0", "L0H0.q")], clean, corrupted, **kw)
    with pytest.raises(CircuitError, match="not a receiver"):
        faithfulness(induction_model, [("L0H0", "L1H9.q")], clean, corrupted, **kw)
    with pytest.raises(CircuitError, match="list of"):
        faithfulness(induction_model, 5, clean, corrupted, **kw)
    with pytest.raises(CircuitError, match="sizes must lie"):
        faithfulness(induction_model, [("L0H0", "L1H0.k")], clean, corrupted, sizes=[3], **kw)
    with pytest.raises(CircuitError, match="'corrupted' or 'mean'"):
        faithfulness(induction_model, [("L0H0", "L1H0.k")], clean, corrupted, ablation="zero", **kw)
    with pytest.raises(CircuitError, match="scalar"):
        faithfulness(induction_model, [("L0H0", "L1H0.k")], clean, corrupted, metric=lambda x: x[:, -1, :2].sum(-1))
