"""LoRA: adapters as no-ops at init, hooks intact, save/load/merge equivalence, base pin, frozen base, resume."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from tinygpt import GPT, GPTConfig, describe, load, read_checkpoint, save
from tinygpt.cli import main
from tinygpt.eval.perplexity import evaluate
from tinygpt.training.lora import (
    LoRAError,
    LoRALinear,
    add_lora,
    base_fingerprint,
    load_lora,
    lora_finetune,
    lora_modules,
    lora_parameters,
    merge_lora,
    read_lora,
    remove_lora,
    run_checkpoint_path,
    save_lora,
    select_targets,
)

CFG = GPTConfig(n_layers=2, d_model=32, n_heads=2, n_ctx=32)


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYGPT_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def corpus(tmp_path):
    lines = [
        "First Citizen: Before we proceed any further, hear me speak.",
        "All: Speak, speak.",
        "First Citizen: You are all resolved rather to die than to famish?",
        "All: Resolved. resolved.",
    ]
    p = tmp_path / "corpus.txt"
    p.write_text(("\n".join(lines) + "\n") * 10)
    return p


def base(seed=0, cfg=CFG) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg).eval()


def perturb(model: GPT, seed=1) -> None:
    """Give every adapter a non-zero B so it changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.2)


X = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------- the module
def test_fresh_adapters_change_nothing_and_keep_every_hook_name():
    model = base()
    ref = model(X)
    hooks = sorted(model.hook_dict)
    _, ref_cache = model.run_with_cache(X)
    names = add_lora(model, "mlp.fc_in,attn.q_proj", rank=4, alpha=8)
    assert names == ["blocks.0.attn.q_proj", "blocks.0.mlp.fc_in", "blocks.1.attn.q_proj", "blocks.1.mlp.fc_in"]
    assert torch.equal(model(X), ref)  # B = 0
    m = model.get_submodule("blocks.0.attn.q_proj")
    assert isinstance(m, LoRALinear) and m.scale == 2.0 and m.lora_A.abs().sum() > 0
    perturb(model)
    logits, cache = model.run_with_cache(X)
    assert sorted(model.hook_dict) == hooks and sorted(cache.keys()) == sorted(ref_cache.keys())
    assert not torch.allclose(logits, ref, atol=1e-3)
    # the adapters act through the usual hook points: hook_q and mlp.hook_pre change, hook_k does not
    assert not torch.allclose(cache["blocks.0.attn.hook_q"], ref_cache["blocks.0.attn.hook_q"])
    assert not torch.allclose(cache["blocks.0.mlp.hook_pre"], ref_cache["blocks.0.mlp.hook_pre"])
    assert torch.equal(cache["blocks.0.attn.hook_k"], ref_cache["blocks.0.attn.hook_k"])
    # weight views read the base weights; the adapter's update is explicit
    x = torch.randn(3, 32)
    want = x @ (m.weight + m.lora_B @ m.lora_A * m.scale).T + m.bias
    assert torch.allclose(m(x), want, atol=1e-6)
    assert model.W_Q.shape == (2, 2, 32, 16)


def test_only_adapters_are_trainable_and_dropout_is_training_only():
    model = base()
    add_lora(model, "attn", rank=2, dropout=0.5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.endswith(("lora_A", "lora_B"))}
    assert len(trainable) == 2 * 4 * 2 and len(lora_parameters(model)) == 16
    perturb(model)
    model.eval()
    assert torch.equal(model(X), model(X))
    model.train()
    torch.manual_seed(0)
    assert not torch.equal(model(X), model(X))


def test_target_selection_and_errors():
    model = base()
    assert select_targets(model, "mlp", layers="1") == ["blocks.1.mlp.fc_in", "blocks.1.mlp.fc_out"]
    assert select_targets(model, ["o_proj"], layers=[-1]) == ["blocks.1.attn.o_proj"]
    assert len(select_targets(model, "all")) == 12
    assert select_targets(model, "attn.*_proj", layers=0) == [f"blocks.0.attn.{p}_proj" for p in "qkvo"]
    with pytest.raises(ValueError, match="matches no linear layer in blocks.0; its linear layers are: attn.k_proj"):
        select_targets(model, "mlp.gate")
    with pytest.raises(ValueError, match="not a linear layer"):
        select_targets(model, "ln1")
    with pytest.raises(ValueError, match="out of range"):
        select_targets(model, "mlp", layers=5)
    for bad in (dict(rank=0), dict(rank=2.5), dict(alpha=0), dict(dropout=1.0)):
        with pytest.raises(ValueError, match="LoRA"):
            add_lora(model, "mlp", **bad)
    assert not lora_modules(model)  # nothing changed by the failed calls
    add_lora(model, "mlp", rank=2)
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        add_lora(model, "mlp.fc_in", rank=2)


