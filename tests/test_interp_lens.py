"""Logit lens and tuned lens: definitions, the `.lenses` format, TransformerLens interop and the CLI."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from _lens_helpers import random_lens
from _model_helpers import tiny_model
from safetensors.torch import save_file

from tinygpt import GPT, GPTConfig, train
from tinygpt.cli import main
from tinygpt.data import shakespeare_corpus
from tinygpt.interp import LensError, TunedLens, lens_report, logit_lens, residual_stack, tuned_lens
from tinygpt.interp.lens import _show

PROMPT = "ROMEO: But soft, what light"


pytestmark = pytest.mark.usefixtures("isolated_cache")  # conftest: TINYGPT_CACHE_DIR in the test's tmp dir


@pytest.fixture(scope="module")
def shakespeare_file(tmp_path_factory):
    """~600 KB of the built-in Shakespeare as a text file (quick to tokenize)."""
    texts, size = [], 0
    for t in shakespeare_corpus().iter_texts():
        texts.append(t)
        size += len(t)
        if size > 600_000:
            break
    p = tmp_path_factory.mktemp("corpus") / "shakespeare.txt"
    p.write_text("\n\n".join(texts))
    return p


@pytest.fixture(scope="module")
def trained(shakespeare_file, tmp_path_factory):
    """A 4-layer d64 model trained briefly on Shakespeare, and a tuned lens trained on it."""
    cache = tmp_path_factory.mktemp("cache")
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layers=4, d_model=64, n_heads=2, n_ctx=64))
    train(
        model,
        shakespeare_file,
        steps=150,
        batch_size=8,
        ctx=64,
        max_lr=3e-3,
        warmup=10,
        val_every=0,
        device="cpu",
        progress=False,
        cache_dir=cache,
    )
    model.eval()
    lens = tuned_lens(
        model, shakespeare_file, steps=150, batch_size=8, ctx=64, val_split=0.05, progress=False, cache_dir=cache
    )
    return model, lens, cache


# ------------------------------------------------------------------------------------------- logit lens
def test_shapes_labels_and_default_targets():
    model = tiny_model()
    res = logit_lens(model, PROMPT, k=3)
    P, L = len(PROMPT), model.cfg.n_layers
    assert res.labels == ["0_pre", "1_pre", "final_post"]
    assert res.top_ids.shape == res.top_probs.shape == (L + 1, P, 3)
    for t in (res.entropy, res.kl, res.target_rank, res.target_prob):
        assert t.shape == (L + 1, P)
    assert len(res.top_strs) == L + 1 and len(res.top_strs[0]) == P and len(res.top_strs[0][0]) == 3
    assert res.str_tokens == list(PROMPT)
    assert res.top_strs[1][2] == [model.tokenizer.token_str(i) for i in res.top_ids[1, 2].tolist()]
    assert (res.top_probs[..., :-1] >= res.top_probs[..., 1:]).all()  # sorted
    # default target: the actual next token; none at the last position
    assert res.target_ids[:-1].tolist() == model.to_tokens(PROMPT)[0, 1:].tolist()
    assert res.target_ids[-1] == -1 and (res.target_rank[:, -1] == -1).all() and res.target_prob[:, -1].isnan().all()
    assert (res.target_rank[:, :-1] >= 0).all()
    assert res.top(0, 0) == [(s, pytest.approx(float(p))) for s, p in zip(res.top_strs[0][0], res.top_probs[0, 0])]


def test_final_entry_is_the_model_and_intermediate_entries_use_ln_final():
    model = tiny_model(seed=3)
    tokens = model.to_tokens(PROMPT)
    res = logit_lens(model, tokens, k=5)
    with torch.no_grad():
        lp = model(tokens)[0].log_softmax(-1)
        _, cache = model.run_with_cache(tokens)
        lp1 = model.unembed(model.ln_final(cache["blocks.1.hook_resid_pre"]))[0].log_softmax(-1)
    top = lp.topk(5)
    assert torch.equal(res.top_ids[-1], top.indices)
    torch.testing.assert_close(res.top_probs[-1], top.values.exp())
    torch.testing.assert_close(res.entropy[-1], -(lp.exp() * lp).sum(-1))
    nxt = tokens[0, 1:]
    torch.testing.assert_close(res.target_prob[-1, :-1], lp[:-1].gather(-1, nxt[:, None])[:, 0].exp())
    assert torch.equal(res.target_rank[-1, :-1], (lp[:-1] > lp[:-1].gather(-1, nxt[:, None])).sum(-1))
    assert (res.kl[-1] == 0).all()
    # layer 1: final LayerNorm recomputed on the intermediate residual, KL(final || layer)
    torch.testing.assert_close(res.top_probs[1], lp1.topk(5).values.exp())
    torch.testing.assert_close(res.kl[1], (lp.exp() * (lp - lp1)).sum(-1))
    assert (res.kl[:-1] > 0).all()


def test_residual_stack_is_resid_pre_plus_final():
    model = tiny_model()
    tokens = model.to_tokens(PROMPT)
    with torch.no_grad():
        logits, stack = residual_stack(model, tokens)
        _, cache = model.run_with_cache(tokens)
    assert stack.shape == (3, 1, len(PROMPT), 32)
    assert torch.equal(stack[0], cache["blocks.0.hook_resid_pre"])
    torch.testing.assert_close(stack[2], cache["blocks.1.hook_resid_post"])  # run_with_cache takes the eager path
    torch.testing.assert_close(model.unembed(model.ln_final(stack[-1])), logits)


def test_explicit_targets():
    model = tiny_model()
    res = logit_lens(model, PROMPT, target="e")
    e = model.to_single_token("e")
    assert (res.target_ids == e).all()
    assert ((res.target_rank == 0) == (res.top_ids[..., 0] == e)).all()
    per_pos = [5] * (len(PROMPT) - 1) + [-1]
    res2 = logit_lens(model, PROMPT, target=per_pos)
    assert res2.target_ids.tolist() == per_pos and res2.target_prob[:, -1].isnan().all()
    assert torch.equal(logit_lens(model, PROMPT, target=e).target_rank, res.target_rank)
    with pytest.raises(ValueError, match="positions"):
        logit_lens(model, PROMPT, target=[1, 2])
    with pytest.raises(ValueError, match="one sequence"):
        logit_lens(model, torch.zeros(2, 5, dtype=torch.long))


def test_identity_tuned_lens_is_exactly_the_logit_lens():
    model = tiny_model()
    plain = logit_lens(model, PROMPT)
    ident = logit_lens(model, PROMPT, lens=TunedLens.from_model(model))
    assert ident.lens == "tuned" and plain.lens == "logit"
    for name in ("top_ids", "top_probs", "entropy", "kl", "target_rank", "target_prob"):
        assert torch.equal(getattr(plain, name).nan_to_num(), getattr(ident, name).nan_to_num()), name
    moved = logit_lens(model, PROMPT, lens=random_lens(model))
    assert not torch.equal(moved.entropy[:-1], plain.entropy[:-1])
    assert torch.equal(moved.entropy[-1], plain.entropy[-1])  # the final entry has no translator


def test_figure_metrics():
    model = tiny_model()
    res = logit_lens(model, "a b\nc", k=5)
    for metric in ("entropy", "kl", "prob", "rank"):
        fig = res.figure(metric)
        heat = fig.data[0]
        assert len(heat.z) == 3 and len(heat.z[0]) == 5
        assert list(fig.layout.xaxis.ticktext) == ["a", "␣", "b", "\\n", "c"]
        assert list(fig.layout.yaxis.ticktext) == res.labels
        assert [list(r) for r in heat.text] == [[_show(res.top_strs[i][p][0]) for p in range(5)] for i in range(3)]
        assert f"{float(res.top_probs[1, 0, 4]):.3f}" in heat.customdata[1][0]
    assert res.figure("entropy").data[0].z[2][1] == pytest.approx(float(res.entropy[2, 1]))
    assert res.figure("prob").data[0].z[0][-1] is None  # no target at the last position
    with pytest.raises(ValueError, match="metric"):
        res.figure("loss")


# ------------------------------------------------------------------------------------------- .lenses files
def test_save_load_round_trip(tmp_path):
    model = tiny_model()
    lens = random_lens(model)
    lens.train_settings = {"optimizer": "sgd", "lr": 1.0}
    path = lens.save(tmp_path / "m.lenses")
    assert [p.name for p in tmp_path.iterdir()] == ["m.lenses"]  # no temp files left
    back = TunedLens.load(path, model)
    for (k, a), (k2, b) in zip(lens.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert back.base == lens.base and back.train_settings == lens.train_settings
    assert torch.equal(logit_lens(model, PROMPT, lens=back).kl, logit_lens(model, PROMPT, lens=lens).kl)
    meta = json.loads(_metadata(path)["tinygpt-lenses"])
    assert meta["format"] == "tinygpt-lenses" and meta["d_model"] == 32 and meta["n_layers"] == 2
    assert meta["base_model"]["config"] == model.cfg.to_dict() and len(meta["base_model"]["unembed_sha256"]) == 64
    assert TunedLens.load(path).base == lens.base  # loads without a model too


def _metadata(path) -> dict:
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n])["__metadata__"]


def test_lens_refuses_another_model(tmp_path):
    model = tiny_model(seed=0)
    path = random_lens(model).save(tmp_path / "m.lenses")
    other = tiny_model(seed=1)  # same shape, different weights
    with pytest.raises(LensError, match="different model: the unembedding hash does not match"):
        TunedLens.load(path, other)
    assert TunedLens.load(path, other, check=False).n_layers == 2  # explicit opt-out
    with pytest.raises(LensError, match="n_layers=2 but the model has .* n_layers=3"):
        TunedLens.load(path, tiny_model(n_layers=3), check=False)
    lens = TunedLens.load(path, model)
    with pytest.raises(LensError, match="different model"):  # in memory too
        logit_lens(other, PROMPT, lens=lens)
    with torch.no_grad():  # editing the model's unembedding in place invalidates the pin
        model.unembed.weight[0, 0] += 1.0
    with pytest.raises(LensError, match="different model"):
        logit_lens(model, PROMPT, lens=lens)
    lens.pin(model)
    logit_lens(model, PROMPT, lens=lens)


def test_new_files_pin_the_model_fingerprint(tmp_path):
    from tinygpt.checkpoint import model_fingerprint

    model = tiny_model()
    path = random_lens(model).save(tmp_path / "m.lenses")
    meta = json.loads(_metadata(path)["tinygpt-lenses"])
    assert meta["base_model"]["fingerprint"] == model_fingerprint(model)
    assert "content_sha256" in meta  # written by tinygpt.checkpoint.write_tensor_file
    lens = TunedLens.load(path, model)
    with torch.no_grad():  # a weight other than the unembedding: only the fingerprint sees it
        model.blocks[0].mlp.fc_in.weight[0, 0] += 1.0
    with pytest.raises(LensError, match="different model: the weights' fingerprint does not match"):
        TunedLens.load(path, model)
    with pytest.raises(LensError, match="fingerprint"):
        logit_lens(model, PROMPT, lens=lens)
    lens.pin(model)
    logit_lens(model, PROMPT, lens=lens)


def test_legacy_lens_file_loads_with_identical_outputs(tmp_path):
    """A `.lenses` file written before the restructure (pinned by its unembedding hash only) still loads and
    translates exactly as it did, and re-saving it writes a current file that loads too."""
    import tinygpt

    legacy = Path(__file__).parent / "fixtures" / "legacy"
    expected = json.loads((legacy / "expected.json").read_text())
    model = tinygpt.load(legacy / "trained.tinygpt")
    meta = json.loads(_metadata(legacy / "trained.lenses")["tinygpt-lenses"])
    assert "fingerprint" not in meta["base_model"] and meta["base_model"]["unembed_sha256"]
    lens = TunedLens.load(legacy / "trained.lenses", model)
    tokens = torch.tensor(expected["tokens"])
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
        out = lens(cache["blocks.0.hook_resid_pre"], 0)[0, -1]
    torch.testing.assert_close(out, torch.tensor(expected["last_logits"]["lens"]), rtol=0, atol=0)
    other = tiny_model(d_model=model.cfg.d_model, n_layers=model.cfg.n_layers, n_heads=model.cfg.n_heads)
    with pytest.raises(LensError, match="unembedding hash does not match"):
        TunedLens.load(legacy / "trained.lenses", other)
    again = TunedLens.load(lens.pin(model).save(tmp_path / "again.lenses"), model)
    assert torch.equal(again(cache["blocks.0.hook_resid_pre"], 0)[0, -1], out)


def test_corrupt_and_foreign_files(tmp_path):
    model = tiny_model()
    good = random_lens(model).save(tmp_path / "good.lenses")
    data = good.read_bytes()

    def write(name: str, content: bytes):
        p = tmp_path / name
        p.write_bytes(content)
        return p

    cases = {
        "missing": (tmp_path / "nope.lenses", "no such file"),
        "empty": (write("empty.lenses", b""), "empty or truncated"),
        "truncated": (write("trunc.lenses", data[: len(data) - 100]), "truncated"),
        "flipped": (write("flip.lenses", data[:-4] + bytes(b ^ 0xFF for b in data[-4:])), "corrupt"),
        "pickle": (write("p.lenses", pickle.dumps({"a": 1})), "pickle"),
        "garbage": (write("g.lenses", b"\x01" * 64), "not a .lenses file"),
        "directory": (tmp_path, "directory"),
    }
    save_file({"x": torch.zeros(3)}, tmp_path / "plain.safetensors")
    cases["foreign"] = (tmp_path / "plain.safetensors", "not a .lenses file")
    model.save(tmp_path / "model.tinygpt")
    cases["checkpoint"] = (tmp_path / "model.tinygpt", "a tinygpt model checkpoint")
    for name, (path, msg) in cases.items():
        with pytest.raises(LensError, match=msg):
            TunedLens.load(path)
        assert name
    # a newer format version
    meta = json.loads(_metadata(good)["tinygpt-lenses"])
    meta["format_version"] = 99
    from safetensors.torch import load_file

    save_file(load_file(good), tmp_path / "new.lenses", metadata={"tinygpt-lenses": json.dumps(meta)})
    with pytest.raises(LensError, match="newer tinygpt"):
        TunedLens.load(tmp_path / "new.lenses")


# ------------------------------------------------------------------------------------------- training
def test_tuned_lens_training_leaves_the_model_alone():
    model = tiny_model()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = torch.randint(0, 256, (4000,), generator=torch.Generator().manual_seed(0))
    lens = tuned_lens(model, tokens, steps=3, batch_size=2, ctx=16, progress=False)
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len(lens.history) == 3 and not lens.training
    assert lens.train_settings["optimizer"] == "sgd" and lens.train_settings["torch_lr"] == pytest.approx(0.1)
    assert any(p.abs().sum() > 0 for p in lens.parameters())  # it moved
    assert lens.base["unembed_sha256"]
    with pytest.raises(ValueError, match="optimizer"):
        tuned_lens(model, tokens, steps=1, optimizer="lbfgs", progress=False)


def test_tuned_lens_beats_logit_lens_on_held_out_text(trained, shakespeare_file):
    model, lens, cache = trained
    losses = [h["loss"] for h in lens.history]
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10  # it learned
    rep = lens_report(model, lens, shakespeare_file, ctx=64, n_windows=32, val_split=0.05, cache_dir=cache)
    assert rep.n_tokens == 32 * 64
    L = model.cfg.n_layers
    assert rep.logit_kl[-1] == 0 and rep.tuned_kl[-1] == 0
    assert rep.logit_ce[-1] == pytest.approx(float(rep.tuned_ce[-1]))
    for i in range(L):  # the paper's finding: lower KL at every intermediate layer
        assert rep.tuned_kl[i] < rep.logit_kl[i], rep.table()
    table = rep.table()
    assert table.count("\n|") == L + 2 and "final_post" in table
    fig = rep.figure()
    assert [t.name for t in fig.data] == ["logit lens", "tuned lens"] and len(fig.data[0].y) == L + 1
    # logit_lens with the trained lens agrees with the report's direction on a prompt
    res_t = logit_lens(model, PROMPT, lens=lens)
    res_l = logit_lens(model, PROMPT)
    assert res_t.kl[:-1].mean() < res_l.kl[:-1].mean()


def test_adam_option(trained, shakespeare_file):
    model, _, cache = trained
    lens = tuned_lens(
        model, shakespeare_file, steps=10, optimizer="adam", batch_size=4, ctx=32, progress=False, cache_dir=cache
    )
    s = lens.train_settings
    assert s["optimizer"] == "adam" and s["lr"] == 1e-3 and s["warmup"] == 2
    assert [h["lr"] for h in lens.history][:2] == pytest.approx([5e-4, 1e-3])


# ------------------------------------------------------------------------------------------- TransformerLens
def test_transformer_lens_logit_lens_agrees(trained):
    from transformer_lens.tools.analysis import logit_lens as tl_logit_lens

    model, lens, _ = trained
    tokens = model.to_tokens(PROMPT)
    for ours_lens, tl_lens in ((None, None), (lens, lens)):
        ours = logit_lens(model, tokens, k=5, lens=ours_lens)
        theirs = tl_logit_lens(model, tokens, positions=None, return_type="probs", top_k=5, lens=tl_lens)
        assert theirs.labels == ours.labels
        assert torch.equal(theirs.readout.top_ids[:, 0], ours.top_ids)
        torch.testing.assert_close(theirs.values[:, 0], ours.top_probs, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(theirs.readout.entropy[:, 0], ours.entropy, atol=1e-4, rtol=1e-4)
    # incl_mid: pre entries translated, mid entries read plainly
    mid = tl_logit_lens(
        model, tokens, positions=None, return_type="probs", top_k=5, incl_mid=True, lens=lens.as_tl_lens(incl_mid=True)
    )
    plain_mid = tl_logit_lens(model, tokens, positions=None, return_type="probs", top_k=5, incl_mid=True)
    ours = logit_lens(model, tokens, k=5, lens=lens)
    assert mid.labels[2] == "1_pre" and mid.labels[3] == "1_mid"
    torch.testing.assert_close(mid.values[2, 0], ours.top_probs[1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mid.values[3, 0], plain_mid.values[3, 0])


# ------------------------------------------------------------------------------------------- CLI
def test_cli_end_to_end(trained, shakespeare_file, tmp_path, capsys):
    model, _, _ = trained
    path = model.save(tmp_path / "m.tinygpt")
    out = tmp_path / "m.lenses"
    argv = [
        "tuned-lens",
        str(path),
        "--corpus",
        str(shakespeare_file),
        "--steps",
        "30",
        "--lr",
        "1e-3",
        "--batch",
        "4",
        "--ctx",
        "64",
        "--eval-windows",
        "8",
        "--val-split",
        "0.05",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert f"saved {out}" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "_p" in line]
    assert [r.split("|")[1].strip() for r in rows] == ["0_pre", "1_pre", "2_pre", "3_pre", "final_post"]
    lens = TunedLens.load(out, model)
    assert lens.train_settings["steps"] == 30 and lens.train_settings["lr"] == 1e-3
    # errors are one clear line and exit code 2
    assert main(["tuned-lens", str(tmp_path / "missing.tinygpt"), "--no-progress"]) == 2
    assert "no such file" in capsys.readouterr().err
