"""Triton set-up shared by the test files of our Triton kernels.

tests/test_arch_triton.py and tests/test_surgery_hqq_triton.py check the kernels in Triton's CPU interpreter;
tests/test_arch_triton_cuda.py checks them compiled on a CUDA GPU. Triton settles interpreter versus compiler
once, at its first import, from `TRITON_INTERPRET`. So an interpreter file calls `import_triton_interpreted()`
before importing anything that imports triton: it sets the variable while importing triton (unless triton is
already imported) and restores it at once, so other tests never see it. A file that finds triton settled the
other way skips its checks and re-runs itself in a fresh process (`fresh_process_test`).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def import_triton_interpreted() -> bool:
    """Skip the calling test module when triton is not installed; else import triton in interpreter mode (unless
    it is already imported). Returns True when triton runs interpreted in this process."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip(
            "triton is not installed (it is in the dev extras: pip install -e '.[dev]')", allow_module_level=True
        )
    if "triton" not in sys.modules:
        saved = {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "TRITON_DEFAULT_FP_FUSION")}
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences triton 3.9's notice; 1 is its default
        try:
            import triton.language  # noqa: F401  (settles: interpreter)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    from tinygpt.arch.triton import attention as triton_attn

    return triton_attn.interpreting()


def fresh_process_test(test_file: str, timeout: float = 900) -> Callable[[], None]:
    """A test that runs the whole of `test_file` in a fresh pytest process without `TRITON_INTERPRET` (so
    triton settles there as that file needs) and passes when that run passes."""

    def test_in_a_fresh_process():
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", test_file],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-4000:]

    return test_in_a_fresh_process


def compile_without_gpu(code: str, tmp_path: Path) -> str:
    """Run `code` (which compiles kernels for a GPU target with triton's own ptxas) in a fresh process with
    triton in compiled mode and a private kernel cache; returns its stdout (the test fails if it fails)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "triton-cache"), TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout
