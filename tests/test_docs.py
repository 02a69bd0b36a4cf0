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


def hook_table(marker: str = "hook-table") -> list[tuple[str, list[str], str]]:
    """(name, shape dims, explanation) for each row between the `<!-- {marker}:start/end -->` markers."""
    text = HOOKS_MD.read_text(encoding="utf-8")
    start, end = text.index(f"<!-- {marker}:start -->"), text.index(f"<!-- {marker}:end -->")
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


SWITCHES = ("set_use_attn_result", "set_use_split_qkv_input", "set_use_attn_in", "set_use_hook_mlp_in")


def test_documented_shapes_match_the_cache():
    torch.manual_seed(0)
    model = GPT(CFG).eval()
    tokens = torch.randint(0, DIMS["d_vocab"], (DIMS["batch"], DIMS["pos"]))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
        for switch in SWITCHES:  # the rows "only with `set_use_...(True)`" are checked with every switch on
            getattr(model, switch)(True)
        _, switched = model.run_with_cache(tokens)
    sizes = {**DIMS, "dest_pos": DIMS["pos"], "src_pos": DIMS["pos"]}
    for name, dims, what in hook_table():
        want = tuple(int(d) if d.isdigit() else sizes[d] for d in dims)
        gated = any(f"only with `{s}(True)`" in what for s in SWITCHES)
        for full in expand(name, CFG.n_layers):
            if gated:  # never called with the switches off
                assert full not in cache.cache_dict and tuple(switched[full].shape) == want, full
                continue
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


# ------------------------------------------------------------------------------------------------ YOCO
YOCO_CFG = CFG.replace(n_layers=4, yoco=True, yoco_window=3)  # window < pos: the band shows in the pattern


def expand_yoco(name: str, n_layers: int) -> list[str]:
    """`{s}`: self-decoder blocks 0 .. n_layers//2 - 1; `{c}`: cross-decoder blocks; `{i}`: every block."""
    half = n_layers // 2
    for key, layers in (("{s}", range(half)), ("{c}", range(half, n_layers)), ("{i}", range(n_layers))):
        if key in name:
            return [name.replace(key, str(i)) for i in layers]
    return [name]


