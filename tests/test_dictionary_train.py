"""tinygpt.dictionary.train / trainer / activations: training, exact resume, several dictionaries, refusals."""

import random

import pytest
import torch

from tinygpt import GPT, GPTConfig
from tinygpt.dictionary import DictionaryError, hook_activations, load_sae, train_sae
from tinygpt.dictionary.trainer import Schedule, geometric_median

HOOK = "blocks.0.hook_resid_post"
WORDS = "to be or not that is the question whether tis nobler in the mind to suffer slings and arrows".split()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layers=2, d_model=32, n_heads=2, n_ctx=64)).eval()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(0)
    lines = [
        f"{rng.choice(['ROMEO:', 'JULIET:', 'FIRST CITIZEN:'])}\n{' '.join(rng.choices(WORDS, k=10))}\n"
        for _ in range(1500)
    ]
    path = tmp_path_factory.mktemp("corpus") / "plays.txt"
    path.write_text("\n".join(lines))
    return path


def run(model, corpus, tmp_path, **kw):
    opts = dict(
        hook=HOOK,
        k=4,
        expansion=2,
        tokens=12_288,
        batch_size=512,
        buffer_tokens=2_048,
        model_batch=8,
        progress=False,
        cache_dir=tmp_path / "cache",
        eval_tokens=2_048,
    )
    opts.update(kw)
    return train_sae(model, corpus, **opts)


def test_topk_training_learns_saves_and_loads(model, corpus, tmp_path):
    res = run(model, corpus, tmp_path, out=tmp_path / "a.sae")
    h = res.history
    assert res.step == len(h) == 24 and res.tokens == 24 * 512 and not res.interrupted
    assert h[-1]["explained_variance"] > h[0]["explained_variance"] and h[-1]["l0"] <= 4
    sae = res.dictionary
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(64))  # unit decoder rows, kept
    assert sae.in_scale.item() != 1.0  # normalised, the constant is part of the dictionary
    assert res.evals is not None and 0 < res.evals[0]["explained_variance"] <= 1 and res.evals[0]["l0"] <= 4
    back = load_sae(tmp_path / "a.sae", model)
    x = torch.randn(5, 32)
    with torch.no_grad():
        assert torch.equal(back(x), sae(x))
    assert back.training_state["complete"] and back.training_state["eval"]["l0"] == res.evals[0]["l0"]
    assert "EV" not in res.summary() and "explained variance" in res.summary()
    res.figure()


def test_resume_is_bit_exact(model, corpus, tmp_path):
    common = dict(arch=["topk", "jumprelu"], save_every=5, evaluate=False)
    a = run(model, corpus, tmp_path, out=tmp_path / "a", **common)

    def interrupt(rec):
        if rec["step"] == 13 and rec["dictionary"] == 1:
            raise KeyboardInterrupt

    b1 = run(model, corpus, tmp_path, out=tmp_path / "b", callbacks=[interrupt], **common)
    assert b1.interrupted and b1.step == 13 and len(b1.paths) == 2
    b2 = train_sae(model, resume=True, out=tmp_path / "b", progress=False, cache_dir=tmp_path / "cache", evaluate=False)
    assert b2.step == 24 and not b2.interrupted
    for da, db, ha, hb in zip(a.dictionaries, b2.dictionaries, a.histories, b2.histories):
        assert ha == hb
        for (name, ta), tb in zip(da.state_dict().items(), db.state_dict().values()):
            assert torch.equal(ta, tb), name
    more = train_sae(
        model,
        resume=True,
        out=tmp_path / "b",
        tokens=14_336,
        progress=False,
        cache_dir=tmp_path / "cache",
        evaluate=False,
    )
    assert more.step == 28


