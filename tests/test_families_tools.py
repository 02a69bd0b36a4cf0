"""Every tool runs on every imported family (issue 16, "Everything works on them").

For each of Llama, Qwen2, Mistral, GPT-NeoX, Mixtral, Qwen2-MoE and GPT-2 a tiny random `transformers` model is
built in memory (no download), saved, imported with `tinygpt.interop.hf.import_hf`, and every tool is run once on
it: lenses, ablation, activation patching, attention views, attribution patching and edge attribution, the
dictionaries, LASER and HQQ (by the HF-style target names), LoRA, SFT, distillation both ways, evaluation and the
dashboards. Each test asserts something that could fail: finite outputs and shapes, a patch that must recover
the clean run, a model restored bitwise, trained weights that moved, and so on.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _hf_helpers import make_hf, save

from tinygpt import GPT, GPTConfig
from tinygpt.interop.hf import import_hf

FAMILIES = ["llama", "qwen2", "mistral", "gpt_neox", "mixtral", "qwen2_moe", "gpt2"]
MOE = {"mixtral", "qwen2_moe"}
TEXT = (
    "First Citizen: Before we proceed any further, hear me speak.\nAll: Speak, speak.\n"
    "First Citizen: You are all resolved rather to die than to famish?\nAll: Resolved. resolved.\n"
)
PROMPT = "First Citizen: Before"
CLEAN, CORRUPTED = "abcdefgh abcdefg", "abcdXfgh abcdefg"  # differ at position 4 only

pytestmark = pytest.mark.usefixtures("isolated_cache")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    p = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    p.write_text(TEXT * 12)
    return p


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """(family name, the imported model in eval mode)."""
    d = tmp_path_factory.mktemp(request.param)
    return request.param, import_hf(save(make_hf(request.param), d / "hf")).eval()


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(model, snap) -> None:
    now = model.state_dict()
    assert now.keys() == snap.keys()
    assert [k for k in snap if not torch.equal(now[k], snap[k])] == []


def logits(model, x=PROMPT):
    with torch.no_grad():
        return model(x)


def finite(t) -> bool:
    return bool(torch.isfinite(torch.as_tensor(t)).all())


def mlp_matrices(model) -> int:
    """How many MLP / expert weight matrices the model has (routers excluded)."""
    n = 0
    for b in model.blocks:
        ffn = getattr(b, "mlp", None) or b.moe
        n += sum(
            isinstance(m, torch.nn.Linear) and "router" not in name and "shared_expert_gate" not in name
            for name, m in ffn.named_modules()
        )
    return n


# ------------------------------------------------------------------------------------- interpretability
def test_logit_lens_and_tuned_lens(family, corpus):
    from tinygpt.interp import logit_lens, tuned_lens

    _, model = family
    r = logit_lens(model, PROMPT)
    n_pos = len(r.str_tokens)
    assert r.kl.shape == (model.cfg.n_layers + 1, n_pos) and finite(r.kl)
    assert r.kl[-1].abs().max() < 1e-4  # the final layer's lens is the model's own output
    lens = tuned_lens(model, corpus, steps=3, batch_size=2, ctx=16, progress=False)
    t = logit_lens(model, PROMPT, lens=lens)
    assert t.kl.shape == r.kl.shape and finite(t.kl)


def test_ablation_changes_the_loss_and_restores(family):
    from tinygpt.interp import ablate, ablated_loss, ablation_sweep

    _, model = family
    x = model.to_tokens(TEXT[:40])
    snap, before = snapshot(model), logits(model, x)
    clean = model(x, return_type="loss").item()
    loss = ablated_loss(model, x, "0.mlp, 1.head0").item()
    assert math.isfinite(loss) and loss != pytest.approx(clean, abs=1e-6)
    with ablate(model, "1.attn:mean", reference_tokens=x):
        assert not torch.allclose(logits(model, x), before)
    sweep = ablation_sweep(model, x, progress=False)
    assert len(sweep.losses) == 2 * model.cfg.n_layers and all(math.isfinite(v) for v in sweep.losses)
    assert sweep.baseline_loss == pytest.approx(clean, rel=1e-5)
    assert_same(model, snap)
    assert torch.equal(logits(model, x), before)


def test_activation_patching_batched_engine(family):
    from tinygpt.interp import patch_heads, patch_resid_pre, patch_sweep

    _, model = family
    snap = snapshot(model)
    r = patch_resid_pre(model, CLEAN, CORRUPTED, correct="h", incorrect="X", normalize=True)
    n_pos = len(CLEAN)
    assert r.values.shape == (model.cfg.n_layers, n_pos) and finite(r.values)
    assert r.values[0, 4].item() == pytest.approx(1.0, abs=1e-4)  # the only differing position: full recovery
    assert r.values[0, :4].abs().max() < 1e-4  # identical positions: nothing to patch
    h = patch_heads(model, CLEAN, CORRUPTED, correct="h", incorrect="X")
    assert h.values.shape == (model.cfg.n_layers, model.cfg.n_heads) and finite(h.values)
    for site in ("attn_out", "mlp_out"):
        s = patch_sweep(model, CLEAN, CORRUPTED, site, correct="h", incorrect="X", progress=False)
        assert s.values.shape == (model.cfg.n_layers, n_pos) and finite(s.values)
    assert_same(model, snap)


def test_attention_views(family):
    from tinygpt.interp import attention_patterns, induction_scores

    _, model = family
    a = attention_patterns(model, PROMPT)
    n_pos = len(PROMPT)
    maps = a.maps["pattern"]
    assert maps.shape == (model.cfg.n_layers, model.cfg.n_heads, n_pos, n_pos) and finite(maps)
    torch.testing.assert_close(maps.sum(-1), torch.ones_like(maps.sum(-1)), atol=1e-5, rtol=0)
    assert maps.triu(1).abs().max() == 0  # causal
    s = induction_scores(model, seq_len=8, batch=2)
    assert s.shape == (model.cfg.n_layers, model.cfg.n_heads) and finite(s)


def test_attribution_patching_and_edge_attribution(family):
    from tinygpt.interp.circuits import attribution_patch, edge_attribution_patch

    _, model = family
    snap = snapshot(model)
    r = attribution_patch(model, CLEAN, CORRUPTED, site="head", correct="h", incorrect="X")
    assert r.values.shape == (model.cfg.n_layers, model.cfg.n_heads) and finite(r.values)
    assert r.values.abs().max() > 0
    e = edge_attribution_patch(model, CLEAN, CORRUPTED, correct="h", incorrect="X", progress=False)
    scores = torch.as_tensor(e.scores)
    assert scores.numel() > 0 and finite(scores) and scores.abs().max() > 0
    assert_same(model, snap)


def test_dictionary_trains_splices_and_restores(family, corpus, tmp_path):
    from tinygpt.dictionary import build_feature_index, splice, train_sae
    from tinygpt.widgets import FeatureDashboard

    name, model = family
    hook = "blocks.0.hook_resid_post"
    res = train_sae(
        model, corpus, hook=hook, k=4, expansion=2, tokens=2048, batch_size=256, buffer_tokens=1024, model_batch=4,
        context=32, evaluate=False, progress=False, cache_dir=tmp_path / "cache",
    )  # fmt: skip
    sae = res.sae if hasattr(res, "sae") else res.dictionary
    x = model.to_tokens(TEXT[:40])
    before = logits(model, x)
    with splice(model, sae):
        spliced = logits(model, x)
    assert spliced.shape == before.shape and finite(spliced)
    assert not torch.equal(spliced, before)  # the reconstruction replaced the activation
    assert torch.equal(logits(model, x), before)
    index = build_feature_index(
        model, sae, corpus, tokens=1024, context=32, top_k=4, samples=4, batch=4, cache_dir=tmp_path / "cache",
        progress=False,
    )  # fmt: skip
    dash = FeatureDashboard(model, sae, index, latent=0, max_new_tokens=4)
    assert dash.fig.data
    assert torch.equal(logits(model, x), before)


# ------------------------------------------------------------------------------------- surgery
def test_laser_by_hf_names_covers_every_mlp_matrix(family):
    from tinygpt.surgery import laser

    name, model = family
    snap, before = snapshot(model), logits(model)
    with laser(model, "mlp", rank_fraction=0.25) as report:
        assert len(report.entries) == mlp_matrices(model)  # gated MLPs and every expert (shared too)
        assert not torch.allclose(logits(model), before) and finite(logits(model))
    assert_same(model, snap)
    gated = name not in {"gpt_neox", "gpt2"}
    names = "k_proj,v_proj,gate_proj,up_proj,down_proj" if gated else "k_proj,v_proj,fc_in,fc_out"
    with laser(model, names, rank_fraction=0.5) as report:
        shapes = {e.target.rsplit(".", 1)[-1]: tuple(e.shape) for e in report.entries}
        assert shapes["k_proj"] == (model.cfg.n_kv_heads * model.cfg.d_head, model.cfg.d_model)  # GQA: narrower
        if name in MOE:
            assert any(e.target.startswith("moe.experts.") for e in report.entries)
    assert_same(model, snap)


def test_hqq_by_hf_names_and_packed(family):
    from tinygpt.surgery import hqq

    name, model = family
    snap, before = snapshot(model), logits(model)
    with hqq(model, 4, 4, "all") as report:
        assert len(report.entries) == mlp_matrices(model) + 4 * model.cfg.n_layers
        assert all(e.hqq_error <= e.rtn_error + 1e-6 for e in report.entries)
        q = logits(model)
        assert finite(q) and not torch.equal(q, before)
    assert_same(model, snap)
    experts = "experts" if name in MOE else "q_proj,o_proj"
    with hqq(model, 3, 4, experts, packed=True) as report:
        assert report.entries and finite(logits(model))
    assert_same(model, snap)
    assert torch.equal(logits(model), before)


# ------------------------------------------------------------------------------------- training
def test_lora_finetune_trains_only_the_adapters(family, corpus, tmp_path):
    from tinygpt.training import lora_finetune

    name, model = family
    base = copy.deepcopy(model)
    targets = "q_proj,k_proj,v_proj,o_proj," + ("gate_proj,down_proj" if name not in {"gpt_neox", "gpt2"} else "fc_in")
    res = lora_finetune(
        base, corpus, targets=targets, rank=2, steps=2, batch_size=2, ctx=16, warmup=0, max_lr=1e-2, val_split=0.1,
        val_every=0, device="cpu", progress=False, out=tmp_path / "a.lora",
    )  # fmt: skip
    assert len(res.history) == 2 and all(math.isfinite(h["loss"]) for h in res.history)
    assert 0 < res.n_trainable < res.n_total
    if name in MOE:
        assert any(".moe.experts." in m for m in res.modules)
    assert any(".attn.k_proj" in m for m in res.modules)


def test_sft_one_step(family, tmp_path):
    from tinygpt.training import sft

    _, model = family
    student = copy.deepcopy(model)
    before = snapshot(student)
    records = [
        {"instruction": "Who is Puck?", "response": "A sprite."},
        {"instruction": "Who is Lear?", "response": "A king."},
        {"instruction": "Who is Iago?", "response": "A liar."},
        {"instruction": "Who is Ariel?", "response": "A spirit."},
    ]
    res = sft(student, records, steps=1, val_split=0, device="cpu", progress=False, batch_size=2, warmup=0, max_lr=3e-3)
    assert res.history and math.isfinite(res.history[-1]["loss"])
    assert any(not torch.equal(v, before[k]) for k, v in res.model.state_dict().items())


def test_distillation_both_ways(family, corpus):
    from tinygpt.training import distill

    name, model = family
    fast = dict(steps=2, batch_size=2, ctx=16, warmup=0, val_every=0, val_split=0.1, progress=False, device="cpu")
    extra = dict(moe_experts=4, moe_topk=2) if name in MOE else {}
    torch.manual_seed(0)
    student = GPT(GPTConfig(n_layers=1, d_model=32, n_heads=2, n_ctx=32, d_vocab=model.cfg.d_vocab, **extra))
    res = distill(student, model, corpus, **fast)  # the imported model teaches a tinygpt student
    assert len(res.history) == 2 and all(math.isfinite(h["kl"]) and h["kl"] > 0 for h in res.history)
    as_student = copy.deepcopy(model)
    before = snapshot(as_student)
    res2 = distill(as_student, student, corpus, **fast)  # the imported model learns from a tinygpt teacher
    assert res2.history and any(not torch.equal(v, before[k]) for k, v in res2.model.state_dict().items())


# ------------------------------------------------------------------------------------- evaluation
def test_evaluation_perplexity_and_bits_per_byte(family):
    from tinygpt.eval import evaluate

    _, model = family
    text = TEXT[:60]  # one context window (n_ctx 64)
    r = evaluate(model, text, progress=False)
    assert r.n_tokens == len(text.encode()) - 1  # a byte tokenizer: every byte but the first is scored
    assert math.isfinite(r.loss) and r.bpb == pytest.approx(r.loss / math.log(2) * r.n_tokens / r.n_bytes)
    assert r.perplexity == pytest.approx(math.exp(r.loss), rel=1e-6)
    with torch.no_grad():
        direct = model(model.to_tokens(text), return_type="loss").item()
    assert r.loss == pytest.approx(direct, rel=1e-4)  # one window covers the text: the same mean loss


# ------------------------------------------------------------------------------------- dashboards
def test_dashboards_construct_over_the_model(family):
    from _widget_helpers import as_array

    from tinygpt.interp import logit_lens
    from tinygpt.surgery import select_linears
    from tinygpt.widgets import (
        AblationExplorer,
        AttentionViewer,
        CircuitDashboard,
        HqqDashboard,
        LaserDashboard,
        LensDashboard,
        PatchingDashboard,
    )

    _, model = family
    snap = snapshot(model)
    x = model.to_tokens(TEXT[:48])
    lens = LensDashboard(model, prompt=PROMPT)
    torch.testing.assert_close(
        torch.as_tensor(as_array(lens.fig.data[0].z)), logit_lens(model, PROMPT).kl.double(), atol=1e-6, rtol=1e-5
    )
    view = AttentionViewer(model, PROMPT, layer=1, head=1)
    assert view.fig.data
    patch = PatchingDashboard(model, CLEAN, CORRUPTED, correct="h", incorrect="X", progress=False)
    assert patch.fig.data
    abl = AblationExplorer(model, x, prompt="ab", max_new_tokens=4, n_windows=2, progress=False)
    assert abl.fig.data
    las = LaserDashboard(model, x, "mlp", fractions=(0.5,), prompt="ab", max_new_tokens=4, progress=False)
    assert las.sweep_fig.data and las.spectrum_fig.data
    assert set(las.sweep.targets) == {t for _, t, _ in select_linears(model, "mlp", None)}  # gated / experts
    assert finite(torch.tensor(list(las.sweep.losses.values()), dtype=torch.float64))
    q = HqqDashboard(model, x, bits=(4,), group_sizes=(4,), loss_curve=False, loss_group_size=4, progress=False)
    assert q.heatmap_fig.data
    c = CircuitDashboard(model, CLEAN, CORRUPTED, correct="h", incorrect="X", progress=False)
    assert c.graph_fig.data and c.faith_fig.data
    assert_same(model, snap)


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_cli_quantizes_and_factors_experts_by_hf_names(tmp_path, name):
    from tinygpt import load
    from tinygpt.cli import main
    from tinygpt.surgery import LowRankLinear, PackedQuantLinear

    save(make_hf(name), tmp_path / "hf")
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "m.tinygpt")]) == 0
    argv = ["hqq", str(tmp_path / "m.tinygpt"), "--bits", "4", "--group-size", "4", "--target", "experts", "k_proj"]
    assert main([*argv, "--packed", "--out", str(tmp_path / "q.tinygpt")]) == 0
    q = load(tmp_path / "q.tinygpt")
    moe = q.blocks[1].moe
    assert isinstance(moe.experts[3].up_proj, PackedQuantLinear) and isinstance(
        q.blocks[0].attn.k_proj, PackedQuantLinear
    )
    assert type(q.blocks[0].attn.q_proj) is torch.nn.Linear  # not named: left dense
    if name == "qwen2_moe":
        assert type(moe.shared_expert.up_proj) is torch.nn.Linear  # "experts" = the routed experts only
    assert finite(logits(q))
    argv = ["laser", str(tmp_path / "m.tinygpt"), "--target", "down_proj", "--rank-fraction", "0.25", "--factored"]
    assert main([*argv, "--out", str(tmp_path / "l.tinygpt")]) == 0
    lr = load(tmp_path / "l.tinygpt")
    assert isinstance(lr.blocks[0].moe.experts[0].down_proj, LowRankLinear)
    if name == "qwen2_moe":
        assert isinstance(lr.blocks[0].moe.shared_expert.down_proj, LowRankLinear)  # "down_proj": shared one too
    assert finite(logits(lr))
