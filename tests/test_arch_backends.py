"""Attention backend selection (`tinygpt.arch.backends`): `attn_impl` in auto/eager/sdpa/triton/mps.

The Triton kernel's numerics are checked in tests/test_arch_triton.py (Triton's CPU interpreter); here: the
rules, the fused SDPA path, and the errors for backends this machine (no CUDA, no MPS) cannot run.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from tinygpt import GPT, GPTConfig
from tinygpt.arch import backends
from tinygpt.arch.backends import BackendUnavailable
from tinygpt.arch.triton import attention as triton_attn
from tinygpt.cli import main
from tinygpt.config import ConfigError


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layers=2, d_model=32, n_heads=2, n_ctx=32, **kw))


@pytest.fixture
def no_interpreter(monkeypatch):
    """Triton as on a machine without a GPU where nobody asked for the interpreter (another test file may have
    imported triton in interpreter mode in this process)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(triton_attn, "_triton_interprets", lambda: False)


def test_config_accepts_the_backends():
    for impl in backends.IMPLS:
        assert GPTConfig(n_layers=1, d_model=8, n_heads=2, attn_impl=impl).attn_impl == impl
    with pytest.raises(ConfigError, match="attn_impl"):
        GPTConfig(n_layers=1, d_model=8, n_heads=2, attn_impl="flash")


def test_use_eager_rule():
    assert backends.use_eager("eager", False) and backends.use_eager("eager", True)
    for impl in ("auto", "sdpa", "triton"):
        assert not backends.use_eager(impl, False)
    assert backends.use_eager("auto", True)
    for impl in ("sdpa", "triton"):
        with pytest.raises(RuntimeError, match=f"attn_impl='{impl}' cannot expose attention scores/pattern"):
            backends.use_eager(impl, True)
    with pytest.raises(BackendUnavailable, match="attn_impl='mps' is not available"):
        backends.use_eager("mps", True, torch.device("cpu"))


def reference(q, k, v, past):
    t, n = q.shape[2], k.shape[2]
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(torch.arange(n)[None, :] > torch.arange(t)[:, None] + past, float("-inf"))
    return s.softmax(-1) @ v


@pytest.mark.parametrize(("t", "past"), [(7, 0), (1, 6), (3, 5)])  # prefill, one token, a chunk after a cache
def test_attend_sdpa_paths_equal_the_masked_softmax(t, past):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, t, 8, generator=g)
    k, v = torch.randn(2, 3, past + t, 8, generator=g), torch.randn(2, 3, past + t, 12, generator=g)
    want = reference(q, k, v, past)
    for impl in ("auto", "sdpa"):
        torch.testing.assert_close(backends.attend(q, k, v, past, 0.0, impl), want, atol=1e-6, rtol=1e-5)
    assert backends.backend_for("auto", q, k, v) == "sdpa"  # CPU: SDPA


