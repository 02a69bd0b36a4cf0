"""Circuits: attribution patching (AtP, AtP*), its comparison with exact patching, direct logit attribution,
probes, analyses across training (this file's names), and edge attribution, faithfulness and path patching
(helper modules `edges`, `faithfulness`, `path`, re-exported when present).

    attribution.py  `attribution_patch` (every site of the exact sweeps, AtP* fixes, denoising / noising)
    compare.py      `compare_attribution` (Pearson, Spearman, top-k overlap against the exact sweep, scatter)
    dla.py          `direct_logit_attribution` (per layer, head, neuron; `.total()` is the logit difference)
    probes.py       `train_probe` (logistic-regression probes with a Hewitt & Liang control task, layer sweeps)
    across.py       `AnalysisCallback` (live), `CheckpointEvery` + `across_training` (saved) (analyses over training)
"""

from __future__ import annotations

import importlib

from tinygpt.interp.circuits._common import CircuitError
from tinygpt.interp.circuits.across import (
    AcrossTraining,
    AnalysisCallback,
    CheckpointEvery,
    across_training,
)
from tinygpt.interp.circuits.attribution import ATP_SITES, attribution_patch
from tinygpt.interp.circuits.compare import AttributionComparison, compare_attribution
from tinygpt.interp.circuits.dla import DLAResult, direct_logit_attribution
from tinygpt.interp.circuits.probes import ProbeResult, ProbeSweep, train_probe

__all__ = [
    "ATP_SITES",
    "AcrossTraining",
    "AnalysisCallback",
    "AttributionComparison",
    "CheckpointEvery",
    "CircuitError",
    "DLAResult",
    "ProbeResult",
    "ProbeSweep",
    "across_training",
    "attribution_patch",
    "compare_attribution",
    "direct_logit_attribution",
    "train_probe",
]

# helper `edges`'s modules: their public names (`__all__`), once the module exists
for _name in ("graph", "edges", "faithfulness", "path"):
    try:
        _mod = importlib.import_module(f"tinygpt.interp.circuits.{_name}")
    except ModuleNotFoundError as _e:
        if _e.name != f"tinygpt.interp.circuits.{_name}":
            raise
        continue
    for _export in getattr(_mod, "__all__", ()):
        globals()[_export] = getattr(_mod, _export)
        if _export not in __all__:
            __all__.append(_export)
del _name
