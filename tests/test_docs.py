"""docs/hooks.md stays true: its hook table lists exactly the model's hook points with their real shapes,
and its Python examples run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tinygpt import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[1]
HOOKS_MD = ROOT / "docs" / "hooks.md"

# All dims distinct, so a swapped or mislabelled axis in the doc cannot match by accident.
DIMS = {"batch": 2, "pos": 5, "d_model": 24, "n_heads": 3, "d_head": 8, "d_mlp": 40, "d_vocab": 256}
CFG = GPTConfig(n_layers=3, d_model=24, n_heads=3, d_mlp=40, d_vocab=256, n_ctx=16)
ROW = re.compile(r"^\|\s*`(?P<name>[^`]+)`\s*\|\s*`(?P<shape>\[[^`]*\])`\s*\|(?P<what>.*)\|\s*$")


def hook_table() -> list[tuple[str, list[str], str]]:
    """(name, shape dims, explanation) for each row between the hook-table markers."""
    text = HOOKS_MD.read_text(encoding="utf-8")
    start, end = text.index("<!-- hook-table:start -->"), text.index("<!-- hook-table:end -->")
    lines = [ln.strip() for ln in text[start:end].splitlines() if ln.strip().startswith("|")]
    assert lines and lines[0].startswith("| hook | shape |"), "the hook table must start with its header row"
    rows = []
    for line in lines[1:]:
        if set(line) <= set("|-: "):
            continue  # the |---| separator row
        m = ROW.match(line)
        assert m, f"unparseable hook-table row in docs/hooks.md: {line!r}"
        dims = [d.strip() for d in m["shape"].strip("[]").split(",")]
        rows.append((m["name"], dims, m["what"].strip()))
    return rows


def expand(name: str, n_layers: int) -> list[str]:
    return [name.format(i=i) for i in range(n_layers)] if "{i}" in name else [name]


def test_table_is_well_formed():
    rows = hook_table()
    names = [name for name, _, _ in rows]
    assert len(rows) >= 20
    assert len(names) == len(set(names)), "duplicate rows"
    for name, dims, what in rows:
        assert what and what != "hook", f"{name} has no explanation"
        assert "{" not in name.replace("{i}", ""), name
        for d in dims:
            assert d in DIMS or d in ("dest_pos", "src_pos") or d.isdigit(), f"{name}: unknown dim {d!r}"


def test_documented_names_are_exactly_the_models_hooks():
    model = GPT(CFG)
    documented = {n for name, _, _ in hook_table() for n in expand(name, CFG.n_layers)}
    actual = set(model.hook_dict)
    assert documented - actual == set(), "documented but not in the model"
    assert actual - documented == set(), "in the model but not documented"


def test_documented_shapes_match_the_cache():
    torch.manual_seed(0)
    model = GPT(CFG).eval()
    tokens = torch.randint(0, DIMS["d_vocab"], (DIMS["batch"], DIMS["pos"]))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    sizes = {**DIMS, "dest_pos": DIMS["pos"], "src_pos": DIMS["pos"]}
    for name, dims, _ in hook_table():
        want = tuple(int(d) if d.isdigit() else sizes[d] for d in dims)
        for full in expand(name, CFG.n_layers):
            assert full in model.hook_dict, f"{full} is documented but is not a hook point"
            assert tuple(cache[full].shape) == want, f"{full}: docs say {dims}, cache has {tuple(cache[full].shape)}"


def test_docs_state_the_rules():
    text = HOOKS_MD.read_text(encoding="utf-8")
    for phrase in ("attn_impl", '"auto"', '"eager"', '"sdpa"', "hook_scale", "names_filter", "pos_slice",
                   'device="cpu"', "run_with_hooks", "NNsight"):  # fmt: skip
        assert phrase in text, phrase


@pytest.mark.slow
def test_python_examples_run(tmp_path):
    """Every ```python block, in order, as one script (a file: nnsight reads the trace's source).

    A subprocess keeps nnsight's import-time patching of torch out of this test session.
    """
    blocks = re.findall(r"```python\n(.*?)```", HOOKS_MD.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) >= 5
    script = tmp_path / "hooks_examples.py"
    script.write_text("\n\n".join(blocks) + "\nprint('examples ok')\n", encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "examples ok" in proc.stdout
