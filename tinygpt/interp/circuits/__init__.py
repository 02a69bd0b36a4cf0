"""Circuits: attribution patching (AtP, AtP*), its comparison with exact patching, direct logit attribution,
probes, analyses across training, edge attribution, faithfulness and path patching.

    attribution.py   `attribution_patch` (every site of the exact sweeps, AtP* fixes, denoising / noising),
                     `node_attribution` (each node of the edge graph)
    compare.py       `compare_attribution` (Pearson, Spearman, top-k overlap against the exact sweep, scatter)
    dla.py           `direct_logit_attribution` (per layer, head, neuron; `.total()` is the logit difference)
    probes.py        `train_probe` (logistic-regression probes with a Hewitt & Liang control task, layer sweeps)
    across.py        `AnalysisCallback` (live), `CheckpointEvery` + `across_training` (saved) (analyses over training)
    graph.py         the edge graph: node names ("embed", "L{l}H{h}", "MLP{l}"), receivers, `Circuit`
    edges.py         `edge_attribution_patch` (EAP, EAP-IG, exact)
    faithfulness.py  `faithfulness` (every edge outside a circuit patched; the curve over circuit sizes)
    path.py          `path_patch` (Wang et al. 2023)
"""

from __future__ import annotations

from tinygpt.interp.circuits.across import AcrossTraining, AnalysisCallback, CheckpointEvery, across_training
from tinygpt.interp.circuits.attribution import ATP_SITES, attribution_patch, node_attribution
from tinygpt.interp.circuits.compare import AttributionComparison, compare_attribution
from tinygpt.interp.circuits.dla import DLAResult, direct_logit_attribution
from tinygpt.interp.circuits.edges import EdgeAttributionResult, edge_attribution_patch
from tinygpt.interp.circuits.faithfulness import FaithfulnessResult, faithfulness
from tinygpt.interp.circuits.graph import Circuit, CircuitError, EdgeGraph, Node, edge_graph, edge_hooks, parse_node
from tinygpt.interp.circuits.path import PathPatchingResult, path_patch
from tinygpt.interp.circuits.probes import ProbeResult, ProbeSweep, train_probe

__all__ = [
    "ATP_SITES",
    "AcrossTraining",
    "AnalysisCallback",
    "AttributionComparison",
    "CheckpointEvery",
    "Circuit",
    "CircuitError",
    "DLAResult",
    "EdgeAttributionResult",
    "EdgeGraph",
    "FaithfulnessResult",
    "Node",
    "PathPatchingResult",
    "ProbeResult",
    "ProbeSweep",
    "across_training",
    "attribution_patch",
    "compare_attribution",
    "direct_logit_attribution",
    "edge_attribution_patch",
    "edge_graph",
    "edge_hooks",
    "faithfulness",
    "node_attribution",
    "parse_node",
    "path_patch",
    "train_probe",
]
