"""LASER: layer-selective rank reduction (Sharma, Ash & Misra 2023, "The Truth is in There").

A LASER intervention (layer ℓ, matrix τ, fraction ρ) replaces one weight matrix W [out, in] by its best
rank-r approximation in Frobenius norm (Eckart–Young, via an exact SVD in fp32), with

    r = floor(ρ · min(out, in)),  at least 1,

so ρ is the fraction of the maximal rank that is *kept* (ρ = 0.01 removes 99% of the rank). The paper
sweeps ρ ∈ `PAPER_GRID` and composes the best interventions greedily from the last layer down.

    with tinygpt.surgery.laser(model, "mlp.fc_in", layers="8-11", rank_fraction=0.1):
        loss = model(tokens, return_type="loss")          # weights restored exactly afterwards
    report = laser_(model, "mlp.fc_out", layers=[5], rank_fraction=0.05, factored=True)
    sweep = laser_sweep(model, None, targets="mlp")        # validation loss for every (target, layer, ρ)
    sweep.figure().show()

`factored=True` stores the reduced matrix as two factors (`LowRankLinear`: `A` [r, in], `B` [out, r]),
which really removes parameters when r·(in + out) < in·out; such models save and load like any other.

Modules: `decompose` (ranks, SVD, `LowRankLinear`), `apply` (`laser_`, `laser`), `analysis` (sweeps, greedy,
spectra, before/after) and `results` (what the analyses return, each with `.figure()`).
"""

from tinygpt.surgery.evaluation import EvalData
from tinygpt.surgery.laser.analysis import laser_compare, laser_greedy, laser_sweep, singular_values
from tinygpt.surgery.laser.apply import LaserEntry, LaserReport, laser, laser_
from tinygpt.surgery.laser.decompose import (
    PAPER_GRID,
    LowRankLinear,
    check_fraction,
    kept_rank,
    low_rank,
    numerical_rank,
)
from tinygpt.surgery.laser.results import (
    Intervention,
    LaserComparison,
    LaserGreedyResult,
    LaserSweepResult,
    SpectrumResult,
)

_check_fraction = check_fraction  # the name `tinygpt.cli` imported before the split

__all__ = [
    "PAPER_GRID",
    "LowRankLinear",
    "LaserEntry",
    "LaserReport",
    "LaserSweepResult",
    "LaserGreedyResult",
    "Intervention",
    "check_fraction",
    "kept_rank",
    "low_rank",
    "numerical_rank",
    "laser",
    "laser_",
    "laser_sweep",
    "laser_greedy",
    "SpectrumResult",
    "singular_values",
    "LaserComparison",
    "laser_compare",
    "EvalData",
]
