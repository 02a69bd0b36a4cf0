"""tinygpt.widgets: ipywidgets + plotly dashboards over the pure functions of `tinygpt`.

Each dashboard is a thin layer over a function that returns a result dataclass, so the function is
tested without a kernel and the dashboard by driving its controls.
"""
