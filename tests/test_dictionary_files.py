"""tinygpt.dictionary.files: `.sae` files pinned to the model, and the SAELens layout round trip."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tinygpt import GPT, GPTConfig, save
from tinygpt.dictionary import (
    ARCHS,
    DictionaryConfig,
    DictionaryError,
    DictionaryFileError,
    DictionaryMismatchError,
    export_saelens,
    import_saelens,
    load_sae,
    make_dictionary,
    save_sae,
)
from tinygpt.dictionary.files import model_pin

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layers=2, d_model=32, n_heads=2, n_ctx=64)).eval()


def _trained_like(sae, seed=0):
    """Random weights everywhere, non-unit scales: what a trained, normalised dictionary looks like."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (0.3 if name == "threshold" else 0.0))
        sae.normalise_decoder_()
        sae.in_scale.fill_(2.5)
        sae.out_scale.fill_(2.5 if not sae.cfg.transcoder else 0.7)
        if sae.cfg.arch == "batchtopk":
            sae.threshold.fill_(0.2)
    return sae


def _sae(model, arch="topk", **kw):
    cfg = dict(arch=arch, d_in=32, d_sae=48, hook=HOOK, k=5)
    cfg.update(kw)
    sae = _trained_like(make_dictionary(DictionaryConfig(**cfg)))
    sae.base = model_pin(model)
    return sae


def test_sae_file_round_trip_and_pin(model, tmp_path):
    sae = _sae(model, "jumprelu")
    path = save_sae(sae, tmp_path / "d.sae")
    back = load_sae(path, model)
    for (k, a), b in zip(sae.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), k
    assert back.cfg == sae.cfg and back.base["fingerprint"] == sae.base["fingerprint"]
    other = GPT(GPTConfig(n_layers=2, d_model=32, n_heads=2, n_ctx=64))
    with pytest.raises(DictionaryMismatchError, match="trained on a different model"):
        load_sae(path, other)
    assert load_sae(path, other, check=False).cfg == sae.cfg  # on purpose: hooks and widths still checked
    wider = GPT(GPTConfig(n_layers=2, d_model=48, n_heads=2, n_ctx=64))
    with pytest.raises(DictionaryMismatchError, match="width 32 at blocks.0.hook_resid_post, where this model has"):
        load_sae(path, wider, check=False)


def test_damaged_and_foreign_files_are_refused(model, tmp_path):
    path = save_sae(_sae(model), tmp_path / "d.sae")
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    (tmp_path / "bad.sae").write_bytes(bytes(raw))
    with pytest.raises(DictionaryFileError, match="corrupt"):
        load_sae(tmp_path / "bad.sae")
    (tmp_path / "cut.sae").write_bytes(path.read_bytes()[:100])
    with pytest.raises(DictionaryFileError):
        load_sae(tmp_path / "cut.sae")
    save(model, tmp_path / "m.tinygpt")
    with pytest.raises(DictionaryFileError, match="model checkpoint"):
        load_sae(tmp_path / "m.tinygpt")
    with pytest.raises(DictionaryFileError, match="SAELens directory"):
        load_sae(tmp_path)
    with pytest.raises(DictionaryFileError, match="no such file"):
        load_sae(tmp_path / "none.sae")


