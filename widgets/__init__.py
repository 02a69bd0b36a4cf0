"""tinygpt.widgets: ipywidgets + plotly dashboards over the pure functions of `tinygpt`.

Each dashboard is a thin layer over a function that returns a result dataclass, so the function is
tested without a kernel and the dashboard by driving its controls.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> submodule; imported on first use (plotly's FigureWidget costs seconds to import)
_LAZY = {
    "LaserDashboard": "laser",
    "HqqDashboard": "hqq",
    "LensDashboard": "lens",
    "AblationExplorer": "ablation",
    "PatchingDashboard": "patching",
    "AttentionViewer": "attention",
    "TrainingDashboard": "training",
    "EvalMatrixDashboard": "evalmatrix",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))


__all__ = list(_LAZY)