def test_wildcards_reach_mixture_of_experts_layers():
    model = base(cfg=CFG.replace(moe_experts=2, moe_topk=1))
    names = add_lora(model, "moe.experts.*.fc_in,attn.v_proj", rank=2, layers=0)
    assert names == ["blocks.0.attn.v_proj", "blocks.0.moe.experts.0.fc_in", "blocks.0.moe.experts.1.fc_in"]
    perturb(model)
    merged = merge_lora(copy.deepcopy(model))
    assert torch.allclose(merged(X), model(X), atol=1e-5)


# ------------------------------------------------------------------------------------------- files
def test_save_load_merge_equivalence(tmp_path):
    model = base()
    base_path = save(model, tmp_path / "base.tinygpt")
    sha = base_fingerprint(model)
    add_lora(model, "attn.q_proj,attn.v_proj,mlp.fc_in", rank=4, alpha=16)
    assert base_fingerprint(model) == sha  # the pin ignores the adapters
    perturb(model)
    adapted = model(X)
    path = save_lora(model, tmp_path / "a.lora")
    assert path.stat().st_size < base_path.stat().st_size / 5
    f = read_lora(path)
    assert f.base["sha256"] == sha and f.modules["blocks.1.mlp.fc_in"]["alpha"] == 16.0
    assert "6 modules" in f.describe()

    fresh = load(base_path)
    names = load_lora(fresh, path)
    assert len(names) == 6 and torch.equal(fresh(X), adapted)
    assert evaluate(fresh, "To be, or not to be.\n", progress=False).loss == pytest.approx(
        evaluate(model, "To be, or not to be.\n", progress=False).loss, abs=1e-6
    )
    merge_lora(fresh)
    assert not lora_modules(fresh) and all(type(fresh.get_submodule(n)) is nn.Linear for n in names)
    assert torch.allclose(fresh(X), adapted, atol=1e-5)
    merged_path = save(fresh, tmp_path / "merged.tinygpt")
    assert "surgery" not in read_checkpoint(merged_path).manifest
    again = load(merged_path)
    assert torch.allclose(again(X), adapted, atol=1e-5)

    # loading into a model that already has the same adapters replaces their values; remove restores the base
    load_lora(model, path)
    assert torch.equal(model(X), adapted)
    remove_lora(model)
    assert torch.equal(model(X), load(base_path)(X))


def test_adapted_model_saves_and_loads_as_a_full_tinygpt(tmp_path):
    model = base()
    add_lora(model, "mlp.fc_out", rank=3)
    perturb(model)
    p = save(model, tmp_path / "adapted.tinygpt")
    assert "lora" in describe(p)
    back = load(p)
    assert isinstance(back.blocks[0].mlp.fc_out, LoRALinear) and back.blocks[0].mlp.fc_out.rank == 3
    assert torch.equal(back(X), model(X))


def test_wrong_base_and_bad_files_are_clear_errors(tmp_path):
    model = base()
    add_lora(model, "attn.q_proj", rank=2)
    path = save_lora(model, tmp_path / "a.lora")
    with pytest.raises(LoRAError, match="pinned to another base model"):
        load_lora(base(seed=1), path)
    with pytest.raises(LoRAError, match="different architecture: d_model: adapter 32 vs model 64"):
        load_lora(base(cfg=CFG.replace(d_model=64)), path)
    other = base(seed=1)
    assert load_lora(other, path, check=False) == ["blocks.0.attn.q_proj", "blocks.1.attn.q_proj"]
    merged = merge_lora(base())
    add_lora(merged, "attn.q_proj", rank=2)
    perturb(merged)
    merge_lora(merged)
    with pytest.raises(LoRAError, match="already merged"):
        load_lora(merged, path)  # an adapter cannot be loaded twice into its merged base
    with pytest.raises(LoRAError, match="is a .tinygpt model file, not a LoRA adapter"):
        read_lora(save(base(), tmp_path / "m.tinygpt"))
    (tmp_path / "junk.lora").write_bytes(b"\x80\x04junk")
    with pytest.raises(LoRAError, match="pickle"):
        read_lora(tmp_path / "junk.lora")
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    (tmp_path / "bad.lora").write_bytes(bytes(data))
    with pytest.raises(LoRAError, match="corrupt"):
        read_lora(tmp_path / "bad.lora")
    with pytest.raises(LoRAError, match="no LoRA adapters"):
        save_lora(base(), tmp_path / "none.lora")


