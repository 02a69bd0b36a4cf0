"""Crashes and full disks (issue 18): a real `tinygpt train` killed with SIGKILL at random moments always leaves a
file that loads (the old or the new version) and resumes exactly; SIGINT saves and resumes exactly; a full disk
(a tiny tmpfs mounted inside the test, as root) fails with one line naming the path and leaves the old file.

A handful of kill trials run in every CI run; `-m slow` runs 50.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import tinygpt
from tinygpt.checkpoint import read_checkpoint

LINES = "ROMEO: But soft, what light through yonder window breaks?\nJULIET: O Romeo, Romeo!\n" * 40
STEPS = 12
ENV = {**os.environ, "TINYGPT_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _argv(corpus: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "tinygpt",
        "train",
        "--preset",
        "nano",
        "--corpus",
        str(corpus),
        "--steps",
        str(STEPS),
        "--batch",
        "2",
        "--ctx",
        "16",
        "--dropout",
        "0.1",
        "--seed",
        "3",
        "--val-every",
        "0",
        "--warmup",
        "1",
        "--save-every",
        "1",
        "--no-progress",
        "--device",
        "cpu",
        "--out",
        str(out),
        *extra,
    ]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The corpus and the final weights of an uninterrupted run."""
    d = tmp_path_factory.mktemp("crash")
    ENV["TINYGPT_CACHE_DIR"] = str(d / "cache")
    (d / "c.txt").write_text(LINES)
    subprocess.run(_argv(d / "c.txt", d / "full.tinygpt"), env=ENV, check=True, capture_output=True)
    return d, tinygpt.load(d / "full.tinygpt").state_dict()


def _temps(out: Path) -> list[Path]:
    return [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.") and p.name.endswith(".tmp")]


def _kill_and_resume(reference, tmp_path: Path, seed: int, sig: int = signal.SIGKILL) -> None:
    d, final = reference
    out = tmp_path / f"run{seed}.tinygpt"
    rng = random.Random(seed)
    proc = subprocess.Popen(_argv(d / "c.txt", out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not out.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(rng.uniform(0.0, 0.4))  # somewhere in the run: often in the middle of a save
    proc.send_signal(sig)
    proc.wait(timeout=120)
    if out.exists():  # the old or the new version, never a torn one
        ckpt = read_checkpoint(out)  # verifies the content hash
        killed_at = ckpt.train_state["step"]
        assert 1 <= killed_at <= STEPS
        done = subprocess.run([*_argv(d / "c.txt", out), "--resume"], env=ENV, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    else:  # killed before the first save finished: nothing to resume, a fresh run
        killed_at = 0
        subprocess.run(_argv(d / "c.txt", out), env=ENV, check=True, capture_output=True)
    assert _temps(out) == [], "a stale temp file survived the next save"
    got = tinygpt.load(out).state_dict()
    assert [k for k in final if not torch.equal(final[k], got[k])] == [], (
        f"resume after a kill at step {killed_at} is not exact"
    )


@pytest.mark.parametrize("seed", range(4))
def test_sigkill_at_a_random_moment_then_resume_is_exact(reference, tmp_path, seed):
    _kill_and_resume(reference, tmp_path, seed)


def test_sigint_saves_and_resume_is_exact(reference, tmp_path):
    _kill_and_resume(reference, tmp_path, 100, sig=signal.SIGINT)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(1000, 1050))
def test_sigkill_fifty_trials(reference, tmp_path, seed):
    _kill_and_resume(reference, tmp_path, seed)


# ------------------------------------------------------------------------------------- a full disk
@pytest.fixture
def tiny_disk(tmp_path):
    """A 400 KiB tmpfs (smaller than a nano model's 0.55 MB file), mounted for the test and unmounted after."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tinygpt", *argv], env=ENV, capture_output=True, text=True)


def _one_line_naming(r: subprocess.CompletedProcess, path: Path) -> None:
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("tinygpt ")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert str(path) in lines[0] and "No space left on device" in lines[0] and ".tmp" not in lines[0], lines[0]


def test_disk_full_on_save_keeps_the_old_file(tiny_disk, tmp_path):
    small = tiny_disk / "m.tinygpt"
    small.write_bytes(b"old version")  # a file the failed save must leave as it was
    with pytest.raises(OSError, match=rf"\[Errno 28\] cannot write {small}: No space left on device"):
        tinygpt.save(tinygpt.GPT("nano"), small)
    assert small.read_bytes() == b"old version" and [p.name for p in tiny_disk.iterdir()] == ["m.tinygpt"]


def test_disk_full_on_every_writing_command(reference, tiny_disk):
    d, _ = reference
    filler = tiny_disk / "filler"
    filler.write_bytes(b"x" * (400 * 1024 - 8 * 1024))  # 8 KiB left: room for the preflight's empty probe file only
    out = tiny_disk / "new.tinygpt"
    model = str(d / "full.tinygpt")
    cases = {
        out: ["train", *_argv(d / "c.txt", out)[4:-2], "--out", str(out)],
        tiny_disk / "laser.tinygpt": ["laser", model, "--target", "mlp", "--rank-fraction", "0.9", "--out"],
        tiny_disk / "hqq.tinygpt": ["hqq", model, "--bits", "8", "--out"],
        tiny_disk / "hf": ["export", model, "--hf"],
        tiny_disk / "tok": ["tokenizer", "--corpus", str(d / "c.txt"), "--vocab-size", "400", "--out"],
    }
    for target, argv in cases.items():
        r = _cli(*argv) if argv[0] == "train" else _cli(*argv, str(target))
        _one_line_naming(r, target)
        left = sorted(p.name for p in tiny_disk.iterdir())
        assert left == ["filler"], f"{argv[0]} left {left}"