def masked_reference(q, k, v, visible):
    """Softmax attention with an explicit visibility rule: visible(b, i, j) for query i, key j of row b."""
    b, t, n = q.shape[0], q.shape[2], k.shape[2]
    mask = torch.tensor([[[visible(r, i, j) for j in range(n)] for i in range(t)] for r in range(b)])[:, None]
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return s.masked_fill(~mask, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize(("t", "n", "window"), [(9, 9, 4), (9, 9, 12), (1, 4, 4), (3, 7, 5), (6, 6, 6)])
def test_sliding_window_attend_and_mask(t, n, window):
    """Query i is key position i + n - t and sees the `window` keys ending there (YOCO's self-decoder)."""
    g = torch.Generator().manual_seed(t + n)
    q, k, v = torch.randn(2, 3, t, 8, generator=g), torch.randn(2, 3, n, 8, generator=g), torch.randn(2, 3, n, 8)
    want = masked_reference(q, k, v, lambda r, i, j: i + n - t - window < j <= i + n - t)
    mask = backends.attn_mask(t, n, q.device, window=window)
    assert mask.shape == (t, n) and mask.sum(1).tolist() == [min(window, i + n - t + 1) for i in range(t)]
    for impl in ("auto", "sdpa"):
        got = backends.attend(q, k, v, n - t, 0.0, impl, window=window)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_scattered_query_positions_attend_and_mask():
    """q_pos: each query sits at its own key index (MoD routed queries over YOCO's shared keys)."""
    g = torch.Generator().manual_seed(0)
    q_pos = torch.tensor([[0, 4, 5, 9], [2, 3, 8, 1]])  # row 1 ends with a padding query at an earlier position
    q, k, v = torch.randn(2, 2, 4, 8, generator=g), torch.randn(2, 2, 10, 8, generator=g), torch.randn(2, 2, 10, 6)
    want = masked_reference(q, k, v, lambda r, i, j: j <= int(q_pos[r, i]))
    mask = backends.attn_mask(4, 10, q.device, q_pos=q_pos)
    assert mask.shape == (2, 1, 4, 10) and mask[:, 0].sum(-1).tolist() == (q_pos + 1).tolist()
    for impl in ("auto", "sdpa"):
        torch.testing.assert_close(backends.attend(q, k, v, 6, 0.0, impl, q_pos=q_pos), want, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="past=2 but the keys hold 10 positions for 4 queries"):
        backends.attend(q, k, v, 2)


@pytest.mark.parametrize("yoco", [False, True])
def test_auto_and_sdpa_and_eager_models_agree(yoco):
    tokens = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        outs = {
            impl: tiny(attn_impl=impl, yoco=yoco, yoco_window=6).eval()(tokens) for impl in ("auto", "sdpa", "eager")
        }
    torch.testing.assert_close(outs["auto"], outs["eager"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs["sdpa"], outs["eager"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("diff_attn", "yoco"), [(False, False), (True, False), (False, True), (True, True)])
def test_mps_backend_names_the_problem_on_this_machine(diff_attn, yoco):
    m = tiny(attn_impl="mps", diff_attn=diff_attn, yoco=yoco).eval()
    tokens = torch.zeros(1, 4, dtype=torch.long)
    expected = "MPS is not available" if not torch.backends.mps.is_available() else "move it with model.to"
    with pytest.raises(BackendUnavailable, match=f"attn_impl='mps' is not available: .*{expected}"):
        m(tokens)
    with pytest.raises(BackendUnavailable, match="attn_impl='mps'"):  # the eager path checks too
        m.run_with_cache(tokens)
    with pytest.raises(BackendUnavailable, match="attn_impl='mps'"):
        backends.check_backend("mps", "cpu")


@pytest.mark.parametrize(("diff_attn", "yoco"), [(False, False), (True, False), (False, True), (True, True)])
def test_triton_backend_without_cuda_names_the_problem(no_interpreter, diff_attn, yoco):
    m = tiny(attn_impl="triton", diff_attn=diff_attn, yoco=yoco).eval()
    with pytest.raises(BackendUnavailable, match="attn_impl='triton' is not available: the tensors are on 'cpu'.*CUDA"):
        m(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(BackendUnavailable, match="needs a CUDA GPU"):
        backends.check_backend("triton", "cpu")
    backends.check_backend("auto", "cpu")
    backends.check_backend("sdpa", "cpu")


def test_triton_backend_without_the_package_names_the_problem(no_interpreter, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    m = tiny(attn_impl="triton").eval()
    with pytest.raises(BackendUnavailable, match="triton package is not installed"):
        m(torch.zeros(1, 4, dtype=torch.long))


def test_cli_reports_an_unavailable_backend(no_interpreter, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TINYGPT_CACHE_DIR", str(tmp_path / "cache"))
    corpus = tmp_path / "c.txt"
    corpus.write_text("To be, or not to be, that is the question.\n" * 40)
    out = tmp_path / "m.tinygpt"
    argv = ["train", "--preset", "nano", "--attn-impl", "triton", "--steps", "2", "--corpus", str(corpus),
            "--batch", "2", "--ctx", "16", "--val-every", "0", "--out", str(out), "--no-progress",
            "--device", "cpu"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error: attn_impl='triton' is not available" in err and "CUDA" in err
    assert not out.exists()