# ------------------------------------------------------------------------------------------- training
def finetune(model, corpus, tmp_path, **kw):
    settings = dict(
        targets="attn.q_proj,mlp.fc_in",
        rank=4,
        steps=6,
        batch_size=4,
        ctx=32,
        warmup=0,
        max_lr=1e-2,
        val_split=0.1,
        val_every=3,
        val_batches=2,
        device="cpu",
        progress=False,
        cache_dir=tmp_path / "cache",
        out=tmp_path / "run" / "a.lora",
    )
    settings.update(kw)
    return lora_finetune(model, corpus, **settings)


def test_finetune_trains_only_the_adapters_and_leaves_the_base_bitwise_unchanged(corpus, tmp_path):
    model = base()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = finetune(model, corpus, tmp_path)
    after = res.model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert all(m.lora_B.abs().sum() > 0 for m in lora_modules(res.model).values())
    assert res.n_trainable == 2 * (4 * (32 + 32) + 4 * (32 + 128))  # q_proj and fc_in adapters, 2 layers
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    assert res.result.val_losses  # validation ran through the same machinery
    # the optimizer held only the adapters: one state entry per adapter tensor
    ck = read_checkpoint(run_checkpoint_path(tmp_path / "run" / "a.lora"))
    assert len({k.split(".")[1] for k in ck.optimizer}) == len(lora_parameters(res.model))
    f = read_lora(res.adapter_path)
    assert f.train_state["step"] == 6 and f.base["sha256"] == base_fingerprint(base())


def test_resume_continues_exactly_and_checks_the_base(corpus, tmp_path):
    full = finetune(base(), corpus, tmp_path / "full")

    def stop_at_3(rec):
        if rec["step"] == 3:
            raise KeyboardInterrupt

    part = finetune(base(), corpus, tmp_path / "part", callbacks=[stop_at_3])
    assert part.result.interrupted and part.result.step == 3 and part.adapter_path.exists()
    resumed = finetune(base(), corpus, tmp_path / "part", resume=True)
    assert resumed.result.step == 6
    a, b = read_lora(full.adapter_path).tensors, read_lora(resumed.adapter_path).tensors
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(LoRAError, match="not the base this run adapts"):
        finetune(base(seed=7), corpus, tmp_path / "part", resume=True, steps=8)


def test_cli_lora_merge_out_and_lora_merge(corpus, tmp_path, capsys):
    model = base()
    bp = save(model, tmp_path / "base.tinygpt")
    out, merged = tmp_path / "a.lora", tmp_path / "merged.tinygpt"
    args = ["lora", str(bp), "--corpus", str(corpus), "--targets", "mlp.fc_in,attn.q_proj", "--rank", "4"]
    args += ["--alpha", "16", "--steps", "3", "--batch", "2", "--ctx", "32", "--max-lr", "1e-2", "--val-every", "0"]
    assert main([*args, "--out", str(out), "--merge-out", str(merged), "--no-progress", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "done: step 3" in printed and "parameters trained in 4 modules" in printed
    adapted = load(bp)
    load_lora(adapted, out)
    assert adapted.blocks[0].mlp.fc_in.alpha == 16.0
    assert torch.allclose(load(merged)(X), adapted(X), atol=1e-5)
    merged2 = tmp_path / "merged2.tinygpt"
    assert main(["lora-merge", str(bp), str(out), "--out", str(merged2)]) == 0
    assert torch.allclose(load(merged2)(X), adapted(X), atol=1e-5)
    other = save(base(seed=3), tmp_path / "other.tinygpt")
    assert main(["lora-merge", str(other), str(out), "--out", str(tmp_path / "x.tinygpt")]) == 2
    assert "pinned to another base model" in capsys.readouterr().err
