"""tinygpt.widgets: ipywidgets + plotly dashboards over the pure functions of `tinygpt`.

Each dashboard is a thin layer over library functions that return results: a control change calls one
(`tinygpt.interp`, `tinygpt.surgery`, `tinygpt.eval`, `tinygpt.dictionary`) and draws the result's own
`.figure()`, so the function is tested without a kernel and the dashboard by driving its controls; a dashboard
never runs the model itself.

    base.py       `Dashboard`: status line, output area, error reporting, callbacks, figure updates, display
    _inputs.py    prompts typed into a text box (token ids for a model without a tokenizer), evaluation tokens
    lens.py  ablation.py  patching.py  attention.py  training.py  laser.py  hqq.py  evalmatrix.py  features.py
                  circuits.py
                  one each
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
    "FeatureDashboard": "features",
    "CircuitDashboard": "circuits",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))


__all__ = list(_LAZY)
