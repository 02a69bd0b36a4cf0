"""Logit lens and tuned lens: what does each layer of the residual stream already predict?

    import tinygpt
    from tinygpt.interp import logit_lens, tuned_lens, lens_report, TunedLens

    model = tinygpt.load("tiny.tinygpt")
    res = logit_lens(model, "ROMEO: But soft, what light", 5)    # a LensResult
    res.figure("entropy")                                          # layer x position heatmap
    lens = tuned_lens(model, steps=300)                            # Belrose et al. (2023) translators
    logit_lens(model, "ROMEO: But soft", lens=lens).figure("kl")
    print(lens_report(model, lens).table())                       # held-out KL per layer
    lens.save("tiny.lenses"); TunedLens.load("tiny.lenses", model)

- `logit`: the residual stack, `logit_lens` and its `LensResult`;
- `tuned`: `TunedLens`, its training (`tuned_lens`) and its `.lenses` file, pinned to the base model;
- `report`: `lens_report` and its `LensReport`.
"""

from tinygpt.interp.lens.logit import (
    METRICS,
    LensResult,
    _show,
    check_lens,
    layer_logits,
    logit_lens,
    residual_stack,
    stack_labels,
)
from tinygpt.interp.lens.report import LensReport, lens_report
from tinygpt.interp.lens.tuned import FORMAT, FORMAT_VERSION, LensError, TunedLens, tuned_lens, unembed_sha256

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "METRICS",
    "LensError",
    "LensReport",
    "LensResult",
    "TunedLens",
    "_show",
    "check_lens",
    "layer_logits",
    "lens_report",
    "logit_lens",
    "residual_stack",
    "stack_labels",
    "tuned_lens",
    "unembed_sha256",
]
