"""Module paths of tinygpt before the layered layout, kept importable.

`from tinygpt.lora import add_lora`, `from tinygpt.evaluate import corpus_text`, `import tinygpt.sft` ... keep
working: each old path is an alias (`sys.modules` entry) of the module that holds those names now. No files
stand at the old paths, and the package attributes are untouched (`tinygpt.train` stays the function).
"""

from __future__ import annotations

import importlib
import sys

LEGACY_MODULES = {
    "tinygpt.train": "tinygpt.training",
    "tinygpt.distill": "tinygpt.training.distill",
    "tinygpt.distributed": "tinygpt.training.distributed",
    "tinygpt.es": "tinygpt.training.es",
    "tinygpt.lora": "tinygpt.training.lora",
    "tinygpt.magpie": "tinygpt.training.magpie",
    "tinygpt.sft": "tinygpt.training.sft",
    "tinygpt.templates": "tinygpt.training.templates",
    "tinygpt.evaluate": "tinygpt.eval",
    "tinygpt.evalmatrix": "tinygpt.eval.matrix",
    "tinygpt.interp.induction": "tinygpt.interp.toy",
    "tinygpt.arch.triton_attn": "tinygpt.arch.triton.attention",
    "tinygpt.surgery.hqq_triton": "tinygpt.surgery.hqq.triton",
}


def install_legacy_modules() -> None:
    """Register every old module path as an alias of its new module (idempotent)."""
    for old, new in LEGACY_MODULES.items():
        if old not in sys.modules:
            sys.modules[old] = importlib.import_module(new)
