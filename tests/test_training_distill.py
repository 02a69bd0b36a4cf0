"""`distill()`: the loss formula (forward and reverse KL, masking), a zero KL against itself, tokenizer checks,
the on-policy path, exact resume, the CLI, and a Hugging Face directory as teacher."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tinygpt import GPT, BPETokenizer, ByteTokenizer, GPTConfig, load, read_checkpoint, train
from tinygpt.cli import main
from tinygpt.data import tokenize_corpus
from tinygpt.interop.hf import byte_tokenizer_json, export_hf
from tinygpt.training.distill import (
    DistillObjective,
    DistillSettings,
    GPTTeacher,
    TokenizerMismatch,
    distill,
    distill_loss,
    load_teacher,
)
from tinygpt.training.loop import TokenBatches

CFG = GPTConfig(n_layers=2, d_model=32, n_heads=2, n_ctx=64)
FAST = dict(steps=4, batch_size=2, ctx=32, warmup=2, val_every=0, val_split=0.1, val_batches=2, progress=False)


pytestmark = pytest.mark.usefixtures("isolated_cache")


@pytest.fixture
def corpus(make_corpus):
    return make_corpus(n_lines=3)


@pytest.fixture
def teacher_file(corpus, tmp_path):
    """A small trained teacher (different shape from the students)."""
    torch.manual_seed(0)
    res = train(GPT(CFG), corpus, out=tmp_path / "teacher.tinygpt", device="cpu", **{**FAST, "steps": 6})
    return res.path


def randomized(cfg=CFG, seed=0) -> GPT:
    torch.manual_seed(seed)
    m = GPT(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return m


# ------------------------------------------------------------------------------------- the loss
def hand_loss(s, t, y, T, alpha, reverse, kl_mask=None):
    """The formula written out with Python floats, one position at a time."""

    def softmax(row):
        m = max(row)
        e = [math.exp(v - m) for v in row]
        z = sum(e)
        return [v / z for v in e]

    kls, nlls = [], []
    for b in range(len(s)):
        for i in range(len(s[b])):
            ps = softmax([v / T for v in s[b][i]])
            pt = softmax([v / T for v in t[b][i]])
            p, q = (ps, pt) if reverse else (pt, ps)
            kl = sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))
            in_kl = y[b][i] != -100 if kl_mask is None else kl_mask[b][i]
            if in_kl:
                kls.append(kl)
            if y[b][i] != -100:
                p1 = softmax(s[b][i])
                nlls.append(-math.log(p1[y[b][i]]))
    kl = sum(kls) / len(kls)
    nll = sum(nlls) / len(nlls)
    return alpha * T * T * kl + (1 - alpha) * nll, kl, nll


@pytest.mark.parametrize("reverse", [False, True])
def test_loss_matches_a_hand_computation_with_masking(reverse):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 5, generator=g) * 2
    t = torch.randn(2, 3, 5, generator=g) * 2
    y = torch.tensor([[1, -100, 4], [0, 2, -100]])
    loss, parts = distill_loss(s, t, y, temperature=2.5, alpha=0.3, reverse=reverse)
    want, kl, nll = hand_loss(s.tolist(), t.tolist(), y.tolist(), 2.5, 0.3, reverse)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert parts["kl"] == pytest.approx(kl, rel=1e-5) and parts["nll"] == pytest.approx(nll, rel=1e-5)
    # masked positions really are excluded: changing their logits changes nothing
    s2 = s.clone()
    s2[0, 1] += 5.0
    assert distill_loss(s2, t, y, temperature=2.5, alpha=0.3, reverse=reverse)[0].item() == pytest.approx(loss.item())


def test_forward_and_reverse_kl_differ_and_kl_mask_is_honoured():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(1, 4, 6, generator=g), torch.randn(1, 4, 6, generator=g) * 3
    y = torch.tensor([[1, 2, 3, 4]])
    fwd = distill_loss(s, t, y, temperature=1.0, alpha=1.0)[0].item()
    rev = distill_loss(s, t, y, temperature=1.0, alpha=1.0, reverse=True)[0].item()
    assert fwd > 0 and rev > 0 and abs(fwd - rev) > 1e-3
    mask = torch.tensor([[False, False, True, True]])
    got = distill_loss(s, t, y, temperature=1.0, alpha=0.6, kl_mask=mask)[0].item()
    assert got == pytest.approx(hand_loss(s.tolist(), t.tolist(), y.tolist(), 1.0, 0.6, False, mask.tolist())[0])


def test_kl_is_zero_when_the_student_is_the_teacher():
    student = randomized()
    objective = DistillObjective(GPTTeacher(copy.deepcopy(student)), DistillSettings(temperature=3.0, alpha=0.7))
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    loss = objective(student.train(), (x, y, None))
    assert objective.last["kl"] == pytest.approx(0.0, abs=1e-6)
    assert loss.item() == pytest.approx(0.3 * student(x, return_type="loss", targets=y).item(), rel=1e-5)
    other = DistillObjective(GPTTeacher(randomized(seed=1)), DistillSettings())
    other(student, (x, y, None))
    assert other.last["kl"] > 1e-3  # a different teacher: a positive KL


def test_distill_from_itself_starts_with_zero_kl(corpus):
    teacher = randomized()
    res = distill(copy.deepcopy(teacher), teacher, corpus, device="cpu", **{**FAST, "steps": 1})
    assert res.history[0]["kl"] == pytest.approx(0.0, abs=1e-6)


def test_settings_are_validated():
    for bad in (dict(temperature=0), dict(alpha=1.5), dict(on_policy=-0.1)):
        with pytest.raises(ValueError):
            DistillSettings(**bad)


# ------------------------------------------------------------------------------------- runs
def test_preset_student_learns_and_val_loss_is_plain_next_token_loss(corpus, teacher_file, tmp_path):
    res = distill("nano", teacher_file, corpus, out=tmp_path / "s.tinygpt", temperature=4.0, alpha=0.7,
                  device="cpu", **{**FAST, "steps": 6, "val_every": 3, "max_lr": 3e-3})  # fmt: skip
    student = load(res.path)
    assert isinstance(student.tokenizer, ByteTokenizer) and student.cfg.n_layers == 2 and student.cfg.d_model == 64
    rec = res.history[-1]
    assert {"kl", "nll", "on_policy", "val_loss"} <= set(rec)
    assert rec["loss"] == pytest.approx(0.7 * 16 * rec["kl"] + 0.3 * rec["nll"], rel=1e-5)
    state = read_checkpoint(res.path).train_state
    assert state["distill"]["teacher"]["path"] == str(teacher_file)
    assert state["distill"]["teacher"]["fingerprint"] == load_teacher(teacher_file).fingerprint
    assert state["distill"]["settings"] == DistillSettings(temperature=4.0, alpha=0.7).to_dict()
    # val_loss is the student's next-token loss on the validation windows, as train() reports it
    tb = TokenBatches(tokenize_corpus(corpus, student.tokenizer, progress=False), res.config, 64)
    with torch.no_grad():
        val = [student(x, return_type="loss", targets=y).item() for x, y in tb.val()]
    assert rec["val_loss"] == pytest.approx(sum(val) / len(val), rel=1e-5)


def test_same_init_and_batches_as_train_for_the_same_seed(corpus):
    """With alpha=0 distillation is plain next-token training: the same numbers as train()."""
    plain = train(preset="nano", corpus=corpus, device="cpu", **FAST)
    kd = distill("nano", randomized(), corpus, alpha=0.0, device="cpu", **FAST)
    assert kd.losses == pytest.approx(plain.losses, rel=1e-5)


def test_on_policy_batches_are_generated_and_labelled(corpus, teacher_file):
    student = randomized(GPTConfig.preset("nano"), seed=2)
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    y = torch.roll(x, -1, 1)
    seq, nll_t, kl_mask = DistillObjective.on_policy_batch(student, x, y, seed=5)
    assert seq.shape == x.shape and torch.equal(seq[:, :8], x[:, :8])
    assert not torch.equal(seq[:, 8:], x[:, 8:])  # the second half is the student's own text
    assert (nll_t[:, 8:] == -100).all() and torch.equal(nll_t[:, :8], y[:, :8])
    assert kl_mask[:, 7:].all() and not kl_mask[:, :7].any()
    assert torch.equal(DistillObjective.on_policy_batch(student, x, y, seed=5)[0], seq)  # seeded
    res = distill(student, teacher_file, corpus, on_policy=1.0, device="cpu", **FAST)
    assert all(h["on_policy"] == 1.0 for h in res.history)
    assert all(math.isfinite(h["loss"]) for h in res.history)


@pytest.mark.parametrize(
    "variant", [dict(moe_experts=4, moe_topk=2), dict(diff_attn=True), dict(mod=True), dict(yoco=True)], ids=str
)
def test_architecture_variant_students(corpus, teacher_file, tmp_path, variant):
    """distill only needs forward logits: MoE, differential-attention, MoD and YOCO students all work."""
    student = GPT(GPTConfig.preset("nano", **variant))
    res = distill(student, teacher_file, corpus, on_policy=0.5, out=tmp_path / "v.tinygpt", device="cpu", **FAST)
    assert all(math.isfinite(h["loss"]) for h in res.history)
    assert load(res.path).cfg == student.cfg
    # the student's own auxiliary loss (e.g. MoE router balance) is part of the objective while training
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    objective = DistillObjective(load_teacher(teacher_file), DistillSettings(temperature=2.0, alpha=0.5))
    loss = objective(student.train(), (x, torch.roll(x, -1, 1), None)).item()
    aux = student.aux_loss().item()
    assert loss == pytest.approx(0.5 * 4 * objective.last["kl"] + 0.5 * objective.last["nll"] + aux, rel=1e-5)
    if "moe_experts" in variant:
        assert aux > 0


def test_resume_continues_exactly(corpus, teacher_file, tmp_path):
    kw = dict(on_policy=0.5, reverse_kl=True, temperature=3.0, device="cpu", **{**FAST, "steps": 6})
    full = distill("nano", teacher_file, corpus, out=tmp_path / "full.tinygpt", **kw)

    def stop_at_3(rec):
        if rec["step"] == 3:
            raise KeyboardInterrupt

    part = distill("nano", teacher_file, corpus, out=tmp_path / "part.tinygpt", callbacks=[stop_at_3], **kw)
    assert part.interrupted and part.step == 3
    rest = distill(None, None, resume=True, out=tmp_path / "part.tinygpt", device="cpu", progress=False)
    assert rest.step == 6 and not rest.interrupted
    assert rest.losses == pytest.approx(full.losses, rel=1e-5)
    a, b = full.model.state_dict(), rest.model.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_resume_checks_the_teacher_and_warns_on_changed_settings(corpus, teacher_file, tmp_path):
    distill("nano", teacher_file, corpus, out=tmp_path / "s.tinygpt", device="cpu", **FAST)
    with pytest.raises(ValueError, match="not the one this run was distilled from"):
        distill(None, randomized(), resume=True, out=tmp_path / "s.tinygpt", device="cpu", **{**FAST, "steps": 6})
    with pytest.warns(UserWarning, match="temperature"):
        res = distill(None, None, resume=True, out=tmp_path / "s.tinygpt", temperature=5.0, device="cpu",
                      progress=False, steps=5)  # fmt: skip
    assert read_checkpoint(res.path).train_state["distill"]["settings"]["temperature"] == 5.0


# ------------------------------------------------------------------------------------- tokenizers
def permuted_byte_tokenizer() -> BPETokenizer:
    """256 byte symbols like the byte tokenizer, but in another id order: same size, different content."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return BPETokenizer(tok)