def test_several_dictionaries_share_one_activation_pass(model, corpus, tmp_path):
    calls = []
    handle = model.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        one = run(model, corpus, tmp_path, evaluate=False)
        n_one = len(calls)
        calls.clear()
        many = run(
            model, corpus, tmp_path, hook=[HOOK, "blocks.1.hook_resid_mid"], expansion=[2, 4], k=[4], evaluate=False
        )
    finally:
        handle.remove()
    assert len(calls) == n_one  # the same number of model forwards for 1 and for 4 dictionaries
    assert [(d.hook, d.d_sae) for d in many.dictionaries] == [
        (HOOK, 64),
        (HOOK, 128),
        ("blocks.1.hook_resid_mid", 64),
        ("blocks.1.hook_resid_mid", 128),
    ]
    assert torch.equal(many.dictionaries[0].W_enc, one.dictionary.W_enc)  # same seed, same data


def test_forwards_stop_after_the_deepest_hook(model):
    ran = []
    handle = model.blocks[1].register_forward_pre_hook(lambda m, a: ran.append(1))
    try:
        acts = hook_activations(model, torch.zeros(2, 5, dtype=torch.long), [HOOK, "blocks.0.hook_resid_mid"])
        assert not ran and acts[HOOK].shape == (2, 5, 32)
        hook_activations(model, torch.zeros(2, 5, dtype=torch.long), ["blocks.1.attn.hook_z"])
        assert ran
    finally:
        handle.remove()


def test_transcoders_train_between_two_hooks(model, corpus, tmp_path):
    res = run(
        model, corpus, tmp_path, hook="blocks.1.hook_resid_post", transcoder=True, skip=True, arch="relu", l1_coef=0.5
    )
    sae = res.dictionary
    assert (sae.hook, sae.out_hook, sae.cfg.skip) == ("blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out", True)
    assert res.evals[0]["ce_zero"] != res.evals[0]["ce_clean"]
    assert res.history[-1]["mse"] < res.history[0]["mse"]
    res2 = run(
        model, corpus, tmp_path, hook="blocks.1.hook_resid_mid", out_hook="blocks.1.hook_mlp_out", arch="batchtopk"
    )
    assert res2.dictionary.cfg.transcoder and res2.dictionary.threshold.item() > 0


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(hook="blocks.0.hook_resid_pst"), "unknown hook 'blocks.0.hook_resid_pst'; did you mean"),
        (dict(hook="blocks.0.attn.hook_pattern"), "not per-token activations"),
        (dict(k=100), "k=100 is more than the 64 latents"),
        (dict(expansion=0), "expansion must be a positive number"),
        (dict(expansion=-2), "expansion must be a positive number"),
        (dict(arch="gated"), "unknown dictionary architecture"),
        (dict(tokens=100), "less than one batch"),
        (dict(b_dec_init="median"), "b_dec_init must be one of"),
    ],
)
def test_bad_arguments_are_refused_and_nothing_is_written(model, corpus, tmp_path, kw, msg):
    out = tmp_path / "never.sae"
    with pytest.raises(DictionaryError, match=msg):
        run(model, corpus, tmp_path, out=out, **kw)
    assert not out.exists()


def test_a_corpus_shorter_than_one_batch_is_refused(model, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("ROMEO: hello\n" * 20)
    with pytest.raises(DictionaryError, match="shorter than one batch"):
        run(model, short, tmp_path, out=tmp_path / "x.sae")
    assert not (tmp_path / "x.sae").exists()
    with pytest.raises(DictionaryError, match="resume=True needs out="):
        train_sae(model, resume=True, progress=False)


def test_schedule_and_geometric_median():
    s = Schedule(lr=1.0, total=100, warmup=10, decay=20, sparsity_warmup=5)
    assert s.lr_at(5) == 0.5 and s.lr_at(50) == 1.0 and s.lr_at(100) == pytest.approx(1 / 21) and s.lr_at(90) < 1
    assert s.sparsity_at(1) == 0.2 and s.sparsity_at(9) == 1.0
    pts = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [100.0, 100.0]])
    m = geometric_median(pts)
    assert m.norm() < 1.0 < pts.mean(0).norm()  # robust to the outlier, unlike the mean
