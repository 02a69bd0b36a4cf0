"""Interpretability tools that operate on a `tinygpt.GPT`: lenses, ablations, activation patching, attention views.

- `lens/`: the logit lens (`logit`), the tuned lens and its `.lenses` file (`tuned`), `lens_report` (`report`);
- `ablation/`: ablation specs (`specs`), the hooks that apply them (`context`), one-at-a-time sweeps (`sweep`);
- `patching`: activation patching (`patch_resid_pre`, `patch_heads`, ..., `patch_sweep`);
- `attention`: attention maps, induction / previous-token scores; `routing`: the MoE / MoD router readout;
- `toy`: the induction-head toy task (`train_induction_model`);
- `circuits/`: attribution patching (`attribution_patch`, `compare_attribution`), direct logit attribution,
  probes, analyses across training, edge attribution, faithfulness and path patching.

Every function takes the model first, then its data (a prompt, tokens or a corpus), then keyword options; every
result has `.figure()` (plotly, imported when called).
"""

from tinygpt.interp import circuits as _circuits
from tinygpt.interp import patching as _patching
from tinygpt.interp.ablation import (
    Ablation,
    AblationComparison,
    AblationContext,
    AblationError,
    AblationSweepResult,
    ablate,
    ablated_loss,
    ablation_compare,
    ablation_sweep,
    parse_ablations,
)
from tinygpt.interp.attention import (
    AttentionResult,
    attention_maps,
    attention_patterns,
    induction_scores,
    previous_token_scores,
)
from tinygpt.interp.circuits import *  # noqa: F403  (its __all__: attribution_patch, direct_logit_attribution, ...)
from tinygpt.interp.lens import (
    LensError,
    LensReport,
    LensResult,
    TunedLens,
    lens_report,
    logit_lens,
    residual_stack,
    stack_labels,
    tuned_lens,
    unembed_sha256,
)
from tinygpt.interp.patching import *  # noqa: F403  (its __all__: PatchingError, patch_resid_pre, ...)
from tinygpt.interp.routing import Routing, moe_layers, read_routing, routed_layers
from tinygpt.interp.toy import induction_batch, induction_config, repeated_tokens, train_induction_model

__all__ = [
    "Ablation",
    "AblationComparison",
    "AblationContext",
    "AblationError",
    "AblationSweepResult",
    "AttentionResult",
    "LensError",
    "LensReport",
    "LensResult",
    "Routing",
    "TunedLens",
    "ablate",
    "ablated_loss",
    "ablation_compare",
    "ablation_sweep",
    "attention_maps",
    "attention_patterns",
    "induction_batch",
    "induction_config",
    "induction_scores",
    "lens_report",
    "logit_lens",
    "moe_layers",
    "parse_ablations",
    "previous_token_scores",
    "read_routing",
    "repeated_tokens",
    "residual_stack",
    "routed_layers",
    "stack_labels",
    "train_induction_model",
    "tuned_lens",
    "unembed_sha256",
    *_patching.__all__,
    *_circuits.__all__,
]
