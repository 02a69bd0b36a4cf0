"""`.tinygpt` checkpoints: exact round trips, `describe`, atomic writes and clear errors on bad files."""

from __future__ import annotations

import json
import pickle
import re
import struct
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

import tinygpt.io
from tinygpt import GPT, CheckpointError, GPTConfig, describe, load, read_checkpoint, save, train_bpe
from tinygpt.checkpoint import load_optimizer_state, model_fingerprint, register_swap, set_module

TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 20


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYGPT_CACHE_DIR", str(tmp_path / "cache"))


def tiny_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(n_layers=2, d_model=32, n_heads=2, n_ctx=64)
    cfg.update(overrides)
    return GPT(GPTConfig(**cfg))


def batch_loss(model: GPT, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 16), generator=g)
    with torch.no_grad():
        return model(tokens, return_type="loss")


def assert_same_state(a: GPT, b: GPT) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


def data_offset(path) -> int:
    """Byte offset of the tensor data region of a safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return 8 + n


# ----------------------------------------------------------------------------------------- round trips
def test_round_trip_byte_tokenizer(tmp_path):
    model = tiny_model()
    path = save(model, tmp_path / "m.tinygpt")
    assert path.exists()
    loaded = load(path)
    assert_same_state(model, loaded)
    assert loaded.cfg.to_dict() == model.cfg.to_dict()
    assert loaded.tokenizer.to_dict() == model.tokenizer.to_dict() == {"type": "byte"}
    assert torch.equal(batch_loss(loaded), batch_loss(model))
    assert not loaded.training  # loaded for inference


def test_round_trip_bpe_tokenizer(tmp_path):
    tok = train_bpe([TEXT], 300, progress=False)
    assert tok.vocab_size > 256
    model = tiny_model(d_vocab=tok.vocab_size)
    model.tokenizer = tok
    loaded = load(save(model, tmp_path / "bpe.tinygpt"))
    assert_same_state(model, loaded)
    assert loaded.tokenizer.kind == "bpe"
    assert loaded.tokenizer.vocab_size == tok.vocab_size
    assert loaded.tokenizer.fingerprint == tok.fingerprint
    assert loaded.tokenizer.eos_id == tok.eos_id
    sample = "Whether 'tis nobler, or not?"
    assert loaded.tokenizer.encode(sample) == tok.encode(sample)
    assert loaded.tokenizer.decode(tok.encode(sample)) == sample
    assert torch.equal(batch_loss(loaded), batch_loss(model))


def test_round_trip_tied_embeddings(tmp_path):
    model = tiny_model(tie_embeddings=True)
    path = save(model, tmp_path / "tied.tinygpt")
    assert "unembed.weight" not in read_checkpoint(path).tensors  # stored once
    loaded = load(path)
    assert loaded.cfg.tie_embeddings
    assert loaded.unembed.weight is loaded.embed.weight
    assert_same_state(model, loaded)
    assert torch.equal(batch_loss(loaded), batch_loss(model))


def test_round_trip_keeps_train_state(tmp_path):
    model = tiny_model()
    state = {"step": 7, "loss": 1.25, "history": [{"step": 7, "loss": 1.25}]}
    loaded = load(save(model, tmp_path / "m.tinygpt", train_state=state))
    assert loaded.train_state == state


def test_unserialisable_train_state_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="JSON"):
        save(tiny_model(), tmp_path / "m.tinygpt", train_state={"bad": object()})
    assert not (tmp_path / "m.tinygpt").exists()


def test_describe_lists_every_tensor(tmp_path):
    model = tiny_model()
    path = save(model, tmp_path / "m.tinygpt")
    text = describe(path)
    rows = {}
    for line in text.splitlines():
        m = re.match(r"^(\S+)\s+(float32|bfloat16)\s+(\[[\d, ]*\])\s+([\d,]+)$", line)
        if m:
            rows[m.group(1)] = (json.loads(m.group(3)), int(m.group(4).replace(",", "")))
    expected = {k: (list(v.shape), v.numel()) for k, v in model.state_dict().items()}
    assert rows == expected
    assert f"parameters  {model.n_params():,}" in text
    assert re.search(rf"^total\s+{model.n_params():,}$", text, re.M)
    assert "n_layers=2" in text and "d_model=32" in text


def test_describe_tied_counts_shared_weight_once(tmp_path):
    model = tiny_model(tie_embeddings=True)
    text = describe(save(model, tmp_path / "tied.tinygpt"))
    assert f"parameters  {model.n_params():,}" in text
    assert "embeddings tied" in text
    assert "embed.weight" in text and "unembed.weight" not in text


# --------------------------------------------------------------------------------------- optimizer state
def test_optimizer_state_round_trip(tmp_path):
    model = tiny_model()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.9), weight_decay=0.05)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (2, 16), generator=g) for _ in range(4)]

    def step(m, o, tokens):
        o.zero_grad()
        m(tokens, return_type="loss").backward()
        o.step()

    for tokens in batches[:2]:
        step(model, opt, tokens)
    path = save(model, tmp_path / "opt.tinygpt", optimizer=opt)
    ckpt = read_checkpoint(path)
    assert ckpt.optimizer  # stored as tensors, not pickled

    model2 = load(path).train()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.5)  # different hyper-parameters, overwritten by the load
    load_optimizer_state(opt2, ckpt)
    sd1, sd2 = opt.state_dict(), opt2.state_dict()
    assert sd1["param_groups"] == sd2["param_groups"]
    assert sd1["state"].keys() == sd2["state"].keys()
    for i in sd1["state"]:
        for k, v in sd1["state"][i].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(sd2["state"][i][k])), (i, k)
    # Continuing from the restored optimizer gives exactly the same weights.
    for tokens in batches[2:]:
        step(model, opt, tokens)
        step(model2, opt2, tokens)
    assert_same_state(model, model2)


def test_load_optimizer_state_without_optimizer_is_clear(tmp_path):
    model = tiny_model()
    ckpt = read_checkpoint(save(model, tmp_path / "m.tinygpt"))
    with pytest.raises(CheckpointError, match="no optimizer state"):
        load_optimizer_state(torch.optim.AdamW(model.parameters()), ckpt)


# ----------------------------------------------------------------------------------------- atomic saves
def test_failed_save_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "m.tinygpt"
    save(tiny_model(seed=0), path)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(tinygpt.io.os, "replace", boom)
    with pytest.raises(OSError, match="simulated"):
        save(tiny_model(seed=1), path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.tinygpt"]
    load(path)


def test_failure_while_writing_leaves_no_file(tmp_path, monkeypatch):
    path = tmp_path / "new.tinygpt"

    def boom(*args, **kwargs):
        raise OSError("write failed (simulated)")

    monkeypatch.setattr(tinygpt.io.os, "fsync", boom)
    with pytest.raises(OSError, match="simulated"):
        save(tiny_model(), path)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ bad files
@pytest.fixture
def no_unpickling(monkeypatch):
    """Fail the test if anything tries to unpickle or torch.load."""

    def forbidden(*args, **kwargs):
        raise AssertionError("tinygpt tried to unpickle a file")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)


@pytest.fixture
def good_file(tmp_path):
    return save(tiny_model(), tmp_path / "good.tinygpt")


def check_error(path, *patterns):
    """Both `load` and `read_checkpoint` raise a CheckpointError naming the file and each pattern."""
    for fn in (load, read_checkpoint):
        with pytest.raises(CheckpointError) as info:
            fn(path)
        msg = str(info.value)
        assert str(path) in msg
        assert "\n" not in msg
        for p in patterns:
            assert re.search(p, msg, re.I), f"{p!r} not in {msg!r}"


def test_missing_file(tmp_path, no_unpickling):
    check_error(tmp_path / "nope.tinygpt", "no such file")


def test_directory(tmp_path, no_unpickling):
    check_error(tmp_path, "directory")


def test_empty_file(tmp_path, no_unpickling):
    p = tmp_path / "empty.tinygpt"
    p.write_bytes(b"")
    check_error(p, "0 bytes", "empty")


def test_truncated_file(good_file, no_unpickling):
    data = good_file.read_bytes()
    good_file.write_bytes(data[:-100])
    check_error(good_file, "truncated", str(len(data) - 100))


def test_truncated_inside_header(good_file, no_unpickling):
    good_file.write_bytes(good_file.read_bytes()[:200])
    check_error(good_file, "header length", "truncated")


def test_corrupt_tensor_data(good_file, no_unpickling):
    data = bytearray(good_file.read_bytes())
    start = data_offset(good_file)
    mid = (start + len(data)) // 2
    for i in range(mid, mid + 4):
        data[i] ^= 0xFF
    good_file.write_bytes(bytes(data))
    check_error(good_file, "corrupt", "sha256")
    # verify=False skips the hash, so the damage is only visible in the numbers
    assert read_checkpoint(good_file, verify=False).tensors


def test_foreign_safetensors_file(tmp_path, no_unpickling):
    p = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(3, 4)}, str(p), metadata={"format": "pt"})
    check_error(p, "safetensors", "not a tinygpt checkpoint", "tinygpt.save")


def test_torch_save_zip_file_is_rejected_without_unpickling(tmp_path, monkeypatch):
    p = tmp_path / "model.pt"
    torch.save({"weight": torch.zeros(3)}, p)  # written by us; never loaded
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("pickle.loads called"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("pickle.load called"))
    check_error(p, "zip", "torch.save", "never unpickles")


def test_legacy_pickle_file_is_rejected(tmp_path, no_unpickling):
    p = tmp_path / "model.pkl"
    p.write_bytes(pickle.dumps({"weight": [1.0, 2.0]}, protocol=4))
    check_error(p, "pickle", "never unpickles")


def test_header_length_that_starts_like_a_pickle_is_still_read(tmp_path):
    """A safetensors header of 0x..0280 bytes begins with 0x80 0x02, a pickle's magic: still a checkpoint."""
    path = tmp_path / "m.tinygpt"
    model, pad, n = tiny_model(), 0, 0
    while n % 65536 != 0x0280:  # the manifest grows one byte per padding character (header padded to 8 bytes)
        pad += (0x0280 - n) % 65536
        save(model, path, train_state={"note": "x" * pad})
        (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert path.read_bytes()[:2] == b"\x80\x02"
    assert read_checkpoint(path).train_state["note"] == "x" * pad
    load(path)


def test_json_file(tmp_path, no_unpickling):
    p = tmp_path / "config.json"
    p.write_text(json.dumps({"n_layers": 2, "d_model": 32, "n_heads": 2, "n_ctx": 64}))
    check_error(p, "not a .tinygpt file")


def test_text_file(tmp_path, no_unpickling):
    p = tmp_path / "notes.tinygpt"
    p.write_text(TEXT)
    check_error(p, "not a .tinygpt file")


def test_newer_format_version(good_file, tmp_path):
    ckpt = read_checkpoint(good_file)
    manifest = dict(ckpt.manifest, format_version=ckpt.manifest["format_version"] + 1)
    p = tmp_path / "future.tinygpt"
    save_file(ckpt.tensors, str(p), metadata={"tinygpt": json.dumps(manifest)})
    check_error(p, "newer tinygpt", "upgrade")


def test_tensors_not_matching_config(good_file, tmp_path):
    ckpt = read_checkpoint(good_file)
    tensors = dict(ckpt.tensors)
    del tensors["blocks.1.mlp.fc_in.weight"]
    manifest = dict(ckpt.manifest)
    manifest.pop("content_sha256")
    p = tmp_path / "partial.tinygpt"
    save_file(tensors, str(p), metadata={"tinygpt": json.dumps(manifest)})
    with pytest.raises(CheckpointError, match=r"1 tensor missing \(blocks\.1\.mlp\.fc_in\.weight\)"):
        load(p)


# ----------------------------------------------------------------------------------------- swapped modules
class _Doubled(nn.Linear):
    """A toy swapped module (y = 2 (x Wᵀ + b)) registered by the test, as surgery and LoRA register theirs."""

    kind = "test_doubled"

    def forward(self, x):
        return 2 * super().forward(x)

    def surgery_spec(self):
        return {"type": self.kind, "in_features": self.in_features, "out_features": self.out_features}

    @classmethod
    def from_spec(cls, spec, like):
        return cls(like.in_features, like.out_features, like.bias is not None, dtype=like.weight.dtype)


def test_a_registered_swap_is_recorded_and_rebuilt(tmp_path):
    register_swap(_Doubled.kind, _Doubled)
    register_swap(_Doubled.kind, _Doubled)  # registering the same class again is a no-op
    with pytest.raises(ValueError, match="already registered"):
        register_swap(_Doubled.kind, nn.Linear)
    model = tiny_model()
    before = batch_loss(model)
    lin = model.blocks[0].mlp.fc_in
    new = _Doubled(lin.in_features, lin.out_features)
    new.load_state_dict(lin.state_dict())
    assert set_module(model, "blocks.0.mlp.fc_in", new) is lin and model.mod_dict["blocks.0.mlp.fc_in"] is new
    assert not torch.equal(batch_loss(model), before)
    path = save(model, tmp_path / "swapped.tinygpt")
    rec = read_checkpoint(path).manifest["surgery"]
    assert rec["modules"] == {"blocks.0.mlp.fc_in": {"type": "test_doubled", "in_features": 32, "out_features": 128}}
    back = load(path)
    assert type(back.blocks[0].mlp.fc_in) is _Doubled
    assert torch.equal(batch_loss(back), batch_loss(model))
    assert "surgery" not in read_checkpoint(save(tiny_model(), tmp_path / "plain.tinygpt")).manifest


LEGACY = Path(__file__).parent / "fixtures" / "legacy"


def test_legacy_factored_packed_and_lora_files_rebuild_their_registered_modules():
    """Files written before the swap registry (tests/fixtures/legacy) rebuild the same modules, same outputs."""
    from tinygpt.surgery import LowRankLinear, PackedQuantLinear
    from tinygpt.training.lora import LoRALinear, base_fingerprint, load_lora, read_lora

    expected = json.loads((LEGACY / "expected.json").read_text())
    tokens = torch.tensor(expected["tokens"])

    def last_logits(model):
        with torch.no_grad():
            return model(tokens)[0, -1]

    factored = load(LEGACY / "laser_factored.tinygpt")
    assert isinstance(factored.blocks[1].mlp.fc_in, LowRankLinear) and factored.blocks[1].mlp.fc_in.rank == 16
    packed = load(LEGACY / "hqq_packed.tinygpt")
    assert isinstance(packed.blocks[0].attn.q_proj, PackedQuantLinear) and packed.blocks[0].attn.q_proj.bits == 4
    base = load(LEGACY / "trained.tinygpt")
    lora = read_lora(LEGACY / "trained.lora")
    # the one fingerprint computes the pin the old code wrote
    assert model_fingerprint(base) == base_fingerprint(base) == lora.base["sha256"]
    assert load_lora(base, lora) == ["blocks.0.mlp.fc_in", "blocks.1.mlp.fc_in"]
    assert isinstance(base.blocks[0].mlp.fc_in, LoRALinear)
    for model, name in ((factored, "laser_factored"), (packed, "hqq_packed"), (base, "trained+lora")):
        torch.testing.assert_close(last_logits(model), torch.tensor(expected["last_logits"][name]), rtol=0, atol=1e-5)