def test_tokenizer_mismatch_of_the_same_size_is_a_clear_error(corpus, teacher_file):
    student = GPT(GPTConfig.preset("nano"), tokenizer=permuted_byte_tokenizer())
    with pytest.raises(TokenizerMismatch) as e:
        distill(student, teacher_file, corpus, device="cpu", **FAST)
    msg = str(e.value)
    assert "ids differ" in msg and "--tokenizer" in msg


def test_same_content_under_another_spelling_matches(corpus, teacher_file):
    """A byte-level tokenizer.json (as exported for Hugging Face) is the byte tokenizer's vocabulary."""
    student = GPT(GPTConfig.preset("nano"), tokenizer=BPETokenizer.from_str(byte_tokenizer_json()))
    assert distill(student, teacher_file, corpus, device="cpu", **{**FAST, "steps": 1}).step == 1
    with pytest.raises(TokenizerMismatch, match="the tokenizer given"):
        distill("nano", teacher_file, corpus, tokenizer=permuted_byte_tokenizer(), device="cpu", **FAST)


# ------------------------------------------------------------------------------------- Hugging Face teacher
def test_hugging_face_directory_teacher(corpus, teacher_file, tmp_path):
    teacher = load(teacher_file)
    export_hf(teacher, tmp_path / "hf")
    hf_teacher = load_teacher(tmp_path / "hf")
    assert hf_teacher.kind == "hf" and hf_teacher.n_ctx == 64 and hf_teacher.d_vocab == 256
    x = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(hf_teacher.logits(x), GPTTeacher(teacher).logits(x), atol=1e-5)
    res = distill("nano", tmp_path / "hf", corpus, out=tmp_path / "s.tinygpt", device="cpu", **FAST)
    assert isinstance(res.model.tokenizer, ByteTokenizer)  # the directory's byte-level tokenizer, recognised
    rec = read_checkpoint(res.path).train_state["distill"]["teacher"]
    assert rec["kind"] == "hf" and rec["path"] == str(tmp_path / "hf")
    # the same weights give the same distillation as the .tinygpt teacher
    same = distill("nano", teacher_file, corpus, device="cpu", **FAST)
    assert res.losses == pytest.approx(same.losses, rel=1e-4)


