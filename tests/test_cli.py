"""The `tinygpt` command line, called in-process through `tinygpt.cli.main(argv)`: train, sample, inspect and
tokenizer (`tinygpt.cli.train`), one-line errors, the command registry, the shared flags (`tinygpt.cli._flags`)
and every command line of the README."""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import tinygpt.cli
from tinygpt import load, read_checkpoint
from tinygpt.cli import USER_ERRORS, build_parser, main
from tinygpt.cli._command import REGISTRY
from tinygpt.cli._flags import FLAGS, TRAINING_FLAGS

ROOT = Path(__file__).resolve().parents[1]

LINES = [
    "ROMEO: But soft, what light through yonder window breaks?",
    "JULIET: O Romeo, Romeo! wherefore art thou Romeo?",
    "ROMEO: Shall I hear more, or shall I speak at this?",
    "JULIET: 'Tis but thy name that is my enemy.",
]


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYGPT_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text(("\n".join(LINES) + "\n") * 30)  # ~6 KB
    return p


def train_args(corpus, out, steps=5, *extra):
    return [
        "train",
        "--preset",
        "nano",
        "--corpus",
        str(corpus),
        "--steps",
        str(steps),
        "--batch",
        "2",
        "--ctx",
        "32",
        "--warmup",
        "2",
        "--val-split",
        "0.1",
        "--val-every",
        "0",
        "--out",
        str(out),
        "--no-progress",
        "--device",
        "cpu",
        *extra,
    ]


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


@pytest.fixture
def trained(corpus, tmp_path, capsys):
    out = tmp_path / "m.tinygpt"
    assert main(train_args(corpus, out)) == 0
    capsys.readouterr()
    return out


# ------------------------------------------------------------------------------------------------ train
def test_train_prints_loss_and_writes_file(corpus, tmp_path, capsys):
    out = tmp_path / "m.tinygpt"
    assert main(train_args(corpus, out)) == 0
    line = last_line(capsys.readouterr().out)
    m = re.search(r"\bloss (\d+\.\d+)", line)
    assert m, line
    assert line.startswith("done: step 5")
    assert str(out) in line
    state = read_checkpoint(out).train_state
    assert state["step"] == 5
    assert float(m.group(1)) == pytest.approx(state["loss"], abs=5e-4)
    assert load(out).cfg.n_layers == 2  # the nano preset


def test_train_resume_continues(corpus, trained, capsys):
    first = read_checkpoint(trained).train_state["history"]
    assert main(train_args(corpus, trained, 8, "--resume")) == 0
    assert last_line(capsys.readouterr().out).startswith("done: step 8")
    state = read_checkpoint(trained).train_state
    assert state["step"] == 8
    assert [h["step"] for h in state["history"]] == list(range(1, 9))
    assert [h["loss"] for h in state["history"][:5]] == [h["loss"] for h in first]


def test_train_jsonl_text_field_and_resume_without_corpus(tmp_path, capsys):
    p = tmp_path / "docs.jsonl"
    p.write_text("".join(json.dumps({"body": line, "id": i}) + "\n" for i, line in enumerate(LINES * 30)))
    out = tmp_path / "j.tinygpt"
    assert main(train_args(p, out, 2, "--text-field", "body")) == 0
    assert main(["train", "--resume", "--out", str(out), "--steps", "3", "--no-progress", "--device", "cpu"]) == 0
    assert last_line(capsys.readouterr().out).startswith("done: step 3")
    assert read_checkpoint(out).train_state["step"] == 3


def test_train_with_validation(corpus, tmp_path, capsys):
    out = tmp_path / "v.tinygpt"
    args = train_args(corpus, out, 2)
    args[args.index("--val-every") + 1] = "2"
    assert main(args) == 0
    assert re.search(r"val loss \d+\.\d+", last_line(capsys.readouterr().out))


# ------------------------------------------------------------------------------------------------ sample
def test_sample_is_deterministic(trained, capsys):
    args = ["sample", str(trained), "--prompt", "ROMEO:", "--tokens", "30", "--seed", "3"]
    assert main(args) == 0
    a = capsys.readouterr().out
    assert main(args) == 0
    b = capsys.readouterr().out
    assert a == b and a.startswith("ROMEO:")
    assert main([*args[:-1], "4"]) == 0
    assert capsys.readouterr().out != a
    assert main([*args, "--no-cache"]) == 0  # the KV cache changes nothing
    assert capsys.readouterr().out == a


