"""Bad inputs a new user gives the `tinygpt` command and the library (issue 18): each gets exit code 2 and one
line naming the problem, no traceback, and nothing on disk changes (every file hashed before and after).

The table `CASES` runs in-process through `tinygpt.cli.main`; the targeted tests below it cover what a table row
cannot: exact resume after Ctrl-C with dropout, stale temp files, a full disk, the atomic Hugging Face export.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

import tinygpt
from tinygpt.checkpoint import OutputError, read_checkpoint
from tinygpt.cli import main
from tinygpt.io import atomic_write_bytes, check_output, check_writable, remove_stale_temps
from tinygpt.training.settings import UnknownSettingError

ROOT = Path(__file__).resolve().parents[1]
LINES = [
    "ROMEO: But soft, what light through yonder window breaks?",
    "JULIET: O Romeo, Romeo! wherefore art thou Romeo?",
    "ROMEO: Shall I hear more, or shall I speak at this?",
]
RUN = ["--batch", "2", "--ctx", "16", "--val-every", "0", "--warmup", "1", "--no-progress", "--device", "cpu"]


def _train(corpus: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [
        "train",
        "--preset",
        "nano",
        "--corpus",
        str(corpus),
        "--steps",
        str(steps),
        *RUN,
        "--out",
        str(out),
        *extra,
    ]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A folder of inputs every case may read and none may change: corpus, a training checkpoint (nano, step 4),
    a plain model, a finetune run, an SFT run, an HF export, a tokenizer directory, an existing directory."""
    d = tmp_path_factory.mktemp("world")
    mp = pytest.MonkeyPatch()
    mp.setenv("TINYGPT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    (d / "c.txt").write_text(("\n".join(LINES) + "\n") * 30)
    assert main(_train(d / "c.txt", d / "m.tinygpt", 4)) == 0
    model = tinygpt.load(d / "m.tinygpt")
    model.train_state = {}
    tinygpt.save(model, d / "plain.tinygpt")
    ft = ["finetune", str(d / "m.tinygpt"), "--corpus", str(d / "c.txt"), "--steps", "2", *RUN]
    assert main([*ft, "--out", str(d / "ft.tinygpt")]) == 0
    tinygpt.sft(
        d / "plain.tinygpt",
        ROOT / "data" / "sft_small.jsonl",
        steps=1,
        batch_size=2,
        val_every=0,
        out=d / "sft.tinygpt",
    )
    assert main(["export", str(d / "plain.tinygpt"), "--hf", str(d / "hf")]) == 0
    (d / "tok").mkdir()
    (d / "tok" / "tokenizer.json").write_text("{}")
    (d / "adir").mkdir()
    (d / "notes.lora").write_text("not an adapter")
    _write_bad_files(d)
    yield d
    mp.undo()


def _write_bad_files(d: Path) -> None:
    """Damaged copies of the plain model under every name a reading command may be given (`BAD_FILES`), plus bad
    JSONL data, a lens and an adapter of another model."""
    good = (d / "plain.tinygpt").read_bytes()
    (d / "trunc.tinygpt").write_bytes(good[: len(good) // 2])
    (d / "stub.tinygpt").write_bytes(good[:5])
    (d / "empty.tinygpt").write_bytes(b"")
    torch.save({"w": torch.zeros(2)}, d / "pickled.tinygpt")
    flipped = bytearray(good)
    flipped[-100] ^= 0xFF  # inside the last tensor's bytes: the recorded content hash no longer matches
    (d / "tampered.tinygpt").write_bytes(bytes(flipped))
    (d / "text.tinygpt").write_text("ROMEO: not a model\n")
    for name, change in (("wide", {"d_model": 128}), ("deep", {"n_layers": 3})):
        _with_config(good, change, d / f"{name}.tinygpt")
    (d / "notjson.jsonl").write_text('{"instruction": "a", "response": "b"}\nnot json at all\n')
    (d / "nokeys.jsonl").write_text('{"prompt": 3}\n')
    (d / "nothing.jsonl").write_text("")
    tinygpt.tokenizer.train_bpe(LINES * 20, 300, out=d / "bpe", progress=False)
    torch.manual_seed(1)
    tinygpt.save(tinygpt.GPT("nano"), d / "other.tinygpt")
    lora = ["lora", str(d / "other.tinygpt"), "--corpus", str(d / "c.txt"), "--steps", "1", *RUN]
    assert main([*lora, "--out", str(d / "other.lora")]) == 0


def _with_config(data: bytes, change: dict, out: Path) -> None:
    """A copy of a .tinygpt file whose manifest's config says `change` (tensors untouched: a hand-edited file)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    manifest = json.loads(header["__metadata__"]["tinygpt"])
    manifest["config"].update(change)
    header["__metadata__"]["tinygpt"] = json.dumps(manifest)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    out.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n :])


# The damaged model files of `_write_bad_files` and what the one line must say about each.
BAD_FILES = {
    "trunc": r"trunc.tinygpt is truncated",
    "stub": r"stub.tinygpt is not a .tinygpt file: only 5 bytes",
    "empty": r"empty.tinygpt is not a .tinygpt file: only 0 bytes",
    "pickled": r"pickled.tinygpt is a zip archive.*never unpickles",
    "tampered": r"tampered.tinygpt is corrupt: tensor content does not match",
    "text": r"text.tinygpt is not a .tinygpt",
    "wide": r"wide.tinygpt: its tensors do not match its config \(.*d_model=128.*\): \S+ is \[64, 64\] where it",
    "deep": r"deep.tinygpt: its tensors do not match its config \(n_layers=3.*16 tensors missing",
}
# Every command that reads a model, as argv with {m} for the model file (outputs are fresh paths).
READERS = {
    "inspect": ["inspect", "{m}"],
    "sample": ["sample", "{m}", "--tokens", "2"],
    "finetune": ["finetune", "{m}", "--corpus", "{w}/c.txt", "--steps", "2", "--out", "{w}/new.tinygpt", *RUN],
    "lora": ["lora", "{m}", "--corpus", "{w}/c.txt", "--steps", "2", "--out", "{w}/new.lora", *RUN],
    "sft": [
        "sft",
        "{m}",
        "--data",
        str(ROOT / "data" / "sft_small.jsonl"),
        "--steps",
        "1",
        "--out",
        "{w}/new.tinygpt",
        *RUN,
    ],
    "es": ["es", "{m}", "--steps", "1", "--out", "{w}/new.tinygpt", "--no-progress"],
    "magpie": ["magpie", "{m}", "--count", "1", "--out", "{w}/new.jsonl"],
    "eval": ["eval", "{m}", "--corpus", "{w}/c.txt", "--no-progress"],
    "memorization": ["memorization", "{m}", "--train", "{w}/c.txt", "--heldout", "{w}/c.txt"],
    "tuned-lens": ["tuned-lens", "{m}", "--steps", "1", "--out", "{w}/new.lenses", "--no-progress"],
    "export": ["export", "{m}", "--hf", "{w}/newhf"],
    "distill-teacher": ["distill", "nano", "--teacher", "{m}", "--steps", "1", "--out", "{w}/new.tinygpt", *RUN],
    "laser": ["laser", "{m}", "--target", "mlp.fc_in", "--rank-fraction", "0.5", "--out", "{w}/new.tinygpt"],
    "hqq": ["hqq", "{m}", "--out", "{w}/new.tinygpt"],
    "lora-merge": ["lora-merge", "{m}", "{w}/notes.lora", "--out", "{w}/new.tinygpt"],
}
FILE_CASES = [
    (f"{cmd}-{bad}", [a.replace("{m}", f"{{w}}/{bad}.tinygpt") for a in argv], {}, message)
    for cmd, argv in READERS.items()
    for bad, message in BAD_FILES.items()
    if not (cmd == "inspect" and bad in ("wide", "deep"))  # inspect shows such a file, with a warning (below)
]


def _hashes(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in d.rglob("*") if p.is_file()}


T = "{w}/m.tinygpt"  # the training checkpoint
# id, argv (with {w} = the world folder), environment, what the one-line error must say
CASES = [
    # defect 2: outputs checked before the first step
    ("train-out-dir", _train(Path("{w}/c.txt"), Path("{w}/adir"), 5), {}, r"adir is a directory"),
    ("train-out-readonly", _train(Path("{w}/c.txt"), Path("/sys/x.tinygpt"), 5), {}, r"cannot write /sys/x.tinygpt"),
    ("train-out-under-file", _train(Path("{w}/c.txt"), Path("{w}/c.txt/x.tinygpt"), 5), {}, r"c.txt is not a dir"),
    ("finetune-out-dir", ["finetune", T, "--out", "{w}/adir", *RUN], {}, r"adir is a directory"),
    ("sft-out-readonly", ["sft", T, "--data", "x.jsonl", "--out", "/sys/x.tinygpt", *RUN], {}, r"cannot write /sys"),
    ("distill-out-dir", ["distill", "nano", "--teacher", T, "--out", "{w}/adir", *RUN], {}, r"adir is a directory"),
    ("lora-out-dir", ["lora", T, "--out", "{w}/adir", *RUN], {}, r"adir is a directory"),
    ("lora-merge-out-dir", ["lora-merge", T, "{w}/notes.lora", "--out", "{w}/adir"], {}, r"adir is a directory"),
    ("es-out-readonly", ["es", T, "--out", "/sys/x.tinygpt", "--no-progress"], {}, r"cannot write /sys/x.tinygpt"),
    (
        "laser-out-dir",
        ["laser", T, "--target", "mlp.fc_in", "--rank-fraction", "0.5", "--out", "{w}/adir"],
        {},
        r"adir is a directory",
    ),
    ("hqq-out-readonly", ["hqq", T, "--out", "/sys/q.tinygpt"], {}, r"cannot write /sys/q.tinygpt"),
    ("tuned-lens-out-dir", ["tuned-lens", T, "--out", "{w}/adir", "--no-progress"], {}, r"adir is a directory"),
    ("import-out-dir", ["import", "{w}/hf", "--out", "{w}/adir"], {}, r"adir is a directory"),
    ("export-hf-file", ["export", T, "--hf", "{w}/c.txt"], {}, r"c.txt is a file"),
    ("export-hf-readonly", ["export", T, "--hf", "/sys/hfx"], {}, r"cannot write /sys/hfx"),
    ("tokenizer-out-file", ["tokenizer", "--vocab-size", "300", "--out", "{w}/c.txt"], {}, r"c.txt is a file"),
    ("magpie-out-dir", ["magpie", T, "--count", "1", "--out", "{w}/adir"], {}, r"adir is a directory"),
    ("leaderboard-out-dir", ["leaderboard", "{w}", "--out", "{w}/adir"], {}, r"adir is a directory"),
    # defect 3: no silent overwrites, never an input
    ("train-over-model", _train(Path("{w}/c.txt"), Path(T), 5), {}, r"m.tinygpt already exists; pass --overwrite"),
    ("train-over-corpus", _train(Path("{w}/c.txt"), Path("{w}/c.txt"), 5), {}, r"also this command's --corpus"),
    (
        "train-over-corpus-overwrite",
        _train(Path("{w}/c.txt"), Path("{w}/c.txt"), 5, "--overwrite"),
        {},
        r"also this command's --corpus",
    ),
    (
        "laser-over-input",
        ["laser", T, "--target", "mlp.fc_in", "--rank-fraction", "0.5", "--out", T],
        {},
        r"also this command's input.*--overwrite",
    ),
    ("hqq-over-input", ["hqq", T, "--out", T], {}, r"also this command's input"),
    ("finetune-over-existing", ["finetune", T, "--out", "{w}/ft.tinygpt", *RUN], {}, r"already exists"),
    ("sft-over-data", ["sft", T, "--data", "{w}/c.txt", "--out", "{w}/c.txt", *RUN], {}, r"--data input"),
    ("distill-over-teacher", ["distill", "nano", "--teacher", T, "--out", T, *RUN], {}, r"--teacher input"),
    ("es-over-existing", ["es", T, "--out", "{w}/plain.tinygpt", "--no-progress"], {}, r"already exists"),
    ("import-over-existing", ["import", "{w}/hf", "--out", T], {}, r"already exists; pass --overwrite"),
    ("export-over-export", ["export", T, "--hf", "{w}/hf"], {}, r"hf already exists; pass --overwrite"),
    (
        "tokenizer-over-existing",
        ["tokenizer", "--vocab-size", "300", "--out", "{w}/tok"],
        {},
        r"tokenizer.json already exists",
    ),
    ("tuned-lens-over-existing", ["tuned-lens", T, "--out", "{w}/c.txt", "--no-progress"], {}, r"already exists"),
    ("lora-merge-over-base", ["lora-merge", T, "{w}/notes.lora", "--out", T], {}, r"input"),
    ("magpie-over-existing", ["magpie", T, "--count", "1", "--out", "{w}/c.txt"], {}, r"already exists"),
    # defect 4: resume accepts only its own run
    ("resume-fewer-steps", _train(Path("{w}/c.txt"), Path(T), 2, "--resume"), {}, r"already at step 4"),
    (
        "resume-other-preset",
        [*_train(Path("{w}/c.txt"), Path(T), 6, "--resume"), "--preset", "tiny"],
        {},
        r"preset 'tiny'.*n_layers 2 -> 4",
    ),
    (
        "resume-other-dropout",
        _train(Path("{w}/c.txt"), Path(T), 6, "--resume", "--dropout", "0.2"),
        {},
        r"dropout 0.0 -> 0.2",
    ),
    (
        "train-resume-sft",
        ["train", "--out", "{w}/sft.tinygpt", "--resume", "--steps", "3", *RUN],
        {},
        r"not written by train\(\) but by sft\(\)",
    ),
    (
        "train-resume-finetune",
        ["train", "--out", "{w}/ft.tinygpt", "--resume", "--steps", "5", *RUN],
        {},
        r"but by finetune\(\)",
    ),
    (
        "sft-resume-finetune",
        ["sft", T, "--out", "{w}/ft.tinygpt", "--resume", "--steps", "5", *RUN],
        {},
        r"but by finetune\(\)",
    ),
    (
        "finetune-resume-other-base",
        ["finetune", "{w}/plain.tinygpt", "--out", "{w}/ft.tinygpt", "--resume", "--steps", "4", *RUN],
        {},
        r"fine-tunes .*m.tinygpt, not .*plain.tinygpt",
    ),
    (
        "resume-plain-model",
        _train(Path("{w}/c.txt"), Path("{w}/plain.tinygpt"), 6, "--resume"),
        {},
        r"holds no training state",
    ),
    (
        "resume-other-tokenizer",
        [*_train(Path("{w}/c.txt"), Path(T), 6, "--resume"), "--tokenizer", "{w}/bpe"],
        {},
        r"cannot resume .*m.tinygpt with tokenizer .*bpe: the run was tokenized with byte, vocab 256",
    ),
    ("resume-missing", _train(Path("{w}/c.txt"), Path("{w}/nope.tinygpt"), 6, "--resume"), {}, r"does not exist"),
    # defect 7: messages
    (
        "threads-negative",
        [*_train(Path("{w}/c.txt"), Path("{w}/new.tinygpt"), 2), "--threads", "-1"],
        {},
        r"--threads must be an integer >= 1",
    ),
    (
        "threads-env",
        _train(Path("{w}/c.txt"), Path("{w}/new.tinygpt"), 2),
        {"TINYGPT_THREADS": "zero"},
        r"TINYGPT_THREADS must be an integer >= 1",
    ),
    ("device-bogus", ["sample", T, "--device", "gpu0"], {}, r"--device gpu0.*not a device"),
    ("steps-zero", _train(Path("{w}/c.txt"), Path("{w}/new.tinygpt"), 0), {}, r"steps=0: must be an integer >= 1"),
    (
        "max-lr-nan",
        [*_train(Path("{w}/c.txt"), Path("{w}/new.tinygpt"), 2), "--max-lr", "nan"],
        {},
        r"max_lr=nan: must be a finite number > 0",
    ),
    (
        "val-split-one",
        [*_train(Path("{w}/c.txt"), Path("{w}/new.tinygpt"), 2), "--val-split", "1"],
        {},
        r"val_split=1.0: must be in \[0, 1\)",
    ),
    (
        "batch-zero",
        [*_train(Path("{w}/c.txt"), Path("{w}/new.tinygpt"), 2), "--batch", "0"],
        {},
        r"batch_size=0: must be an integer >= 1",
    ),
    ("sample-zero", ["sample", T, "--num-samples", "0"], {}, r"--num-samples must be >= 1"),
    ("sample-negative-tokens", ["sample", T, "--tokens", "-3"], {}, r"--tokens must be >= 0"),
    ("train-missing-corpus", _train(Path("{w}/none.txt"), Path("{w}/new.tinygpt"), 2), {}, r"none.txt"),
    ("inspect-missing", ["inspect", "{w}/none.tinygpt"], {}, r"none.tinygpt: no such file"),
    ("import-inconsistent", ["import", "{w}/adir", "--out", "{w}/new.tinygpt"], {}, r"adir has no config.json"),
]
N = "{w}/new.tinygpt"  # a fresh output path
SFT = ["sft", T, "--steps", "1", "--out", N, *RUN]
# bad data files, chat templates, surgery and sampling arguments, settings of every training command
ARG_CASES = [
    ("sft-notjson", [*SFT, "--data", "{w}/notjson.jsonl"], {}, r"notjson.jsonl:2: not valid JSON.*one JSON object"),
    ("sft-nokeys", [*SFT, "--data", "{w}/nokeys.jsonl"], {}, r"nokeys.jsonl:1: a record needs 'instruction'"),
    ("sft-no-records", [*SFT, "--data", "{w}/nothing.jsonl"], {}, r"nothing.jsonl holds no records"),
    ("sft-data-dir", [*SFT, "--data", "{w}/adir"], {}, r"adir does not exist \(or is not a file\)"),
    ("sft-template", [*SFT, "--data", "{w}/nokeys.jsonl", "--template", "bogus"], {}, r"unknown chat template"),
    ("laser-target", ["laser", T, "--target", "bogus", "--rank-fraction", "0.5", "--out", N], {}, r"unknown target"),
    ("laser-rank-0", ["laser", T, "--target", "mlp", "--rank-fraction", "0", "--out", N], {}, r"in \(0, 1\]"),
    ("laser-rank-2", ["laser", T, "--target", "mlp", "--rank-fraction", "2", "--out", N], {}, r"in \(0, 1\]"),
    (
        "laser-layer-range",
        ["laser", T, "--target", "mlp", "--rank-fraction", "0.5", "--layers", "9", "--out", N],
        {},
        r"layer 9 is out of range for a 2-layer model",
    ),
    (
        "laser-layer-parse",
        ["laser", T, "--target", "mlp", "--rank-fraction", "0.5", "--layers", "x-y", "--out", N],
        {},
        r"cannot parse layers 'x-y'",
    ),
    ("hqq-group", ["hqq", T, "--group-size", "7", "--out", N], {}, r"group_size 7 does not divide"),
    ("hqq-bits", ["hqq", T, "--bits", "0", "--out", N], {}, r"bits must be an int from 1 to 8"),
    ("hqq-target", ["hqq", T, "--target", "bogus", "--out", N], {}, r"unknown target 'bogus'"),
    ("eval-ctx", ["eval", T, "--corpus", "{w}/c.txt", "--ctx", "0", "--no-progress"], {}, r"ctx must be in \[1"),
    ("eval-stride", ["eval", T, "--corpus", "{w}/c.txt", "--stride", "0", "--no-progress"], {}, r"stride must be"),
    ("sample-temperature", ["sample", T, "--temperature", "-1"], {}, r"temperature must be >= 0"),
    ("sample-top-p", ["sample", T, "--top-p", "2"], {}, r"top_p must be in \(0, 1\]"),
    ("sample-top-k", ["sample", T, "--top-k", "0"], {}, r"top_k must be a positive integer"),
    ("sample-empty-prompt", ["sample", T, "--prompt", "", "--tokens", "3"], {}, r"prompt is empty"),
    ("train-corpus-dir", _train(Path("{w}/adir"), Path(N), 1), {}, r"adir holds no text files"),
    ("train-tokenizer-missing", [*_train(Path("{w}/c.txt"), Path(N), 1), "--tokenizer", "{w}/no"], {}, r"no does"),
    ("tokenizer-vocab", ["tokenizer", "--vocab-size", "10", "--out", "{w}/tk"], {}, r"vocab_size must be .* >= 257"),
    ("es-population", ["es", T, "--population", "1", "--out", N, "--no-progress"], {}, r"antithetic pairs"),
    ("es-sigma", ["es", T, "--sigma", "0", "--out", N, "--no-progress"], {}, r"sigma=0.0: must be the noise"),
    ("lora-rank", ["lora", T, "--rank", "0", "--out", "{w}/n.lora", *RUN], {}, r"rank must be a positive integer"),
    ("lora-alpha", ["lora", T, "--alpha", "-1", "--out", "{w}/n.lora", *RUN], {}, r"alpha must be > 0"),
    ("lora-targets", ["lora", T, "--targets", "bogus", "--out", "{w}/n.lora", *RUN], {}, r"matches no linear layer"),
    ("lora-layers", ["lora", T, "--layers", "7", "--out", "{w}/n.lora", *RUN], {}, r"layer 7 is out of range"),
    ("distill-temperature", ["distill", "nano", "--teacher", T, "--temperature", "0", "--out", N, *RUN], {}, r"> 0"),
    ("distill-alpha", ["distill", "nano", "--teacher", T, "--alpha", "2", "--out", N, *RUN], {}, r"in \[0, 1\]"),
    ("distill-teacher-missing", ["distill", "nano", "--teacher", "{w}/no", "--out", N, *RUN], {}, r"does not exist"),
    ("magpie-count", ["magpie", T, "--count", "0", "--out", "{w}/n.jsonl"], {}, r"count must be a positive"),
    ("leaderboard-empty", ["leaderboard", "{w}/adir"], {}, r"adir holds no .tinygpt files"),
    ("tuned-lens-steps", ["tuned-lens", T, "--steps", "0", "--out", "{w}/n.lenses", "--no-progress"], {}, r">= 1"),
    ("lora-merge-other-base", ["lora-merge", T, "{w}/other.lora", "--out", N], {}, r"other.lora is pinned to another"),
    (
        "sft-resume-other-base",
        ["sft", "{w}/other.tinygpt", "--out", "{w}/sft.tinygpt", "--resume", "--steps", "3", *RUN],
        {},
        r"that run fine-tunes .*plain.tinygpt, not .*other.tinygpt",
    ),
    ("tuned-lens-lr", ["tuned-lens", T, "--lr", "-1", "--out", "{w}/n.lenses", "--no-progress"], {}, r"lr must be > 0"),
]
CASES += FILE_CASES + ARG_CASES
if not torch.cuda.is_available():
    CASES.append(("device-cuda", ["sample", T, "--device", "cuda"], {}, r"--device cuda: .*CUDA.*--device cpu"))


@pytest.mark.parametrize("argv, env, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(world, argv, env, message, capsys, monkeypatch):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    before = _hashes(world)
    argv = [str(a).replace("{w}", str(world)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("tinygpt ")]
    assert len(lines) == 1 and lines[0].startswith(f"tinygpt {argv[0]}: error: "), err
    assert "Traceback" not in err and ".tmp" not in lines[0]
    assert __import__("re").search(message, lines[0]), lines[0]
    assert _hashes(world) == before, "a bad input changed a file"


def test_cases_are_many():
    assert len(CASES) >= 150


# ------------------------------------------------------------------------------------- what works instead
def test_overwrite_and_resume_are_the_ways_to_reuse_an_out(world, tmp_path, capsys):
    out = tmp_path / "m.tinygpt"
    shutil.copy(world / "m.tinygpt", out)
    assert main(_train(world / "c.txt", out, 2, "--overwrite")) == 0  # a new run, replacing the old one
    assert "warning: --overwrite replaces" in capsys.readouterr().err  # the old run was resumable
    assert read_checkpoint(out).train_state["step"] == 2
    assert main(_train(world / "c.txt", out, 3, "--resume")) == 0
    assert read_checkpoint(out).train_state["step"] == 3


def test_repeating_the_same_command_with_resume_works(world, tmp_path, capsys):
    """Unchanged architecture values are accepted (only a change is refused); a finished run is left as it is."""
    out = tmp_path / "d.tinygpt"
    cmd = _train(world / "c.txt", out, 3, "--dropout", "0.1", "--preset", "nano")
    assert main(cmd) == 0
    saved = out.read_bytes()
    with pytest.warns(UserWarning, match="already at step 3 of steps=3: nothing to train"):
        assert main([*cmd, "--resume"]) == 0
    assert out.read_bytes() == saved  # nothing to do: not rewritten
    cmd[cmd.index("--steps") + 1] = "5"
    assert main([*cmd, "--resume"]) == 0
    assert read_checkpoint(out).train_state["step"] == 5


def test_laser_over_a_training_checkpoint_warns_that_it_loses_the_run(world, tmp_path, capsys):
    out = tmp_path / "m.tinygpt"
    shutil.copy(world / "m.tinygpt", out)
    args = ["laser", str(out), "--target", "mlp.fc_in", "--rank-fraction", "0.5", "--out", str(out), "--overwrite"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "warning: --overwrite replaces" in captured.err and "optimizer state" in captured.err
    assert "holds the weights only" in captured.out
    assert read_checkpoint(out).optimizer == {}


def test_library_train_refuses_an_existing_out(world, tmp_path, monkeypatch):
    monkeypatch.setenv("TINYGPT_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "x.tinygpt"
    kw = dict(preset="nano", steps=1, batch_size=2, ctx=16, val_every=0, progress=False, device="cpu")
    tinygpt.train(None, world / "c.txt", out=out, **kw)
    with pytest.raises(OutputError, match="already exists; pass overwrite=True"):
        tinygpt.train(None, world / "c.txt", out=out, **kw)
    tinygpt.train(None, world / "c.txt", out=out, overwrite=True, **kw)
    with pytest.raises(OutputError, match="also an input"):
        tinygpt.train(None, world / "c.txt", out=world / "c.txt", overwrite=True, **kw)
    with pytest.raises(OutputError, match="is a directory"):
        tinygpt.train(None, world / "c.txt", out=tmp_path, **kw)
    with pytest.raises(UnknownSettingError, match="did you mean 'steps'"):
        tinygpt.train(stepz=3)


# ------------------------------------------------------------------------------------- the io helpers
@pytest.mark.parametrize(
    "make, kwargs, message",
    [
        (lambda d: d / "sub", {}, "is a directory"),
        (lambda d: d / "f" / "x.tinygpt", {}, "is not a directory"),
        (lambda d: d / "f", {"directory": True}, "is a file"),
        (lambda d: Path("/sys/x.bin"), {}, "cannot write /sys/x.bin"),
    ],
    ids=["dir-for-file", "file-as-parent", "file-for-dir", "read-only"],
)
def test_check_writable_names_the_users_path(tmp_path, make, kwargs, message):
    (tmp_path / "sub").mkdir()
    (tmp_path / "f").write_text("x")
    with pytest.raises(OSError, match=message):
        check_writable(make(tmp_path), **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "sub"]  # no probe or directory left


def test_check_writable_leaves_no_directories_it_made(tmp_path):
    check_writable(tmp_path / "a" / "b" / "x.tinygpt")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OSError, match="already exists"):
        (tmp_path / "x").write_text("1")
        check_output(tmp_path / "x")
    check_output(tmp_path / "x", overwrite=True)


def test_stale_temp_files_of_the_target_are_removed_on_the_next_save(tmp_path):
    target = tmp_path / "m.tinygpt"
    stale = [tmp_path / ".m.tinygpt.abcd1234.tmp", tmp_path / ".m.tinygpt.zz_99xyz.tmp"]
    others = [tmp_path / ".other.tinygpt.abcd1234.tmp", tmp_path / ".m.tinygpt.notes.txt"]
    for p in stale + others:
        p.write_bytes(b"partial")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in others)
    assert remove_stale_temps(target) == []


def test_disk_full_names_the_path_and_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "m.bin"
    target.write_bytes(b"old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("tinygpt.io.os.fsync", full)
    with pytest.raises(OSError, match=rf"cannot write {target}: No space left on device") as e:
        atomic_write_bytes(target, b"new")
    assert e.value.errno == errno.ENOSPC and ".tmp" not in str(e.value)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["m.bin"]


# ------------------------------------------------------------------------------------- Ctrl-C + resume
class _InterruptForward:
    """A forward hook raising KeyboardInterrupt in the `n`-th forward (after dropout drew its masks)."""

    def __init__(self, n: int):
        self.n, self.calls = n, 0

    def __call__(self, module, args, output):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt


@pytest.mark.parametrize("where", ["mid-step", "callback"])
def test_ctrl_c_then_resume_equals_the_uninterrupted_run_with_dropout(world, tmp_path, monkeypatch, where):
    monkeypatch.setenv("TINYGPT_CACHE_DIR", str(tmp_path / "cache"))
    kw = dict(
        preset="nano",
        model_config={"dropout": 0.1},
        steps=6,
        batch_size=2,
        accum=2,
        ctx=16,
        val_every=0,
        progress=False,
        device="cpu",
        seed=3,
    )
    full = tinygpt.train(None, world / "c.txt", out=tmp_path / "full.tinygpt", **kw)
    part = tmp_path / "part.tinygpt"
    if where == "callback":

        def stop(rec):
            if rec["step"] == 3:
                raise KeyboardInterrupt

        res = tinygpt.train(None, world / "c.txt", out=part, callbacks=[stop], **kw)
    else:
        hook = _InterruptForward(n=2 * 3 + 2)  # step 4's second micro-batch: step 4 is abandoned
        orig = tinygpt.GPT.__init__

        def init(self, *a, **k):
            orig(self, *a, **k)
            self.ln_final.register_forward_hook(hook)

        monkeypatch.setattr(tinygpt.GPT, "__init__", init)
        res = tinygpt.train(None, world / "c.txt", out=part, **kw)
        monkeypatch.undo()
        monkeypatch.setenv("TINYGPT_CACHE_DIR", str(tmp_path / "cache"))
    assert res.interrupted and read_checkpoint(part).train_state["step"] == 3
    rest = tinygpt.train(out=part, resume=True, progress=False, device="cpu")
    a, b = full.model.state_dict(), rest.model.state_dict()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


# ------------------------------------------------------------------------------------- HF export / import
def test_export_is_atomic_and_import_refuses_an_inconsistent_directory(world, tmp_path, monkeypatch):
    from tinygpt.interop import hf as hfmod
    from tinygpt.interop.hf import InteropError, export_hf, import_hf

    model = tinygpt.load(world / "plain.tinygpt")
    d = export_hf(model, tmp_path / "hf")
    before = _hashes(d)
    with pytest.raises(OutputError, match="already exists; pass overwrite=True"):
        export_hf(model, d)

    def broken(*a, **k):
        raise RuntimeError("disk full while writing the tokenizer")

    monkeypatch.setattr(hfmod, "hf_tokenizer", broken)
    with pytest.raises(InteropError, match=rf"cannot write the Hugging Face export {d}"):
        export_hf(model, d, overwrite=True)
    monkeypatch.undo()
    assert _hashes(d) == before and [p.name for p in tmp_path.iterdir()] == ["hf"]  # old export, no temp dir
    other = tinygpt.GPT(
        tinygpt.GPTConfig.preset("nano", n_layers=1, d_vocab=model.cfg.d_vocab), tokenizer=model.tokenizer
    )
    export_hf(other, d, overwrite=True)  # swapped in whole
    assert import_hf(d).cfg.n_layers == 1
    cfg = json.loads((d / "config.json").read_text())
    cfg["n_embd"] = 2 * cfg["n_embd"]  # a config.json that does not match the weights
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InteropError, match="not a consistent Hugging Face model directory"):
        import_hf(d)


def test_inspect_warns_when_the_tensors_do_not_match_the_config(world, capsys):
    assert main(["inspect", str(world / "wide.tinygpt")]) == 0
    out = capsys.readouterr().out
    assert "WARNING     the tensors do not match its config" in out and "this file will not load" in out
    assert main(["inspect", str(world / "plain.tinygpt")]) == 0
    assert "WARNING" not in capsys.readouterr().out


def test_library_es_refuses_its_input_and_an_existing_out(world, tmp_path):
    with pytest.raises(OutputError, match=r"also an input of this command"):
        tinygpt.es(world / "plain.tinygpt", steps=1, out=world / "plain.tinygpt", overwrite=True, progress=False)
    with pytest.raises(OutputError, match=r"ft.tinygpt already exists; pass overwrite=True"):
        tinygpt.es(world / "plain.tinygpt", steps=1, out=world / "ft.tinygpt", progress=False)
