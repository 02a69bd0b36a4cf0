"""LoRA: low-rank adapters on chosen linear layers, saved as a small file pinned to the base model.

    import tinygpt
    from tinygpt.training.lora import add_lora, lora_finetune, load_lora, merge_lora, save_lora

    model = tinygpt.load("tiny.tinygpt")
    res = lora_finetune(model, "sonnets.txt", targets="attn.q_proj,attn.v_proj,mlp.fc_in", rank=8, alpha=16,
                        steps=300, out="tiny-sonnets.lora")          # trains only the adapters
    base = tinygpt.load("tiny.tinygpt")
    load_lora(base, "tiny-sonnets.lora")                              # checks it is the same base model
    merge_lora(base).save("tiny-sonnets.tinygpt")                     # folded in: a plain .tinygpt again

An adapted linear computes `y = x Wᵀ + b + (α / r) · dropout(x) Aᵀ Bᵀ` with A [r, in] (Kaiming-uniform, as
`nn.Linear` and `peft` initialise it) and B [out, r] (zeros, so a fresh adapter leaves the model unchanged).
`LoRALinear` subclasses `nn.Linear` and keeps the base `weight`/`bias` under their usual names, so module paths,
every TransformerLens hook name, `run_with_cache` and the `W_Q`/`W_in`-style weight views are unchanged (the
views read the *base* weights; merge to see the adapted ones).

Targets are named as `tinygpt inspect` shows them, relative to a block: `attn.q_proj`, `attn.k_proj`,
`attn.v_proj`, `attn.o_proj`, `mlp.fc_in`, `mlp.fc_out`, the groups `attn`, `mlp`, `all`, or any block-relative
path to a linear layer with `*` wildcards (e.g. `moe.experts.*.fc_in` in a mixture-of-experts model); `layers`
as in `tinygpt.surgery` ("0-3", "0,2", [1, 2], None = all). The grammar is `tinygpt.surgery.targets`' (with
`patterns=True`), so on mixture-of-experts blocks `mlp.fc_in` means every expert's, and groups skip matrices a
block lacks (YOCO's cross-decoder blocks). The default targets are `attn.q_proj` and
`attn.v_proj`, as in Hu et al. (2021).

## Files
An adapter file is one safetensors file: `<module>.lora_A` / `.lora_B` tensors and a JSON manifest (metadata
key "tinygpt_lora") with each module's rank, alpha and dropout, and the **base-model pin**: the sha256 of all
the base model's weights (every tensor but the adapters, so also the layers it does not adapt, since the
adapters were trained against all of them) and its config. `load_lora` refuses another base (clear error;
`check=False` overrides). A model with adapters attached can also be saved with `tinygpt.save` as a full
`.tinygpt` (the adapters are recorded like other module surgery and rebuilt by `tinygpt.load`).

## Training
`lora_finetune` is `tinygpt.training.loop.fit` (schedule, clipping, accumulation, progress, callbacks, atomic saves,
`strategy=` "ddp"/"fsdp" under torchrun) with every base parameter frozen, so only the adapters are in the
optimizer and the base stays bitwise unchanged; it takes the keyword tail of every training function and returns
a `LoRATrainResult` (a `TrainResult`). Its defaults differ from `train()` in two places: `max_lr=1e-3` and
`weight_decay=0.0`. While training, the run's checkpoint is a full `.tinygpt` of the adapted
model with the optimizer state, written to `<out>.run.tinygpt` (atomic, every `save_every` steps and at the
end) so `resume=True` continues exactly; the adapter file `out` is written at the end (also after an
interrupt). Delete the run file when you no longer need to resume. Under torchrun, rank 0 alone writes the run
checkpoint, the adapter and the merged model (under FSDP the full weights are gathered onto rank 0's CPU first).

## Why not `peft`
`peft` 0.21 works on this model (checked: `LoraConfig(target_modules=["q_proj", "fc_in"])` + `get_peft_model`
keeps the hook names of the inner model and `run_with_cache` works), but it is not used because (1) it
depends on `transformers` and `accelerate` at import (≈ 2.7 s to import on this machine; tinygpt's core
needs neither), (2) its adapter format is a directory keyed `base_model.model.…` with no content pin of the
base, so the save/load/pin layer would be ours anyway, (3) it wraps the model in a `PeftModel` whose module
names gain a `base_model.model.` prefix, so `inspect`-style names hold only on the unwrapped inner model, and
(4) the adapter itself is thirty lines. The math and initialisation follow peft's `Linear` LoRA layer.

Modules: `adapters` (`LoRALinear`, `add_lora`, selection, merging), `files` (`.lora` files and the base pin),
`finetune` (`lora_finetune`, `LoRATrainResult`).
"""

from tinygpt.training.lora.adapters import (
    DEFAULT_TARGETS,
    LoRAError,
    LoRALinear,
    add_lora,
    base_fingerprint,
    is_lora_key,
    lora_modules,
    lora_parameters,
    lora_state_dict,
    mark_only_lora_trainable,
    merge_lora,
    merged_copy,
    remove_lora,
    select_targets,
)
from tinygpt.training.lora.files import (
    LORA_FORMAT,
    LORA_FORMAT_VERSION,
    META_KEY,
    LoRAFile,
    check_base,
    load_lora,
    read_lora,
    save_lora,
)
from tinygpt.training.lora.finetune import LORA_DEFAULTS, LoRATrainResult, lora_finetune, run_checkpoint_path

__all__ = [
    "DEFAULT_TARGETS",
    "LORA_DEFAULTS",
    "LORA_FORMAT",
    "LORA_FORMAT_VERSION",
    "META_KEY",
    "LoRAError",
    "LoRAFile",
    "LoRALinear",
    "LoRATrainResult",
    "add_lora",
    "base_fingerprint",
    "check_base",
    "is_lora_key",
    "load_lora",
    "lora_finetune",
    "lora_modules",
    "lora_parameters",
    "lora_state_dict",
    "mark_only_lora_trainable",
    "merge_lora",
    "merged_copy",
    "read_lora",
    "remove_lora",
    "run_checkpoint_path",
    "save_lora",
    "select_targets",
]
