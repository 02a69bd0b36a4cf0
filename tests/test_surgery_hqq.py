"""HQQ / round-to-nearest quantization: reference errors, packing, model surgery, checkpoints, CLI."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from _surgery_helpers import make_model

import tinygpt
from tinygpt.cli import main
from tinygpt.surgery import (
    PackedQuantLinear,
    hqq,
    hqq_,
    hqq_quantize,
    pack_codes,
    quantize_rtn,
    unpack_codes,
)
from tinygpt.surgery.hqq import packed_nbytes


def rel_err(W, What) -> float:
    return float((W - What).norm() / W.norm())


# ------------------------------------------------------------------------------------- reference figures
# hqq 0.2.8 on CPU, torch.manual_seed(0); W = torch.randn(out, in) * 0.02; group 64 (see ecosystem-facts.md)
REFERENCE = [
    ((512, 128), 4, 0.0895, 0.0859),
    ((512, 128), 3, 0.1924, 0.1847),
    ((1024, 1024), 4, 0.0896, 0.0860),
    ((1024, 1024), 3, 0.1920, 0.1844),
]


@pytest.mark.parametrize("shape,bits,rtn_ref,hqq_ref", REFERENCE)
def test_reference_errors(shape, bits, rtn_ref, hqq_ref):
    torch.manual_seed(0)
    W = torch.randn(shape) * 0.02
    rtn, opt = quantize_rtn(W, bits, 64), hqq_quantize(W, bits, 64)
    e_rtn, e_hqq = rel_err(W, rtn.dequantize()), rel_err(W, opt.dequantize())
    assert round(e_rtn, 4) == rtn_ref
    assert round(e_hqq, 4) <= hqq_ref
    assert e_hqq < e_rtn
    assert opt.rel_error(W) == pytest.approx(e_hqq)
    assert 1 <= opt.iters_run <= 20


def test_quantized_tensor_layout_and_rtn_bound():
    torch.manual_seed(0)
    W = torch.randn(24, 128)
    for bits in range(1, 9):
        q = quantize_rtn(W, bits, 32)
        assert q.codes.dtype == torch.uint8 and q.codes.shape == (24, 128)
        assert int(q.codes.max()) <= 2**bits - 1
        assert q.scale.shape == q.zero.shape == (24, 4)
        # groups are contiguous along in_features: group (r, j) covers W[r, 32j : 32(j+1)]
        grp = W[5, 64:96]
        assert q.scale[5, 2] == pytest.approx(float(grp.max() - grp.min()) / (2**bits - 1), rel=1e-6)
        # round to nearest: every error is at most half a step
        err = (W - q.dequantize()).abs().reshape(24, 4, 32)
        assert (err <= q.scale[..., None] / 2 * (1 + 1e-5) + 1e-7).all()


def test_eight_bits_is_near_identity_and_constant_groups_are_exact():
    torch.manual_seed(0)
    W = torch.randn(64, 128) * 0.02
    assert rel_err(W, quantize_rtn(W, 8, 64).dequantize()) < 0.01
    assert rel_err(W, hqq_quantize(W, 8, 64).dequantize()) < 0.01
    W[3] = 0.25  # a constant row: zero range must not divide by zero
    for q in (quantize_rtn(W, 4, 64), hqq_quantize(W, 4, 64)):
        D = q.dequantize()
        assert torch.isfinite(D).all()
        assert torch.equal(D[3], W[3])


def test_group_size_none_is_per_row_and_bf16_input():
    torch.manual_seed(0)
    W = torch.randn(16, 48, dtype=torch.bfloat16)
    q = hqq_quantize(W, 4, None)
    assert q.group_size == 48 and q.scale.shape == (16, 1)
    assert q.dequantize(torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        ({"bits": 0}, "bits must be an int from 1 to 8"),
        ({"bits": 9}, "bits must be an int from 1 to 8"),
        ({"group_size": 48}, "group_size 48 does not divide in_features=128"),
        ({"group_size": 0}, "positive int"),
    ],
)
def test_tensor_bad_arguments(kwargs, msg):
    W = torch.randn(8, 128)
    args = {"bits": 4, "group_size": 64, **kwargs}
    for fn in (quantize_rtn, hqq_quantize):
        with pytest.raises(ValueError, match=msg):
            fn(W, **args)


# ------------------------------------------------------------------------------------- packing
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 13, 64, 1001])
def test_pack_round_trip(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 2**bits, (n,), generator=g, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(n, bits) == -(-n * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, n), codes)


def test_pack_layout_is_little_endian():
    assert pack_codes(torch.tensor([1, 2, 3, 4]), 4).tolist() == [0x21, 0x43]
    assert pack_codes(torch.tensor([1, 0, 1, 1, 0, 0, 0, 1]), 1).tolist() == [0b10001101]
    # 3 bits: 8 codes -> 3 bytes; code i at bits [3i, 3i + 3)
    value = sum(c << (3 * i) for i, c in enumerate([7, 1, 2, 3, 4, 5, 6, 0]))
    assert pack_codes(torch.tensor([7, 1, 2, 3, 4, 5, 6, 0]), 3).tolist() == [(value >> 8 * j) & 255 for j in range(3)]
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        pack_codes(torch.tensor([8]), 3)


# ------------------------------------------------------------------------------------- on a model
def test_hqq_inplace_dense(tokens, snapshot):
    model = make_model()
    before = snapshot(model)
    report = hqq_(model, bits=4, group_size=32, targets="attn", layers=1)
    assert [(e.layer, e.target) for e in report.entries] == [
        (1, t) for t in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj")
    ]
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {f"blocks.1.attn.{t}.weight" for t in ("q_proj", "k_proj", "v_proj", "o_proj")}
    for e in report.entries:
        W0 = before[f"{e.name}.weight"]
        assert e.hqq_error == pytest.approx(rel_err(W0, model.get_submodule(e.name).weight.detach()), rel=1e-5)
        # what is stored is exactly the HQQ reconstruction
        assert torch.equal(model.get_submodule(e.name).weight, hqq_quantize(W0, 4, 32).dequantize())
    assert report.mean_error < report.mean_rtn_error
    assert "RTN err" in str(report) and "blocks.1.attn.o_proj" in str(report)
    rtn = hqq_(make_model(), 4, 32, "attn", 1, optimize=False)
    assert rtn.method == "rtn" and all(e.hqq_error is None for e in rtn.entries)


def test_hqq_context_manager_restores_bitwise(tokens, snapshot, assert_bitwise_equal, loss_of):
    model = make_model()
    before = snapshot(model)
    base = loss_of(model, tokens)
    with hqq(model, bits=2, group_size=64) as report:
        assert len(report.entries) == 12
        assert loss_of(model, tokens) != base
    assert_bitwise_equal(model, before)
    with hqq(model, bits=3, group_size=64, targets="mlp", packed=True):
        assert isinstance(model.blocks[0].mlp.fc_out, PackedQuantLinear)
    assert type(model.blocks[0].mlp.fc_out) is nn.Linear
    assert model.mod_dict["blocks.0.mlp.fc_out"] is model.blocks[0].mlp.fc_out
    assert_bitwise_equal(model, before)
    assert loss_of(model, tokens) == base


@pytest.mark.parametrize("bits", [1, 3, 4, 8])
def test_packed_equals_dense_requantised(bits, tokens, loss_of):
    dense, packed = make_model(), make_model()
    hqq_(dense, bits, 64)
    hqq_(packed, bits, 64, packed=True)
    assert isinstance(packed.blocks[1].attn.q_proj, PackedQuantLinear)
    assert torch.equal(packed.blocks[1].mlp.fc_in.weight, dense.blocks[1].mlp.fc_in.weight)
    assert abs(loss_of(packed, tokens) - loss_of(dense, tokens)) < 1e-5


def test_packed_file_shrinks_and_round_trips(tmp_path, tokens, loss_of):
    base = make_model()
    fp32 = base.save(tmp_path / "fp32.tinygpt")
    dense, packed = make_model(), make_model()
    hqq_(dense, 4, 64)
    report = hqq_(packed, 4, 64, packed=True)
    path = packed.save(tmp_path / "q4.tinygpt")
    dense_bytes = sum(e.dense_bytes for e in report.entries)
    packed_bytes = sum(e.packed_bytes for e in report.entries)
    assert packed_bytes == sum(e.shape[0] * e.shape[1] // 2 + e.shape[0] * e.shape[1] // 64 * 8 for e in report.entries)
    expected = fp32.stat().st_size - dense_bytes + packed_bytes
    assert expected <= path.stat().st_size <= expected + 16_384  # + a larger header (names, manifest)
    loaded = tinygpt.load(path)
    assert all(isinstance(loaded.get_submodule(e.name), PackedQuantLinear) for e in report.entries)
    assert abs(loss_of(loaded, tokens) - loss_of(dense, tokens)) < 1e-5
    assert torch.equal(loaded(tokens), packed(tokens))
    assert loaded.generate(tokens[:1, :4], max_new_tokens=5, seed=0).shape == (1, 9)
    _, cache = loaded.run_with_cache(tokens[:1])
    assert cache["blocks.1.mlp.hook_post"].shape == (1, 33, 256)
    assert "surgery     12 packed_quant 4-bit modules" in tinygpt.describe(path)


def test_packed_bf16_model_round_trip(tmp_path, tokens):
    model = make_model(dtype="bfloat16")
    hqq_(model, 4, 64, "mlp", packed=True)
    loaded = tinygpt.load(model.save(tmp_path / "bf16.tinygpt"))
    assert loaded.blocks[0].mlp.fc_in.bias.dtype == torch.bfloat16
    assert torch.equal(loaded(tokens), model(tokens))


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        ({"layers": 2}, "layer 2 is out of range for a 2-layer model"),
        ({"targets": "mlp.mid_proj"}, r"unknown target 'mlp.mid_proj'; valid targets: attn.q_proj"),
        ({"bits": 0}, "bits must be an int from 1 to 8"),
        ({"bits": 9}, "bits must be an int from 1 to 8"),
        ({"group_size": 48}, "group_size 48 does not divide in_features=64 of blocks.0.attn.q_proj"),
        ({"iters": -1}, "iters"),
    ],
)
def test_model_bad_arguments_modify_nothing(kwargs, msg, snapshot, assert_bitwise_equal):
    model = make_model()
    before = snapshot(model)
    args = {"bits": 4, "group_size": 64, "targets": "all", "layers": None, **kwargs}
    with pytest.raises(ValueError, match=msg):
        hqq_(model, **args, packed=True)
    with pytest.raises(ValueError, match=msg), hqq(model, **args):
        pass
    assert_bitwise_equal(model, before)
    assert not getattr(model, "surgery_log", [])


def test_group_size_checked_on_every_matrix_before_any_change(snapshot, assert_bitwise_equal):
    model = make_model(d_mlp=96)  # group 64 fits every matrix except fc_out (in_features=96), selected last
    before = snapshot(model)
    for packed in (False, True):
        with pytest.raises(ValueError, match="group_size 64 does not divide in_features=96 of blocks.0.mlp.fc_out"):
            hqq_(model, 4, 64, packed=packed)
    assert_bitwise_equal(model, before)
    assert all(type(m) is not PackedQuantLinear for m in model.modules())


# ------------------------------------------------------------------------------------- CLI
@pytest.fixture
def saved(tmp_path):
    return make_model().save(tmp_path / "in.tinygpt")


def test_cli_hqq_end_to_end(saved, tmp_path, capsys):
    out = tmp_path / "q.tinygpt"
    rc = main(
        [
            "hqq",
            str(saved),
            "--bits",
            "3",
            "--group-size",
            "32",
            "--p",
            "0.7",
            "--layers",
            "0-1",
            "--targets",
            "mlp",
            "attn.v_proj",
            "--packed",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "HQQ 3-bit, group 32 (packed)" in text and "blocks.1.attn.v_proj" in text and "wrote" in text
    assert out.stat().st_size < saved.stat().st_size
    model = tinygpt.load(out)
    assert isinstance(model.blocks[1].attn.v_proj, PackedQuantLinear) and model.blocks[1].attn.v_proj.bits == 3
    assert type(model.blocks[1].attn.q_proj) is nn.Linear
    assert isinstance(model.generate("ab", max_new_tokens=5, seed=0), str)
    # dense (drop-in) output, in place: --out equal to the input needs --overwrite (issue 18: no silent overwrite)
    assert main(["hqq", str(saved), "--bits", "8", "--rtn", "--out", str(saved)]) == 2
    assert type(tinygpt.load(saved).blocks[0].mlp.fc_in) is nn.Linear
    assert main(["hqq", str(saved), "--bits", "8", "--rtn", "--out", str(saved), "--overwrite"]) == 0
    assert type(tinygpt.load(saved).blocks[0].mlp.fc_in) is nn.Linear


@pytest.mark.parametrize(
    "args,msg",
    [
        (["--bits", "0"], "bits must be an int from 1 to 8"),
        (["--bits", "9"], "bits must be an int from 1 to 8"),
        (["--group-size", "48"], "does not divide"),
        (["--layers", "0-2"], "layer 2 is out of range"),
        (["--targets", "mlp.w1"], "unknown target"),
    ],
)
def test_cli_hqq_bad_arguments_write_nothing(saved, tmp_path, capsys, args, msg):
    out = tmp_path / "never.tinygpt"
    assert main(["hqq", str(saved), *args, "--packed", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and msg in err and err.startswith("tinygpt hqq: error:")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tinygpt"]


def test_packed_layer_computes_in_the_input_dtype_without_autocast():
    torch.manual_seed(0)
    lin = nn.Linear(64, 24)
    layer = PackedQuantLinear.from_quantized(hqq_quantize(lin.weight.detach(), 4, 32), lin.bias.detach())
    x = torch.randn(3, 64)
    want = layer(x)
    got = layer(x.to(torch.bfloat16))  # bf16 activations, fp32 bias: no dtype error, bf16 out
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=5e-2, rtol=5e-2)
