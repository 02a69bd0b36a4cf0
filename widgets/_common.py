"""Small helpers shared by the interpretability dashboards (not public API)."""

from __future__ import annotations

import contextlib
import html
import re
from collections.abc import Iterator
from typing import Any

import ipywidgets as W
import plotly.graph_objects as go
import torch
from torch import Tensor


def show_figure(target: go.FigureWidget, fig: go.Figure) -> None:
    """Make the FigureWidget `target` show `fig`: its traces and layout replace the current ones.

    Replacing (rather than updating traces in place) never leaves a stale property behind, e.g. a `zmax`
    that one metric sets and the next does not.
    """
    with target.batch_update():
        target.data = ()
        target.add_traces(fig.data)
        target.layout = fig.layout


def error_html(message: str) -> str:
    """A red message for a dashboard's status line."""
    return f"<span style='color:#b00020'>⚠ {html.escape(str(message))}</span>"


def status_html(message: str) -> str:
    """A grey message for a dashboard's status line (`message` is HTML)."""
    return f"<span style='color:#555'>{message}</span>"


@contextlib.contextmanager
def user_errors(status: W.HTML, *kinds: type[BaseException]) -> Iterator[None]:
    """Show errors of the given kinds (bad input typed into a control) in `status` instead of raising.

    Anything else propagates: outside a kernel (tests) it fails the caller; in a kernel the dashboard's
    `Output` area (see `captured`) shows the traceback.
    """
    try:
        yield
    except kinds as e:
        status.value = error_html(e)


@contextlib.contextmanager
def captured(out: W.Output, *, clear: bool = True) -> Iterator[None]:
    """Run a callback inside the dashboard's `Output` area: progress bars (tqdm) and tracebacks appear there,
    under the controls, instead of in JupyterLab's log console. Outside a kernel `Output` captures nothing
    and exceptions propagate unchanged."""
    if clear and _in_kernel():
        out.clear_output()
    with out:
        yield


def _in_kernel() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython comes with ipywidgets
        return False
    ip = get_ipython()
    return ip is not None and getattr(ip, "kernel", None) is not None


def dropdown_value(widget: W.Dropdown, value: Any) -> None:
    """Set a Dropdown to `value` if it is one of its options' values (otherwise leave it)."""
    values = [o[1] if isinstance(o, tuple) else o for o in widget.options]
    if value in values:
        widget.value = value


# ------------------------------------------------------------------------------------------ prompts
def has_tokenizer(model) -> bool:
    return getattr(model, "tokenizer", None) is not None


def parse_tokens(model, prompt: Any) -> Tensor:
    """A prompt typed in a dashboard (or given as ids) -> tokens [1, pos] on the model's device.

    Text goes through the model's tokenizer. A model without one (a toy model over token ids) takes token ids
    separated by spaces or commas, e.g. "5 17 3 5".
    """
    if isinstance(prompt, str):
        if has_tokenizer(model):
            ids = model.tokenizer.encode(prompt)
        else:
            try:
                ids = [int(p) for p in re.split(r"[\s,]+", prompt.strip()) if p]
            except ValueError:
                raise ValueError(
                    f"this model has no tokenizer: type token ids (0..{model.cfg.d_vocab - 1}) separated by spaces, "
                    "e.g. '5 17 3 5'"
                ) from None
    else:
        ids = torch.as_tensor(prompt).reshape(-1).tolist()
    if not ids:
        raise ValueError("type a prompt (at least one token)")
    bad = [i for i in ids if not 0 <= i < model.cfg.d_vocab]
    if bad:
        raise ValueError(f"token ids must be in [0, {model.cfg.d_vocab}), got {bad[:5]}")
    if len(ids) > model.cfg.n_ctx:
        raise ValueError(f"the prompt has {len(ids)} tokens but the model's context is n_ctx={model.cfg.n_ctx}")
    return torch.tensor([ids], dtype=torch.long, device=next(model.parameters()).device)


def prompt_text(model, prompt: Any) -> str:
    """What a prompt box shows for `prompt` (text as is; token ids decoded, or listed for a model without a
    tokenizer)."""
    if isinstance(prompt, str):
        return prompt
    return decode(model, torch.as_tensor(prompt).reshape(-1).tolist())


def decode(model, ids: list[int]) -> str:
    """Token ids as text, or as space-separated ids for a model without a tokenizer."""
    if has_tokenizer(model):
        return model.tokenizer.decode(ids)
    return " ".join(str(int(i)) for i in ids)


def token_strs(model, ids: list[int]) -> list[str]:
    """One readable string per token (its id for a model without a tokenizer)."""
    if has_tokenizer(model):
        return [model.tokenizer.token_str(int(i)) for i in ids]
    return [str(int(i)) for i in ids]


def parse_answer(model, text: str) -> int:
    """One answer token: a single-token string, or a token id for a model without a tokenizer."""
    ids = parse_tokens(model, text)[0].tolist()
    if len(ids) != 1:
        raise ValueError(f"the answer {text!r} is {len(ids)} tokens, not one: {ids}")
    return ids[0]
