"""Activation patching: run a corrupted prompt, splice in one activation from the clean run, measure recovery.

Same semantics as `transformer_lens.patching` (`get_act_patch_resid_pre`, `..._attn_out`, `..._mlp_out`,
`..._block_every`, `..._attn_head_out_all_pos`, `..._attn_head_out_by_pos`; the tests check agreement to 1e-5),
but a sweep runs as a few *batched* forwards instead of one forward per cell, and skips work that cannot change
the result. A cell whose clean and corrupted activations are identical (a position before the first token
the prompts differ in; a shared token in layer 0's resid_pre) is a no-op: its value is the corrupted run's.
The other cells are replicas of the corrupted run (chunked to bound memory): the blocks before the patched one
are unaffected, so each replica starts there from the cached corrupted run, and computes only the patched
position and the later ones (causal attention; the earlier positions' keys and values are the corrupted
run's). For position sites of a plain model with nothing hooked, the patched block's output comes from the
two runs' cached activations (e.g. patching `mlp_out` at p changes `resid_post` at p only; patching
`resid_pre` at p changes the keys and values at p, not the other queries), later blocks run on the packed
(replica, position) rows, and with the default metric the final block computes the last position only.
Otherwise a hook patches a different cell in each replica. Every forward is the model's own (`GPT.run_from`,
the model run from any layer): the engine writes no block math of its own.

    clean, corrupted = "When Mary and John went, John gave it to", "When Mary and John went, Mary gave it to"
    res = patch_resid_pre(model, clean, corrupted, correct=" Mary", incorrect=" John")
    res.figure()                                   # (layer x position) heatmap with the prompt's tokens
    every = patch_block_every(model, clean, corrupted, correct=" Mary", incorrect=" John", normalize=True)
    heads = patch_heads(model, clean, corrupted, metric=my_metric)       # (layer x head), all positions
    patch_resid(model, clean, corrupted, layer=2, pos=5, correct=" Mary", incorrect=" John")   # one site

The metric maps logits [batch, pos, d_vocab] of a (patched) corrupted run to a scalar. By default it is
`logit_diff` at the last position between `correct` and `incorrect` (given as token ids or single-token
strings; if omitted, the clean and corrupted runs' own top predictions). `normalize=True` reports
(value - corrupted) / (clean - corrupted): 0 = no effect, 1 = fully restores the clean run, as in
TransformerLens' IOI demos.

Mixture-of-depths blocks (`mod=True`) compute only the tokens they route, so inside them `hook_z` holds the
routed tokens only ([batch, routed, n_heads, d_head]), and the clean and corrupted runs may route different
tokens. Head sweeps there patch by token position: the clean output of a head at position p replaces the
corrupted one at p when both runs route p through the block; a token either run skips keeps its corrupted
value (the clean run has no head output there, or the corrupted run does not compute the token). The
residual-stream sites keep their full shape in every variant and need nothing special.

    api.py      the sweeps (`patch_sweep`, `patch_resid_pre`, ...), `patch_resid`, `PatchingResult`,
                `patching_figure` (several sweeps side by side)
    engine.py   the batched, resumed and packed forwards of a sweep
    metrics.py  `logit_diff`, `logit_diff_metric`, `PatchingError`
"""

from tinygpt.interp.patching.api import (
    PatchingResult,
    patch_attn_out,
    patch_block_every,
    patch_heads,
    patch_heads_by_pos,
    patch_mlp_out,
    patch_resid,
    patch_resid_mid,
    patch_resid_pre,
    patch_sweep,
    patching_figure,
)
from tinygpt.interp.patching.engine import SITES
from tinygpt.interp.patching.metrics import Metric, PatchingError, logit_diff, logit_diff_metric

__all__ = [
    "SITES",
    "Metric",
    "PatchingError",
    "PatchingResult",
    "logit_diff",
    "logit_diff_metric",
    "patch_attn_out",
    "patch_block_every",
    "patch_heads",
    "patch_heads_by_pos",
    "patch_mlp_out",
    "patch_resid",
    "patch_resid_mid",
    "patch_resid_pre",
    "patch_sweep",
    "patching_figure",
]
