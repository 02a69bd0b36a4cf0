"""Edge attribution patching (`tinygpt.interp.circuits.edges`: EAP, EAP-IG) and the edge graph (`graph.py`).

Scientific checks on the induction model the tests train: the top edge is the induction head's output into the
logits, and with EAP-IG a previous-token head's edge into the induction head's key is among the top 5. Exact
identities: the scores into a receiver add up to its own attribution, the scores out of a sender to its own
(gradients read at different hook points), and EAP-IG's scores out of the embeddings to the whole metric change."""

from __future__ import annotations

import copy

import pytest
import torch
from _circuit_helpers import induction_pair

from tinygpt.config import GPTConfig
from tinygpt.interp.circuits.edges import edge_attribution_patch
from tinygpt.interp.circuits.graph import Circuit, CircuitError, edge_graph, edge_hooks, parse_node
from tinygpt.interp.circuits.path import path_patch
from tinygpt.interp.patching import PatchingError
from tinygpt.interp.patching.metrics import logit_diff
from tinygpt.model import GPT

INDUCTION = "L1H0"  # the induction head of train_induction_model(seed=3) (tests/test_interp_toy.py)


@pytest.fixture(scope="module")
def pair():
    return induction_pair(8, seed=1)


@pytest.fixture(scope="module")
def eap(induction_model, pair):
    clean, corrupted, y, n = pair
    return edge_attribution_patch(induction_model, clean, corrupted, correct=y, incorrect=n)


# ------------------------------------------------------------------------------------------------ graph
def test_graph_names_and_edges():
    g = edge_graph(GPT(GPTConfig(n_layers=2, d_model=32, n_heads=2, n_ctx=16, d_vocab=32)))
    assert g.senders == ["embed", "L0H0", "L0H1", "MLP0", "L1H0", "L1H1", "MLP1"]
    assert g.receivers[:7] == ["L0H0.q", "L0H1.q", "L0H0.k", "L0H1.k", "L0H0.v", "L0H1.v", "MLP0"]
    assert g.receivers[-1] == "logits" and len(g.receivers) == 2 * 7 + 1
    assert g.is_edge("L0H1", "L1H0.k") and g.is_edge("L0H1", "MLP0") and g.is_edge("embed", "L0H0.q")
    assert not g.is_edge("L0H1", "L0H0.q") and not g.is_edge("MLP0", "MLP0") and not g.is_edge("L1H0", "L1H1.v")
    # embed -> the 7 layer-0 receivers; embed and layer 0's 3 senders -> the 7 layer-1 receivers; every sender
    # -> logits; each layer's 2 heads -> its MLP
    assert g.n_edges == 7 + 4 * 7 + 7 + 2 * 2
    assert len(g.edges()) == g.n_edges and g.check_receiver("L1H0") == ["L1H0.q", "L1H0.k", "L1H0.v"]
    assert str(parse_node("L3KV1.v")) == "L3KV1.v" and parse_node("MLP2").layer == 2
    par = edge_graph(GPT(GPTConfig(n_layers=2, d_model=32, n_heads=2, n_ctx=16, d_vocab=32, parallel_attn_mlp=True)))
    assert not par.is_edge("L0H0", "MLP0") and par.is_edge("L0H0", "MLP1") and par.n_edges == g.n_edges - 4
    gqa = edge_graph(GPT(GPTConfig(n_layers=2, d_model=32, n_heads=4, n_key_value_heads=2, n_ctx=16, d_vocab=32)))
    assert "L1KV1.k" in gqa.receivers and "L1H3.k" not in gqa.receivers
    assert gqa.check_receiver("L1H3.k") == ["L1KV1.k"]


# ---------------------------------------------------------------------------------------- scientific
def test_top_edges_on_the_induction_model(induction_model, pair, eap):
    clean, corrupted, y, n = pair
    top = eap.top(5)
    assert top[0][:2] == (INDUCTION, "logits"), top  # the induction head's output into the logits
    assert eap.clean_metric > eap.corrupted_metric + 5
    # K-composition: with plain EAP the previous-token heads' key edges are the strongest edges into the head
    into_head = [e for e in eap.ranked() if e[1].startswith(INDUCTION + ".")]
    assert into_head[0][0].startswith("L0H") and into_head[0][1] == INDUCTION + ".k", into_head[:4]
    # ... and with EAP-IG (the gradient integrated past the saturated attention) among the top 5 of all edges
    ig = edge_attribution_patch(
        induction_model, clean, corrupted, method="eap-ig", steps=5, correct=y, incorrect=n, progress=False
    )
    assert ig.top(1)[0][:2] == (INDUCTION, "logits")
    assert any(s.startswith("L0H") and r == INDUCTION + ".k" for s, r, _ in ig.top(5)), ig.top(8)


