"""The one target grammar: which weight matrices an operation (LASER, HQQ, LoRA) acts on.

Targets are named relative to a block, as `tinygpt inspect` shows them (`blocks.3.mlp.fc_out.weight`):

    attn.q_proj  attn.k_proj  attn.v_proj  attn.o_proj          (the Hugging Face names; k/v narrower under GQA)
    mlp.fc_in  mlp.fc_out                                      (GPT-2-style MLP)
    mlp.gate_proj  mlp.up_proj  mlp.down_proj                  (gated MLP: SwiGLU / GeGLU, Llama-style)
    groups: "mlp" (every MLP matrix the block has), "attn" (all four attention projections), "all" (both),
            "experts" (every expert matrix of MoE blocks, = "moe.experts")

Leaf names alone ("fc_out", "q_proj", "gate_proj") are accepted too; a comma-separated string or a list
combines names.

Mixture-of-Experts blocks (`tinygpt.arch.moe`, and the Mixtral / Qwen2-MoE blocks of `tinygpt.arch.hf_moe`)
have no `mlp`: there the `mlp.*` names (and so the "mlp" and "all" groups) stand for every expert's matrix of
that leaf, `moe.experts.{j}.fc_in` / `.fc_out` (tinygpt experts) or `moe.experts.{j}.gate_proj` / `.up_proj` /
`.down_proj` (gated experts), plus Qwen2-MoE's shared expert `moe.shared_expert.{gate,up,down}_proj`; each
expert matrix is operated on (and reported, e.g. "moe.experts.2.down_proj") on its own. The routers
(`moe.router`, `moe.shared_expert_gate`) are never in a group. Experts can be named explicitly:
`moe.experts.up_proj` (every expert) or `moe.experts.2.fc_out` (expert 2 only); these names apply only to MoE
blocks. A block that lacks a matrix (YOCO's cross-decoder blocks have no `attn.k_proj` / `attn.v_proj`, a
gated MLP has no `mlp.fc_in`) is skipped for it, but a target named on its own (not through a group) must
exist in at least one selected block.

With `patterns=True` (what LoRA uses) any other block-relative path to a linear layer is accepted as well,
with `*` wildcards (`moe.experts.*.fc_in`, `attn.*_proj`, `moe.router`).

Layers are an int, a list of ints, a `range`, a string such as "8-11", "0,2,5" or "0-3,7", "all", or None
(every layer); negative ints count from the end. Every function validates all of its arguments before
anything is modified.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch.nn as nn

from tinygpt.errors import TinyGPTValueError


class SurgeryError(TinyGPTValueError):
    """A bad surgery argument: an unknown target, a layer out of range, a matrix a block lacks, bad settings."""


TARGETS: tuple[str, ...] = (
    "attn.q_proj",
    "attn.k_proj",
    "attn.v_proj",
    "attn.o_proj",
    "mlp.fc_in",
    "mlp.fc_out",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
_EXPERT_LEAVES = ("fc_in", "fc_out", "gate_proj", "up_proj", "down_proj")
_GATED_LEAVES = ("gate_proj", "up_proj", "down_proj")
TARGET_GROUPS: dict[str, tuple[str, ...]] = {
    "attn": TARGETS[:4],
    "mlp": TARGETS[4:],
    "all": TARGETS,
    "experts": tuple(f"moe.experts.{leaf}" for leaf in _EXPERT_LEAVES),
}
_GROUP_ALIASES = {"moe.experts": "experts"}
_LEAF = {t.split(".")[1]: t for t in TARGETS}

TargetSpec = str | Sequence[str] | None
LayerSpec = int | str | Sequence[int] | range | None

_MOE_TARGET = re.compile(r"^moe\.experts\.(?:(\d+)\.)?(fc_in|fc_out|gate_proj|up_proj|down_proj)$")
_SHARED_TARGET = re.compile(r"^moe\.shared_expert\.(gate_proj|up_proj|down_proj)$")
_PATH = re.compile(r"^[A-Za-z0-9_*?\[\]]+(\.[A-Za-z0-9_*?\[\]]+)*$")


def valid_target_names() -> str:
    return (
        ", ".join(TARGETS)
        + "; groups: "
        + ", ".join(TARGET_GROUPS)
        + "; MoE experts: moe.experts.<leaf> (every expert) or moe.experts.{j}.<leaf>, <leaf> one of "
        + ", ".join(_EXPERT_LEAVES)
        + "; Qwen2-MoE shared expert: moe.shared_expert.gate_proj / up_proj / down_proj"
    )


def _known(name: str) -> bool:
    return name in TARGETS or _MOE_TARGET.match(name) is not None or _SHARED_TARGET.match(name) is not None


def target_sort_key(name: str) -> tuple[int, int, int, str]:
    """Sort key of block-relative target names: `TARGETS` order first, then MoE expert matrices leaf-major
    (every expert's fc_in, then every expert's fc_out, ... by expert index; "every expert" before expert 0),
    then the shared expert's matrices, then anything else alphabetically. Accepts canonical names
    ("mlp.fc_in"), expert names ("moe.experts.fc_in", "moe.experts.3.gate_proj") and any other module path."""
    if name in TARGETS:
        return (0, TARGETS.index(name), 0, "")
    m = _MOE_TARGET.match(name)
    if m is not None:
        return (1, _EXPERT_LEAVES.index(m.group(2)), -1 if m.group(1) is None else int(m.group(1)), "")
    m = _SHARED_TARGET.match(name)
    if m is not None:
        return (2, _GATED_LEAVES.index(m.group(1)), 0, "")
    return (3, 0, 0, name)


def sort_targets(names: Iterable[str]) -> list[str]:
    """Distinct target names in `target_sort_key` order."""
    return sorted(set(names), key=target_sort_key)


def resolve_targets(spec: TargetSpec, default: TargetSpec = "all", *, patterns: bool = False) -> list[str]:
    """Expand a target spec into canonical names, in `target_sort_key` order, without duplicates.

    Args:
        spec: a name ("mlp.fc_out", "fc_out", "gate_proj"), a group ("mlp", "attn", "all", "experts"), a MoE
            expert name ("moe.experts.fc_in", "moe.experts.2.down_proj", "moe.shared_expert.up_proj"), a
            comma-separated string of those, a list of them,
            or None (= `default`). MoE names come after the `TARGETS` ones; they are expanded per block by
            `block_targets`.
        patterns: also accept other block-relative module paths, with `*` wildcards (kept as they are).
    Raises:
        SurgeryError: an unknown name (the message lists the valid ones) or an empty spec.
    """
    return _expand_targets(spec, default, patterns)[0]


def _expand_targets(spec: TargetSpec, default: TargetSpec, patterns: bool = False) -> tuple[list[str], set[str]]:
    """(`resolve_targets(spec)`, the names given one by one rather than through a group)."""
    if spec is None:
        spec = default
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    chosen: set[str] = set()
    explicit: set[str] = set()
    for raw in items:
        if not isinstance(raw, str):
            raise SurgeryError(f"targets must be strings, got {raw!r}; valid targets: {valid_target_names()}")
        name = raw.strip()
        if patterns and not name:
            continue
        name = _GROUP_ALIASES.get(name, name)
        if name in TARGET_GROUPS:
            chosen.update(TARGET_GROUPS[name])
            continue
        if name in _LEAF:
            canonical = _LEAF[name]
        elif _known(name) or (patterns and _PATH.match(name)):
            canonical = name
        else:
            raise SurgeryError(f"unknown target {raw!r}; valid targets: {valid_target_names()}")
        chosen.add(canonical)
        explicit.add(canonical)
    if not chosen:
        raise SurgeryError(f"no targets given; valid targets: {valid_target_names()}")
    return sort_targets(chosen), explicit


def block_targets(model: nn.Module, layer: int, targets: Sequence[str], *, strict: bool = True) -> list[str]:
    """The concrete block-relative module paths that canonical `targets` name in block `layer`.

    On a dense block the names are returned as they are. On a MoE block (one with `moe.experts` and no `mlp`)
    `mlp.<leaf>` and `moe.experts.<leaf>` become every expert's matrix (`moe.experts.{j}.<leaf>`; `mlp.<leaf>`
    also the shared expert's `moe.shared_expert.<leaf>` where there is one) and `moe.experts.{j}.<leaf>` is
    checked against the number of experts. Other names (patterns) become the paths of the block's linear
    layers they match. The paths are not checked to exist (a gated expert has no `fc_in`: `select_modules`
    skips what a block lacks). Duplicates are dropped, first occurrence kept.

    Args:
        strict: raise for an expert name on a dense block (False: name nothing there; what groups use).
    Raises:
        SurgeryError: (with `strict`) a MoE name on a block without experts, or an expert index out of range.
    """
    block = model.blocks[layer]
    moe = getattr(block, "moe", None)
    experts = getattr(moe, "experts", None) if not hasattr(block, "mlp") else None
    shared = experts is not None and getattr(moe, "shared_expert", None) is not None
    out: list[str] = []
    for t in targets:
        m = _MOE_TARGET.match(t)
        if not _known(t):
            out.extend(n for n, mod in block.named_modules() if n and fnmatch.fnmatchcase(n, t) and _is_matrix(mod))
            continue
        if m is None and not (experts is not None and t.startswith("mlp.")):
            out.append(t)
            continue
        if experts is None:
            if not strict:
                continue
            raise SurgeryError(
                f"target {t!r} names MoE experts, but block {layer} has no `moe.experts` (it is a dense block); "
                "use the mlp.* names there"
            )
        leaf = m.group(2) if m else t.split(".", 1)[1]
        if m and m.group(1) is not None:
            j = int(m.group(1))
            if j >= len(experts):
                raise SurgeryError(
                    f"target {t!r}: block {layer} has {len(experts)} experts (valid indices 0..{len(experts) - 1})"
                )
            out.append(f"moe.experts.{j}.{leaf}")
        else:
            out.extend(f"moe.experts.{j}.{leaf}" for j in range(len(experts)))
            if m is None and shared and leaf in _GATED_LEAVES:
                out.append(f"moe.shared_expert.{leaf}")
    return list(dict.fromkeys(out))


_RANGE = re.compile(r"^(\d+)\s*-\s*(\d+)$")
_INT = re.compile(r"^-?\d+$")


def resolve_layers(spec: LayerSpec, n_layers: int) -> list[int]:
    """Expand a layer spec into sorted, distinct layer indices in `[0, n_layers)`.

    Args:
        spec: an int (negative counts from the end), a list/tuple/range of ints, a string "8-11" (inclusive),
            "0,2,5", "0-3,7" or "all", or None (every layer).
        n_layers: the model's number of layers.
    Raises:
        SurgeryError: a layer out of range, a malformed string, or an empty selection.
    """
    valid = f"valid layers are 0..{n_layers - 1} (or negative from the end)"
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "all"):
        return list(range(n_layers))
    if isinstance(spec, str):
        out: list[int] = []
        for part in spec.split(","):
            part = part.strip()
            if m := _RANGE.match(part):
                lo, hi = int(m.group(1)), int(m.group(2))
                if lo > hi:
                    raise SurgeryError(f"layer range {part!r} is empty (start > end); write it as {hi}-{lo}")
                out.extend(range(lo, hi + 1))
            elif _INT.match(part):
                out.append(int(part))
            else:
                raise SurgeryError(
                    f"cannot parse layers {spec!r}: write an int, a range like 8-11 or a list like 0,2,5"
                )
        items: list[Any] = out
    elif isinstance(spec, bool):
        raise SurgeryError(f"layers must be ints, got {spec!r}")
    elif isinstance(spec, (int, np.integer)):
        items = [int(spec)]
    else:
        items = list(spec)
    result: set[int] = set()
    for x in items:
        if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
            raise SurgeryError(f"layers must be ints, got {x!r}; {valid}")
        i = int(x)
        if not -n_layers <= i < n_layers:
            raise SurgeryError(f"layer {i} is out of range for a {n_layers}-layer model; {valid}")
        result.add(i % n_layers)
    if not result:
        raise SurgeryError(f"no layers selected; {valid}")
    return sorted(result)


def layers_text(layers: Iterable[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    ls = sorted(set(layers))
    parts, i = [], 0
    while i < len(ls):
        j = i
        while j + 1 < len(ls) and ls[j + 1] == ls[j] + 1:
            j += 1
        parts.append(str(ls[i]) if i == j else f"{ls[i]}-{ls[j]}")
        i = j + 1
    return ",".join(parts)


def module_name(layer: int, target: str) -> str:
    """The module path of a target matrix, e.g. (3, "mlp.fc_out") -> "blocks.3.mlp.fc_out"."""
    return f"blocks.{layer}.{target}"


def get_module(model: nn.Module, layer: int, target: str) -> nn.Module:
    return model.get_submodule(module_name(layer, target))


def check_model(model: nn.Module) -> int:
    """The number of layers of a tinygpt-style model (has `cfg.n_layers` and `blocks`)."""
    if not hasattr(model, "blocks") or not hasattr(model, "cfg"):
        raise SurgeryError(f"expected a tinygpt.GPT (with .blocks and .cfg), got {type(model).__name__}")
    return len(model.blocks)


def _is_matrix(m: nn.Module) -> bool:
    """A linear layer: `nn.Linear` or a module standing in for one (factored, packed: `in_features` and `weight`)."""
    return isinstance(m, nn.Linear) or (isinstance(getattr(m, "in_features", None), int) and hasattr(m, "weight"))


def _find_module(model: nn.Module, layer: int, target: str) -> nn.Module | None:
    try:
        return get_module(model, layer, target)
    except AttributeError:
        return None


def _block_matrices(model: nn.Module, layer: int) -> list[str]:
    """The target names block `layer` really has (for error messages)."""
    names = [t for t in TARGETS if _find_module(model, layer, t) is not None]
    moe = getattr(model.blocks[layer], "moe", None)
    experts = getattr(moe, "experts", None)
    if experts is not None:
        names += [
            f"moe.experts.{{0..{len(experts) - 1}}}.{leaf}"
            for leaf in _EXPERT_LEAVES
            if _find_module(model, layer, f"moe.experts.0.{leaf}") is not None
        ]
    if getattr(moe, "shared_expert", None) is not None:
        names += [f"moe.shared_expert.{leaf}" for leaf in _GATED_LEAVES]
    return names


def _missing(model: nn.Module, t: str, lay: list[int]) -> SurgeryError:
    """The error for a target named on its own that none of the selected blocks `lay` has."""
    if not _known(t):  # a pattern: say what it does name, or which linear layers there are
        block = model.blocks[lay[0]]
        mods = dict(block.named_modules())
        other = [n for n in mods if n and fnmatch.fnmatchcase(n, t)]
        if other:
            kinds = ", ".join(f"{n} ({type(mods[n]).__name__})" for n in other[:3])
            return SurgeryError(f"blocks.{lay[0]}: target {t!r} names {kinds}, not a linear layer")
        linears = sorted(n for n, m in mods.items() if n and _is_matrix(m))
        return SurgeryError(
            f"target {t!r} matches no linear layer in blocks.{lay[0]}; its linear layers are: {', '.join(linears)} "
            f"(groups: {', '.join(TARGET_GROUPS)}; `*` matches a path component)"
        )
    yoco = (
        " (YOCO cross-decoder blocks take keys and values from the model's shared `yoco_kv`)"
        if t in ("attn.k_proj", "attn.v_proj") and hasattr(model, "yoco_kv")
        else ""
    )
    return SurgeryError(
        f"target {t!r} is in none of the selected blocks (layers {layers_text(lay)}){yoco}; block {lay[0]} "
        f"has {', '.join(_block_matrices(model, lay[0]))}"
    )


def select_modules(
    model: nn.Module,
    targets: TargetSpec,
    layers: LayerSpec,
    *,
    dense_only: bool = True,
    patterns: bool = False,
    default: TargetSpec = "all",
) -> list[tuple[int, str, nn.Module]]:
    """(layer, target, module) for every selected weight matrix, layer-major; validates everything first.

    `target` is the concrete block-relative path (on MoE blocks one entry per expert matrix, e.g.
    "moe.experts.2.fc_out"; see `block_targets`), so `module_name(layer, target)` is unique per matrix.
    A block that lacks a matrix is skipped for it, but a target named on its own (not through a group such
    as "attn" or "all") must exist in at least one selected block.

    Args:
        dense_only: require plain `nn.Linear` modules (what LASER and HQQ operate on); False also returns
            factored (`LowRankLinear`), packed (`PackedQuantLinear`) and LoRA layers, which all have `weight`.
        patterns: accept block-relative module paths with `*` wildcards too (see `resolve_targets`).
        default: the targets `targets=None` means.
    Raises:
        SurgeryError: bad targets or layers, a target named on its own that no selected block has, nothing
            selected at all, or (with `dense_only`) a selected module that is not a plain `nn.Linear` (for
            example one already replaced by `LowRankLinear` or `PackedQuantLinear`).
    """
    n = check_model(model)
    tgt, explicit = _expand_targets(targets, default, patterns)
    lay = resolve_layers(layers, n)
    out = []
    found: set[str] = set()
    seen: set[tuple[int, str]] = set()
    for layer in lay:
        for t in tgt:
            for concrete in block_targets(model, layer, [t], strict=t in explicit):
                mod = _find_module(model, layer, concrete)
                if mod is None:
                    continue
                found.add(t)
                if (layer, concrete) in seen:  # e.g. "mlp" and "moe.experts.1.fc_in" together
                    continue
                if dense_only and type(mod) is not nn.Linear:
                    raise SurgeryError(
                        f"{module_name(layer, concrete)} is a {type(mod).__name__}, not a dense nn.Linear (it was "
                        "already factored or packed); reload the original model to operate on it again"
                    )
                seen.add((layer, concrete))
                out.append((layer, concrete, mod))
    missing = sorted(explicit - found, key=target_sort_key)
    if missing:
        raise _missing(model, missing[0], lay)
    if not out:
        raise SurgeryError(f"no weight matrices selected (layers {layers_text(lay)}, targets {', '.join(tgt)})")
    return out


def select_linears(model: nn.Module, targets: TargetSpec, layers: LayerSpec) -> list[tuple[int, str, nn.Linear]]:
    """(layer, target, nn.Linear) for every selected matrix: `select_modules` with `dense_only=True`."""
    return select_modules(model, targets, layers, dense_only=True)


def concrete_targets(chosen: Iterable[tuple[int, str, Any]]) -> tuple[list[str], list[int]]:
    """The distinct targets (in `target_sort_key` order) and layers (sorted) of a selection."""
    chosen = list(chosen)
    return sort_targets(t for _, t, _ in chosen), sorted({ly for ly, _, _ in chosen})


__all__ = [
    "TARGETS",
    "TARGET_GROUPS",
    "LayerSpec",
    "SurgeryError",
    "TargetSpec",
    "block_targets",
    "check_model",
    "concrete_targets",
    "layers_text",
    "module_name",
    "resolve_layers",
    "resolve_targets",
    "select_linears",
    "select_modules",
    "sort_targets",
    "target_sort_key",
]
