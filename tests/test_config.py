"""GPTConfig: presets, the documented parameter-count table, validation and serialisation."""

from __future__ import annotations

import json

import pytest
import torch

import tinygpt.config as config_module
from tinygpt import GPT, PRESETS, ConfigError, GPTConfig


def parse_param_table() -> dict[str, dict[str, int]]:
    """Rows of the preset table in the `tinygpt.config` module docstring, keyed by preset name."""
    lines = [ln.strip() for ln in config_module.__doc__.splitlines() if ln.strip().startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if set(cells[0]) <= set("-: "):
            continue  # the |---| separator row
        rows[cells[0]] = {h: int(c.replace(",", "")) for h, c in zip(header[1:], cells[1:])}
    return rows


TABLE = parse_param_table()


def test_docstring_table_lists_every_preset():
    assert set(TABLE) == set(PRESETS)
    for name, row in TABLE.items():
        assert {"params (vocab 256)", "params (vocab 49152)"} <= set(row), name


@pytest.mark.parametrize(
    "name, shape",
    [
        ("tiny", dict(n_layers=4, d_model=128, n_heads=4, n_ctx=256)),
        ("huge", dict(n_layers=12, d_model=256, n_heads=8, n_ctx=512)),
    ],
)
def test_documented_preset_shapes(name, shape):
    cfg = GPTConfig.preset(name)
    for key, value in shape.items():
        assert getattr(cfg, key) == value, key
    assert cfg.d_head == cfg.d_model // cfg.n_heads
    assert cfg.d_mlp == 4 * cfg.d_model


@pytest.mark.parametrize("name", list(PRESETS))
def test_docstring_table_matches_preset_config(name):
    cfg = GPTConfig.preset(name)
    row = TABLE[name]
    for key in ("n_layers", "d_model", "n_heads", "d_head", "n_ctx"):
        assert row[key] == getattr(cfg, key), (name, key)


@pytest.mark.parametrize("vocab", [256, 49152])
@pytest.mark.parametrize("name", list(PRESETS))
def test_docstring_param_counts_match_the_model(name, vocab):
    cfg = GPTConfig.preset(name, d_vocab=vocab)
    with torch.device("meta"):  # same modules and shapes, no memory or init cost
        model = GPT(cfg)
    counted = model.n_params()
    assert counted == sum(p.numel() for p in model.parameters())
    assert counted == cfg.n_params()
    assert counted == TABLE[name][f"params (vocab {vocab})"]


def test_n_params_with_tied_embeddings_counts_the_matrix_once():
    cfg = GPTConfig(n_layers=2, d_model=32, n_heads=2, n_ctx=64, tie_embeddings=True)
    untied = cfg.replace(tie_embeddings=False)
    assert GPT(cfg).n_params() == cfg.n_params() == untied.n_params() - cfg.d_vocab * cfg.d_model


def test_preset_overrides_and_unknown_preset():
    cfg = GPTConfig.preset("tiny", d_vocab=1000, dropout=0.1)
    assert (cfg.n_layers, cfg.d_vocab, cfg.dropout) == (4, 1000, 0.1)
    with pytest.raises(ConfigError, match="unknown preset 'tinny'.*did you mean 'tiny'"):
        GPTConfig.preset("tinny")
    with pytest.raises(ConfigError, match="n_layer"):
        GPTConfig.preset("tiny", n_layer=3)


def test_from_dict_rejects_unknown_keys_naming_them():
    good = GPTConfig(n_layers=2, d_model=32, n_heads=2).to_dict()
    with pytest.raises(ConfigError) as info:
        GPTConfig.from_dict({**good, "n_layer": 3})
    message = str(info.value)
    assert "'n_layer'" in message
    assert "did you mean 'n_layers'" in message
    with pytest.raises(ConfigError, match="frobnicate"):
        GPTConfig.from_dict({**good, "frobnicate": 1})
    with pytest.raises(ConfigError, match="expects a dict"):
        GPTConfig.from_dict([("n_layers", 2)])


def test_from_dict_does_not_accept_derived_tl_fields():
    # attn_only and the hook switches are read-only extras for TransformerLens, not saved fields.
    for name in ("attn_only", "use_attn_result", "use_split_qkv_input"):
        with pytest.raises(ConfigError, match=name):
            GPTConfig.from_dict({name: True})


@pytest.mark.parametrize(
    "bad, fragment",
    [
        (dict(n_layers=0), "n_layers"),
        (dict(n_layers=2.5), "n_layers"),
        (dict(n_layers=True), "n_layers"),
        (dict(d_model=-8), "d_model"),
        (dict(d_model=30, n_heads=4), "divisible"),
        (dict(d_vocab=0), "d_vocab"),
        (dict(n_ctx=0), "n_ctx"),
        (dict(d_mlp=0), "d_mlp"),
        (dict(dtype="float16"), "dtype"),
        (dict(act_fn="swish"), "act_fn"),
        (dict(attn_impl="flash"), "attn_impl"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
    ],
)
def test_bad_values_raise_config_error(bad, fragment):
    with pytest.raises(ConfigError, match=fragment):
        GPTConfig(**bad)
    with pytest.raises(ConfigError, match=fragment):
        GPTConfig.from_dict(bad)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_explicit_d_head_allows_non_divisible_width():
    cfg = GPTConfig(d_model=30, n_heads=4, d_head=8, n_layers=1, n_ctx=16)
    assert cfg.d_head == 8
    logits = GPT(cfg)(torch.randint(0, 256, (1, 5)))
    assert logits.shape == (1, 5, 256)


@pytest.mark.parametrize(
    "cfg",
    [
        GPTConfig(),
        GPTConfig.preset("huge", d_vocab=49152),
        GPTConfig(
            n_layers=3,
            d_model=48,
            n_heads=3,
            d_head=20,
            d_mlp=100,
            tie_embeddings=True,
            dtype="bfloat16",
            layer_norm_eps=1e-6,
            act_fn="gelu",
            dropout=0.1,
            init_std=0.01,
            attn_impl="eager",
        ),
    ],
)
def test_to_dict_from_dict_round_trip(cfg):
    d = cfg.to_dict()
    assert "device" not in d
    assert d["d_head"] == cfg.d_head and d["d_mlp"] == cfg.d_mlp  # derived values are saved resolved
    again = GPTConfig.from_dict(json.loads(json.dumps(d)))  # survives JSON (the checkpoint manifest)
    assert again == cfg
    assert again.to_dict() == d


def test_replace_validates_and_leaves_original_untouched():
    cfg = GPTConfig(n_layers=2, d_model=32, n_heads=2)
    other = cfg.replace(n_layers=3)
    assert (cfg.n_layers, other.n_layers) == (2, 3)
    with pytest.raises(ConfigError, match="n_heads"):
        cfg.replace(n_heads=0)


def test_transformer_lens_extras_present():
    cfg = GPTConfig()
    assert cfg.normalization_type == "LN"
    assert cfg.attn_only is False
    assert cfg.positional_embedding_type == "standard"
    assert cfg.device == "cpu"
