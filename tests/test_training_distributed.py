"""Data-parallel training under torchrun: DDP and FSDP on CPU (gloo, 2 processes) against 1-process runs.

The subprocess tests launch `python -m torch.distributed.run --standalone --nproc-per-node 2` (torchrun on a
free port, so parallel test workers do not collide) and compare with `train()` run in this process on the
same settings: the global batch (`batch × accum` sequences) is the same whatever the world size, so the
losses, validation losses and weights must agree up to floating-point reduction order.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tinygpt import load, read_checkpoint, train
from tinygpt.data import tokenize_corpus
from tinygpt.tokenizer import ByteTokenizer
from tinygpt.training import distributed as D
from tinygpt.training.loop import TokenBatches, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5  # losses; measured: DDP 0.0, FSDP 2.4e-7
# weights: Adam divides each gradient entry by its own running magnitude, so rounding-level gradient differences
# on near-zero entries become visible weight differences (measured: DDP 0.0, FSDP up to 1.6e-6)
WEIGHT_TOL = 5e-5
FLAGS = dict(steps=6, batch_size=4, accum=2, ctx=32, warmup=2, max_lr=3e-3, val_every=3, val_split=0.1)
FLAGS3 = dict(FLAGS, accum=3)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    rng = random.Random(0)
    words = "to be or not that is the question whether tis nobler in mind suffer slings arrows".split()
    p = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    p.write_text("\n".join(" ".join(rng.choice(words) for _ in range(10)) for _ in range(300)))
    return p


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """The uninterrupted 1-process run every 2-process run is compared with."""
    d = tmp_path_factory.mktemp("ref")
    return train(
        corpus=corpus, preset="nano", out=d / "ref.tinygpt", device="cpu", progress=False, cache_dir=d, **FLAGS
    )


pytestmark = pytest.mark.usefixtures("isolated_cache")


def cli_flags(corpus: Path, **settings) -> list[str]:
    names = {"batch_size": "--batch"}
    out = ["train", "--preset", "nano", "--corpus", str(corpus), "--device", "cpu", "--no-progress"]
    for k, v in {**FLAGS, **settings}.items():
        out += [names.get(k, "--" + k.replace("_", "-")), str(v)]
    return out


def torchrun(args: list[str], tmp_path: Path, *, env: dict | None = None, timeout: float = 240):
    """Run `args` (a script path or ["-m", "tinygpt", ...]) in 2 gloo processes; returns (rc, output, seconds)."""
    full_env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TINYGPT_CACHE_DIR": str(tmp_path / "cache"),
        "PYTHONPATH": str(ROOT),
        **(env or {}),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - t0


def assert_matches(history, ref_history, tol=TOL):
    assert [h["step"] for h in history] == [h["step"] for h in ref_history]
    for h, r in zip(history, ref_history):
        assert h["lr"] == r["lr"]
        assert abs(h["loss"] - r["loss"]) <= tol, (h["step"], h["loss"], r["loss"])
        assert abs(h["grad_norm"] - r["grad_norm"]) <= 10 * tol * max(1.0, r["grad_norm"])
        assert ("val_loss" in h) == ("val_loss" in r)
        if "val_loss" in r:
            assert abs(h["val_loss"] - r["val_loss"]) <= tol, (h["step"], h["val_loss"], r["val_loss"])


def max_weight_diff(a: Path, b: Path) -> float:
    """Largest |difference| between two checkpoints' weights.

    The key biases are left out: attention is invariant to them, so their gradient is zero in exact
    arithmetic and pure rounding noise in practice, which Adam normalises into updates of ordinary size
    (FSDP measured up to 3e-6 there); they only have to stay small.
    """
    ta, tb = read_checkpoint(a).tensors, read_checkpoint(b).tensors
    assert sorted(ta) == sorted(tb)
    assert all((ta[k] - tb[k]).abs().max().item() <= 1e-3 for k in ta if k.endswith("k_proj.bias"))
    return max((ta[k] - tb[k]).abs().max().item() for k in ta if not k.endswith("k_proj.bias"))


# ------------------------------------------------------------------------------- sharding (in-process)
def test_shards_partition_the_global_batch(corpus, tmp_path):
    data = tokenize_corpus(corpus, ByteTokenizer(), cache_dir=tmp_path, progress=False)
    for batch, accum, world in [(4, 2, 2), (8, 1, 2), (4, 3, 2), (2, 3, 3), (3, 4, 4)]:
        cfg = TrainConfig(batch_size=batch, accum=accum, ctx=16, val_split=0.1)
        tb = TokenBatches(data, cfg, 32)
        whole = tb.train(5)
        assert len(whole) == accum and all(x.shape == (batch, 16) for x, _ in whole)
        shards = [tb.train_shard(5, r, world) for r in range(world)]
        assert all(x.shape[0] <= batch for s in shards for x, _ in s)
        assert {sum(x.shape[0] for x, _ in s) for s in shards} == {batch * accum // world}
        for i in (0, 1):  # inputs and targets: rank order rebuilds the 1-process global batch exactly
            cat = torch.cat([m[i] for s in shards for m in s])
            assert torch.equal(cat, torch.cat([m[i] for m in whole]))
    with pytest.raises(ValueError, match="cannot be split evenly across 2 processes"):
        TokenBatches(data, TrainConfig(batch_size=3, accum=1, ctx=16), 32).train_shard(0, 0, 2)


def test_objectives_without_train_shard_split_their_micro_batches():
    class Plain:  # e.g. distillation batches: micro-batches carrying per-micro-batch extras
        def train(self, step):
            return [(torch.full((2, 4), step * 10 + m), m) for m in range(4)]

    assert [m for _, m in D.shard_micro_batches(Plain(), 1, 0, 2)] == [0, 1]
    assert [m for _, m in D.shard_micro_batches(Plain(), 1, 1, 2)] == [2, 3]
    assert len(D.shard_micro_batches(Plain(), 1, 0, 1)) == 4
    with pytest.raises(ValueError, match="multiple of 3"):
        D.shard_micro_batches(Plain(), 1, 0, 3)


def test_single_process_is_untouched(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    from tinygpt import GPT, GPTConfig

    par = D.wrap_model(GPT(GPTConfig(n_layers=1, d_model=32, n_heads=2, n_ctx=16)), "fsdp", device="cpu")
    assert par.strategy == "single" and par.world == 1 and par.is_main and not D.active()
    assert par.train_model is par.module
    with pytest.raises(ValueError, match="strategy must be one of ddp, fsdp"):
        D.wrap_model(par.module, "zero3")
    monkeypatch.setenv(D.FAULT_ENV, "0:2")
    D.fault_injection(1)
    with pytest.raises(RuntimeError, match="injected fault on rank 0 at step 2"):
        D.fault_injection(2)
    monkeypatch.setenv(D.FAULT_ENV, "two")
    with pytest.raises(ValueError, match="RANK:STEP"):
        D.fault_injection(2)


# ------------------------------------------------------------------------------- 2 processes (torchrun)
WRITE_LOGGER = """
import os, sys
import tinygpt.data.cache as cache, tinygpt.io as io
from tinygpt import cli

