"""tinygpt: train, dissect and operate on small GPT language models.

import tinygpt
result = tinygpt.train(preset="tiny", steps=300, out="tiny.tinygpt")   # built-in Shakespeare, bytes
model = tinygpt.load("tiny.tinygpt")
print(tinygpt.generate(model, "ROMEO:", 200, seed=0))
logits, cache = model.run_with_cache("To be, or not to be")          # a TransformerLens ActivationCache
"""

from tinygpt import arch, cli, eval, interop, interp, surgery, training  # noqa: F401  (every layer: swaps register)
from tinygpt._legacy import install_legacy_modules
from tinygpt.checkpoint import CheckpointError, describe, load, read_checkpoint, save
from tinygpt.config import PRESETS, ConfigError, GPTConfig
from tinygpt.data import Corpus, CorpusError, load_corpus, tokenize_corpus, train_bpe
from tinygpt.errors import TinyGPTError
from tinygpt.eval import eval_matrix, evaluate, leaderboard, memorization_test
from tinygpt.model import GPT, KVCache
from tinygpt.sampling import generate, stream
from tinygpt.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, TokenizerError, load_tokenizer
from tinygpt.training import (
    TrainConfig,
    TrainingDiverged,
    TrainResult,
    add_lora,
    chat,
    default_device,
    distill,
    es,
    finetune,
    fit,
    load_lora,
    load_template,
    lora_finetune,
    magpie,
    merge_lora,
    save_lora,
    sft,
    train,
)

install_legacy_modules()

sample = generate
__version__ = "0.1.0"

__all__ = [
    "GPT",
    "GPTConfig",
    "PRESETS",
    "KVCache",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "Corpus",
    "ByteTokenizer",
    "BPETokenizer",
    "Tokenizer",
    "load",
    "save",
    "describe",
    "read_checkpoint",
    "train",
    "distill",
    "evaluate",
    "leaderboard",
    "memorization_test",
    "eval_matrix",
    "es",
    "add_lora",
    "load_lora",
    "save_lora",
    "merge_lora",
    "lora_finetune",
    "sft",
    "finetune",
    "magpie",
    "chat",
    "load_template",
    "generate",
    "sample",
    "stream",
    "load_corpus",
    "tokenize_corpus",
    "load_tokenizer",
    "train_bpe",
    "default_device",
    "CheckpointError",
    "ConfigError",
    "CorpusError",
    "TokenizerError",
    "TinyGPTError",
    "fit",
]