def _node_scores(model, clean, corrupted, fn, names):
    """(activation_clean - activation_corrupted) · d fn / d activation at the corrupted run, per hook name."""
    with edge_hooks(model):
        _, cache = model.run_with_cache(clean, names_filter=names)
        acts = {}

        def keep(x, hook):
            acts[hook.name] = x
            return None

        with model.hooks(fwd_hooks=[(name, keep) for name in names]):
            value = fn(model(corrupted))
        grads = torch.autograd.grad(value, [acts[n] for n in names])
    return {n: (cache[n] - acts[n].detach()) * g for n, g in zip(names, grads)}


def test_scores_into_a_receiver_and_out_of_a_sender_add_up_to_its_node_score(induction_model, pair):
    model = copy.deepcopy(induction_model).double()  # the identities are exact: float64 shows it to 1e-9
    clean, corrupted, y, n = pair
    res = edge_attribution_patch(model, clean, corrupted, correct=y, incorrect=n)
    g = res.graph

    def fn(logits):
        return logit_diff(logits, y, n)

    into = _node_scores(model, clean, corrupted, fn, g.receiver_hooks())
    recv = res.receiver_scores()
    for j, (name, head) in enumerate(g.receiver_slices()):
        t = into[name] if head is None else into[name][:, :, head]
        assert recv[g.receivers[j]] == pytest.approx(float(t.sum()), abs=1e-5), g.receivers[j]
    out = _node_scores(model, clean, corrupted, fn, g.sender_hooks())
    send = res.sender_scores()
    for i, (name, head) in enumerate(g.sender_slices()):
        t = out[name] if head is None else out[name][:, :, head]
        assert send[g.senders[i]] == pytest.approx(float(t.sum()), abs=1e-5), g.senders[i]
    assert abs(recv["L1H0.k"]) > 0.5 and abs(send[INDUCTION]) > 5  # not vacuous
    # the float32 model gives the same scores
    res32 = edge_attribution_patch(induction_model, clean, corrupted, correct=y, incorrect=n)
    assert torch.allclose(res32.scores.double(), res.scores, atol=2e-3)


def test_eap_ig_completeness_and_steps(induction_model, pair):
    clean, corrupted, y, n = pair
    ig = edge_attribution_patch(
        induction_model, clean, corrupted, method="eap-ig", steps=16, correct=y, incorrect=n, progress=False
    )
    gap = ig.clean_metric - ig.corrupted_metric
    # integrated gradients along the embeddings: the embeddings' total attribution is the whole change
    assert ig.sender_scores()["embed"] == pytest.approx(gap, rel=0.02)
    eap = edge_attribution_patch(induction_model, clean, corrupted, correct=y, incorrect=n)
    assert abs(eap.sender_scores()["embed"] - gap) > 0.2 * gap  # plain EAP is only a first-order estimate
    assert ig.steps == 16 and ig.method == "eap-ig" and "steps=16" in repr(ig)


# ------------------------------------------------------------------------------------ result and circuit
def test_circuit_selection_and_figures(eap):
    c = eap.circuit(10)
    assert isinstance(c, Circuit) and len(c) == 10
    assert [abs(v) for *_, v in c] == sorted((abs(v) for *_, v in c), reverse=True)
    assert (INDUCTION, "logits") in c and INDUCTION in c.nodes and "logits" in c.nodes
    t = abs(c[4][2])
    assert [e[:2] for e in eap.circuit(threshold=t)] == [e[:2] for e in c.edges[:5]]
    assert len(eap.circuit(3, threshold=t)) == 3
    assert len(eap.edges) == eap.graph.n_edges == 110 and eap.score(INDUCTION, "logits") == c[0][2]
    fig = eap.figure(n=12)
    assert len(fig.data) == 13  # one line per edge and the nodes
    assert fig.data[-1].text[0] == "embed" and "logits" in fig.data[-1].text
    with pytest.raises(CircuitError, match="give n="):
        eap.circuit()
    with pytest.raises(CircuitError, match="not an edge"):
        eap.score("L1H0", "L0H0.q")


