"""Training: the loop every objective shares (`fit`), pretraining, finetuning, distillation, SFT, LoRA, ES.

| module | holds |
|---|---|
| `settings` | `TrainConfig` and the keyword tail every training function shares (`RunOptions`, did-you-mean errors) |
| `loop` | `fit` (the loop), `TrainResult`, `TokenBatches`, `make_optimizer`, `TrainingDiverged` |
| `run` | the start every training function shares: `start_run` (resume, settings), `corpus_batches` |
| `pretrain` | `train` (a new or given model on a corpus), `finetune` (continue an existing one) |
| `distill` | `distill`: a student learns a teacher's distributions (a tinygpt or Hugging Face causal LM) |
| `sft` | `sft`: supervised fine-tuning on chat data (`data`: records, `filters`, `batches`, `special_tokens`) |
| `templates` | chat templates as data (`load_template`) |
| `chat_turns` | `chat`: a model's reply in its template; the turn sampler Magpie uses |
| `magpie` | `magpie`: instruction data synthesised from a chat model's own template |
| `lora` | LoRA adapters (`add_lora`, `lora_finetune`, `.lora` files) |
| `es` | `es`: evolution strategies, gradient-free, for any reward |
| `distributed` | data-parallel runs under torchrun (DDP or FSDP), joined by `fit` automatically |

Every training function takes the model first, then its data (`corpus`: running text; `data`: SFT records;
`objective` for `es`), then keyword-only options, and the shared keyword tail (`tinygpt.training.settings`);
each returns a `TrainResult` (or a subclass) with `.figure()` and continues a saved run with `resume=True`.
"""

from tinygpt.training import distributed  # noqa: F401
from tinygpt.training.chat_turns import chat
from tinygpt.training.distill import DistillSettings, TokenizerMismatch, distill, distill_loss, load_teacher
from tinygpt.training.es import ESConfig, ESResult, es, word_list_reward, words_of
from tinygpt.training.loop import (
    TokenBatches,
    TrainingDiverged,
    TrainResult,
    default_device,
    fit,
    make_optimizer,
    next_token_loss,
)
from tinygpt.training.lora import (
    LoRAError,
    LoRATrainResult,
    add_lora,
    load_lora,
    lora_finetune,
    merge_lora,
    save_lora,
)
from tinygpt.training.magpie import MagpieResult, magpie
from tinygpt.training.pretrain import FINETUNE_DEFAULTS, finetune, train
from tinygpt.training.run import ResumedRun, corpus_batches, resume_run, start_run
from tinygpt.training.settings import RunOptions, SettingError, TrainConfig, UnknownSettingError
from tinygpt.training.sft import (
    SFT_DEFAULTS,
    Conversation,
    MinHashDeduper,
    SFTDataError,
    SFTResult,
    add_special_tokens,
    filter_conversations,
    load_sft_data,
    repetition_score,
    sft,
)
from tinygpt.training.templates import Template, TemplateError, available_templates, encode_literal, load_template

__all__ = [
    "FINETUNE_DEFAULTS",
    "SFT_DEFAULTS",
    "Conversation",
    "DistillSettings",
    "ESConfig",
    "ESResult",
    "LoRAError",
    "LoRATrainResult",
    "MagpieResult",
    "MinHashDeduper",
    "ResumedRun",
    "RunOptions",
    "SFTDataError",
    "SFTResult",
    "SettingError",
    "Template",
    "TemplateError",
    "TokenBatches",
    "TokenizerMismatch",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "UnknownSettingError",
    "add_lora",
    "add_special_tokens",
    "available_templates",
    "chat",
    "corpus_batches",
    "default_device",
    "distill",
    "distill_loss",
    "encode_literal",
    "es",
    "filter_conversations",
    "finetune",
    "fit",
    "load_lora",
    "load_sft_data",
    "load_teacher",
    "load_template",
    "lora_finetune",
    "magpie",
    "make_optimizer",
    "merge_lora",
    "next_token_loss",
    "repetition_score",
    "resume_run",
    "save_lora",
    "sft",
    "start_run",
    "train",
    "word_list_reward",
    "words_of",
]
