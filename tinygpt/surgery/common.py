"""Shared helpers for weight surgery: choosing matrices, swapping modules, restoring, evaluating.

Targets are named relative to a block, as `tinygpt inspect` shows them (`blocks.3.mlp.fc_out.weight`):

    mlp.fc_in  mlp.fc_out  attn.q_proj  attn.k_proj  attn.v_proj  attn.o_proj
    groups: "mlp" (both MLP matrices), "attn" (all four attention projections), "all" (all six)

Leaf names alone ("fc_out", "q_proj") are accepted too.

Mixture-of-Experts blocks (`tinygpt.arch.moe`) have no `mlp`: there `mlp.fc_in` / `mlp.fc_out` (and so the
"mlp" and "all" groups) stand for every expert's matrix of that block, `moe.experts.{j}.fc_in` /
`moe.experts.{j}.fc_out`, and each expert matrix is operated on (and reported, e.g. "moe.experts.2.fc_out")
on its own. Experts can be named explicitly: `moe.experts.fc_in` (every expert) or `moe.experts.2.fc_out`
(expert 2 only); these names apply only to MoE blocks. Layers are an int, a list of ints, a `range`,
a string such as "8-11", "0,2,5" or "0-3,7", or None (every layer); negative ints count from the end.
Every function here validates all of its arguments before anything is modified.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

TARGETS: tuple[str, ...] = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.fc_in", "mlp.fc_out")
TARGET_GROUPS: dict[str, tuple[str, ...]] = {
    "attn": TARGETS[:4],
    "mlp": TARGETS[4:],
    "all": TARGETS,
}
_LEAF = {t.split(".")[1]: t for t in TARGETS}

TargetSpec = str | Sequence[str] | None
LayerSpec = int | str | Sequence[int] | range | None


_MOE_TARGET = re.compile(r"^moe\.experts\.(?:(\d+)\.)?(fc_in|fc_out)$")


def valid_target_names() -> str:
    return (
        ", ".join(TARGETS)
        + "; groups: "
        + ", ".join(TARGET_GROUPS)
        + "; MoE experts: moe.experts.fc_in, moe.experts.fc_out, moe.experts.{j}.fc_in, moe.experts.{j}.fc_out"
    )


def target_sort_key(name: str) -> tuple[int, int, int, str]:
    """Sort key of block-relative target names: `TARGETS` order first, then MoE expert matrices leaf-major
    (every expert's fc_in, then every expert's fc_out, by expert index; "every expert" before expert 0),
    then anything else alphabetically. Accepts canonical names ("mlp.fc_in"), expert names
    ("moe.experts.fc_in", "moe.experts.3.fc_in") and any other module path."""
    if name in TARGETS:
        return (0, TARGETS.index(name), 0, "")
    m = _MOE_TARGET.match(name)
    if m is not None:
        return (1, 0 if m.group(2) == "fc_in" else 1, -1 if m.group(1) is None else int(m.group(1)), "")
    return (2, 0, 0, name)


def sort_targets(names: Iterable[str]) -> list[str]:
    """Distinct target names in `target_sort_key` order."""
    return sorted(set(names), key=target_sort_key)


def resolve_targets(spec: TargetSpec, default: TargetSpec = "all") -> list[str]:
    """Expand a target spec into canonical names, in `target_sort_key` order, without duplicates.

    Args:
        spec: a name ("mlp.fc_out" or "fc_out"), a group ("mlp", "attn", "all"), a MoE expert name
            ("moe.experts.fc_in", "moe.experts.2.fc_out"), a comma-separated string of those, a list of them,
            or None (= `default`). MoE names come after the `TARGETS` ones; they are expanded per block by
            `block_targets`.
    Raises:
        ValueError: an unknown name (the message lists the valid ones) or an empty spec.
    """
    return _expand_targets(spec, default)[0]


def _expand_targets(spec: TargetSpec, default: TargetSpec = "all") -> tuple[list[str], set[str]]:
    """(`resolve_targets(spec)`, the names given one by one rather than through a group)."""
    if spec is None:
        spec = default
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    chosen: set[str] = set()
    explicit: set[str] = set()
    for raw in items:
        if not isinstance(raw, str):
            raise ValueError(f"targets must be strings, got {raw!r}; valid targets: {valid_target_names()}")
        name = raw.strip()
        if name in TARGET_GROUPS:
            chosen.update(TARGET_GROUPS[name])
            continue
        if name in TARGETS or _MOE_TARGET.match(name):
            canonical = name
        elif name in _LEAF:
            canonical = _LEAF[name]
        else:
            raise ValueError(f"unknown target {raw!r}; valid targets: {valid_target_names()}")
        chosen.add(canonical)
        explicit.add(canonical)
    if not chosen:
        raise ValueError(f"no targets given; valid targets: {valid_target_names()}")
    return sort_targets(chosen), explicit


def block_targets(model: nn.Module, layer: int, targets: Sequence[str]) -> list[str]:
    """The concrete block-relative module paths that canonical `targets` name in block `layer`.

    On a dense block the names are returned as they are. On a MoE block (one with `moe.experts` and no `mlp`)
    `mlp.fc_in` / `mlp.fc_out` and `moe.experts.fc_in` / `moe.experts.fc_out` become every expert's matrix
    (`moe.experts.{j}.fc_in`, ...) and `moe.experts.{j}.<leaf>` is checked against the number of experts.
    Duplicates are dropped, first occurrence kept.

    Raises:
        ValueError: a MoE name on a block without experts, or an expert index out of range.
    """
    block = model.blocks[layer]
    moe = getattr(block, "moe", None)
    experts = getattr(moe, "experts", None) if not hasattr(block, "mlp") else None
    out: list[str] = []
    for t in targets:
        m = _MOE_TARGET.match(t)
        if m is None and not (experts is not None and t.startswith("mlp.")):
            out.append(t)
            continue
        if experts is None:
            raise ValueError(
                f"target {t!r} names MoE experts, but block {layer} has no `moe.experts` (it is a dense block); "
                "use mlp.fc_in / mlp.fc_out there"
            )
        leaf = m.group(2) if m else t.split(".", 1)[1]
        if m and m.group(1) is not None:
            j = int(m.group(1))
            if j >= len(experts):
                raise ValueError(
                    f"target {t!r}: block {layer} has {len(experts)} experts (valid indices 0..{len(experts) - 1})"
                )
            out.append(f"moe.experts.{j}.{leaf}")
        else:
            out.extend(f"moe.experts.{j}.{leaf}" for j in range(len(experts)))
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
        ValueError: a layer out of range, a malformed string, or an empty selection.
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
                    raise ValueError(f"layer range {part!r} is empty (start > end); write it as {hi}-{lo}")
                out.extend(range(lo, hi + 1))
            elif _INT.match(part):
                out.append(int(part))
            else:
                raise ValueError(f"cannot parse layers {spec!r}: write an int, a range like 8-11 or a list like 0,2,5")
        items: list[Any] = out
    elif isinstance(spec, bool):
        raise ValueError(f"layers must be ints, got {spec!r}")
    elif isinstance(spec, (int, np.integer)):
        items = [int(spec)]
    else:
        items = list(spec)
    result: set[int] = set()
    for x in items:
        if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
            raise ValueError(f"layers must be ints, got {x!r}; {valid}")
        i = int(x)
        if not -n_layers <= i < n_layers:
            raise ValueError(f"layer {i} is out of range for a {n_layers}-layer model; {valid}")
        result.add(i % n_layers)
    if not result:
        raise ValueError(f"no layers selected; {valid}")
    return sorted(result)


def module_name(layer: int, target: str) -> str:
    """The module path of a target matrix, e.g. (3, "mlp.fc_out") -> "blocks.3.mlp.fc_out"."""
    return f"blocks.{layer}.{target}"


def get_module(model: nn.Module, layer: int, target: str) -> nn.Module:
    return model.get_submodule(module_name(layer, target))


def set_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Replace the submodule at dotted path `name` by `new`; returns the old one.

    Keeps a `HookedRootModule`'s `mod_dict` and module `.name` attributes in step with the tree.
    """
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, leaf)
    setattr(parent, leaf, new)
    new.name = name
    mod_dict = getattr(model, "mod_dict", None)
    if isinstance(mod_dict, dict):
        mod_dict[name] = new
    return old