def test_yoco_hook_table_matches_a_yoco_model():
    text = " ".join(HOOKS_MD.read_text(encoding="utf-8").split())
    assert "cross-decoder blocks have no `attn.hook_k` / `attn.hook_v`" in text
    torch.manual_seed(0)
    model = GPT(YOCO_CFG).eval()
    rows = hook_table("hook-table:yoco")
    cross = range(YOCO_CFG.n_layers // 2, YOCO_CFG.n_layers)
    absent = {f"blocks.{c}.attn.hook_{kv}" for c in cross for kv in "kv"}  # the stated exception
    main = {n for name, _, _ in hook_table() for n in expand(name, YOCO_CFG.n_layers)}
    documented = (main - absent) | {n for name, _, _ in rows for n in expand_yoco(name, YOCO_CFG.n_layers)}
    assert documented == set(model.hook_dict)
    tokens = torch.randint(0, DIMS["d_vocab"], (DIMS["batch"], DIMS["pos"]))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    sizes = {**DIMS, "dest_pos": DIMS["pos"], "src_pos": DIMS["pos"]}
    for name, dims, what in rows:
        assert what, name
        want = tuple(int(d) if d.isdigit() else sizes[d] for d in dims)
        for full in expand_yoco(name, YOCO_CFG.n_layers):
            assert tuple(cache[full].shape) == want, f"{full}: docs say {dims}, cache has {tuple(cache[full].shape)}"
    # "zero outside the band dest - yoco_window < src <= dest" (self) / "upper triangle 0" (cross)
    dest, src = torch.arange(DIMS["pos"])[:, None], torch.arange(DIMS["pos"])[None, :]
    band = (src <= dest) & (src > dest - YOCO_CFG.yoco_window)
    assert (cache["blocks.0.attn.hook_pattern"][..., ~band] == 0).all()
    assert (cache["blocks.3.attn.hook_pattern"][..., src > dest] == 0).all()
    assert (cache["blocks.3.attn.hook_pattern"][..., band.logical_not() & (src <= dest)] > 0).all()


# -------------------------------------------------------------------------------------- Mixture-of-Experts
MOE_CFG = CFG.replace(moe_experts=6, moe_topk=4)  # 6 and 4: distinct from every other dim


def test_moe_hook_table_matches_a_moe_model():
    torch.manual_seed(0)
    model = GPT(MOE_CFG).eval()
    rows = hook_table("hook-table:moe")
    absent = {f"blocks.{i}.mlp.hook_{h}" for i in range(MOE_CFG.n_layers) for h in ("pre", "post")}
    main = {n for name, _, _ in hook_table() for n in expand(name, MOE_CFG.n_layers)}
    documented = (main - absent) | {n for name, _, _ in rows for n in expand(name, MOE_CFG.n_layers)}
    assert documented == set(model.hook_dict)
    tokens = torch.randint(0, DIMS["d_vocab"], (DIMS["batch"], DIMS["pos"]))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    sizes = {**DIMS, "moe_experts": 6, "moe_topk": 4}
    for name, dims, what in rows:
        assert what, name
        want = tuple(int(d) if d.isdigit() else sizes[d] for d in dims)
        for full in expand(name, MOE_CFG.n_layers):
            assert tuple(cache[full].shape) == want, f"{full}: docs say {dims}, cache has {tuple(cache[full].shape)}"
    assert cache["blocks.0.moe.hook_router_logits"].dtype == torch.float32
    torch.testing.assert_close(cache["blocks.1.moe.hook_expert_weights"].sum(-1), torch.ones(2, 5))


# -------------------------------------------------------------------------------------- Mixture-of-Depths
MOD_CFG = CFG.replace(n_layers=4, mod=True, mod_capacity=0.8)  # routed = ceil(0.8 * 5) = 4 of pos = 5


def expand_mod(name: str, n_layers: int) -> list[str]:
    """`{r}`: the routed blocks (i % mod_every == mod_every - 1); `{i}`: every block."""
    if "{r}" in name:
        return [name.replace("{r}", str(i)) for i in range(n_layers) if i % 2 == 1]
    return expand(name, n_layers)


def test_mod_hook_table_matches_a_mod_model():
    from tinygpt.arch.mod import routing

    torch.manual_seed(0)
    model = GPT(MOD_CFG).eval()
    rows = hook_table("hook-table:mod")
    main = {n for name, _, _ in hook_table() for n in expand(name, MOD_CFG.n_layers)}
    documented = main | {n for name, _, _ in rows for n in expand_mod(name, MOD_CFG.n_layers)}
    assert documented == set(model.hook_dict)
    tokens = torch.randint(0, DIMS["d_vocab"], (DIMS["batch"], DIMS["pos"]))
    with torch.no_grad(), routing(model, "topk"):
        _, cache = model.run_with_cache(tokens)
    sizes = {**DIMS, "routed": 4}
    for name, dims, what in rows:
        assert what, name
        want = tuple(int(d) if d.isdigit() else sizes[d] for d in dims)
        for full in expand_mod(name, MOD_CFG.n_layers):
            assert tuple(cache[full].shape) == want, f"{full}: docs say {dims}, cache has {tuple(cache[full].shape)}"
    # the main table's other hooks keep their shapes in routed blocks (residual hooks: full pos)
    for i in (1, 3):
        for h in ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"):
            assert cache[f"blocks.{i}.hook_{h}"].shape == (2, 5, 24)
    # eval mode default (causal predictor): `routed` is the largest routed count in the batch
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    routed = int(cache["blocks.1.hook_routing_mask"].sum(1).max())
    assert cache["blocks.1.attn.hook_pattern"].shape == (2, 3, routed, routed)


# ------------------------------------------------------------------------------------ Differential attention
DIFF_CFG = CFG.replace(diff_attn=True)  # d_head 8: halves of 4


def test_diff_attn_hook_table_matches_a_diff_attn_model():
    text = " ".join(HOOKS_MD.read_text(encoding="utf-8").split())
    assert "There is no `attn.hook_attn_scores`" in text
    torch.manual_seed(0)
    model = GPT(DIFF_CFG).eval()
    rows = hook_table("hook-table:diff_attn")
    absent = {f"blocks.{i}.attn.hook_attn_scores" for i in range(DIFF_CFG.n_layers)}  # the stated exception
    main = {n for name, _, _ in hook_table() for n in expand(name, DIFF_CFG.n_layers)}
    documented = (main - absent) | {n for name, _, _ in rows for n in expand(name, DIFF_CFG.n_layers)}
    assert documented == set(model.hook_dict)
    tokens = torch.randint(0, DIMS["d_vocab"], (DIMS["batch"], DIMS["pos"]))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    sizes = {**DIMS, "dest_pos": DIMS["pos"], "src_pos": DIMS["pos"]}
    for name, dims, what in rows:
        assert what, name
        want = tuple(int(d) if d.isdigit() else sizes[d] for d in dims if d)  # `[]`: a scalar
        for full in expand(name, DIFF_CFG.n_layers):
            assert tuple(cache[full].shape) == want, f"{full}: docs say {dims}, cache has {tuple(cache[full].shape)}"
    # the stated convention: hook_pattern = pattern1 - λ pattern2, rows summing to 1 - λ
    for i in range(DIFF_CFG.n_layers):
        a = f"blocks.{i}.attn."
        lam = cache[a + "hook_lambda"]
        torch.testing.assert_close(
            cache[a + "hook_pattern"], cache[a + "hook_pattern1"] - lam * cache[a + "hook_pattern2"]
        )
        torch.testing.assert_close(cache[a + "hook_pattern"].sum(-1), (1 - lam).expand(2, 3, 5))


# --------------------------------------------------------------------------- Llama / Qwen2 / NeoX knobs
LLAMA_DIMS = {**DIMS, "n_heads": 6, "n_key_value_heads": 3}  # every dim distinct again
LLAMA_CFG = CFG.replace(
    n_heads=6, d_head=8, n_key_value_heads=3, positional_embedding_type="rotary", rotary_dim=4,
    normalization_type="RMS", gated_mlp=True, act_fn="silu", bias=False, parallel_attn_mlp=True,
)  # fmt: skip


def test_llama_hook_table_matches_a_model_with_every_knob():
    torch.manual_seed(0)
    model = GPT(LLAMA_CFG).eval()
    rows = hook_table("hook-table:llama")
    absent = {"hook_pos_embed"} | {f"blocks.{i}.hook_resid_mid" for i in range(LLAMA_CFG.n_layers)}
    main = {n for name, _, _ in hook_table() for n in expand(name, LLAMA_CFG.n_layers)}
    documented = (main - absent) | {n for name, _, _ in rows for n in expand(name, LLAMA_CFG.n_layers)}
    assert documented == set(model.hook_dict)
    tokens = torch.randint(0, DIMS["d_vocab"], (DIMS["batch"], DIMS["pos"]))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
        model.set_use_split_qkv_input(True)
        _, switched = model.run_with_cache(tokens)
    sizes = {**LLAMA_DIMS, "dest_pos": DIMS["pos"], "src_pos": DIMS["pos"]}
    for name, dims, what in rows:
        want = tuple(int(d) if d.isdigit() else sizes[d] for d in dims)
        acts = switched if "only with `set_use_split_qkv_input(True)`" in what else cache
        for full in expand(name, LLAMA_CFG.n_layers):
            assert tuple(acts[full].shape) == want, f"{full}: docs say {dims}, cache has {tuple(acts[full].shape)}"
    # the rest of the main table keeps its shapes (the query side keeps n_heads)
    assert cache["blocks.0.attn.hook_q"].shape == (2, 5, 6, 8)
    assert cache["blocks.0.attn.hook_pattern"].shape == (2, 6, 5, 5)