# -------------------------------------------------------------------------------------------- bad input
def test_bad_input_is_refused_naming_the_fix():
    cfg = dict(n_layers=2, d_model=32, n_heads=2, n_ctx=16, d_vocab=32)
    model = GPT(GPTConfig(**cfg))
    a, b = torch.randint(0, 32, (2, 8)), torch.randint(0, 32, (2, 8))
    with pytest.raises(PatchingError, match="same number of tokens"):
        edge_attribution_patch(model, a, b[:, :6], correct=1, incorrect=2)
    with pytest.raises(CircuitError, match="scalar"):
        edge_attribution_patch(model, a, b, metric=lambda logits: logits[:, -1, 0])
    with pytest.raises(CircuitError, match="scalar tensor"):
        edge_attribution_patch(model, a, b, metric=lambda logits: 1.0)
    with pytest.raises(CircuitError, match="'eap', 'eap-ig' \(with steps=\) or 'exact'"):
        edge_attribution_patch(model, a, b, method="acdc", correct=1, incorrect=2)
    with pytest.raises(CircuitError, match="steps"):
        edge_attribution_patch(model, a, b, method="eap-ig", steps=0, correct=1, incorrect=2)
    for variant, kw in {"yoco": dict(yoco=True, yoco_window=4), "mod": dict(mod=True, mod_every=2)}.items():
        with pytest.raises(CircuitError, match=f"{variant}=True.*node-level"):
            edge_attribution_patch(GPT(GPTConfig(**cfg, **kw)), a, b, correct=1, incorrect=2)
    # the switches are restored after a run, and after a failed one
    assert not model.cfg.use_split_qkv_input and not model.cfg.use_attn_result and not model.cfg.use_hook_mlp_in


@pytest.mark.parametrize(
    "variant",
    [
        dict(n_key_value_heads=2),
        dict(parallel_attn_mlp=True),
        dict(positional_embedding_type="rotary", gated_mlp=True, act_fn="silu", normalization_type="RMS"),
        dict(moe_experts=3, moe_topk=2),
        dict(diff_attn=True),
    ],
    ids=["gqa", "parallel", "rotary_swiglu_rms", "moe", "diff_attn"],
)
def test_score_sums_hold_on_variants(variant):
    torch.manual_seed(0)
    cfg = GPTConfig(n_layers=2, d_model=32, n_heads=4, n_ctx=16, d_vocab=32, init_std=0.3, **variant)
    model = GPT(cfg).eval().double()
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 32, (3, 10), generator=g)
    corrupted = clean.clone()
    corrupted[:, 3:6] = (corrupted[:, 3:6] + 5) % 32
    res = edge_attribution_patch(model, clean, corrupted, correct=1, incorrect=2)
    graph = res.graph

    def fn(logits):
        return logit_diff(logits, 1, 2)

    for hooks, slices, sums, names in [
        (graph.receiver_hooks(), graph.receiver_slices(), res.receiver_scores(), graph.receivers),
        (graph.sender_hooks(), graph.sender_slices(), res.sender_scores(), graph.senders),
    ]:
        node = _node_scores(model, clean, corrupted, fn, hooks)
        for j, (name, head) in enumerate(slices):
            t = node[name] if head is None else node[name][:, :, head]
            assert sums[names[j]] == pytest.approx(float(t.sum()), abs=1e-8), names[j]
    assert max(abs(v) for v in res.receiver_scores().values()) > 0.01


def test_exact_method_scores_each_edge_by_patching_it_alone(induction_model):
    """method="exact": every edge's score is `path_patch` of its sender into its receiver alone (the reference the
    estimates are checked against), laid out like EAP's result."""
    clean, corrupted, y, n = induction_pair(4, seed=2)
    exact = edge_attribution_patch(induction_model, clean, corrupted, method="exact", correct=y, incorrect=n)
    eap = edge_attribution_patch(induction_model, clean, corrupted, correct=y, incorrect=n)
    assert exact.method == "exact" and exact.scores.shape == eap.scores.shape
    for sender, receiver in [("L1H0", "logits"), ("L0H1", "L1H0.k"), ("embed", "L0H2.v")]:
        p = path_patch(induction_model, clean, corrupted, sender=sender, receivers=[receiver], correct=y, incorrect=n)
        assert exact.score(sender, receiver) == pytest.approx(p.value - p.corrupted_metric, abs=1e-5)
    assert exact.top(1)[0][:2] == ("L1H0", "logits")
