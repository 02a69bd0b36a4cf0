"""Plain progress lines without a terminal (`tinygpt.training.logline`): the library (`log_every=`), the CLI with
stdout a pipe (`--log-every`), and the rule that a terminal keeps the tqdm bar."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tinygpt import train
from tinygpt.training import logline
from tinygpt.training.logline import LogLines, default_log_every

pytestmark = pytest.mark.usefixtures("isolated_cache")

LINE = re.compile(
    r"^step (\d+)/(\d+) \| loss \d+\.\d{4}( \| val loss \d+\.\d{4})? \| lr \d\.\d\de[-+]\d\d \| [\d,]+ tok/s \| "
    r"\d+s elapsed( \| eta \d+s)?$"
)


def _run(corpus, tmp_path, **kw):
    settings = dict(
        preset="nano", steps=6, batch_size=2, ctx=32, warmup=2, val_every=3, val_split=0.1, val_batches=1,
        device="cpu", cache_dir=tmp_path / "cache",
    )  # fmt: skip
    settings.update(kw)
    return train(corpus=corpus, **settings)


def test_default_interval():
    assert [default_log_every(n) for n in (1, 9, 20, 100, 500, 10_000)] == [1, 1, 2, 10, 50, 50]


def test_lines_without_a_terminal(make_corpus, tmp_path, capsys, monkeypatch):
    """No terminal, progress on (the default): one line at step 1, every `log_every` steps, at each validation
    and at the last step; no tqdm bar on stderr."""
    monkeypatch.setattr(logline, "interactive", lambda: False)
    res = _run(make_corpus(), tmp_path, log_every=2)
    out, err = capsys.readouterr()
    lines = [x for x in out.splitlines() if x.startswith("step ")]
    steps = [int(LINE.match(x).group(1)) for x in lines]
    assert steps == [1, 2, 3, 4, 6], out
    assert all(LINE.match(x) for x in lines), lines
    assert "val loss" in lines[2] and "val loss" in lines[4] and "val loss" not in lines[1]
    assert "eta" in lines[0] and "eta" not in lines[-1]
    assert f"loss {res.history[1]['loss']:.4f}" in lines[1]
    assert "train:" not in err and "it/s" not in err  # the bar is off


def test_automatic_interval_and_silence(make_corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(logline, "interactive", lambda: False)
    corpus = make_corpus()
    _run(corpus, tmp_path, steps=20, val_every=0)  # log_every=None: every 2 steps (10% of 20)
    steps = [int(x.split()[1].split("/")[0]) for x in capsys.readouterr().out.splitlines() if x.startswith("step ")]
    assert steps == [1, *range(2, 21, 2)]
    _run(corpus, tmp_path / "b", steps=4, progress=False)  # progress off, no log_every: silent
    _run(corpus, tmp_path / "c", steps=4, log_every=0)  # 0: never
    assert not [x for x in capsys.readouterr().out.splitlines() if x.startswith("step ")]


def test_terminal_keeps_the_bar(monkeypatch):
    monkeypatch.setattr(logline, "interactive", lambda: True)
    auto = LogLines(None, 100, progress=True)
    assert auto.bar and not auto.on
    explicit = LogLines(5, 100, progress=True)
    assert explicit.bar and explicit.on and explicit.every == 5
    monkeypatch.setattr(logline, "interactive", lambda: False)
    piped = LogLines(None, 100, progress=True)
    assert not piped.bar and piped.on and piped.every == 10
    assert not LogLines(None, 100, progress=True, main=False).on  # under torchrun only rank 0 prints


def test_format_of_es_records():
    lines = LogLines(1, 10, progress=True, rate=("evals_per_sec", "evals/s"))
    lines._acc_time, lines._acc_units = 2.0, 82
    text = lines.format({"step": 3, "reward": 0.25, "elapsed": 75.0, "evals_per_sec": 40.0})
    assert text == "step 3/10 | reward 0.2500 | 41 evals/s | 1m15s elapsed | eta 2m55s"


def test_cli_through_a_pipe(make_corpus, tmp_path):
    """`tinygpt train` with stdout and stderr pipes (a log file, nohup) prints plain lines, then its final line."""
    out = tmp_path / "m.tinygpt"
    cmd = [
        sys.executable, "-m", "tinygpt", "train", "--preset", "nano", "--corpus", str(make_corpus()), "--steps", "4",
        "--batch", "2", "--ctx", "32", "--warmup", "1", "--val-every", "0", "--device", "cpu", "--log-every", "2",
        "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "TINYGPT_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = [x for x in proc.stdout.splitlines() if x.startswith("step ")]
    assert [int(LINE.match(x).group(1)) for x in lines] == [1, 2, 4], proc.stdout
    assert proc.stdout.splitlines()[-1].startswith("done: step 4")
    assert "it/s" not in proc.stderr