LOG = os.path.join(sys.argv[1], f"writes-rank{os.environ['RANK']}.txt")

def log(path):
    with open(LOG, "a") as f:
        f.write(f"{path}\\n")

# every file tinygpt writes goes through tinygpt.io.atomic_writer (checkpoints, adapters, the token cache)
real_writer = io.atomic_writer
io.atomic_writer = cache.atomic_writer = lambda path, *a, **k: (log(path), real_writer(path, *a, **k))[1]
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_ddp_matches_one_process_and_only_rank0_writes(corpus, reference, tmp_path):
    script = tmp_path / "logged_tinygpt.py"
    script.write_text(WRITE_LOGGER)
    out = tmp_path / "ddp.tinygpt"
    rc, text, secs = torchrun([str(script), str(tmp_path), *cli_flags(corpus), "--out", str(out)], tmp_path)
    assert rc == 0, text
    print(f"DDP 2-process run: {secs:.1f}s")
    ckpt = read_checkpoint(out)
    assert ckpt.train_state["world_size"] == 2 and ckpt.train_state["strategy"] == "ddp"
    assert_matches(ckpt.train_state["history"], reference.history)
    diff = max_weight_diff(out, reference.path)
    print(f"DDP vs 1 process: max |loss diff| {_max_loss_diff(ckpt, reference)}, max |weight diff| {diff}")
    assert diff <= WEIGHT_TOL
    ref_opt = read_checkpoint(reference.path).optimizer
    assert sorted(ckpt.optimizer) == sorted(ref_opt)
    assert max((ckpt.optimizer[k].float() - ref_opt[k].float()).abs().max().item() for k in ref_opt) <= TOL
    # rank 0 alone reports, builds the token cache and writes the checkpoint
    assert text.count("done: step 6") == 1
    assert not (tmp_path / "writes-rank1.txt").exists()
    writes = (tmp_path / "writes-rank0.txt").read_text().split()
    assert writes.count(str(out)) == 1 and sum("/tokens/" in w for w in writes) == 1


