"""The keyword tail every training function shares: `RunOptions.split`, `make_config`, did-you-mean errors."""

from __future__ import annotations

import pytest
import torch

import tinygpt
from tinygpt import GPT, GPTConfig
from tinygpt.errors import TinyGPTError
from tinygpt.training.es import ESConfig
from tinygpt.training.settings import (
    RunOptions,
    SettingError,
    TrainConfig,
    UnknownSettingError,
    check_keywords,
    did_you_mean,
    make_config,
)

pytestmark = pytest.mark.usefixtures("isolated_cache")


def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layers=1, d_model=32, n_heads=2, n_ctx=32))


def test_split_separates_run_options_from_settings():
    run, settings = RunOptions.split(
        {"steps": 3, "max_lr": 1e-3, "out": "x.tinygpt", "resume": True, "progress": False}, what="train"
    )
    assert settings == {"steps": 3, "max_lr": 1e-3}
    assert (run.out, run.resume, run.progress, run.strategy, run.callbacks) == ("x.tinygpt", True, False, "ddp", ())
    run, settings = RunOptions.split({"population": 8, "seed": 2, "device": "cpu"}, what="es", settings=ESConfig)
    assert settings == {"population": 8, "seed": 2} and run.device == "cpu"


def test_an_unknown_keyword_names_the_closest_valid_one():
    with pytest.raises(UnknownSettingError, match=r"train\(\) got an unexpected keyword argument 'max_l'") as e:
        RunOptions.split({"max_l": 1e-3}, what="train")
    assert "did you mean 'max_lr'?" in str(e.value)
    assert isinstance(e.value, TypeError) and isinstance(e.value, TinyGPTError)
    with pytest.raises(UnknownSettingError, match="did you mean 'resume'"):
        RunOptions.split({"resum": True}, what="sft")
    with pytest.raises(UnknownSettingError, match="did you mean 'temperature'"):
        RunOptions.split({"temprature": 2.0}, what="distill", own=("temperature", "alpha"))
    with pytest.raises(UnknownSettingError, match="did you mean 'population'"):
        RunOptions.split({"populaton": 8}, what="es", settings=ESConfig)
    assert did_you_mean("zzzz", ["steps"]) == ""
    check_keywords(["steps"], ["steps"], what="train")  # no error


def test_bad_values_are_setting_errors():
    with pytest.raises(SettingError, match="strategy must be one of ddp, fsdp, got 'zero3'"):
        RunOptions(strategy="zero3")
    with pytest.raises(SettingError, match="steps=0"):
        TrainConfig(steps=0)
    assert issubclass(SettingError, ValueError) and issubclass(SettingError, TinyGPTError)


def test_make_config_applies_function_defaults_only_without_a_config():
    cfg = make_config(TrainConfig, None, {"steps": 7}, {"max_lr": 3e-4, "steps": 200})
    assert (cfg.steps, cfg.max_lr) == (7, 3e-4)
    given = TrainConfig(steps=9, max_lr=1e-2)
    cfg = make_config(TrainConfig, given, {"warmup": 1}, {"max_lr": 3e-4})
    assert (cfg.steps, cfg.max_lr, cfg.warmup) == (9, 1e-2, 1) and given.warmup == 50
    with pytest.raises(SettingError, match="config must be a TrainConfig"):
        make_config(TrainConfig, ESConfig(), {})


@pytest.mark.parametrize("fn", ["train", "finetune", "sft", "distill", "es", "lora_finetune"])
def test_every_training_function_refuses_a_misspelt_keyword(fn, tmp_path):
    model = tiny_model()
    calls = {
        "train": lambda: tinygpt.train(model, None, stpes=3),
        "finetune": lambda: tinygpt.finetune(model, None, stpes=3),
        "sft": lambda: tinygpt.sft(model, [{"instruction": "a", "response": "b"}], stpes=3),
        "distill": lambda: tinygpt.distill(model, model, None, stpes=3),
        "es": lambda: tinygpt.es(model, None, stpes=3),
        "lora_finetune": lambda: tinygpt.lora_finetune(model, None, stpes=3),
    }
    with pytest.raises(UnknownSettingError, match=rf"{fn}\(\) got an unexpected keyword argument 'stpes'.*'steps'"):
        calls[fn]()
