"""`tinygpt sae`, `sae-eval`, `sae-export`, `sae-import` (`tinygpt.cli.sae`) on a tiny model."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

from tinygpt import GPT, GPTConfig, save
from tinygpt.cli import main
from tinygpt.dictionary import evaluate_dictionary, import_saelens, load_sae, train_sae

pytestmark = pytest.mark.usefixtures("isolated_cache")  # conftest: TINYGPT_CACHE_DIR in the test's tmp dir

HOOK = "blocks.0.hook_resid_post"
WORDS = "to be or not that is the question whether tis nobler in the mind to suffer slings and arrows".split()
SMALL = ["--k", "4", "--expansion", "2", "--tokens", "6144", "--batch", "512", "--eval-tokens", "1024"]
SUMMARY = re.compile(
    r"topk 64 k=4 @ blocks\.0\.hook_resid_post: explained variance (-?\d\.\d{3}) \| L0 (\d+\.\d) \| dead "
    r"(\d+\.\d)% \| loss recovered (-?\d+\.\d{3}) -> (.+)"
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("sae-cli")
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layers=2, d_model=32, n_heads=2, n_ctx=64)).eval()
    save(model, d / "m.tinygpt")
    torch.manual_seed(1)
    save(GPT(GPTConfig(n_layers=2, d_model=32, n_heads=2, n_ctx=64)), d / "other.tinygpt")
    rng = random.Random(0)
    lines = [f"{rng.choice(['ROMEO:', 'JULIET:'])}\n{' '.join(rng.choices(WORDS, k=10))}\n" for _ in range(600)]
    (d / "plays.txt").write_text("\n".join(lines))
    return d


def _train(world, out, *extra):
    args = ["sae", str(world / "m.tinygpt"), "--hook", HOOK, *SMALL, "--corpus", str(world / "plays.txt")]
    return main([*args, "--out", str(out), "--no-progress", "--device", "cpu", *extra])


def test_sae_trains_prints_the_summary_and_matches_the_library(world, tmp_path, capsys):
    out = tmp_path / "a.sae"
    assert _train(world, out) == 0
    lines = capsys.readouterr().out.splitlines()
    m = SUMMARY.fullmatch(lines[0])
    assert m, lines
    assert m.group(5) == str(out) and float(m.group(2)) <= 4.0
    assert re.fullmatch(r"done: step 12 \| 6,144 tokens \| \d+\.\ds", lines[1]), lines[1]
    from tinygpt import load

    model = load(world / "m.tinygpt")
    sae = load_sae(out, model)
    assert float(m.group(1)) == pytest.approx(sae.training_state["eval"]["explained_variance"], abs=1e-3)
    ref = train_sae(
        model,
        world / "plays.txt",
        hook=HOOK,
        k=4,
        expansion=2,
        tokens=6144,
        batch_size=512,
        eval_tokens=1024,
        progress=False,
    )
    for (name, a), b in zip(ref.dictionary.state_dict().items(), sae.state_dict().values()):
        assert torch.equal(a, b), name  # the command is the library function


def test_overwrite_and_resume_rules(world, tmp_path, capsys):
    out = tmp_path / "a.sae"
    assert _train(world, out) == 0
    before = out.read_bytes()
    capsys.readouterr()
    assert _train(world, out) == 2  # an existing run is not replaced silently
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert out.read_bytes() == before
    assert _train(world, out, "--resume") == 2  # --resume with settings flags: refused, one line
    assert "only --tokens may change (given: --batch, --expansion, --hook, --k)" in capsys.readouterr().err
    args = ["sae", str(world / "m.tinygpt"), "--out", str(out), "--resume", "--no-progress", "--device", "cpu"]
    assert main([*args, "--tokens", "8192", "--corpus", str(world / "plays.txt")]) == 0  # extends the run
    assert "done: step 16 | 8,192 tokens" in capsys.readouterr().out
    assert load_sae(out).training_state["step"] == 16
    assert _train(world, out, "--overwrite") == 0
    assert load_sae(out).training_state["step"] == 12


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--hook", "blocks.0.hook_resid_pots"], "unknown hook 'blocks.0.hook_resid_pots'; did you mean"),
        (["--k", "100"], "k=100 is more than the 64 latents"),
        (["--expansion", "0"], "expansion must be a positive number"),
        (["--arch", "gated"], "unknown dictionary architecture 'gated'"),
        (["--tokens", "0"], "--tokens must be a positive integer"),
    ],
)
def test_bad_arguments_are_one_line_and_write_nothing(world, tmp_path, capsys, extra, message):
    out = tmp_path / "never.sae"
    assert _train(world, out, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tinygpt sae: error: ") and message in err and "\n" not in err
    assert not out.exists()


def test_a_corpus_shorter_than_one_batch_is_refused(world, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("ROMEO: hello\n" * 10)
    args = ["sae", str(world / "m.tinygpt"), "--hook", HOOK, *SMALL, "--corpus", str(short)]
    assert main([*args, "--out", str(tmp_path / "x.sae"), "--no-progress", "--device", "cpu"]) == 2
    assert "shorter than one batch" in capsys.readouterr().err and not (tmp_path / "x.sae").exists()


def test_sae_eval_prints_the_table_and_refuses_another_model(world, tmp_path, capsys):
    out = tmp_path / "a.sae"
    assert _train(world, out) == 0
    capsys.readouterr()
    corpus = ["--corpus", str(world / "plays.txt"), "--tokens", "2048", "--no-progress"]
    assert main(["sae-eval", str(out), "--model", str(world / "m.tinygpt"), *corpus]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| name | explained_variance | mse | l0 |") and "2,048 tokens" in table[-1]
    from tinygpt import load

    model = load(world / "m.tinygpt")
    ev = evaluate_dictionary(model, load_sae(out, model), world / "plays.txt", tokens=2048, progress=False)
    cells = [c.strip() for c in table[2].strip("|").split("|")]
    assert float(cells[1]) == pytest.approx(ev[0]["explained_variance"], rel=1e-3)
    assert float(cells[9]) == pytest.approx(ev[0]["loss_recovered"], rel=1e-3, abs=1e-3)
    assert main(["sae-eval", str(world / "m.tinygpt"), str(out), *corpus]) == 0  # MODEL FILE.sae works too
    assert capsys.readouterr().out.splitlines()[2] == table[2]
    assert main(["sae-eval", str(out), *corpus]) == 0  # the model the dictionary was saved from
    capsys.readouterr()
    assert main(["sae-eval", str(out), "--model", str(world / "other.tinygpt"), *corpus]) == 2
    err = capsys.readouterr().err
    assert "trained on a different model" in err and len(err.strip().splitlines()) == 1


def test_sae_export_and_import_round_trip(world, tmp_path, capsys):
    out = tmp_path / "a.sae"
    assert _train(world, out) == 0
    d = tmp_path / "saelens"
    assert main(["sae-export", str(out), "--out", str(d)]) == 0
    assert "wrote" in capsys.readouterr().out
    cfg = json.loads((d / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 4 and cfg["metadata"]["hook_name"] == HOOK
    assert main(["sae-export", str(out), "--out", str(d)]) == 2  # a non-empty directory needs --overwrite
    assert "already exists" in capsys.readouterr().err
    assert main(["sae-export", str(out), "--out", str(d), "--overwrite"]) == 0
    back = tmp_path / "back.sae"
    assert main(["sae-import", str(d), "--model", str(world / "m.tinygpt"), "--out", str(back)]) == 0
    assert "pinned to" in capsys.readouterr().out
    from tinygpt import load

    model = load(world / "m.tinygpt")
    a, b = load_sae(out, model), load_sae(back, model)  # the pin survives the round trip
    x = torch.randn(7, 32)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-5)
    assert main(["sae-import", str(d), "--model", str(world / "other.tinygpt"), "--out", str(tmp_path / "o.sae")]) == 2
    assert "different model" in capsys.readouterr().err and not (tmp_path / "o.sae").exists()
    with pytest.raises(Exception, match="different model"):
        import_saelens(d, load(world / "other.tinygpt"))
    assert main(["sae-import", str(tmp_path / "nothing"), "--out", str(tmp_path / "n.sae")]) == 2
    assert "not an SAELens directory" in capsys.readouterr().err


def test_ctrl_c_then_resume_equals_the_uninterrupted_run(world, tmp_path, capsys, monkeypatch):
    from tinygpt.dictionary.trainer import Trainer

    full = tmp_path / "full.sae"
    assert _train(world, full) == 0
    real = Trainer.step

    def step(self, n, x, y):
        if n == 8:  # Ctrl-C in the middle of step 8: the file keeps the state of step 5 (--save-every 5)
            raise KeyboardInterrupt
        return real(self, n, x, y)

    monkeypatch.setattr(Trainer, "step", step)
    part = tmp_path / "part.sae"
    assert _train(world, part, "--save-every", "5") == 130
    assert "interrupted: step 7" in capsys.readouterr().out and load_sae(part).training_state["step"] == 5
    monkeypatch.setattr(Trainer, "step", real)
    args = ["sae", str(world / "m.tinygpt"), "--out", str(part), "--resume", "--no-progress", "--device", "cpu"]
    assert main([*args, "--corpus", str(world / "plays.txt")]) == 0
    a, b = load_sae(full), load_sae(part)
    assert a.training_state["history"] == b.training_state["history"]
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
