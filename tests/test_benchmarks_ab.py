"""benchmarks/ab.py (matched-parameter / matched-FLOPs A/B) and benchmarks/llama_throughput.py's reference."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import tinygpt

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


ab = _load("ab")
llama = _load("llama_throughput")


def test_matched_params_within_one_percent():
    base = tinygpt.GPTConfig.preset("nano")
    specs = ab.matched_configs(base, list(ab.CONFIGS), "params", ctx=32)
    target = specs["gpt2"]["params"]
    for name, s in specs.items():
        assert abs(s["params"] - target) / target < 0.01, (name, s["params"], target)
        assert s["cfg"].n_params() == s["params"]
    # the knobs are really on, and the widths really moved where the architecture adds parameters
    assert specs["llama"]["cfg"].gated_mlp and specs["llama"]["cfg"].n_kv_heads == 1
    assert specs["llama"]["cfg"].d_mlp < base.d_mlp and specs["moe"]["cfg"].d_mlp < base.d_mlp / 3


def test_matched_flops():
    base = tinygpt.GPTConfig.preset("nano")
    specs = ab.matched_configs(base, ["gpt2", "mod", "moe"], "flops", ctx=32)
    target = specs["gpt2"]["flops"]
    for name, s in specs.items():
        assert abs(s["flops"] - target) / target < 0.02, (name, s["flops"], target)
    assert specs["mod"]["cfg"].d_mlp > base.d_mlp  # MoD computes less per token: it gets a wider MLP


def test_llama_reference_is_the_same_function():
    cfg = llama.llama_config("nano", 256, 1)  # 2 query heads sharing 1 key/value head
    assert llama.function_difference(cfg) < 1e-5  # logits at large weights
    torch.manual_seed(0)
    ours, ref = tinygpt.GPT(cfg), llama.RefLlama(cfg)
    with torch.no_grad():
        for p_ref, p_ours in zip(ref.parameters(), ours.parameters(), strict=True):
            p_ref.copy_(p_ours)
    x, y = torch.randint(0, 256, (2, 24)), torch.randint(0, 256, (2, 24))
    lo, lr = ours(x, return_type="loss", targets=y), ref(x, y)
    torch.testing.assert_close(lo, lr, atol=1e-5, rtol=1e-5)
    lo.backward()
    lr.backward()
    for p_ref, p_ours in zip(ref.parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(p_ours.grad, p_ref.grad, atol=1e-5, rtol=1e-4)


def test_llama_reference_refuses_a_different_function(monkeypatch):
    monkeypatch.setattr(llama, "rotate_half", lambda x: x)  # a wrong rotary: the pre-timing check must catch it
    with pytest.raises(SystemExit, match="different function"):
        llama.measure(llama.llama_config("nano", 256, 1), batch=1, rounds=1, steps=1)


def test_ab_end_to_end_and_merge(tmp_path, capsys):
    args = ["--configs", "gpt2", "llama", "--steps", "3", "--warmup", "1", "--batch", "2", "--ctx", "32"]
    args += ["--seeds", "1", "--eval-chars", "2000"]
    for seed in (0, 1):
        ab.main([*args, "--seed-start", str(seed), "--out", str(tmp_path / f"s{seed}")])
    ab.main([*args, "--merge", str(tmp_path / "s0.json"), str(tmp_path / "s1.json"), "--out", str(tmp_path / "m")])
    out = capsys.readouterr().out
    merged = json.loads((tmp_path / "m.json").read_text())
    assert sorted((r["config"], r["seed"]) for r in merged["runs"]) == [
        ("gpt2", 0), ("gpt2", 1), ("llama", 0), ("llama", 1)
    ]  # fmt: skip
    for s in merged["summary"]:
        assert s["bpb"] > 0 and s["bpb_sd"] >= 0 and len(s["bpbs"]) == 2
    assert (tmp_path / "m.html").stat().st_size > 1000
    assert "| llama |" in out and "val bpb (mean ± sd)" in out
