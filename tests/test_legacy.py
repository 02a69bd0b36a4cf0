"""What users wrote before the layered layout keeps working: old module paths and old files.

tests/fixtures/legacy/ holds files written by the pre-restructure code (tests/fixtures/legacy/make_legacy.py.txt
made them) and the last-position logits that code computed from them.
"""

import importlib
import json
from pathlib import Path

import pytest
import torch

import tinygpt
from tinygpt._legacy import LEGACY_MODULES

LEGACY = Path(__file__).parent / "fixtures" / "legacy"
EXPECTED = json.loads((LEGACY / "expected.json").read_text())
TOKENS = torch.tensor(EXPECTED["tokens"])

# names README.md, the notebooks and docs/ import from the old paths
OLD_NAMES = {
    "tinygpt.train": ["TrainConfig", "TrainResult", "TrainingDiverged", "fit", "train", "default_device"],
    "tinygpt.lora": ["add_lora", "save_lora", "load_lora", "lora_finetune", "merge_lora"],
    "tinygpt.distill": ["distill"],
    "tinygpt.sft": ["sft", "finetune", "add_special_tokens", "filter_conversations", "load_sft_data"],
    "tinygpt.templates": ["load_template", "encode_literal"],
    "tinygpt.es": ["es", "word_list_reward", "words_of"],
    "tinygpt.magpie": ["magpie", "chat"],
    "tinygpt.evaluate": ["evaluate", "leaderboard", "memorization_test", "Text", "corpus_text", "heldout_text"],
    "tinygpt.evalmatrix": ["EvalMatrix", "eval_matrix", "few_shot_pool", "load_qa"],
    "tinygpt.interp.induction": ["train_induction_model", "repeated_tokens", "induction_batch"],
    "tinygpt.arch.triton_attn": ["flash_attention", "diff_flash_attention"],
    "tinygpt.surgery.hqq_triton": ["use_triton", "packed4_linear"],
}


@pytest.mark.parametrize("old", sorted(OLD_NAMES))
def test_old_module_paths_import_their_names(old):
    mod = importlib.import_module(old)
    missing = [n for n in OLD_NAMES[old] if not hasattr(mod, n)]
    assert not missing, f"{old} lost {missing}"


def test_aliases_leave_package_attributes_alone():
    for old in LEGACY_MODULES:
        importlib.import_module(old)
    # the functions of the same name stay what `tinygpt.X` means
    for name in ("train", "distill", "sft", "es", "magpie", "evaluate"):
        assert callable(getattr(tinygpt, name)) and not isinstance(getattr(tinygpt, name), type(tinygpt)), name
    assert tinygpt.train.__name__ == "train"


def _last_logits(model):
    with torch.no_grad():
        return model(TOKENS)[0, -1]


@pytest.mark.parametrize("name", ["trained", "laser_factored", "hqq_packed", "moe_diff", "yoco_mod"])
def test_old_tinygpt_files_load_with_the_same_outputs(name):
    model = tinygpt.load(LEGACY / f"{name}.tinygpt")
    ref = torch.tensor(EXPECTED["last_logits"][name])
    torch.testing.assert_close(_last_logits(model), ref, rtol=0, atol=1e-5)


def test_old_training_checkpoint_keeps_its_resumable_state():
    ckpt = tinygpt.read_checkpoint(LEGACY / "trained.tinygpt")
    assert ckpt.train_state["step"] == 4
    assert ckpt.manifest["optimizer"]["class"] == "AdamW"
    assert any(k.startswith("state.") for k in ckpt.optimizer), sorted(ckpt.optimizer)[:3]


def test_old_lora_file_loads_on_its_base_model():
    model = tinygpt.load(LEGACY / "trained.tinygpt")
    tinygpt.load_lora(model, LEGACY / "trained.lora")
    ref = torch.tensor(EXPECTED["last_logits"]["trained+lora"])
    torch.testing.assert_close(_last_logits(model), ref, rtol=0, atol=1e-5)


def test_old_lora_file_refuses_another_model():
    other = tinygpt.load(LEGACY / "moe_diff.tinygpt")
    with pytest.raises(tinygpt.TinyGPTError):
        tinygpt.load_lora(other, LEGACY / "trained.lora")


def test_old_lens_file_loads_on_its_base_model():
    from tinygpt.interp import TunedLens

    model = tinygpt.load(LEGACY / "trained.tinygpt")
    lens = TunedLens.load(LEGACY / "trained.lenses", model)
    _, cache = model.run_with_cache(TOKENS)
    with torch.no_grad():
        out = lens(cache["blocks.0.hook_resid_pre"], 0)[0, -1]
    torch.testing.assert_close(out, torch.tensor(EXPECTED["last_logits"]["lens"]), rtol=0, atol=1e-5)
