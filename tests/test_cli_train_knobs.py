"""`tinygpt train`'s architecture flags for the models people study (`tinygpt.cli.train._knob_config`): --rope,
--rope-theta, --rotary-pct, --norm, --mlp, --kv-heads, --no-bias, --parallel-residual become the GPTConfig fields
of the saved model, which then samples and is inspected like any other; bad combinations are one-line errors."""

from __future__ import annotations

import pytest

from tinygpt import load
from tinygpt.cli import main

LINES = ["ROMEO: But soft, what light through yonder window breaks?", "JULIET: O Romeo, Romeo! wherefore art thou?"]


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYGPT_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text(("\n".join(LINES) + "\n") * 40)
    return p


def train(corpus, out, *flags: str) -> int:
    args = ["train", "--preset", "nano", "--corpus", str(corpus), "--steps", "3", "--batch", "2", "--ctx", "32"]
    return main(
        [*args, "--warmup", "1", "--val-every", "0", "--out", str(out), "--no-progress", "--device", "cpu", *flags]
    )


def test_llama_flags_train_sample_and_inspect(corpus, tmp_path, capsys):
    out = tmp_path / "llama.tinygpt"
    flags = ("--rope", "--rope-theta", "500", "--norm", "rms", "--mlp", "swiglu", "--kv-heads", "1", "--no-bias")
    assert train(corpus, out, *flags) == 0
    cfg = load(out).cfg
    assert (cfg.positional_embedding_type, cfg.rotary_base, cfg.normalization_type) == ("rotary", 500.0, "RMS")
    assert (cfg.gated_mlp, cfg.act_fn, cfg.n_key_value_heads, cfg.bias) == (True, "silu", 1, False)
    capsys.readouterr()
    assert main(["sample", str(out), "--prompt", "ROMEO:", "--tokens", "8", "--seed", "0"]) == 0
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "n_key_value_heads=1" in text and "blocks.0.mlp.gate_proj.weight" in text and "pos_embed" not in text


def test_neox_flags(corpus, tmp_path):
    out = tmp_path / "neox.tinygpt"
    assert train(corpus, out, "--rope", "--rotary-pct", "0.25", "--parallel-residual", "--mlp", "geglu") == 0
    cfg = load(out).cfg
    assert cfg.rotary_dim == 8 and cfg.parallel_attn_mlp and cfg.gated_mlp and cfg.act_fn == "gelu"  # nano d_head 32


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (("--rope-theta", "500"), "need --rope"),
        (("--rope", "--rotary-pct", "0.03"), "even"),
        (("--rope", "--rotary-pct", "1.5"), "rotary-pct"),
        (("--kv-heads", "3"), "n_key_value_heads"),
        (("--rope", "--yoco"), "yoco"),
    ],
)
def test_bad_knob_flags_are_one_line_errors(corpus, tmp_path, capsys, flags, fragment):
    out = tmp_path / "bad.tinygpt"
    assert train(corpus, out, *flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tinygpt train: error:") and fragment in err[0], err
    assert not out.exists()
