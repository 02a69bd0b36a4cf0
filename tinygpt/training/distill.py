"""`distill()`: knowledge distillation from a teacher (a `.tinygpt` file or a local Hugging Face causal LM).

The student minimises, on each micro-batch of tokens both models see,

    loss = α · T² · KL(teacher_T ‖ student_T) + (1 − α) · NLL(student)

where `p_T = softmax(logits / T)` (Hinton et al. 2015; the T² keeps gradient scales comparable across
temperatures), KL and NLL are means over the unmasked positions (targets of -100 are masked), and the teacher
runs in eval mode under `torch.no_grad()`. Options:

- `reverse_kl=True`: KL(student_T ‖ teacher_T), mode-seeking (as in MiniLLM, Gu et al. 2024).
- `on_policy=λ`: each micro-batch is, with probability λ, replaced by sequences the student samples itself
  (the first half of a real window as prompt, the rest generated at temperature 1) which the teacher then
  labels, as in GKD (Agarwal et al. 2024). On such a batch the KL covers the positions that predict generated
  tokens and the NLL only the positions whose context and target are still real text.

The student can be any tinygpt model (dense, MoE, differential attention, MoD, ...): distillation only needs
its forward logits (plus `model.aux_loss()`, e.g. router balancing, while training, when the model has one).
Both models must share a tokenizer, compared by vocabulary content (`tinygpt.tokenizer.vocab_mismatch`).

Training is `tinygpt.training.loop.fit`, the loop `train()` uses: schedule, accumulation, clipping, progress bar,
atomic checkpoints, exact resume and callbacks. The reported `val_loss` is the student's plain next-token
loss, comparable with `train()`'s. The checkpoint records the teacher (path and weight fingerprint) and the
distillation settings, so `resume=True` continues the same run.
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from tinygpt.checkpoint import CheckpointError, as_model
from tinygpt.config import PRESETS, GPTConfig
from tinygpt.interop.causal_lm import CausalLM, GPTCausalLM, HFCausalLM, as_causal_lm
from tinygpt.model import GPT
from tinygpt.tokenizer import (
    ByteTokenizer,
    Tokenizer,
    TokenizerError,
    describe_tokenizer,
    load_tokenizer,
    vocab_mismatch,
)
from tinygpt.training import distributed
from tinygpt.training.loop import TokenBatches, TrainResult, fit, next_token_loss
from tinygpt.training.run import corpus_batches, start_run, warn_changed_options
from tinygpt.training.settings import RunOptions, SettingError, field_names, given


class TokenizerMismatch(TokenizerError):
    """Student and teacher do not share a tokenizer."""


@dataclass
class DistillSettings:
    """The distillation objective (saved in the checkpoint; `resume` reuses it).

    Attributes:
        temperature: T > 0; both distributions are softened by it.
        alpha: weight of the distillation term in [0, 1]; 1 - alpha weighs the plain NLL.
        reverse_kl: use KL(student || teacher) instead of KL(teacher || student).
        on_policy: fraction in [0, 1] of micro-batches made of student-generated sequences.
    """

    temperature: float = 2.0
    alpha: float = 0.5
    reverse_kl: bool = False
    on_policy: float = 0.0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise SettingError(f"temperature must be > 0, got {self.temperature!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise SettingError(f"alpha must be in [0, 1], got {self.alpha!r}")
        if not 0.0 <= self.on_policy <= 1.0:
            raise SettingError(f"on_policy must be in [0, 1], got {self.on_policy!r}")
        self.reverse_kl = bool(self.reverse_kl)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DistillSettings:
        known = set(field_names(cls))
        if unknown := sorted(set(d) - known):
            raise SettingError(f"unknown distillation setting(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


# --------------------------------------------------------------------------------------------- the loss
def distill_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    *,
    temperature: float = 1.0,
    alpha: float = 0.5,
    reverse: bool = False,
    kl_mask: Tensor | None = None,
    vocab_size: int | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """`α·T²·KL + (1 − α)·NLL`, each a mean over its unmasked positions.

    Args:
        student_logits, teacher_logits: [batch, pos, vocab] (the teacher's carry no gradient).
        targets: [batch, pos] next-token ids; -100 masks a position out of the NLL (and of the KL unless
            `kl_mask` is given).
        temperature: T; the KL compares softmax(logits / T).
        alpha: weight of the KL term.
        reverse: KL(student_T || teacher_T) instead of KL(teacher_T || student_T).
        kl_mask: [batch, pos] bool, positions the KL covers (default `targets != -100`).
        vocab_size: compare only the first `vocab_size` logits (when the two models' output sizes differ,
            e.g. a padded embedding; ids beyond the tokenizer never occur).
    Returns:
        (scalar loss, {"kl": ..., "nll": ...} as floats).
    """
    s, t = student_logits.float(), teacher_logits.float()
    if vocab_size is not None:
        s_kl, t_kl = s[..., :vocab_size], t[..., :vocab_size]
    else:
        if s.shape[-1] != t.shape[-1]:
            raise SettingError(
                f"student and teacher logits have different sizes ({s.shape[-1]} vs {t.shape[-1]}); pass vocab_size="
            )
        s_kl, t_kl = s, t
    log_ps = F.log_softmax(s_kl / temperature, dim=-1)
    log_pt = F.log_softmax(t_kl / temperature, dim=-1)
    if reverse:  # KL(s || t) = sum p_s (log p_s - log p_t)
        kl = F.kl_div(log_pt, log_ps, log_target=True, reduction="none").sum(-1)
    else:  # KL(t || s) = sum p_t (log p_t - log p_s)
        kl = F.kl_div(log_ps, log_pt, log_target=True, reduction="none").sum(-1)
    valid = targets != -100
    mask = valid if kl_mask is None else kl_mask.to(torch.bool)
    kl_mean = (kl * mask).sum() / mask.sum().clamp_min(1)
    nll_tok = F.cross_entropy(s.reshape(-1, s.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="none")
    nll = nll_tok.sum() / valid.sum().clamp_min(1)
    loss = alpha * temperature**2 * kl_mean + (1.0 - alpha) * nll
    return loss, {"kl": kl_mean.item(), "nll": nll.item()}


# --------------------------------------------------------------------------------------------- teachers
# A teacher is a `tinygpt.interop.causal_lm.CausalLM`: a tinygpt model or a Hugging Face causal LM.
Teacher = CausalLM
GPTTeacher = GPTCausalLM
HFTeacher = HFCausalLM


def load_teacher(spec: GPT | CausalLM | str | os.PathLike, device: str | None = None) -> CausalLM:
    """A teacher from a tinygpt `GPT`, a `.tinygpt` file or a local Hugging Face causal-LM directory."""
    return as_causal_lm(spec, device=device, what="teacher")


def tokenizer_hint(teacher: CausalLM) -> str:
    """How to give a student this teacher's tokenizer."""
    fresh = "pass a preset name (e.g. 'nano') as the student to start a fresh one with the teacher's tokenizer"
    if teacher.kind == "hf":
        return f"train the student with `tinygpt train --tokenizer {teacher.source or 'TEACHER_DIR'}`, or {fresh}"
    if isinstance(teacher.tokenizer, ByteTokenizer):
        how = "`tinygpt train --tokenizer byte`"
    else:
        src = teacher.source or "TEACHER.tinygpt"
        how = f"`tinygpt.load('{src}').tokenizer.save(DIR)`, then `tinygpt train --tokenizer DIR`"
    return f"train the student with the teacher's tokenizer ({how}), or {fresh}"


def check_tokenizers(student: Any, teacher: CausalLM, what: str = "the student's tokenizer") -> None:
    """Raise `TokenizerMismatch` unless `student` (a tokenizer) has the teacher's vocabulary content."""
    why = vocab_mismatch(student, teacher.tokenizer)
    if why is not None:
        raise TokenizerMismatch(
            f"{what} ({describe_tokenizer(student)}) does not match the teacher's "
            f"({describe_tokenizer(teacher.tokenizer)}): {why}. Distillation compares both models' "
            f"distributions over the same token ids: {tokenizer_hint(teacher)}."
        )


# --------------------------------------------------------------------------------------------- batches
class DistillBatches:
    """`TokenBatches` whose micro-batches carry an on-policy seed (or None): `(x, y, seed)`.

    Whether a micro-batch is on-policy is a pure function of (seed, step, micro-batch index), so a resumed
    run makes the same choices.
    """

    def __init__(self, inner: TokenBatches, on_policy: float, seed: int):
        self.inner, self.on_policy, self.seed = inner, on_policy, seed
        self.has_val = inner.has_val
        self.tokens_per_step = inner.tokens_per_step

    @property
    def device(self):
        return self.inner.device

    @device.setter
    def device(self, value) -> None:
        self.inner.device = value

    def train(self, step: int) -> list[tuple[Tensor, Tensor, int | None]]:
        out = []
        for m, (x, y) in enumerate(self.inner.train(step)):
            gen = None
            if self.on_policy > 0:
                r = random.Random(f"distill:{self.seed}:{step}:{m}")
                if r.random() < self.on_policy:
                    gen = r.randrange(2**62)
            out.append((x, y, gen))
        return out

    def val(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self.inner.val()


class DistillObjective:
    """`(student, micro_batch) -> loss` for `fit`; also logs the KL and NLL parts into each step's record."""

    def __init__(
        self, teacher: CausalLM, settings: DistillSettings, vocab_size: int | None = None, *, lockstep: bool = False
    ):
        """
        Args:
            teacher, settings: the teacher and the objective.
            vocab_size: compare only the first `vocab_size` logits (see `distill_loss`).
            lockstep: every data-parallel process generates whenever one does (FSDP: each forward of the
                sharded student is a collective, so all processes must run the same forwards); a process
                whose own micro-batch is not on-policy generates too and discards the result.
        """
        self.teacher, self.settings, self.vocab_size, self.lockstep = teacher, settings, vocab_size, lockstep
        self._parts: list[dict[str, float]] = []
        self.last: dict[str, float] = {}

    def __call__(self, model: GPT, batch: tuple) -> Tensor:
        x, y = batch[0], batch[1]
        gen = batch[2] if len(batch) > 2 else None
        kl_mask = None
        if self.lockstep and distributed.any_process(gen is not None, x.device):
            generated = self.on_policy_batch(model, x, y, gen if gen is not None else 0)
            if gen is not None:
                x, y, kl_mask = generated
        elif gen is not None:
            x, y, kl_mask = self.on_policy_batch(model, x, y, gen)
        teacher_logits = self.teacher.logits(x)
        student_logits = model(x)
        st = self.settings
        loss, parts = distill_loss(
            student_logits,
            teacher_logits,
            y,
            temperature=st.temperature,
            alpha=st.alpha,
            reverse=st.reverse_kl,
            kl_mask=kl_mask,
            vocab_size=self.vocab_size,
        )
        if model.training and callable(getattr(model, "aux_loss", None)):
            loss = loss + model.aux_loss()  # e.g. MoE router balance; zero for dense models
        parts["on_policy"] = float(gen is not None)
        self.last = parts
        self._parts.append(parts)
        return loss

    @staticmethod
    def on_policy_batch(model: GPT, x: Tensor, y: Tensor, seed: int) -> tuple[Tensor, Tensor, Tensor]:
        """Student-generated sequences: the first half of each window as prompt, the rest sampled (T=1).

        Returns:
            (tokens [b, ctx], NLL targets [b, ctx] with -100 where the context is no longer real text,
            KL mask [b, ctx]: the positions that predict generated tokens).
        """
        from tinygpt.sampling import generate_tokens

        ctx = x.shape[1]
        p = max(1, ctx // 2)
        new = list(generate_tokens(model, x[:, :p], ctx - p, temperature=1.0, seed=seed)) if ctx > p else []
        seq = torch.cat([x[:, :p], *(t[:, None] for t in new)], dim=1)
        nll_targets = y.clone()
        nll_targets[:, p:] = -100
        kl_mask = (torch.arange(ctx, device=x.device) >= p - 1)[None].expand_as(seq)
        return seq, nll_targets, kl_mask

    def log(self, rec: dict[str, float]) -> None:
        """A `fit` callback: adds the step's mean `kl`, `nll` and `on_policy` fraction to its record."""
        if self._parts:
            for k in self._parts[0]:
                rec[k] = sum(p[k] for p in self._parts) / len(self._parts)
        self._parts = []


# --------------------------------------------------------------------------------------------- distill()
def distill(
    student: GPT | str | os.PathLike | None,
    teacher: GPT | CausalLM | str | os.PathLike | None,
    corpus: Any = None,
    *,
    temperature: float | None = None,
    alpha: float | None = None,
    reverse_kl: bool | None = None,
    on_policy: float | None = None,
    tokenizer: Any = None,
    **options: Any,
) -> TrainResult:
    """Distil a teacher into a student on a corpus.

    Args:
        student: a tinygpt `GPT` (any architecture), a `.tinygpt` path, or a preset name ("nano", "tiny", ...)
            for a fresh student with the teacher's tokenizer and output size. Ignored with `resume=True`.
        teacher: a tinygpt `GPT`, a `.tinygpt` path, or a local Hugging Face causal-LM directory (any
            `tinygpt.interop.causal_lm.CausalLM`). With `resume=True`, None reloads the teacher the checkpoint
            records (its fingerprint is checked).
        corpus: a path (text file, directory, .jsonl), a `Corpus`, or None for the built-in Shakespeare.
        temperature, alpha, reverse_kl, on_policy: see `DistillSettings` (defaults 2.0, 0.5, False, 0.0;
            on resume, the saved values unless given).
        tokenizer: optional; must match the teacher's (checked), e.g. the teacher's tokenizer directory.
        **options: the shared keyword tail, as for `train()` (`TrainConfig` fields and `config`, `out`, `resume`,
            `callbacks`, `device`, `progress`, `cache_dir`, `strategy`). Each step's record also holds `kl`,
            `nll` and `on_policy` (the fraction of on-policy micro-batches). Under torchrun, `strategy="fsdp"`
            shards the student (the teacher is replicated on every process); the micro-batches of a step are
            split whole across processes, so `accum` must be a multiple of the number of processes; the run
            then equals a single-process run with the same settings.
    Returns:
        `TrainResult`; `val_loss` is the student's plain next-token loss (comparable with `train()`).
    Raises:
        TokenizerMismatch: the student's (or `tokenizer`'s) vocabulary differs from the teacher's.
    """
    own = ("temperature", "alpha", "reverse_kl", "on_policy", "tokenizer")
    opts, settings = RunOptions.split(options, what="distill", own=own)
    explicit = given(temperature=temperature, alpha=alpha, reverse_kl=reverse_kl, on_policy=on_policy)
    run = start_run(opts, settings, what="distill", record="distill")
    cfg = run.config
    if run.resumed is not None:
        rec = run.record
        dset = DistillSettings.from_dict({**rec["settings"], **explicit})
        warn_changed_options(rec["settings"], explicit, "distillation settings")
        saved_teacher = rec["teacher"]
        if teacher is None:
            if not saved_teacher.get("path"):
                raise SettingError("the run's teacher was an in-memory model; pass teacher= to resume")
            teacher = saved_teacher["path"]
    else:
        if teacher is None:
            raise SettingError("distill needs a teacher: a .tinygpt file, a Hugging Face directory or a GPT")
        dset = DistillSettings(**explicit)
    t = load_teacher(teacher)
    if run.resumed is not None and t.fingerprint != saved_teacher.get("fingerprint"):
        raise SettingError(
            f"the teacher {t.source or '(in-memory)'} is not the one this run was distilled from (weight "
            f"fingerprint {t.fingerprint[:12]} vs saved {str(saved_teacher.get('fingerprint'))[:12]} from "
            f"{saved_teacher.get('path')}); pass the original teacher, or start a new run without resume"
        )
    tok_given = load_tokenizer(tokenizer) if tokenizer is not None else None
    if tok_given is not None:
        check_tokenizers(tok_given, t, "the tokenizer given")
    if run.resumed is not None:
        model = run.resumed.model
    else:
        run.seed()  # after loading the teacher: the same student init as train(seed=...)
        model = make_student(student, t, tok_given, cfg.ctx)
    tok = model._require_tokenizer()
    check_tokenizers(tok, t)
    vocab_size = _shared_vocab(model, t, tok)
    if cfg.ctx is None and t.n_ctx is not None:
        cfg.ctx = min(model.cfg.n_ctx, t.n_ctx)
    if t.n_ctx is not None and cfg.ctx is not None and cfg.ctx > t.n_ctx:
        raise SettingError(f"ctx={cfg.ctx} exceeds the teacher's context of {t.n_ctx} tokens; lower --ctx")
    tokens, corpus_rec = corpus_batches(model, run.corpus(corpus), cfg, run=run)
    batches = DistillBatches(tokens, dset.on_policy, cfg.seed)
    t.to(distributed.local_device(run.device))  # under torchrun each process's own GPU, as `fit` uses
    objective = DistillObjective(t, dset, vocab_size, lockstep=opts.strategy == "fsdp" and dset.on_policy > 0)
    state = {"corpus": corpus_rec, "distill": {"teacher": t.record(), "settings": dset.to_dict()}}
    result = fit(
        model,
        cfg,
        batches,
        loss_fn=objective,
        val_loss_fn=next_token_loss,
        **run.fit_options(objective.log),
        state=state,
        desc="distill",
    )
    result.model.train_state["distill"] = state["distill"]
    return result


def make_student(
    student: GPT | str | os.PathLike, teacher: CausalLM, tokenizer: Tokenizer | None = None, ctx: int | None = None
) -> GPT:
    """The student: a given model or `.tinygpt` file (`as_model`), or a fresh preset with the teacher's tokenizer
    and output size."""
    if student is None:
        raise SettingError("distill needs a student: a GPT, a .tinygpt file or a preset name such as 'nano'")
    if isinstance(student, (str, os.PathLike)) and not Path(student).exists():
        if isinstance(student, str) and student in PRESETS:
            tok = tokenizer if tokenizer is not None else teacher.tinygpt_tokenizer()
            overrides: dict[str, Any] = {"d_vocab": max(teacher.d_vocab, tok.vocab_size)}
            if ctx and ctx > GPTConfig.preset(student).n_ctx:
                overrides["n_ctx"] = ctx
            return GPT(GPTConfig.preset(student, **overrides), tokenizer=tok)
        raise CheckpointError(
            f"student {student!s} is neither an existing .tinygpt file nor a preset ({', '.join(PRESETS)})"
        )
    return as_model(student, what="student")


def _shared_vocab(model: GPT, teacher: CausalLM, tok: Tokenizer) -> int | None:
    """None when both output the same number of logits; else the tokenizer's size, which both must cover."""
    if model.cfg.d_vocab == teacher.d_vocab:
        return None
    v = tok.vocab_size
    if model.cfg.d_vocab < v or teacher.d_vocab < v:
        raise SettingError(
            f"the student outputs {model.cfg.d_vocab} logits and the teacher {teacher.d_vocab}, but the tokenizer "
            f"has {v} tokens; both must cover it"
        )
    return v


__all__ = [
    "DistillBatches",
    "DistillObjective",
    "DistillSettings",
    "GPTTeacher",
    "HFTeacher",
    "Teacher",
    "TokenizerMismatch",
    "check_tokenizers",
    "distill",
    "distill_loss",
    "load_teacher",
    "make_student",
    "tokenizer_hint",
]
