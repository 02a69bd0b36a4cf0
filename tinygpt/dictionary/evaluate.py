"""Evaluation of dictionaries: one function, one table.

    ev = evaluate_dictionary(model, sae)        # held-out tail of the built-in corpus
    print(ev)                                   # markdown table, one row per dictionary
    ev.figure()

Per dictionary, over the evaluation tokens (SAELens' definitions):

| column | definition |
|---|---|
| `explained_variance` | `1 - sum ||y - recon||^2 / sum ||y - mean(y)||^2` (y: the site's activations, raw units) |
| `mse` | mean over tokens of `||y - recon||^2` |
| `l0` | mean number of active latents per token |
| `dead_fraction` | latents that never fire on the evaluation tokens |
| `dense_fraction` | latents active on more than `dense_threshold` of the tokens |
| `ce_clean`, `ce_spliced`, `ce_zero` | next-token cross-entropy: clean; spliced in (no error term); site zeroed |
| `loss_recovered` | `(ce_zero - ce_spliced) / (ce_zero - ce_clean)` |
| `kl_spliced`, `kl_zero` | mean per-token `KL(clean || spliced)`, `KL(clean || zero-ablated)` |

A transcoder's site is its `out_hook` (its recon predicts that hook; zero-ablating it removes the MLP output).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from tinygpt.checkpoint import as_model
from tinygpt.dictionary.activations import corpus_tokens, spaced_windows
from tinygpt.dictionary.errors import DictionaryError
from tinygpt.dictionary.files import check_model
from tinygpt.dictionary.modules import SparseDictionary
from tinygpt.dictionary.splice import _as_list, splice
from tinygpt.inputs import eval_mode, model_device, progress_enabled

COLUMNS = (
    "explained_variance",
    "mse",
    "l0",
    "dead_fraction",
    "dense_fraction",
    "ce_clean",
    "ce_spliced",
    "ce_zero",
    "loss_recovered",
    "kl_spliced",
    "kl_zero",
)


def dictionary_name(sae: SparseDictionary) -> str:
    c = sae.cfg
    k = f" k={c.k}" if c.k is not None else ""
    site = f"{c.hook} -> {c.out_hook}" if c.transcoder else c.hook
    return f"{c.arch} {c.d_sae}{k} @ {site}"


@dataclass
class DictionaryEval:
    """The evaluation table: `rows[i]` holds dictionary i's metrics (`COLUMNS`, plus `name`, `arch`, `hook`,
    `out_hook`, `d_sae`, `k`); `densities[i]` is each latent's firing frequency [d_sae]."""

    rows: list[dict[str, Any]]
    densities: list[Tensor] = field(repr=False)
    tokens: int = 0

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]

    def __len__(self) -> int:
        return len(self.rows)

    def table(self) -> str:
        """A markdown table, one row per dictionary."""
        cols = ["name", *COLUMNS]
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in self.rows:
            cells = [r["name"]] + [f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in COLUMNS]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def summary(self, i: int = 0) -> str:
        """One line: explained variance, L0, dead fraction and loss recovered of dictionary i."""
        r = self.rows[i]
        return (
            f"explained variance {r['explained_variance']:.3f} | L0 {r['l0']:.1f} | dead "
            f"{100 * r['dead_fraction']:.1f}% | loss recovered {r['loss_recovered']:.3f}"
        )

    def __str__(self) -> str:
        return f"{self.table()}\n({self.tokens:,} tokens)"

    def _repr_markdown_(self) -> str:
        return str(self)

    def figure(self):
        """Plotly: explained variance and loss recovered per dictionary, and the latent density histograms."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        fig = make_subplots(rows=1, cols=2, subplot_titles=("fidelity", "latent density (log10)"))
        names = [r["name"] for r in self.rows]
        for key in ("explained_variance", "loss_recovered"):
            fig.add_trace(go.Bar(x=names, y=[r[key] for r in self.rows], name=key), row=1, col=1)
        for name, d in zip(names, self.densities):
            vals = torch.log10(d[d > 0].double()).tolist()
            fig.add_trace(go.Histogram(x=vals, name=name, opacity=0.6, nbinsx=50), row=1, col=2)
        fig.update_layout(barmode="group", height=380, title=f"dictionary evaluation ({self.tokens:,} tokens)")
        return fig


def _ce(logits: Tensor, toks: Tensor) -> Tensor:
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), toks[:, 1:].reshape(-1), reduction="sum"
    )


def _kl(clean_lp: Tensor, logits: Tensor) -> Tensor:
    lp = logits.float().log_softmax(-1)
    return (clean_lp.exp() * (clean_lp - lp)).sum(-1).sum()


@torch.no_grad()
def evaluate_windows(
    model,
    saes: Sequence[SparseDictionary],
    windows: Tensor,
    *,
    batch: int = 8,
    dense_threshold: float = 0.1,
    progress: bool = False,
) -> DictionaryEval:
    """Evaluate dictionaries on token windows [n, pos] (the engine of `evaluate_dictionary`)."""
    from tqdm.auto import tqdm

    device = model_device(model)
    hooks = sorted({h for s in saes for h in (s.hook, s.site)})
    acc = [dict(sse=0.0, l0=0.0, ce_s=0.0, ce_z=0.0, kl_s=0.0, kl_z=0.0) for _ in saes]
    y_sum = [torch.zeros(s.d_out, dtype=torch.float64, device=device) for s in saes]
    y_sq = [torch.zeros((), dtype=torch.float64, device=device) for _ in saes]
    fired = [torch.zeros(s.d_sae, dtype=torch.float64, device=device) for s in saes]
    ce_c, n_tok, n_pred = 0.0, 0, 0
    flags = [s.training for s in saes]
    for s in saes:
        s.eval()
    bar = tqdm(total=windows.shape[0], desc="evaluating dictionaries", unit="seq", disable=not progress)
    try:
        with eval_mode(model):
            for i in range(0, windows.shape[0], batch):
                toks = windows[i : i + batch].to(device)
                store: dict[str, Tensor] = {}

                def save(t: Tensor, hook, store: dict[str, Tensor] = store) -> None:
                    store[hook.name] = t.detach()

                logits = model.run_with_hooks(toks, fwd_hooks=[(h, save) for h in hooks])
                clean_lp = logits.float().log_softmax(-1)
                ce_c += float(_ce(logits, toks))
                n_tok += toks.numel()
                n_pred += toks.shape[0] * (toks.shape[1] - 1)
                for j, s in enumerate(saes):
                    x = store[s.hook]
                    y = s._flat(store[s.site], s.d_out, "target").reshape(-1, s.d_out).double()
                    xs = s._flat(x, s.d_in, "input").reshape(-1, s.d_in)
                    a = s.encode(xs)
                    recon = s.decode(a, xs).double()
                    acc[j]["sse"] += float((recon - y).pow(2).sum())
                    y_sum[j] += y.sum(0)
                    y_sq[j] += y.pow(2).sum()
                    active = a > 0
                    acc[j]["l0"] += float(active.sum())
                    fired[j] += active.sum(0)
                    with splice(model, s, check=False):
                        spliced = model(toks)
                    zero = model.run_with_hooks(toks, fwd_hooks=[(s.site, lambda t, hook: torch.zeros_like(t))])
                    acc[j]["ce_s"] += float(_ce(spliced, toks))
                    acc[j]["ce_z"] += float(_ce(zero, toks))
                    acc[j]["kl_s"] += float(_kl(clean_lp, spliced))
                    acc[j]["kl_z"] += float(_kl(clean_lp, zero))
                bar.update(toks.shape[0])
    finally:
        bar.close()
        for s, f in zip(saes, flags):
            s.train(f)
    rows, dens = [], []
    ce_clean = ce_c / n_pred
    for j, s in enumerate(saes):
        a = acc[j]
        total_var = float(y_sq[j] - y_sum[j].pow(2).sum() / n_tok)
        density = (fired[j] / n_tok).float().cpu()
        ce_s, ce_z = a["ce_s"] / n_pred, a["ce_z"] / n_pred
        denom = ce_z - ce_clean
        rows.append(
            {
                "name": dictionary_name(s),
                "arch": s.cfg.arch,
                "hook": s.hook,
                "out_hook": s.out_hook,
                "d_sae": s.d_sae,
                "k": s.cfg.k,
                "explained_variance": 1.0 - a["sse"] / total_var if total_var > 0 else math.nan,
                "mse": a["sse"] / n_tok,
                "l0": a["l0"] / n_tok,
                "dead_fraction": float((density == 0).float().mean()),
                "dense_fraction": float((density > dense_threshold).float().mean()),
                "ce_clean": ce_clean,
                "ce_spliced": ce_s,
                "ce_zero": ce_z,
                "loss_recovered": (ce_z - ce_s) / denom if denom != 0 else math.nan,
                "kl_spliced": a["kl_s"] / n_tok,
                "kl_zero": a["kl_z"] / n_tok,
            }
        )
        dens.append(density)
    return DictionaryEval(rows=rows, densities=dens, tokens=n_tok)


def evaluate_dictionary(
    model,
    saes: SparseDictionary | Sequence[SparseDictionary],
    corpus: Any = None,
    *,
    tokens: int = 65_536,
    context: int | None = None,
    val_split: float = 0.05,
    batch: int = 8,
    dense_threshold: float = 0.1,
    check: bool = True,
    cache_dir: Any = None,
    progress: bool | None = None,
) -> DictionaryEval:
    """Evaluate one or several dictionaries on a model and a corpus: the table of the module docstring.

    Args:
        model: the base model (or a `.tinygpt` path).
        saes: a dictionary or a list (SAEs and transcoders mixed).
        corpus: a corpus spec (default: built-in Shakespeare) or token ids.
        tokens: about how many tokens to evaluate on (evenly spaced windows).
        context: window length (default: the model's `n_ctx`).
        val_split: evaluate on the last `val_split` of the corpus (the part `train_sae` holds out); 0: all of it.
        batch: windows per forward.
        dense_threshold: firing frequency above which a latent counts as dense.
        check: refuse dictionaries pinned to another model.
        progress: a progress bar (None: the package default).
    """
    model = as_model(model)
    items = _as_list(saes)
    if not items:
        raise DictionaryError("give at least one dictionary to evaluate")
    for s in items:
        check_model(s, model, check=check)
    show = progress_enabled(progress)
    arr = corpus_tokens(model, corpus, cache_dir=cache_dir, progress=show)
    ctx = context or model.cfg.n_ctx
    if not 0.0 <= val_split < 1.0:
        raise DictionaryError(f"val_split must be in [0, 1), got {val_split}")
    start = len(arr) - int(len(arr) * val_split) if val_split > 0 else 0
    if len(arr) - start < ctx:
        raise DictionaryError(
            f"the evaluation part of the corpus has {len(arr) - start} tokens, fewer than a window of {ctx}"
        )
    windows = spaced_windows(arr, ctx, start, len(arr), math.ceil(tokens / ctx))
    return evaluate_windows(model, items, windows, batch=batch, dense_threshold=dense_threshold, progress=show)


__all__ = ["COLUMNS", "DictionaryEval", "dictionary_name", "evaluate_dictionary", "evaluate_windows"]
