"""Supervised fine-tuning on chat data (`sft`): the loss on the assistant's replies, in a chat template.

    import tinygpt
    res = tinygpt.sft("tiny.tinygpt", "data/sft_small.jsonl", template="chatml", steps=200, out="chat.tinygpt")
    print(res.report)                     # records each quality filter dropped
    print(tinygpt.chat(res.model, "Who is Puck?"))

**Data** (`tinygpt.training.sft.data`). JSONL, one record per line: `{"instruction": ..., "response": ...}`
(optional `"input"`, appended to the instruction after a blank line, and `"system"`; `"output"` is accepted for
`"response"`), or chat style `{"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}`
(ShareGPT's `{"conversations": [{"from": "human" | "gpt" | "system", "value": ...}]}` too). Blank lines are
skipped; a malformed line raises `SFTDataError` naming `file:line` and what to fix. A list of such dicts works
as well.

**Template and special tokens** (`tinygpt.training.templates`, `tinygpt.training.sft.special_tokens`). Each
conversation is rendered with a chat template ("chatml" by default). Special tokens the template needs are added
to the tokenizer and to the embedding and unembedding (new rows start at the mean of the existing rows,
`cfg.d_vocab` grows), and the tokenizer records them, so `save`/`load` round-trip the chat model. A model that
already has them is left alone.

**Loss mask** (`tinygpt.training.sft.batches`). Only the tokens of assistant replies (their content and the
template's end-of-turn, e.g. `<|im_end|>`) are targets; prompt, system and template tokens and padding are -100
(`train_on_prompt=True` adds the system and user turns' content and end-of-turn). The loss of an optimizer step
is the mean cross-entropy over *all* target tokens of its global batch (every micro-batch and process), not a
mean of per-sequence or per-micro-batch means, so long and short replies weigh by their tokens and the loss does
not depend on how the batch is split into micro-batches or processes.

**Padding or packing.** By default each conversation is one row, right-padded to the longest row of its
micro-batch (causal attention: padding never influences real tokens). `packing=True` instead concatenates
whole conversations greedily into rows of up to `ctx + 1` tokens. tinygpt's attention has no document
masking, so in a packed row a conversation can attend to the ones before it in the same row: faster on
short data, slightly different from training on each alone (the usual trade-off of packing without
variable-length attention). Validation always uses padding, so its loss is comparable across both modes.
A conversation longer than `ctx + 1` tokens is cut at the end; one whose reply would not start inside the
context is dropped and counted as `too_long`.

**Filters** (`tinygpt.training.sft.filters`: `min_length`, `max_repetition`, `dedup`, `near_dedup`) run before
tokenization, in that order after dropping empty replies; `SFTResult.report` says how many records each dropped.

Training is `tinygpt.training.loop.fit`: LR schedule, gradient clipping and accumulation, progress bar, atomic
checkpoints, exact `resume`, callbacks and `strategy=` under torchrun, as for `train()`. `finetune` (continued
next-token training on plain text) lives in `tinygpt.training.pretrain` and is re-exported here.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tinygpt.model import GPT
from tinygpt.training.loop import TrainResult, fit
from tinygpt.training.pretrain import FINETUNE_DEFAULTS, check_resumed_base, finetune
from tinygpt.training.run import start_run, warn_changed_options
from tinygpt.training.settings import RunOptions, SettingError, given
from tinygpt.training.sft.batches import (
    Example,
    SFTBatches,
    collate,
    encode_conversations,
    pack_examples,
    sft_loss,
    split_examples,
)
from tinygpt.training.sft.data import (
    Conversation,
    SFTDataError,
    data_hash,
    data_name,
    load_sft_data,
    read_jsonl,
    record_to_messages,
)
from tinygpt.training.sft.filters import MinHashDeduper, filter_conversations, repetition_score
from tinygpt.training.sft.special_tokens import add_special_tokens, resize_token_embeddings
from tinygpt.training.templates import Template, TemplateError, load_template

SFT_DEFAULTS: dict[str, Any] = {"steps": 200, "max_lr": 3e-4, "warmup": 20, "val_split": 0.05, "val_every": 50}
_FILTER_DEFAULTS: dict[str, Any] = {
    "min_length": 0,
    "max_repetition": None,
    "dedup": True,
    "near_dedup": None,
    "packing": False,
    "train_on_prompt": False,
}


@dataclass(repr=False)
class SFTResult(TrainResult):
    """What `sft` returns: a `TrainResult` (model, history, path, `.figure()`) plus the data's story.

    Attributes:
        template: the chat template used.
        report: records dropped, by filter: `empty`, `min_length`, `repetition`, `exact_dup`, `near_dup`
            (those switched on), and `too_long` (no reply token fits in the context).
        n_records: records read.
        n_train, n_val: examples trained on and held out (before packing).
        n_rows: training rows (= n_train without packing).
        truncated: examples cut at the context length (kept).
        packing: whether rows were packed.
    """

    template: Template | None = None
    report: dict[str, int] = field(default_factory=dict)
    n_records: int = 0
    n_train: int = 0
    n_val: int = 0
    n_rows: int = 0
    truncated: int = 0
    packing: bool = False

    def describe_data(self) -> str:
        """One line: records read, dropped per filter, kept for training and validation."""
        dropped = ", ".join(f"{k} {v}" for k, v in self.report.items())
        rows = f" in {self.n_rows} packed rows" if self.packing else ""
        return (
            f"{self.n_records} records; dropped: {dropped or 'none'}; {self.n_train} train{rows} + {self.n_val} val "
            f"examples ({self.truncated} truncated to the context)"
        )

    def __repr__(self) -> str:
        return super().__repr__() + f" [{self.describe_data()}]"


def sft(
    model: GPT | str | os.PathLike | None,
    data: str | os.PathLike | Sequence[Any] | None = None,
    *,
    template: str | os.PathLike | Template | None = None,
    packing: bool | None = None,
    min_length: int | None = None,
    max_repetition: float | None = None,
    dedup: bool | None = None,
    near_dedup: float | None = None,
    train_on_prompt: bool | None = None,
    **options: Any,
) -> SFTResult:
    """Supervised fine-tuning on instruction / chat data with a chat template; loss on the replies only.

    Args:
        model: a `GPT` (changed in place: special tokens, then training) or a `.tinygpt` path. Ignored with
            `resume=True`.
        data: a JSONL path or a list of records (see the module docstring). With `resume=True`, None reads
            the file the run recorded.
        template: a chat template name ("chatml", "alpaca"), JSON path or `Template` (default "chatml"; on
            resume, the run's).
        packing: pack several conversations per row instead of padding (default False).
        min_length, max_repetition, dedup, near_dedup: quality filters (see `filter_conversations`;
            defaults 0, None, True, None). On resume, the run's unless given.
        train_on_prompt: also train on the system and user turns (their content and end-of-turn), as
            "train on inputs" options elsewhere do (default False: replies only). A tiny model needs it before
            Magpie can sample user queries from it (see `tinygpt.training.magpie`).
        **options: the shared keyword tail, as for `train()` (`TrainConfig` fields and `config`, `out`, `resume`,
            `callbacks`, `device`, `progress`, `strategy`); the setting defaults are `train()`'s except
            `SFT_DEFAULTS` (200 steps, max_lr 3e-4, warmup 20, 5% validation every 50 steps). `ctx` (default: the
            model's n_ctx) is the longest row. Each step's record also holds `epoch` (passes over the training
            examples so far).
    Returns:
        `SFTResult`; `.model.train_state["sft"]` (also in the saved file) records the template, the data and
        the filter report, so `chat(model, ...)` finds the template again.
    Raises:
        SFTDataError: malformed data (`FILE:LINE` named), or no example left after filtering.
        TemplateError: an unknown or malformed template.
    """
    own = ("template", "packing", "min_length", "max_repetition", "dedup", "near_dedup", "train_on_prompt")
    run_opts, settings = RunOptions.split(options, what="sft", own=own)
    explicit = given(
        packing=packing,
        min_length=min_length,
        max_repetition=max_repetition,
        dedup=dedup,
        near_dedup=near_dedup,
        train_on_prompt=train_on_prompt,
    )
    run = start_run(run_opts, settings, what="sft", record="sft", defaults=SFT_DEFAULTS)
    cfg = run.config
    base = str(model) if isinstance(model, (str, os.PathLike)) else getattr(model, "source_path", None)
    if run.resumed is not None:
        rec = run.record
        check_resumed_base(model, rec, run.out)  # a base given on resume must be the run's own
        base = rec.get("base")
        model = run.resumed.model
        tmpl = Template.from_dict(rec["template"])
        if template is not None and load_template(template).to_dict() != tmpl.to_dict():
            raise TemplateError(f"cannot resume with template {template!r}: the run used {tmpl.name!r}")
        opts = {**_FILTER_DEFAULTS, **rec.get("options", {})}
        warn_changed_options(opts, explicit, "data options")
        opts.update(explicit)
        if data is None:
            data = rec.get("data")
            if data is None:
                raise SettingError("the run's data was given in memory; pass data= to resume it")
    else:
        if data is None:
            raise SettingError("sft needs data: a .jsonl file or a list of records")
        model = run.model(model)
        tmpl = load_template(template if template is not None else "chatml")
        opts = {**_FILTER_DEFAULTS, **explicit}
        run.seed()
        add_special_tokens(model, tmpl)
    tok = model._require_tokenizer()
    tmpl.check_tokenizer(tok)
    ctx = cfg.ctx or model.cfg.n_ctx
    if ctx > model.cfg.n_ctx:
        raise SettingError(f"ctx={ctx} exceeds the model's n_ctx={model.cfg.n_ctx}; lower --ctx")
    cfg.ctx = ctx
    convs = load_sft_data(data)
    kept, report = filter_conversations(
        convs,
        min_length=opts["min_length"],
        max_repetition=opts["max_repetition"],
        dedup=opts["dedup"],
        near_dedup=opts["near_dedup"],
    )
    examples, report["too_long"] = encode_conversations(kept, tmpl, tok, ctx, opts["train_on_prompt"])
    if not examples:
        hint = "relax the filters"
        if report["too_long"]:
            hint += ", or raise ctx (too_long: the prompt fills the context)"
        raise SFTDataError(f"no usable example left in {data_name(data)} (dropped: {report}); {hint}")
    train_ex, val_ex = split_examples(examples, cfg.val_split, cfg.seed)
    units = pack_examples(train_ex, ctx) if opts["packing"] else train_ex
    batches = SFTBatches(units, val_ex[: cfg.val_batches * cfg.batch_size], cfg)
    record = {
        "base": base,
        "template": tmpl.to_dict(),
        "data": str(data) if isinstance(data, (str, os.PathLike)) else None,
        "data_sha256": data_hash(data),
        "options": opts,
        "report": report,
        "n_train": len(train_ex),
        "n_val": len(val_ex),
    }
    if run.resumed is not None and record["data_sha256"] != run.record.get("data_sha256"):
        warnings.warn(
            "the SFT data changed since the run started: it will not reproduce an uninterrupted run", stacklevel=2
        )

    def log_epoch(rec: dict[str, float]) -> None:
        rec["epoch"] = batches.epoch_at(int(rec["step"]))

    res = fit(
        model,
        cfg,
        batches,
        loss_fn=sft_loss,
        val_loss_fn=sft_loss,
        **run.fit_options(log_epoch),
        state={"sft": record},
        desc="sft",
    )
    res.model.train_state["sft"] = record
    return SFTResult.extend(
        res,
        template=tmpl,
        report=report,
        n_records=len(convs),
        n_train=len(train_ex),
        n_val=len(val_ex),
        n_rows=len(units),
        truncated=sum(e.truncated for e in examples),
        packing=bool(opts["packing"]),
    )


__all__ = [
    "SFT_DEFAULTS",
    "FINETUNE_DEFAULTS",
    "SFTDataError",
    "SFTResult",
    "SFTBatches",
    "Conversation",
    "Example",
    "MinHashDeduper",
    "add_special_tokens",
    "collate",
    "encode_conversations",
    "filter_conversations",
    "finetune",
    "load_sft_data",
    "pack_examples",
    "read_jsonl",
    "record_to_messages",
    "repetition_score",
    "resize_token_embeddings",
    "sft",
    "sft_loss",
    "split_examples",
]