def check_model(model: nn.Module) -> int:
    """The number of layers of a tinygpt-style model (has `cfg.n_layers` and `blocks`)."""
    if not hasattr(model, "blocks") or not hasattr(model, "cfg"):
        raise ValueError(f"expected a tinygpt.GPT (with .blocks and .cfg), got {type(model).__name__}")
    return len(model.blocks)


def _find_module(model: nn.Module, layer: int, target: str) -> nn.Module | None:
    try:
        return get_module(model, layer, target)
    except AttributeError:
        return None


def _block_matrices(model: nn.Module, layer: int) -> list[str]:
    """The target names block `layer` really has (for error messages)."""
    names = [t for t in TARGETS if _find_module(model, layer, t) is not None]
    experts = getattr(getattr(model.blocks[layer], "moe", None), "experts", None)
    if experts is not None:
        names += [f"moe.experts.{{0..{len(experts) - 1}}}.{leaf}" for leaf in ("fc_in", "fc_out")]
    return names


def select_modules(
    model: nn.Module, targets: TargetSpec, layers: LayerSpec, *, dense_only: bool = True
) -> list[tuple[int, str, nn.Module]]:
    """(layer, target, module) for every selected weight matrix, layer-major; validates everything first.

    `target` is the concrete block-relative path (on MoE blocks one entry per expert matrix, e.g.
    "moe.experts.2.fc_out"; see `block_targets`), so `module_name(layer, target)` is unique per matrix.
    A block that lacks a matrix is skipped for it (YOCO's cross-decoder blocks have no `attn.k_proj` /
    `attn.v_proj`: they attend to the shared `yoco_kv`), but a target named on its own (not through a group
    such as "attn" or "all") must exist in at least one selected block.

    Args:
        dense_only: require plain `nn.Linear` modules (what LASER and HQQ operate on); False also returns
            factored (`LowRankLinear`), packed (`PackedQuantLinear`) and LoRA layers, which all have `weight`.
    Raises:
        ValueError: bad targets or layers, a target named on its own that no selected block has, nothing
            selected at all, or (with `dense_only`) a selected module that is not a plain `nn.Linear` (for
            example one already replaced by `LowRankLinear` or `PackedQuantLinear`).
    """
    n = check_model(model)
    tgt, explicit = _expand_targets(targets)
    lay = resolve_layers(layers, n)
    out = []
    found: set[str] = set()
    seen: set[tuple[int, str]] = set()
    for layer in lay:
        for t in tgt:
            for concrete in block_targets(model, layer, [t]):
                mod = _find_module(model, layer, concrete)
                if mod is None:
                    continue
                found.add(t)
                if (layer, concrete) in seen:  # e.g. "mlp" and "moe.experts.1.fc_in" together
                    continue
                if dense_only and type(mod) is not nn.Linear:
                    raise ValueError(
                        f"{module_name(layer, concrete)} is a {type(mod).__name__}, not a dense nn.Linear (it was "
                        "already factored or packed); reload the original model to operate on it again"
                    )
                seen.add((layer, concrete))
                out.append((layer, concrete, mod))
    for t in sorted(explicit - found, key=target_sort_key):
        yoco = (
            " (YOCO cross-decoder blocks take keys and values from the model's shared `yoco_kv`)"
            if t in ("attn.k_proj", "attn.v_proj") and hasattr(model, "yoco_kv")
            else ""
        )
        raise ValueError(
            f"target {t!r} is in none of the selected blocks (layers {layers_text(lay)}){yoco}; block {lay[0]} "
            f"has {', '.join(_block_matrices(model, lay[0]))}"
        )
    if not out:
        raise ValueError(f"no weight matrices selected (layers {layers_text(lay)}, targets {', '.join(tgt)})")
    return out


