"""Training: the loop every objective shares (`fit`), pretraining, finetuning, distillation, SFT, LoRA, ES."""

from tinygpt.training.loop import TrainConfig, TrainingDiverged, TrainResult, default_device, fit, train  # noqa: F401
