"""Ablation specs: what to remove and how, parsed from "3.attn", "2.head5:mean", "L2H5", ...

"3"  / "3.layer"   the whole block 3 (its attention output and its MLP output)
"3.attn"           block 3's attention output       blocks.3.hook_attn_out
"1.mlp"            block 1's MLP output             blocks.1.hook_mlp_out
"2.head5" / "L2H5" head 5 of block 2                blocks.2.attn.hook_z[:, :, 5]
"2.head5:mean"     ... with a mode: zero (default), mean or resample
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from tinygpt.errors import TinyGPTValueError

COMPONENTS = ("layer", "attn", "mlp", "head")
MODES = ("zero", "mean", "resample")

_SPEC_FORMS = (
    "LAYER[.COMPONENT][:MODE] with COMPONENT one of layer, attn, mlp, headN and MODE one of zero, mean, "
    "resample (e.g. '3.attn', '2.head5:mean', '1.mlp:resample', 'L2H5')"
)
_SPEC_RE = re.compile(
    r"^\s*(?:L(?P<tl_layer>-?\d+)H(?P<tl_head>\d+)"
    r"|(?P<layer>-?\d+)(?:\.(?P<comp>layer|attn|mlp|(?:head|h)(?P<head>\d+)))?)"
    r"(?::(?P<mode>\w+))?\s*$",
    re.IGNORECASE,
)


class AblationError(TinyGPTValueError):
    """An ablation spec is malformed or does not fit the model."""


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class Ablation:
    """What to ablate and how.

    Attributes:
        layer: block index (negative counts from the last block, resolved by `resolve`).
        component: "layer" (attention and MLP outputs), "attn", "mlp" or "head".
        head: the head index, required for (and only for) component "head".
        mode: "zero", "mean" or "resample".
    """

    layer: int
    component: str = "layer"
    head: int | None = None
    mode: str = "zero"

    def __post_init__(self) -> None:
        if not _is_int(self.layer):
            raise AblationError(f"layer must be an integer, got {self.layer!r}")
        if self.component not in COMPONENTS:
            raise AblationError(f"component must be one of {COMPONENTS}, got {self.component!r}")
        if self.mode not in MODES:
            raise AblationError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.component == "head":
            if not _is_int(self.head) or self.head < 0:
                raise AblationError(f"a head ablation needs a non-negative head index, got head={self.head!r}")
        elif self.head is not None:
            raise AblationError(f"head={self.head} only applies to component 'head', not {self.component!r}")

    @classmethod
    def parse(cls, text: str, mode: str | None = None) -> Ablation:
        """Parse "3.attn", "2.head5", "1.mlp:mean", "L2H5", "0" (whole layer). `mode` applies when the
        text names none."""
        if isinstance(text, Ablation):
            return text
        if not isinstance(text, str):
            raise AblationError(f"an ablation spec must be a string or an Ablation, got {type(text).__name__}")
        m = _SPEC_RE.match(text)
        if m is None:
            raise AblationError(f"cannot parse ablation spec {text!r}: expected {_SPEC_FORMS}")
        chosen = (m["mode"] or mode or "zero").lower()
        if chosen not in MODES:
            raise AblationError(f"unknown ablation mode {chosen!r} in {text!r}; choose one of {MODES}")
        if m["tl_layer"] is not None:
            return cls(int(m["tl_layer"]), "head", int(m["tl_head"]), chosen)
        if m["head"] is not None:
            return cls(int(m["layer"]), "head", int(m["head"]), chosen)
        return cls(int(m["layer"]), (m["comp"] or "layer").lower(), None, chosen)

    def resolve(self, cfg) -> Ablation:
        """Check the layer and head against a model config; negative layers count from the end."""
        n_layers, n_heads = cfg.n_layers, cfg.n_heads
        layer = self.layer + n_layers if self.layer < 0 else self.layer
        if not 0 <= layer < n_layers:
            raise AblationError(
                f"ablation {self}: layer {self.layer} is out of range; the model has {n_layers} layers "
                f"(0..{n_layers - 1}, or -1..-{n_layers} from the end)"
            )
        if self.component == "head" and self.head >= n_heads:
            raise AblationError(
                f"ablation {self}: head {self.head} is out of range; layer {layer} has {n_heads} heads "
                f"(0..{n_heads - 1})"
            )
        return Ablation(layer, self.component, self.head, self.mode) if layer != self.layer else self

    @property
    def hook_names(self) -> list[str]:
        """The hook points this ablation edits."""
        block = f"blocks.{self.layer}"
        return {
            "layer": [f"{block}.hook_attn_out", f"{block}.hook_mlp_out"],
            "attn": [f"{block}.hook_attn_out"],
            "mlp": [f"{block}.hook_mlp_out"],
            "head": [f"{block}.attn.hook_z"],
        }[self.component]

    @property
    def label(self) -> str:
        """Short name without the mode: "3.attn", "2.head5", "1.layer"."""
        return f"{self.layer}.head{self.head}" if self.component == "head" else f"{self.layer}.{self.component}"

    def __str__(self) -> str:
        return f"{self.label}:{self.mode}"


def parse_ablations(specs: Any, mode: str | None = None) -> list[Ablation]:
    """Specs as a list of `Ablation`s. Accepts an `Ablation`, a string (several separated by commas or
    spaces: "0.head1, 1.mlp:mean") or an iterable of either; `mode` applies to strings naming none."""
    if specs is None:
        return []
    if isinstance(specs, (str, Ablation)):
        specs = [specs]
    out: list[Ablation] = []
    for spec in specs:
        if isinstance(spec, Ablation):
            out.append(spec)
        elif isinstance(spec, str):
            out.extend(Ablation.parse(part, mode) for part in re.split(r"[,\s]+", spec.strip()) if part)
        else:
            raise AblationError(f"an ablation spec must be a string or an Ablation, got {type(spec).__name__}")
    if not out:
        raise AblationError(f"no ablation given: pass specs such as {_SPEC_FORMS}")
    return out
