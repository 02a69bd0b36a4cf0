"""Interpretability tools that operate on a `tinygpt.GPT`: lenses, ablations, activation patching."""

from tinygpt.interp.ablation import (  # noqa: F401
    Ablation,
    AblationContext,
    AblationError,
    AblationSweepResult,
    ablate,
    ablated_loss,
    ablation_sweep,
    parse_ablations,
)
from tinygpt.interp.attention import (  # noqa: F401
    AttentionResult,
    attention_maps,
    attention_patterns,
    induction_scores,
    previous_token_scores,
)
from tinygpt.interp.lens import (  # noqa: F401
    LensError,
    LensReport,
    LensResult,
    TunedLens,
    lens_report,
    logit_lens,
    residual_stack,
    tuned_lens,
    unembed_sha256,
)
from tinygpt.interp.patching import (  # noqa: F401
    PatchingError,
    PatchingResult,
    logit_diff,
    logit_diff_metric,
    patch_attn_out,
    patch_block_every,
    patch_heads,
    patch_heads_by_pos,
    patch_mlp_out,
    patch_resid,
    patch_resid_mid,
    patch_resid_pre,
    patch_sweep,
)
from tinygpt.interp.toy import induction_batch, repeated_tokens, train_induction_model  # noqa: F401
