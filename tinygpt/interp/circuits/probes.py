"""Linear probes: logistic regression from a hook point's activations to a label, with a control task.

A probe's accuracy alone does not say the model *represents* the label: a flexible enough probe can memorise
any function of the token. Hewitt & Liang (2019) compare it with a *control task*: each token type (the token id
at the probed position) gets a random label, drawn once from the empirical label distribution, and the same
probe is trained on those labels. Selectivity = accuracy - control accuracy; a probe that only memorises token
identity has selectivity near 0 (or below).

    res = train_probe(model, tokens, labels, hook="blocks.1.hook_resid_pre")   # labels [batch, pos] per token
    res.accuracy, res.control_accuracy, res.selectivity
    sweep = train_probe(model, tokens, labels, hook="blocks.{layer}.hook_resid_pre")   # every layer
    sweep.figure()                                                                # accuracy per layer

Labels: [batch, pos] integers per token (-100 = not used), or [batch] per sequence (the activation at `pos`,
default the last token, or the mean over positions with `pos="mean"`). Rows (sequences) are split into train
and held-out sets (`test_size`); accuracies are held-out. The probe is a multinomial logistic regression with
L2 penalty on standardised features, fitted by L-BFGS (deterministic given `seed`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from tinygpt.inputs import as_tokens, eval_mode
from tinygpt.interp.circuits._common import CircuitError

__all__ = ["ProbeResult", "ProbeSweep", "train_probe"]


@dataclass
class ProbeResult:
    """One probe on one hook point.

    Attributes:
        hook: the hook point read.
        accuracy, train_accuracy: held-out and training accuracy on the task.
        control_accuracy: held-out accuracy of the same probe on the control task (random label per token type).
        selectivity: accuracy - control_accuracy.
        majority: held-out accuracy of always predicting the most frequent training label.
        weight [n_classes, d], bias [n_classes], mean [d], std [d]: the probe (on standardised features:
            logits = ((x - mean) / std) @ weight.T + bias).
        n_train, n_test: examples in each split; n_classes.
    """

    hook: str
    accuracy: float
    train_accuracy: float
    control_accuracy: float
    selectivity: float
    majority: float
    weight: Tensor
    bias: Tensor
    mean: Tensor
    std: Tensor
    n_train: int
    n_test: int
    n_classes: int
    meta: dict[str, Any] = field(default_factory=dict)

    def predict(self, acts: Tensor) -> Tensor:
        """Class predictions for activations [..., d]."""
        x = (acts.float() - self.mean) / self.std
        return (x @ self.weight.T + self.bias).argmax(-1)

    def __repr__(self) -> str:
        return (
            f"ProbeResult({self.hook}: accuracy {self.accuracy:.3f} (control {self.control_accuracy:.3f}, "
            f"selectivity {self.selectivity:+.3f}, majority {self.majority:.3f}); {self.n_train} train / "
            f"{self.n_test} held-out, {self.n_classes} classes)"
        )

    def figure(self, title: str | None = None):
        """Plotly bars: task, control and majority-class accuracy."""
        import plotly.graph_objects as go

        fig = go.Figure(
            go.Bar(
                x=["task", "control", "majority"],
                y=[self.accuracy, self.control_accuracy, self.majority],
                text=[f"{v:.2f}" for v in (self.accuracy, self.control_accuracy, self.majority)],
            )
        )
        fig.update_layout(
            title=title or f"Probe on {self.hook}: selectivity {self.selectivity:+.2f}",
            yaxis=dict(title="held-out accuracy", range=[0, 1]),
            template="plotly_white",
            width=460,
            height=380,
        )
        return fig


@dataclass
class ProbeSweep:
    """Probes on a hook point of every layer (`hook` with "{layer}"), one `ProbeResult` each."""

    layers: list[int]
    probes: list[ProbeResult]
    hook: str

    @property
    def accuracy(self) -> Tensor:
        return torch.tensor([p.accuracy for p in self.probes])

    @property
    def control_accuracy(self) -> Tensor:
        return torch.tensor([p.control_accuracy for p in self.probes])

    @property
    def selectivity(self) -> Tensor:
        return torch.tensor([p.selectivity for p in self.probes])

    def best(self) -> ProbeResult:
        """The probe of highest selectivity."""
        return self.probes[int(self.selectivity.argmax())]

    def __repr__(self) -> str:
        rows = ", ".join(
            f"L{layer} {p.accuracy:.2f}/{p.control_accuracy:.2f}" for layer, p in zip(self.layers, self.probes)
        )
        return f"ProbeSweep({self.hook}: accuracy/control {rows})"

    def figure(self, title: str | None = None):
        """Plotly lines over layers: task accuracy, control accuracy and selectivity."""
        import plotly.graph_objects as go

        fig = go.Figure()
        for name, y in (
            ("task accuracy", self.accuracy),
            ("control accuracy", self.control_accuracy),
            ("selectivity", self.selectivity),
        ):
            fig.add_trace(go.Scatter(x=self.layers, y=y.tolist(), mode="lines+markers", name=name))
        fig.update_layout(
            title=title or f"Probes on {self.hook}",
            xaxis=dict(title="layer", tickmode="array", tickvals=self.layers),
            yaxis=dict(title="held-out accuracy"),
            template="plotly_white",
            width=620,
            height=400,
        )
        return fig


def train_probe(
    model,
    data: Any,
    labels: Any,
    *,
    hook: str = "blocks.{layer}.hook_resid_post",
    layers: Sequence[int] | None = None,
    pos: int | str = -1,
    test_size: float = 0.25,
    l2: float = 1e-3,
    max_iter: int = 200,
    control: bool = True,
    seed: int = 0,
    batch_size: int = 64,
) -> ProbeResult | ProbeSweep:
    """Train a logistic-regression probe for `labels` on `hook`'s activations (every layer if `hook` holds
    "{layer}"), with a Hewitt & Liang control task.

    Args:
        model: a tinygpt model (eval mode during the call).
        data: the inputs: tokens [batch, pos], or texts of equal token length.
        labels: [batch, pos] integer labels per token (-100: skip the token) or [batch] per sequence.
        hook: a hook point name, or a template with "{layer}" for a layer sweep.
        layers: the layers of a sweep (default all).
        pos: for sequence labels: the position read (default the last) or "mean" (mean over positions).
        test_size: the fraction of rows (sequences) held out.
        l2: the L2 penalty on the probe's weights (mean over examples).
        max_iter: L-BFGS iterations.
        control: also train on the control task (else control_accuracy is NaN).
        seed: the split, the control labels and nothing else (the fit is deterministic).
        batch_size: rows per forward when collecting activations.

    Returns:
        A `ProbeResult`, or a `ProbeSweep` for a template.
    """
    tokens = as_tokens(model, data, what="data", error=CircuitError)
    y = torch.as_tensor(labels).long().cpu()
    b, t = tokens.shape
    per_token = y.ndim == 2
    if per_token and tuple(y.shape) != (b, t):
        raise CircuitError(f"per-token labels must be [batch, pos] = {(b, t)}, got {tuple(y.shape)}")
    if not per_token and tuple(y.shape) != (b,):
        raise CircuitError(f"labels must be [batch, pos] per token or [batch] per sequence, got {tuple(y.shape)}")
    if isinstance(pos, str) and pos != "mean":
        raise CircuitError(f"pos must be an int or 'mean', got {pos!r}")
    if b < 2:
        raise CircuitError("a probe needs at least 2 sequences (a train and a held-out row)")
    sweep = "{layer}" in hook
    layer_list = list(range(model.cfg.n_layers)) if layers is None else [int(x) for x in layers]
    names = [hook.format(layer=layer) for layer in layer_list] if sweep else [hook]
    missing = [n for n in names if n not in model.hook_dict]
    if missing:
        raise CircuitError(f"the model has no hook point {missing[0]!r}; see docs/hooks.md for the names")
    acts = _collect(model, tokens, names, batch_size)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(b, generator=gen)
    n_test = min(b - 1, max(1, round(b * test_size)))
    test_rows, train_rows = order[:n_test], order[n_test:]
    # the control task: a random label per token type (the token at the probed position), drawn once from the
    # empirical label distribution
    used = y[y != -100] if per_token else y
    if used.numel() == 0:
        raise CircuitError("every label is -100: nothing to probe")
    n_classes = int(used.max()) + 1
    freq = torch.bincount(used, minlength=n_classes).double()
    types = tokens.cpu() if per_token else _types(tokens.cpu(), pos)
    control_of = torch.multinomial(freq / freq.sum(), model.cfg.d_vocab if per_token or pos != "mean" else b,
                                   replacement=True, generator=gen)  # fmt: skip
    y_control = control_of[types]
    results = []
    for name in names:
        x = acts[name]  # [b, t, d]
        if not per_token:
            x = x.mean(1) if pos == "mean" else x[:, pos]
        results.append(_fit(name, x, y, y_control, train_rows, test_rows, per_token, n_classes, l2, max_iter, control))
    if not sweep:
        return results[0]
    return ProbeSweep(layer_list, results, hook)


def _types(tokens: Tensor, pos: int | str) -> Tensor:
    """Per sequence: the token type at the read position, or for mean pooling the sequence's own index (each
    distinct sequence its own type)."""
    if pos == "mean":
        _, inverse = torch.unique(tokens, dim=0, return_inverse=True)
        return inverse
    return tokens[:, pos]


def _collect(model, tokens: Tensor, names: list[str], batch_size: int) -> dict[str, Tensor]:
    out: dict[str, list[Tensor]] = {n: [] for n in names}
    with eval_mode(model), torch.no_grad():
        for i in range(0, tokens.shape[0], batch_size):
            _, cache = model.run_with_cache(tokens[i : i + batch_size], names_filter=names)
            for n in names:
                a = cache[n]
                if a.ndim != 3:
                    raise CircuitError(f"{n} is shaped {tuple(a.shape)}; probe a [batch, pos, d] hook point")
                out[n].append(a.float().cpu())
    return {n: torch.cat(v) for n, v in out.items()}


def _split(x: Tensor, y: Tensor, rows: Tensor, per_token: bool) -> tuple[Tensor, Tensor]:
    x, y = x[rows], y[rows]
    if per_token:
        x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1)
        keep = y != -100
        x, y = x[keep], y[keep]
    return x, y


def _logreg(x: Tensor, y: Tensor, n_classes: int, l2: float, max_iter: int) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression on x [n, d] by L-BFGS: weight [C, d], bias [C]."""
    w = torch.zeros(n_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    x, y = x.double(), y
    opt = torch.optim.LBFGS([w, bias], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w.T + bias, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach().float(), bias.detach().float()


def _fit(name, x, y, y_control, train_rows, test_rows, per_token, n_classes, l2, max_iter, control) -> ProbeResult:
    xtr, ytr = _split(x, y, train_rows, per_token)
    xte, yte = _split(x, y, test_rows, per_token)
    if len(ytr) == 0 or len(yte) == 0:
        raise CircuitError("the train or held-out split has no labelled example; give more rows or labels")
    mean, std = xtr.mean(0), xtr.std(0).clamp_min(1e-6)

    def fit_eval(a_tr, b_tr, a_te, b_te):
        w, bias = _logreg((a_tr - mean) / std, b_tr, n_classes, l2, max_iter)
        acc = lambda a, b: float((((a - mean) / std) @ w.T + bias).argmax(-1).eq(b).double().mean())  # noqa: E731
        return w, bias, acc(a_tr, b_tr), acc(a_te, b_te)

    w, bias, train_acc, acc = fit_eval(xtr, ytr, xte, yte)
    control_acc = float("nan")
    if control:
        ctr, ctr_y = _split(
            x, y_control if not per_token else torch.where(y == -100, -100, y_control), train_rows, per_token
        )
        cte, cte_y = _split(
            x, y_control if not per_token else torch.where(y == -100, -100, y_control), test_rows, per_token
        )
        control_acc = fit_eval(ctr, ctr_y, cte, cte_y)[3]
    majority = float(yte.eq(torch.bincount(ytr, minlength=n_classes).argmax()).double().mean())
    return ProbeResult(
        hook=name,
        accuracy=acc,
        train_accuracy=train_acc,
        control_accuracy=control_acc,
        selectivity=acc - control_acc,
        majority=majority,
        weight=w,
        bias=bias,
        mean=mean,
        std=std,
        n_train=len(ytr),
        n_test=len(yte),
        n_classes=n_classes,
    )
