"""Ablations: knock out a layer, its attention, its MLP or one head, and measure what breaks.

A spec names what to remove and how (`specs`):

    "3"  / "3.layer"   the whole block 3 (its attention output and its MLP output)
    "3.attn"           block 3's attention output       blocks.3.hook_attn_out
    "1.mlp"            block 1's MLP output             blocks.1.hook_mlp_out
    "2.head5" / "L2H5" head 5 of block 2                blocks.2.attn.hook_z[:, :, 5]
    "2.head5:mean"     ... with a mode: zero (default), mean or resample

`context` installs the hooks (`ablate`, `ablated_loss`; the modes and mixture-of-depths blocks are described
there); `sweep` ablates one component at a time (`ablation_sweep`); `compare` continues a prompt without and
with one ablation (`ablation_compare`, the ablation explorer's samples).

    with ablate(model, ["0.head1", "1.mlp:mean"], reference_tokens=val):
        loss = model(tokens, return_type="loss")
    ablated_loss(model, tokens, "1.attn")                            # a scalar tensor
    tinygpt.generate(model, "ROMEO:", 50, ablate="1.attn")            # generation under an ablation
    sweep = ablation_sweep(model, val, modes=("zero", "mean"), heads=True); sweep.figure()
    sweep.figure("mean", highlight="1.attn")                         # one bar per ablation, 1.attn in red
    ablation_compare(model, "1.attn", "ROMEO:", tokens=val)          # both continuations (and both losses)
"""

from tinygpt.interp.ablation.compare import AblationComparison, ablation_compare
from tinygpt.interp.ablation.context import AblationContext, ablate, ablated_loss, as_ablation_context
from tinygpt.interp.ablation.specs import COMPONENTS, MODES, Ablation, AblationError, parse_ablations
from tinygpt.interp.ablation.sweep import AblationSweepResult, ablation_sweep

__all__ = [
    "COMPONENTS",
    "MODES",
    "Ablation",
    "AblationComparison",
    "AblationContext",
    "AblationError",
    "AblationSweepResult",
    "ablate",
    "ablated_loss",
    "ablation_compare",
    "ablation_sweep",
    "as_ablation_context",
    "parse_ablations",
]

from tinygpt.sampling import register_intervention  # noqa: E402  (generate(..., ablate=...) uses ablations)

register_intervention(as_ablation_context)