def select_linears(model: nn.Module, targets: TargetSpec, layers: LayerSpec) -> list[tuple[int, str, nn.Linear]]:
    """(layer, target, nn.Linear) for every selected matrix: `select_modules` with `dense_only=True`."""
    return select_modules(model, targets, layers, dense_only=True)


def concrete_targets(chosen: Iterable[tuple[int, str, Any]]) -> tuple[list[str], list[int]]:
    """The distinct targets (in `target_sort_key` order) and layers (sorted) of a selection."""
    chosen = list(chosen)
    return sort_targets(t for _, t, _ in chosen), sorted({ly for ly, _, _ in chosen})


class Restorer:
    """Makes the changes of one surgery operation and, when `active`, remembers what they replaced so that
    `restore()` puts it back exactly (bitwise). An inactive one (in-place `laser_` / `hqq_`) only makes them."""

    def __init__(self, model: nn.Module, active: bool = True):
        self.model, self.active = model, active
        self.weights: dict[int, tuple[nn.Linear, Tensor]] = {}  # id -> (module, weight before the first write)
        self.modules: list[tuple[str, nn.Module]] = []
        self.log_len = len(getattr(model, "surgery_log", []) or [])

    @torch.no_grad()
    def write_weight(self, lin: nn.Linear, value: Tensor) -> None:
        """Overwrite `lin.weight` with `value` (cast to its dtype); the first write to `lin` saves the original."""
        if self.active and id(lin) not in self.weights:
            self.weights[id(lin)] = (lin, lin.weight.detach().clone())
        lin.weight.copy_(value.to(lin.weight.dtype))

    def original(self, lin: nn.Linear) -> Tensor:
        """`lin.weight` as it was before this restorer first wrote it."""
        return self.weights[id(lin)][1] if id(lin) in self.weights else lin.weight.detach()

    def swap(self, name: str, new: nn.Module) -> None:
        """Replace the module at `name` by `new`."""
        old = set_module(self.model, name, new)
        if self.active:
            self.modules.append((name, old))

    @torch.no_grad()
    def restore(self) -> None:
        for lin, w in self.weights.values():
            lin.weight.copy_(w)
        for name, old in reversed(self.modules):
            set_module(self.model, name, old)
        log = getattr(self.model, "surgery_log", None)
        if log is not None and self.active:
            del log[self.log_len :]
        self.weights.clear()
        self.modules.clear()