@pytest.mark.parametrize("arch", ARCHS)
def test_saelens_round_trip(model, tmp_path, arch):
    sae = _sae(model, arch).eval()
    out = export_saelens(sae, tmp_path / arch)
    cfg = json.loads((out / "cfg.json").read_text())
    w = load_file(out / "sae_weights.safetensors")
    assert (
        cfg["architecture"]
        == {"topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu", "relu": "standard"}[arch]
    )
    assert (cfg["d_in"], cfg["d_sae"], cfg["metadata"]["hook_name"], cfg["hook_name"]) == (32, 48, HOOK, HOOK)
    assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
    assert w["W_enc"].shape == (32, 48) and w["W_dec"].shape == (48, 32) and w["b_dec"].shape == (32,)
    assert ("threshold" in w) == (arch in ("jumprelu", "batchtopk")) and cfg.get("k") == (5 if arch == "topk" else None)
    # the exported weights act on raw activations (SAELens' own formulas), with the normalisation folded in
    x = torch.randn(6, 32) * 3
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    if arch == "topk":
        kth = pre.topk(5, dim=-1).values[:, -1:]
        acts = torch.where(pre >= kth, pre.relu(), 0.0)
    elif "threshold" in w:
        acts = pre.relu() * (pre > w["threshold"])
    else:
        acts = pre.relu()
    with torch.no_grad():
        torch.testing.assert_close(acts @ w["W_dec"] + w["b_dec"], sae(x), rtol=1e-5, atol=1e-5)
        back = import_saelens(out, model)
        assert back.cfg.arch == arch and back.in_scale.item() == 1.0
        torch.testing.assert_close(back(x), sae(x), rtol=1e-5, atol=1e-5)
    again = export_saelens(back, tmp_path / f"{arch}-again")
    w2 = load_file(again / "sae_weights.safetensors")
    assert w.keys() == w2.keys() and all(torch.equal(w[k], w2[k]) for k in w)  # exact the second time


def test_saelens_transcoders_and_foreign_variants(model, tmp_path):
    tc = _sae(model, "relu", hook="blocks.1.ln2.hook_normalized", out_hook="blocks.1.hook_mlp_out", skip=True)
    out = export_saelens(tc, tmp_path / "tc")
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == "skip_transcoder" and cfg["d_out"] == 32 and not cfg["apply_b_dec_to_input"]
    assert cfg["metadata"]["hook_name_out"] == "blocks.1.hook_mlp_out"
    assert load_file(out / "sae_weights.safetensors")["W_skip"].shape == (32, 32)
    x = torch.randn(4, 32)
    with torch.no_grad():
        torch.testing.assert_close(import_saelens(out)(x), tc(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(DictionaryError, match="SAELens has no topk transcoder"):
        export_saelens(
            _sae(model, "topk", hook="blocks.1.ln2.hook_normalized", out_hook="blocks.1.hook_mlp_out"), tmp_path / "no"
        )
    # an SAELens TopK trained with rescale_acts_by_decoder_norm (unnormalised decoder rows) is folded on import
    g = torch.Generator().manual_seed(5)
    W_enc, W_dec = torch.randn(32, 48, generator=g), torch.randn(48, 32, generator=g) * 3
    b_enc, b_dec = torch.randn(48, generator=g), torch.randn(32, generator=g)
    d = tmp_path / "foreign"
    d.mkdir()
    save_file({"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec}, d / "sae_weights.safetensors")
    (d / "cfg.json").write_text(
        json.dumps(
            {
                "architecture": "topk",
                "d_in": 32,
                "d_sae": 48,
                "k": 4,
                "rescale_acts_by_decoder_norm": True,
                "apply_b_dec_to_input": True,
                "metadata": {"hook_name": HOOK},
            }
        )
    )
    sae = import_saelens(d, model)
    n = W_dec.norm(dim=-1)
    pre = ((x - b_dec) @ W_enc + b_enc) * n
    kth = pre.topk(4, dim=-1).values[:, -1:]
    ref = (torch.where(pre >= kth, pre.relu(), 0.0) / n) @ W_dec + b_dec
    with torch.no_grad():
        torch.testing.assert_close(sae(x), ref, rtol=1e-4, atol=1e-4)
    assert sae.base is None  # SAELens files carry no weights fingerprint
    (d / "cfg.json").write_text(json.dumps({"architecture": "gated", "d_in": 32, "d_sae": 48}))
    with pytest.raises(DictionaryFileError, match="not supported"):
        import_saelens(d)
    with pytest.raises(DictionaryFileError, match="not an SAELens directory"):
        import_saelens(tmp_path / "nothing")