def test_sample_matches_library(trained, capsys):
    from tinygpt import generate

    assert (
        main(["sample", str(trained), "--prompt", "JULIET:", "--tokens", "20", "--seed", "1", "--temperature", "0.8"])
        == 0
    )
    out = capsys.readouterr().out
    expected = generate(load(trained), "JULIET:", 20, temperature=0.8, seed=1)
    assert out == expected + "\n"


def test_sample_num_samples(trained, capsys):
    assert main(["sample", str(trained), "--prompt", "A", "--tokens", "5", "--seed", "0", "--num-samples", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n---\n") == 2


# ------------------------------------------------------------------------------------------------ inspect
def test_inspect(trained, capsys):
    assert main(["inspect", str(trained)]) == 0
    out = capsys.readouterr().out
    model = load(trained)
    assert "blocks.0.mlp.fc_in.weight" in out and "blocks.1.attn.q_proj.bias" in out
    assert f"{model.n_params():,}" in out
    assert re.search(r"training\s+step=5", out)
    assert "optimizer" in out


# ---------------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_then_train_with_it(corpus, tmp_path, capsys):
    tok_dir = tmp_path / "tok"
    assert (
        main(["tokenizer", "--corpus", str(corpus), "--vocab-size", "300", "--out", str(tok_dir), "--no-progress"]) == 0
    )
    assert "vocab 300" in capsys.readouterr().out
    assert (tok_dir / "tokenizer.json").is_file()
    out = tmp_path / "bpe.tinygpt"
    assert main(train_args(corpus, out, 2, "--tokenizer", str(tok_dir))) == 0
    model = load(out)
    assert model.tokenizer.kind == "bpe" and model.tokenizer.vocab_size == 300
    assert model.cfg.d_vocab == 300
    capsys.readouterr()
    assert main(["sample", str(out), "--prompt", "ROMEO:", "--tokens", "5", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO:")


# ------------------------------------------------------------------------------------------------ errors
def assert_one_line_error(capsys, command: str, *patterns: str) -> None:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "Traceback" not in captured.err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"tinygpt {command}: error: ")
    for p in patterns:
        assert re.search(p, err), err


def test_missing_file(tmp_path, capsys):
    missing = str(tmp_path / "missing.tinygpt")
    assert main(["inspect", missing]) == 2
    assert_one_line_error(capsys, "inspect", "no such file", re.escape(missing))
    assert main(["sample", missing]) == 2
    assert_one_line_error(capsys, "sample", "no such file")


def test_corrupt_file(trained, capsys):
    data = bytearray(trained.read_bytes())
    data[-50] ^= 0xFF
    trained.write_bytes(bytes(data))
    assert main(["inspect", str(trained)]) == 2
    assert_one_line_error(capsys, "inspect", "corrupt", "sha256")
    trained.write_bytes(bytes(data[: len(data) // 2]))
    assert main(["sample", str(trained)]) == 2
    assert_one_line_error(capsys, "sample", "truncated")


def test_pickle_file(tmp_path, capsys):
    p = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, p)
    assert main(["inspect", str(p)]) == 2
    assert_one_line_error(capsys, "inspect", "never unpickles")


def test_missing_corpus_and_bad_settings(tmp_path, capsys):
    assert main(train_args(tmp_path / "nope.txt", tmp_path / "x.tinygpt")) == 2
    assert_one_line_error(capsys, "train", "does not exist")
    assert main(train_args(tmp_path / "nope.txt", tmp_path / "x.tinygpt", 0)) == 2
    assert_one_line_error(capsys, "train", "steps=0")
    assert main(train_args(tmp_path / "nope.txt", tmp_path / "x.tinygpt", 5, "--resume")) == 2
    assert_one_line_error(capsys, "train", "cannot resume")
    assert not (tmp_path / "x.tinygpt").exists()


def test_bad_tokenizer_path(corpus, tmp_path, capsys):
    assert main(train_args(corpus, tmp_path / "x.tinygpt", 1, "--tokenizer", str(tmp_path / "nodir"))) == 2
    assert_one_line_error(capsys, "train", "does not exist")


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["train", "--preset", "gigantic"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ module
def test_no_argv_at_import(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(sys, "argv", ["tinygpt", "--not-an-option"])
    importlib.reload(tinygpt.cli)  # would exit if the module parsed sys.argv on import
    monkeypatch.setattr(sys, "argv", ["tinygpt", "inspect", str(tmp_path / "none.tinygpt")])
    assert tinygpt.cli.main() == 2  # main() without argv reads sys.argv at call time
    assert_one_line_error(capsys, "inspect", "no such file")


def test_python_m_help():
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "tinygpt", "--help"], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stderr
    for command in ("train", "sample", "inspect", "tokenizer"):
        assert command in proc.stdout


# ------------------------------------------------------------------------------------------------ the parser
def readme_commands() -> list[list[str]]:
    """The argument lists of every `tinygpt ...` / `-m tinygpt ...` command in the README's command-line block."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("## On the command line", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        for part in line.split("&&"):
            words = shlex.split(part, comments=True)
            if "tinygpt" not in words:
                continue
            args = words[words.index("tinygpt") + 1 :]
            commands.append([w for w in args if w != "..."])  # "tinygpt train ... --resume": the flags shown
    return commands


def test_every_readme_command_parses():
    commands = readme_commands()
    assert len(commands) >= 20
    named = {c[0] for c in commands}
    assert {"train", "sample", "inspect", "tokenizer", "laser", "hqq", "eval", "leaderboard", "es"} <= named
    for args in commands:
        parsed = build_parser().parse_args(args)  # SystemExit (a failed test) on an unknown flag or choice
        assert parsed.command == args[0]


def _option_snapshot(action: argparse.Action) -> dict:
    return {
        "dest": action.dest,
        "type": getattr(action.type, "__name__", None),
        "choices": list(action.choices) if action.choices else None,
        "required": action.required,
        "action": type(action).__name__,
        "nargs": action.nargs,
    }


#: flags added after the snapshot (issue 18: an existing output is replaced only with --overwrite)
ADDED_SINCE = {"--overwrite", "--architecture", "--float32", "--n-ctx"}  # --architecture, ...: HF interop
ADDED_SINCE |= {"--param-dtype", "--compile", "--log-every"}  # training at the hardware's limit (issue 17)
ADDED_SINCE |= {
    "--rope",
    "--rope-theta",
    "--rotary-pct",
    "--norm",
    "--mlp",
    "--kv-heads",
    "--no-bias",
    "--parallel-residual",
}
ADDED_COMMANDS = {"sae", "sae-eval", "sae-export", "sae-import"}  # sparse dictionaries (issue 14)


def test_every_command_and_flag_of_before_the_restructure_is_kept():
    """tests/fixtures/cli_flags.json: each command's positionals and options as the pre-restructure CLI declared
    them. Every one is still there with the same meaning; a default may only have become the None sentinel of a
    flag whose library default is the old value."""
    from tinygpt.training import TrainConfig
    from tinygpt.training.es import ESConfig

    old = json.loads((ROOT / "tests" / "fixtures" / "cli_flags.json").read_text())
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) - set(old) == ADDED_COMMANDS and set(old) <= set(sub.choices)
    library = {"train": TrainConfig(), "es": ESConfig()}
    es_fields = {"batch": "batch_size", "tokens": "max_new_tokens"}
    for name, want in old.items():
        p = sub.choices[name]
        assert [a.dest for a in p._actions if not a.option_strings] == want["positionals"], name
        options = {o: a for a in p._actions for o in a.option_strings if not isinstance(a, argparse._HelpAction)}
        assert set(options) - ADDED_SINCE == set(want["options"]), name
        for opt, spec in want["options"].items():
            a = options[opt]
            assert _option_snapshot(a) == {k: v for k, v in spec.items() if k != "default"}, (name, opt)
            if (name, opt) == ("train", "--preset"):  # None: "tiny" for a new run, the run's own on --resume
                assert a.default is None and spec["default"] == "tiny"
                continue
            if a.default != spec["default"]:
                assert a.default is None and name in library, (name, opt, a.default)
                field = TRAINING_FLAGS[a.dest][0] if name == "train" else es_fields.get(a.dest, a.dest)
                assert getattr(library[name], field) == spec["default"], (name, opt)


def _declared_options(path: Path) -> list[str]:
    """The option strings a module passes to `add_argument` itself (not through `_flags.add`)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            out += [a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("-")]
    return out


def test_shared_flags_are_declared_once():
    cli_dir = ROOT / "tinygpt" / "cli"
    where: dict[str, list[str]] = {}
    for path in sorted(cli_dir.glob("*.py")):
        if path.name != "_flags.py":
            for opt in _declared_options(path):
                where.setdefault(opt, []).append(path.name)
    for opt in ("--corpus", "--text-field", "--device", "--threads", "--seed", "--out", "--no-progress"):
        assert opt in FLAGS and opt not in where, (opt, where.get(opt))
    for dest in TRAINING_FLAGS:
        assert "--" + dest.replace("_", "-") in FLAGS
    assert not set(FLAGS) & set(where), "declared outside tinygpt/cli/_flags.py"
    # the only options declared in two places mean different things there
    twice = {opt: files for opt, files in where.items() if len(files) > 1}
    assert twice == {
        "--heldout": ["eval.py", "eval.py"],  # eval/leaderboard: a fraction; memorization: the examples' file
        "--targets": ["lora.py", "surgery.py"],  # lora: comma-separated; laser/hqq: one or more words
        "--hook": ["sae.py", "sae.py"],  # sae: a comma list (one dictionary each); sae-import: the one hook to use
    }


def test_the_registry_builds_the_parser_and_commands_are_the_handlers():
    assert list(REGISTRY)[:4] == ["train", "sample", "inspect", "tokenizer"]
    assert tinygpt.cli.COMMANDS == {name: c.run for name, c in REGISTRY.items()}
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert list(sub.choices) == list(REGISTRY)


def test_train_resume_passes_exactly_the_flags_given(monkeypatch, tmp_path, capsys):
    """--resume overrides only what was given, also a value equal to the default; nothing re-parses defaults."""
    import tinygpt.training

    calls = []
    fake = SimpleNamespace(history=[{"loss": 1.0}], step=8, final_val_loss=None, elapsed=0.1, interrupted=False)

    def train(**kwargs):
        calls.append(kwargs)
        return SimpleNamespace(**vars(fake), path=kwargs["out"])

    monkeypatch.setattr(tinygpt.training, "train", train)
    parsers = []
    real = tinygpt.cli.build_parser
    monkeypatch.setattr(tinygpt.cli, "build_parser", lambda: parsers.append(1) or real())
    out = str(tmp_path / "r.tinygpt")
    assert main(["train", "--resume", "--out", out, "--steps", "8", "--seed", "1337", "--val-every", "100"]) == 0
    assert len(parsers) == 1
    (kw,) = calls
    assert kw["resume"] is True and kw["out"] == out and kw["model_config"] == {}
    assert {k: kw[k] for k in ("steps", "seed", "val_every")} == {"steps": 8, "seed": 1337, "val_every": 100}
    assert not {f for f, _ in TRAINING_FLAGS.values()} - {"steps", "seed", "val_every"} & set(kw)
    assert last_line(capsys.readouterr().out).startswith("done: step 8")
    calls.clear()
    assert main(["train", "--preset", "nano", "--no-progress"]) == 0  # a new run: TrainConfig's defaults
    assert calls[0]["out"] == "nano.tinygpt" and not set(calls[0]) & {f for f, _ in TRAINING_FLAGS.values()}


def test_user_errors_are_every_tinygpt_error_plus_value_and_os_errors():
    from tinygpt.arch.backends import BackendUnavailable
    from tinygpt.checkpoint import CheckpointError
    from tinygpt.config import ConfigError
    from tinygpt.data import CorpusError
    from tinygpt.errors import TinyGPTError
    from tinygpt.tokenizer import TokenizerError
    from tinygpt.training import TrainingDiverged

    assert USER_ERRORS == (TinyGPTError, ValueError, OSError)
    for cls in (BackendUnavailable, CheckpointError, ConfigError, CorpusError, TokenizerError, TrainingDiverged):
        assert issubclass(cls, USER_ERRORS), cls  # what the CLI printed as one line before stays one line
        assert issubclass(cls, TinyGPTError), cls


def test_a_multi_line_error_is_printed_on_one_line(monkeypatch, capsys):
    from tinygpt.errors import TinyGPTError

    def boom(a):
        raise TinyGPTError("first line\nsecond line")

    monkeypatch.setitem(REGISTRY, "inspect", REGISTRY["inspect"].__class__("inspect", "", lambda p: None, boom))
    monkeypatch.setattr(tinygpt.cli, "build_parser", lambda: _bare_parser("inspect"))
    assert main(["inspect"]) == 2
    assert_one_line_error(capsys, "inspect", "first line second line")


def _bare_parser(name: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinygpt")
    parser.add_subparsers(dest="command", required=True).add_parser(name)
    return parser