@contextlib.contextmanager
def restoring(model: nn.Module) -> Iterator[Restorer]:
    """A `Restorer` whose changes are undone when the block exits (also on an exception)."""
    restorer = Restorer(model)
    try:
        yield restorer
    finally:
        restorer.restore()


def record(model: nn.Module, entry: dict[str, Any]) -> None:
    """Append an operation to `model.surgery_log` (saved in the checkpoint manifest)."""
    log = getattr(model, "surgery_log", None)
    if log is None:
        log = []
        model.surgery_log = log
    log.append(entry)


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


# -------------------------------------------------------------------------------- checkpoints
class SwappedLinear(nn.Module):
    """Base of the modules surgery puts in place of an `nn.Linear` (factored, packed), rebuilt on load from
    the manifest's `surgery` record. Subclasses set `kind` and `spec_fields` (their int constructor
    arguments after in_features and out_features, kept as attributes of the same names)."""

    kind: str = "?"
    spec_fields: tuple[str, ...] = ()
    in_features: int
    out_features: int

    @classmethod
    def from_spec(cls, spec: dict[str, Any], like: nn.Linear) -> SwappedLinear:
        """An empty module shaped by a manifest `spec`, in the dtype/device of the Linear it replaces."""
        if (spec.get("in_features"), spec.get("out_features")) != (like.in_features, like.out_features):
            raise ValueError(
                f"{cls.kind} record {spec} does not match a Linear {like.in_features}->{like.out_features}"
            )
        w = like.weight
        args = (int(spec[k]) for k in cls.spec_fields)
        return cls(like.in_features, like.out_features, *args, like.bias is not None, device=w.device, dtype=w.dtype)

    def surgery_spec(self) -> dict[str, Any]:
        """The manifest entry `from_spec` rebuilds this module from."""
        fields = {k: getattr(self, k) for k in self.spec_fields}
        return {"type": self.kind, **fields, "in_features": self.in_features, "out_features": self.out_features}


def surgery_record(model: nn.Module) -> dict[str, Any] | None:
    """The manifest entry describing structural surgery (factored / packed modules) and the log, or None."""
    modules = {name: m.surgery_spec() for name, m in model.named_modules() if hasattr(m, "surgery_spec")}
    log = list(getattr(model, "surgery_log", None) or [])
    if not modules and not log:
        return None
    return {"version": 1, "modules": modules, "log": log}


def apply_surgery_record(model: nn.Module, rec: dict[str, Any]) -> None:
    """Rebuild factored / packed modules described by `rec` (before `load_state_dict`)."""
    from tinygpt.surgery.hqq import PackedQuantLinear
    from tinygpt.surgery.laser import LowRankLinear
    from tinygpt.training.lora import LoRALinear

    kinds = {LowRankLinear.kind: LowRankLinear, PackedQuantLinear.kind: PackedQuantLinear, LoRALinear.kind: LoRALinear}
    if not isinstance(rec, dict) or not isinstance(rec.get("modules", {}), dict):
        raise ValueError("malformed 'surgery' record in the manifest")
    for name, spec in rec.get("modules", {}).items():
        kind = spec.get("type") if isinstance(spec, dict) else None
        if kind not in kinds:
            raise ValueError(f"unknown surgery module type {kind!r} for {name} (written by a newer tinygpt?)")
        try:
            old = model.get_submodule(name)
        except AttributeError as e:
            raise ValueError(f"surgery record names {name}, which the model does not have") from e
        if not isinstance(old, nn.Linear):
            raise ValueError(f"surgery record names {name}, which is a {type(old).__name__}, not a Linear")
        set_module(model, name, kinds[kind].from_spec(spec, like=old))
    model.surgery_log = list(rec.get("log", []))