@pytest.mark.slow
def test_fsdp_matches_one_process_and_saves_the_usual_file(corpus, tmp_path):
    """batch 4 x accum 3 over 2 processes: each takes 6 sequences, in micro-batches of 4 and 2 weighted 2:1."""
    ref = train(corpus=corpus, preset="nano", out=tmp_path / "ref.tinygpt", device="cpu", progress=False, **FLAGS3)
    out = tmp_path / "fsdp.tinygpt"
    args = ["-m", "tinygpt", *cli_flags(corpus, accum=3), "--strategy", "fsdp", "--out", str(out)]
    rc, text, secs = torchrun(args, tmp_path)
    assert rc == 0, text
    print(f"FSDP 2-process run: {secs:.1f}s")
    ckpt = read_checkpoint(out)
    assert ckpt.train_state["strategy"] == "fsdp"
    assert_matches(ckpt.train_state["history"], ref.history)
    diff = max_weight_diff(out, ref.path)
    print(f"FSDP vs 1 process: max |loss diff| {_max_loss_diff(ckpt, ref)}, max |weight diff| {diff}")
    assert diff <= WEIGHT_TOL
    # the full (gathered) weights and optimizer state, in the single-process layout
    ref_ckpt = read_checkpoint(ref.path)
    assert sorted(ckpt.optimizer) == sorted(ref_ckpt.optimizer)
    assert ckpt.manifest["optimizer"]["param_groups"] == ref_ckpt.manifest["optimizer"]["param_groups"]
    assert max((ckpt.optimizer[k] - ref_ckpt.optimizer[k]).abs().max().item() for k in ref_ckpt.optimizer) <= 1e-3
    model = load(out)
    x = torch.randint(0, 256, (1, 16))
    torch.testing.assert_close(model(x), ref.model(x), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_a_failing_rank_ends_the_run_and_its_checkpoint_resumes_in_one_process(corpus, reference, tmp_path):
    out = tmp_path / "fault.tinygpt"
    args = ["-m", "tinygpt", *cli_flags(corpus, save_every=3), "--out", str(out)]
    rc, text, secs = torchrun(args, tmp_path, env={D.FAULT_ENV: "1:5"}, timeout=180)
    print(f"run with a fault on rank 1 ended after {secs:.1f}s")
    assert rc != 0
    assert "RuntimeError: TINYGPT_FAULT_INJECT: injected fault on rank 1 at step 5" in text
    assert "rank      : 1 (local_rank: 1)" in text  # torchrun's summary names the failing rank
    # the step-3 checkpoint of the 2-process run continues in one process as if never interrupted
    assert read_checkpoint(out).train_state["step"] == 3
    resumed = train(resume=True, out=out, device="cpu", progress=False)
    assert_matches(resumed.history, reference.history)
    assert max_weight_diff(out, reference.path) <= WEIGHT_TOL


@pytest.mark.slow
def test_one_process_checkpoint_resumes_in_two_fsdp_processes(corpus, tmp_path):
    """Also a mixture of experts (16, top-1) that sees 32 tokens per process and step, so experts go unused
    on one process only (FSDP must still reduce-scatter them) or on both (no gradient at all, as in one
    process), and 5 validation batches (3 + 2: the second process repeats one forward uncounted). Micro-batches
    of 4 as in the single process: the router-balance loss is computed per micro-batch."""
    settings = dict(FLAGS, ctx=8, save_every=3, val_batches=5)
    moe = {"moe_experts": 16, "moe_topk": 1}
    common = dict(corpus=corpus, preset="nano", model_config=moe, device="cpu", progress=False, **settings)
    ref = train(out=tmp_path / "ref.tinygpt", **common)

    def stop_at_3(rec):
        if rec["step"] == 3:
            raise KeyboardInterrupt

    out = tmp_path / "one.tinygpt"
    assert train(out=out, callbacks=[stop_at_3], **common).interrupted
    resume = ["train", "--resume", "--out", str(out), "--strategy", "fsdp", "--device", "cpu", "--no-progress"]
    rc, text, _ = torchrun(["-m", "tinygpt", *resume], tmp_path)
    assert rc == 0, text
    ckpt = read_checkpoint(out)
    assert ckpt.train_state["step"] == 6 and ckpt.train_state["world_size"] == 2
    assert_matches(ckpt.train_state["history"], ref.history)
    assert max_weight_diff(out, tmp_path / "ref.tinygpt") <= WEIGHT_TOL
    # experts no process used in a step got no gradient (so no AdamW decay or momentum step), as in one process
    ref_opt = read_checkpoint(tmp_path / "ref.tinygpt").optimizer
    assert sorted(ckpt.optimizer) == sorted(ref_opt)
    assert max((ckpt.optimizer[k] - ref_opt[k]).abs().max().item() for k in ref_opt) <= 1e-3


def _max_loss_diff(ckpt, reference) -> float:
    return max(abs(h["loss"] - r["loss"]) for h, r in zip(ckpt.train_state["history"], reference.history))


def test_documented_commands_parse():
    """Every `tinygpt` command line in docs/distributed.md is accepted by the CLI's parser."""
    import re
    import shlex

    from tinygpt.cli import build_parser

    text = (ROOT / "docs" / "distributed.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = [ln for b in blocks for ln in b.splitlines() if "-m tinygpt " in ln and not ln.startswith("#")]
    assert len(lines) >= 6
    for line in lines:
        args = shlex.split(line.split("-m tinygpt ", 1)[1].split("#")[0])
        build_parser().parse_args(args)  # SystemExit (a failed test) on an unknown flag or choice


# ------------------------------------------------------------------------------- distillation
DISTILL = dict(steps=4, batch_size=4, accum=2, ctx=32, warmup=2, max_lr=3e-3, val_every=2, val_split=0.1)


@pytest.mark.slow
def test_distill_in_two_processes_matches_one_process_with_twice_the_accumulation(corpus, tmp_path):
    """`tinygpt distill` under torchrun, DDP and FSDP: 2 gloo processes with --accum 2 (one micro-batch each)
    equal one process accumulating both, including on-policy micro-batches (under FSDP a process generates
    whenever the other does, since each forward of the sharded student is a collective); rank 0 alone prints."""
    import random as _random

    from tinygpt.training.distill import distill

    teacher = train(corpus=corpus, preset="nano", out=tmp_path / "teacher.tinygpt", device="cpu", progress=False,
                    steps=3, batch_size=4, ctx=32, val_every=0)  # fmt: skip
    seed = TrainConfig().seed
    on_policy = [[_random.Random(f"distill:{seed}:{s}:{m}").random() < 0.5 for m in (0, 1)] for s in range(4)]
    assert [True, False] in on_policy or [False, True] in on_policy  # a step where only one process generates
    ref = distill("nano", teacher.path, corpus, on_policy=0.5, out=tmp_path / "ref.tinygpt", device="cpu",
                  progress=False, **DISTILL)  # fmt: skip
    assert 0 < sum(h["on_policy"] for h in ref.history) < len(ref.history)
    flags = [f"--{k.replace('_', '-')}" if k != "batch_size" else "--batch" for k in DISTILL]
    for strategy in ("ddp", "fsdp"):
        out = tmp_path / f"{strategy}.tinygpt"
        args = ["-m", "tinygpt", "distill", "nano", "--teacher", str(teacher.path), "--corpus", str(corpus),
                "--on-policy", "0.5", *[x for f, v in zip(flags, DISTILL.values()) for x in (f, str(v))],
                "--strategy", strategy, "--device", "cpu", "--no-progress", "--out", str(out)]  # fmt: skip
        rc, text, secs = torchrun(args, tmp_path)
        assert rc == 0, text
        ckpt = read_checkpoint(out)
        assert ckpt.train_state["world_size"] == 2 and ckpt.train_state["strategy"] == strategy
        assert ckpt.train_state["distill"]["settings"]["on_policy"] == 0.5
        assert_matches(ckpt.train_state["history"], ref.history)
        diff = max_weight_diff(out, ref.path)
        print(f"distill {strategy} 2 processes: {secs:.1f}s; max |loss diff| {_max_loss_diff(ckpt, ref)}, "
              f"max |weight diff| {diff}")  # fmt: skip
        assert diff <= WEIGHT_TOL
        assert text.count("done: step 4") == 1 and "kl" in text  # rank 0 alone prints the summary


def test_distill_and_lora_commands_print_on_rank_0_only(corpus, tmp_path, monkeypatch, capsys):
    """The final line of `tinygpt distill` / `tinygpt lora` comes from rank 0 alone (here: another rank)."""
    from tinygpt.cli import main

    teacher = train(corpus=corpus, preset="nano", out=tmp_path / "t.tinygpt", device="cpu", progress=False,
                    steps=1, batch_size=2, ctx=16, val_every=0)  # fmt: skip
    common = ["--corpus", str(corpus), "--steps", "1", "--batch", "2", "--ctx", "16", "--val-every", "0",
              "--device", "cpu", "--no-progress"]  # fmt: skip
    commands = {
        "distill": [
            "distill",
            "nano",
            "--teacher",
            str(teacher.path),
            *common,
            "--out",
            str(tmp_path / "s.tinygpt"),
            "--overwrite",
        ],
        "lora": [
            "lora",
            str(teacher.path),
            *common,
            "--no-checkpoint",
            "--out",
            str(tmp_path / "a.lora"),
            "--overwrite",
        ],
    }
    for name, args in commands.items():
        assert main(args) == 0
        assert "done: step 1" in capsys.readouterr().out, name
        with monkeypatch.context() as m:
            m.setattr(D, "is_main", lambda: False)
            assert main(args) == 0
        assert capsys.readouterr().out == "", name


# ------------------------------------------------------------------------------- supervised fine-tuning
SFT = dict(steps=4, batch_size=2, accum=2, ctx=96, warmup=1, max_lr=3e-3, val_every=2, val_split=0.05)


@pytest.mark.slow
def test_sft_in_two_processes_matches_one_process_with_twice_the_accumulation(tmp_path):
    """`tinygpt sft` under torchrun (DDP and FSDP, gloo): 2 processes with --accum 2 (one micro-batch of 2 conversations
    each) equal one process accumulating both micro-batches: the same losses (the mean over every reply token of
    the global batch), validation losses and weights; the chat tokens added on every rank alike; rank 0 alone
    prints and writes."""
    from tinygpt import GPT, GPTConfig, save
    from tinygpt.training.sft import sft

    torch.manual_seed(0)
    base = save(GPT(GPTConfig(n_layers=2, d_model=32, n_heads=2, n_ctx=96)), tmp_path / "base.tinygpt")
    data = ROOT / "data" / "sft_small.jsonl"
    ref = sft(base, data, out=tmp_path / "ref.tinygpt", device="cpu", progress=False, **SFT)
    names = {k: "--batch" if k == "batch_size" else "--" + k.replace("_", "-") for k in SFT}
    flags = [x for k, v in SFT.items() for x in (names[k], str(v))]
    args = ["-m", "tinygpt", "sft", str(base), "--data", str(data), *flags, "--device", "cpu", "--no-progress"]
    for strategy in ("ddp", "fsdp"):
        out = tmp_path / f"{strategy}.tinygpt"
        rc, text, secs = torchrun([*args, "--strategy", strategy, "--out", str(out)], tmp_path)
        assert rc == 0, text
        ckpt = read_checkpoint(out)
        assert ckpt.train_state["world_size"] == 2 and ckpt.train_state["strategy"] == strategy
        assert ckpt.train_state["sft"]["report"] == ref.report and ckpt.train_state["sft"]["n_val"] == ref.n_val > 0
        assert_matches(ckpt.train_state["history"], ref.history)
        diff = max_weight_diff(out, ref.path)
        print(f"sft {strategy} 2 processes: {secs:.1f}s; max |loss diff| {_max_loss_diff(ckpt, ref)}, "
              f"max |weight diff| {diff}")  # fmt: skip
        assert diff <= WEIGHT_TOL
        assert load(out).tokenizer.special_tokens == {"<|im_start|>": 256, "<|im_end|>": 257}
        assert text.count("done: step 4") == 1 and text.count("data: 175 records") == 1


# ------------------------------------------------------------------------------- LoRA
LORA = dict(steps=4, batch_size=4, accum=2, ctx=32, warmup=1, max_lr=1e-2, val_every=2, val_split=0.1)


@pytest.mark.slow
def test_lora_in_two_processes_matches_one_process_and_only_rank0_writes(corpus, tmp_path):
    """`tinygpt lora` under torchrun (DDP and FSDP, gloo; the base frozen, sharded too under FSDP): 2 processes with
    --accum 2 (one micro-batch each) equal one process accumulating both: the same losses, validation losses,
    adapters and merged model; rank 0 alone writes the run checkpoint, the adapter and the merged model, once."""
    from tinygpt.training.lora import lora_finetune, read_lora

    base = train(corpus=corpus, preset="nano", out=tmp_path / "base.tinygpt", device="cpu", progress=False,
                 steps=2, batch_size=4, ctx=32, val_every=0)  # fmt: skip
    lora = dict(targets="attn.q_proj,mlp.fc_in", rank=4)
    ref = lora_finetune(base.path, corpus, out=tmp_path / "ref.lora", merge_out=tmp_path / "ref-merged.tinygpt",
                        device="cpu", progress=False, **lora, **LORA)  # fmt: skip
    ref_adapter = read_lora(ref.adapter_path)
    assert max(t.abs().max().item() for k, t in ref_adapter.tensors.items() if k.endswith("lora_B")) > 0  # trained
    script = tmp_path / "logged_tinygpt.py"
    script.write_text(WRITE_LOGGER)
    names = {k: "--batch" if k == "batch_size" else "--" + k.replace("_", "-") for k in LORA}
    flags = [x for k, v in LORA.items() for x in (names[k], str(v))]
    for strategy in ("ddp", "fsdp"):
        d = tmp_path / strategy
        d.mkdir()
        out, merged = d / "a.lora", d / "merged.tinygpt"
        args = [str(script), str(d), "lora", str(base.path), "--corpus", str(corpus), "--targets", lora["targets"],
                "--rank", "4", *flags, "--strategy", strategy, "--device", "cpu", "--no-progress",
                "--out", str(out), "--merge-out", str(merged)]  # fmt: skip
        rc, text, secs = torchrun(args, tmp_path)
        assert rc == 0, text
        run = read_checkpoint(d / "a.lora.run.tinygpt")
        assert run.train_state["world_size"] == 2 and run.train_state["strategy"] == strategy
        assert_matches(run.train_state["history"], ref.history)
        adapter = read_lora(out)
        assert adapter.base == ref_adapter.base  # pinned to the same base (sha256, config, source)
        assert sorted(adapter.tensors) == sorted(ref_adapter.tensors)
        diff = max((adapter.tensors[k] - ref_adapter.tensors[k]).abs().max().item() for k in adapter.tensors)
        merged_diff = max_weight_diff(merged, ref.merged_path)
        print(f"lora {strategy} 2 processes: {secs:.1f}s; max |loss diff| {_max_loss_diff(run, ref.result)}, "
              f"max |adapter diff| {diff}, max |merged weight diff| {merged_diff}")  # fmt: skip
        assert diff <= WEIGHT_TOL and merged_diff <= WEIGHT_TOL
        assert text.count("done: step 4") == 1 and text.count(f"saved {out}") == 1  # rank 0 alone prints
        assert not (d / "writes-rank1.txt").exists()
        writes = (d / "writes-rank0.txt").read_text().split()
        assert [writes.count(str(p)) for p in (out, merged, d / "a.lora.run.tinygpt")] == [1, 1, 1], writes