def test_any_hugging_face_causal_lm_directory_can_teach(corpus, tmp_path):
    """Not only GPT-2: a (tiny, random) Llama directory with a byte-level tokenizer teaches a nano student."""
    import transformers

    from tinygpt.interop.hf import hf_tokenizer, import_hf

    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=48, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    hf_tokenizer(ByteTokenizer()).save_pretrained(tmp_path / "llama")
    res = distill("nano", tmp_path / "llama", corpus, device="cpu", **{**FAST, "ctx": None, "steps": 2})
    assert res.config.ctx == 48  # the shorter of the two contexts
    assert res.history[0]["kl"] > 0 and isinstance(res.model.tokenizer, ByteTokenizer)
    assert import_hf(tmp_path / "llama").cfg.normalization_type == "RMS"  # and since issue 16 it imports too


# ------------------------------------------------------------------------------------- CLI
def test_cli_distill_end_to_end(corpus, teacher_file, tmp_path, capsys):
    out = tmp_path / "s.tinygpt"
    args = ["distill", "nano", "--teacher", str(teacher_file), "--corpus", str(corpus), "--tokenizer", "byte",
            "--steps", "3", "--batch", "2", "--ctx", "32", "--warmup", "1", "--val-every", "0",
            "--temperature", "4", "--alpha", "0.7", "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "done: step 3" in printed and "kl" in printed
    state = read_checkpoint(out).train_state
    assert state["step"] == 3 and state["distill"]["settings"]["temperature"] == 4.0
    assert main(["distill", "nano", "--out", str(out), "--steps", "5", "--resume", "--no-progress"]) == 0
    assert "done: step 5" in capsys.readouterr().out
    assert read_checkpoint(out).train_state["distill"]["settings"]["alpha"] == 0.7  # kept from the first run


def test_cli_distill_errors_are_clear(corpus, teacher_file, tmp_path, capsys):
    tok_dir = tmp_path / "tok"
    permuted_byte_tokenizer().save(tok_dir)
    base = ["distill", "nano", "--corpus", str(corpus), "--out", str(tmp_path / "s.tinygpt"), "--no-progress"]
    assert main([*base, "--teacher", str(teacher_file), "--tokenizer", str(tok_dir)]) == 2
    err = capsys.readouterr().err
    assert "does not match the teacher's" in err and "Traceback" not in err
    assert main(base) == 2
    assert "--teacher is required" in capsys.readouterr().err
    assert main([*base, "--teacher", str(tmp_path / "missing.tinygpt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_strategy_is_checked_and_lockstep_generation_is_neutral_in_one_process(corpus, teacher_file):
    with pytest.raises(ValueError, match="strategy must be one of ddp, fsdp, got 'zero3'"):
        distill("nano", teacher_file, corpus, strategy="zero3", device="cpu", **FAST)
    student = randomized(GPTConfig.preset("nano"), seed=3).train()
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    teacher = load_teacher(teacher_file)
    for gen in (None, 5):  # outside torchrun, lockstep (FSDP's rule) generates exactly when the batch is on-policy
        losses = [
            DistillObjective(teacher, DistillSettings(), lockstep=lockstep)(student, (x, torch.roll(x, -1, 1), gen))
            for lockstep in (False, True)
        ]
        assert losses[0].item() == losses[1].item()