# -------------------------------------------------------------------------------- evaluation
@dataclass
class EvalData:
    """Fixed validation windows: inputs and targets [n_windows, ctx]."""

    x: Tensor
    y: Tensor
    batch_size: int = 8

    @property
    def n_tokens(self) -> int:
        return self.y.numel()

    def batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        for i in range(0, len(self.x), self.batch_size):
            yield self.x[i : i + self.batch_size], self.y[i : i + self.batch_size]


def eval_data(
    model: nn.Module,
    data: Any = None,
    *,
    ctx: int | None = None,
    n_windows: int = 16,
    batch_size: int = 8,
    val_fraction: float = 0.01,
    progress: bool = False,
) -> EvalData:
    """Validation windows from many kinds of input.

    Args:
        model: the model (its tokenizer, `cfg.n_ctx` and device are used).
        data: tokens [batch, pos] (used as they are, next-token targets), a 1-D token stream (tensor or
            array; cut into `n_windows` evenly spaced windows of `ctx`), text, a corpus path / `Corpus`,
            or None for the built-in Shakespeare (the last `val_fraction` of a corpus is used).
        ctx: window length (default: the model's n_ctx).
        n_windows: windows cut from a token stream.
        batch_size: windows per forward pass.
    """
    from tinygpt.data import Corpus, load_corpus, tokenize_corpus, val_starts, windows

    device = next(model.parameters()).device
    ctx = min(ctx or model.cfg.n_ctx, model.cfg.n_ctx)
    if isinstance(data, EvalData):
        return data
    if isinstance(data, Tensor) and data.ndim == 2:
        if data.shape[1] < 2:
            raise ValueError(f"token batches need at least 2 positions, got shape {tuple(data.shape)}")
        t = data.long().to(device)
        return EvalData(t[:, :-1], t[:, 1:], batch_size)
    if isinstance(data, str) and not os.path.exists(data):
        stream = np.asarray(model._require_tokenizer().encode(data), dtype=np.int64)
    elif data is None or isinstance(data, (str, os.PathLike, Path, Corpus)):
        tok = model._require_tokenizer()
        td = tokenize_corpus(load_corpus(data), tok, progress=progress)
        stream = td.split(val_fraction)[1] if val_fraction else td.tokens
    else:
        stream = data.cpu().numpy() if isinstance(data, Tensor) else np.asarray(data)
        if stream.ndim != 1:
            raise ValueError(f"expected tokens [batch, pos] or a 1-D token stream, got shape {stream.shape}")
    if len(stream) < 2:
        raise ValueError(f"need at least 2 validation tokens, got {len(stream)}")
    ctx = min(ctx, len(stream) - 1)
    starts = val_starts(len(stream), ctx, n_windows) if len(stream) > ctx + 1 else torch.zeros(1, dtype=torch.long)
    x, y = windows(stream, starts, ctx, device)
    return EvalData(x.to(device), y.to(device), batch_size)


@torch.no_grad()
def eval_loss(model: nn.Module, data: EvalData) -> float:
    """Mean next-token cross-entropy over all target tokens of `data`."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for x, y in data.batches():
            loss = model(x, return_type="loss", targets=y)
            total += float(loss) * y.numel()
            count += y.numel()
    finally:
        model.train(was_training)
    return total / count


def validation_loss(
    model: nn.Module,
    data: Any = None,
    *,
    ctx: int | None = None,
    n_windows: int = 16,
    batch_size: int = 8,
) -> float:
    """Mean next-token loss on the validation windows every surgery function uses (see `eval_data`).

    Works on any model, including ones with factored or packed layers, so a surgically changed model can be
    compared with the numbers a sweep reported. `data=None` is the held-out end of the built-in Shakespeare.
    """
    return eval_loss(model, eval_data(model, data, ctx=ctx, n_windows=n_windows, batch_size=batch_size))
