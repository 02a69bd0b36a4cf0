"""Weight surgery on trained models: LASER rank reduction and HQQ / round-to-nearest quantization.

    from tinygpt.surgery import laser, laser_, laser_sweep, hqq, hqq_

    with laser(model, "mlp.fc_in", layers="2-3", rank_fraction=0.1):   # restored exactly on exit
        print(model("To be, or not to be", return_type="loss"))
    print(hqq_(model, bits=4, group_size=64, packed=True))            # per-matrix RTN vs HQQ error
    model.save("tiny-4bit.tinygpt")                                    # factored / packed layers load back

Targets are named relative to a block: attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.fc_in,
mlp.fc_out, and for gated MLPs mlp.gate_proj, mlp.up_proj, mlp.down_proj (the Hugging Face names; leaf names
alone work too; groups: mlp, attn, all, experts). Layers: an int, a list, "8-11", "0,2,5" or None (all). On MoE
blocks mlp.* stand for every expert's matrix (moe.experts.{j}.<leaf>, also nameable directly); blocks that
lack a matrix (YOCO's cross-decoder: no attn.k_proj / attn.v_proj) are skipped by groups. See docs/surgery.md.

Modules: `targets` (the target grammar, shared with LoRA), `restore` (exact undo, in-place vs context-manager
forms, the base of swapped modules), `evaluation` (validation windows and loss), `laser/`, `hqq/`.
"""

from tinygpt.surgery.evaluation import EvalData, eval_data, eval_loss, validation_loss
from tinygpt.surgery.hqq import (
    HqqGridResult,
    HqqLossCurve,
    HQQReport,
    PackedQuantLinear,
    QuantEntry,
    QuantizedTensor,
    hqq,
    hqq_,
    hqq_error_grid,
    hqq_loss_curve,
    hqq_quantize,
    pack_codes,
    quantize_rtn,
    unpack_codes,
)
from tinygpt.surgery.hqq import triton as hqq_triton
from tinygpt.surgery.laser import (
    PAPER_GRID,
    Intervention,
    LaserComparison,
    LaserEntry,
    LaserGreedyResult,
    LaserReport,
    LaserSweepResult,
    LowRankLinear,
    SpectrumResult,
    kept_rank,
    laser,
    laser_,
    laser_compare,
    laser_greedy,
    laser_sweep,
    low_rank,
    singular_values,
)
from tinygpt.surgery.restore import Restorer, restoring
from tinygpt.surgery.targets import (
    TARGET_GROUPS,
    TARGETS,
    LayerSpec,
    SurgeryError,
    TargetSpec,
    resolve_layers,
    resolve_targets,
    select_linears,
    select_modules,
)

__all__ = [
    "TARGETS",
    "TARGET_GROUPS",
    "LayerSpec",
    "TargetSpec",
    "SurgeryError",
    "resolve_layers",
    "resolve_targets",
    "select_linears",
    "select_modules",
    "Restorer",
    "restoring",
    "EvalData",
    "eval_data",
    "eval_loss",
    "validation_loss",
    "PAPER_GRID",
    "Intervention",
    "LaserEntry",
    "LaserGreedyResult",
    "LaserReport",
    "LaserSweepResult",
    "LowRankLinear",
    "kept_rank",
    "laser",
    "laser_",
    "laser_greedy",
    "laser_sweep",
    "low_rank",
    "SpectrumResult",
    "singular_values",
    "LaserComparison",
    "laser_compare",
    "HQQReport",
    "PackedQuantLinear",
    "QuantEntry",
    "QuantizedTensor",
    "hqq",
    "hqq_",
    "hqq_quantize",
    "pack_codes",
    "quantize_rtn",
    "unpack_codes",
    "HqqGridResult",
    "hqq_error_grid",
    "HqqLossCurve",
    "hqq_loss_curve",
    "hqq_triton",
]
