"""`train_sae`: train sparse dictionaries (SAEs, transcoders) on a model's activations, several at once.

    res = train_sae(model, hook="blocks.2.hook_resid_post", arch="topk", k=32, expansion=8, tokens=2_000_000,
                    out="tiny-l2.sae")
    res.dictionary, res.history, res.evals, res.figure()
    res = train_sae(model, hook=["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"], expansion=[4, 8])
    res = train_sae(model, hook="blocks.2.hook_resid_post", transcoder=True)   # ln2.hook_normalized -> hook_mlp_out
    train_sae(model, resume=True, out="tiny-l2.sae")                           # continue exactly where it stopped

`hook`, `arch`, `expansion` / `d_sae` and `k` accept lists: one dictionary per combination, all fed from the
same activations (one model forward per chunk of windows, stopped after the deepest hook they need). The
activations stream from the corpus (`tinygpt.dictionary.activations.ActivationStream`): the first
`1 - val_split` of the tokens train, the tail evaluates. Each step's loss and schedule are described in
`tinygpt.dictionary.trainer`. With `out`, the `.sae` file(s) hold the weights and the whole training state
(Adam state, dead-latent counters, the stream position, the history), so `resume=True` reproduces the
uninterrupted run bit for bit (same machine); Ctrl-C (or a callback raising KeyboardInterrupt) saves and stops.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinygpt.checkpoint import as_model
from tinygpt.dictionary.activations import ActivationStream, TokenWindows, corpus_tokens, spaced_windows
from tinygpt.dictionary.errors import DictionaryError
from tinygpt.dictionary.evaluate import DictionaryEval, evaluate_windows
from tinygpt.dictionary.files import model_pin, save_sae
from tinygpt.dictionary.modules import SparseDictionary, make_dictionary
from tinygpt.dictionary.settings import (
    DEFAULT_TOKENS,
    SETTINGS,
    check_outputs,
    check_settings,
    configs,
    corpus_from_record,
    corpus_record,
    out_paths,
    resume_state,
)
from tinygpt.dictionary.trainer import Schedule, Trainer, steps_of
from tinygpt.inputs import model_device, progress_enabled


@dataclass
class SAETrainResult:
    """What `train_sae` returns.

    Attributes:
        dictionaries: the trained dictionaries (eval mode), in the order of the combinations.
        histories: per dictionary, one metrics dict per step (`step`, `tokens`, `lr`, `loss`, `mse`,
            `explained_variance`, `l0`, `dead_fraction`, and `aux` / `l1` / `l0_penalty`).
        evals: the held-out `DictionaryEval` (None with `evaluate=False` or when interrupted).
        paths: the files written (empty without `out`).
        step, tokens: steps done and training tokens seen; seconds: wall time of this call.
        timing: seconds in the model's forwards (`forward_s`) and in the dictionaries' steps (`dictionary_s`).
        interrupted: stopped early by Ctrl-C or a callback's KeyboardInterrupt.
    """

    dictionaries: list[SparseDictionary]
    histories: list[list[dict[str, float]]]
    evals: DictionaryEval | None
    paths: list[Path]
    step: int
    tokens: int
    seconds: float
    timing: dict[str, float] = field(default_factory=dict)
    interrupted: bool = False

    @property
    def dictionary(self) -> SparseDictionary:
        return self.dictionaries[0]

    @property
    def history(self) -> list[dict[str, float]]:
        return self.histories[0]

    @property
    def path(self) -> Path | None:
        return self.paths[0] if self.paths else None

    def summary(self) -> str:
        """One line per dictionary: explained variance, L0, dead fraction, loss recovered (held out)."""
        if self.evals is None:
            return "\n".join(
                f"{h[-1]['explained_variance']:.3f} EV (last batch), L0 {h[-1]['l0']:.1f}" for h in self.histories if h
            )
        return "\n".join(self.evals.summary(i) for i in range(len(self.evals)))

    def __repr__(self) -> str:
        head = f"SAETrainResult({len(self.dictionaries)} dictionaries, {self.step} steps, {self.tokens:,} tokens)"
        return f"{head}\n{self.summary()}"

    def figure(self):
        """Plotly: MSE, explained variance, L0 and dead fraction against training tokens, per dictionary."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        from tinygpt.dictionary.evaluate import dictionary_name

        keys = ("mse", "explained_variance", "l0", "dead_fraction")
        fig = make_subplots(rows=2, cols=2, subplot_titles=keys)
        for d, hist in zip(self.dictionaries, self.histories):
            x = [h["tokens"] for h in hist]
            for j, key in enumerate(keys):
                fig.add_trace(
                    go.Scatter(
                        x=x,
                        y=[h[key] for h in hist],
                        name=dictionary_name(d),
                        legendgroup=str(id(d)),
                        showlegend=j == 0,
                        mode="lines",
                    ),
                    row=j // 2 + 1,
                    col=j % 2 + 1,
                )
        fig.update_xaxes(title_text="training tokens")
        fig.update_layout(height=560, title="dictionary training")
        return fig


# ------------------------------------------------------------------------------------------ train_sae
def train_sae(
    model,
    corpus: Any = None,
    *,
    hook: str | Sequence[str] = "blocks.2.hook_resid_post",
    out_hook: str | Sequence[str] | None = None,
    transcoder: bool = False,
    skip: bool = False,
    arch: str | Sequence[str] = "topk",
    k: int | Sequence[int] = 32,
    expansion: float | Sequence[float] = 8,
    d_sae: int | Sequence[int] | None = None,
    tokens: int | None = None,
    batch_size: int = 1024,
    context: int | None = None,
    lr: float | None = None,
    warmup: float = 0.01,
    decay: float = 0.2,
    l1_coef: float = 5.0,
    l0_coef: float = 0.1,
    jumprelu_threshold: float | None = None,
    bandwidth: float = 0.05,
    sparsity_warmup: float = 0.05,
    aux_coef: float = 1.0,
    aux_k: int | None = None,
    dead_after: int = 100_000,
    threshold_lr: float = 0.01,
    b_dec_init: str = "geometric_median",
    normalize: bool = True,
    buffer_tokens: int = 65_536,
    model_batch: int = 16,
    val_split: float = 0.05,
    evaluate: bool = True,
    eval_tokens: int = 32_768,
    seed: int = 0,
    out: Any = None,
    resume: bool = False,
    overwrite: bool = False,
    save_every: int | None = None,
    callbacks: Sequence[Callable[[dict[str, Any]], Any]] = (),
    progress: bool | None = None,
    cache_dir: Any = None,
) -> SAETrainResult:
    """Train sparse dictionaries on `model`'s activations at `hook` (see the module docstring).

    Args:
        model: the base model (a `GPT` or a `.tinygpt` path); it is only run, never changed.
        corpus: a corpus spec (default: built-in Shakespeare), a `Corpus`, or 1-D token ids.
        hook: the hook(s) read. out_hook: the hook(s) written, for transcoders (one per hook).
        transcoder: read `blocks.L.ln2.hook_normalized` and write `blocks.L.hook_mlp_out`, L from `hook`.
        skip: transcoders with a linear skip connection.
        arch: "topk", "batchtopk", "jumprelu", "relu" (or a list).
        k: active latents per token (topk; the batch average for batchtopk).
        expansion: d_sae = expansion * d_in; d_sae: the number of latents (overrides expansion).
        tokens: training tokens (default 2,000,000; on resume: the saved total, or more to extend the run).
        batch_size: activations per step. context: tokens per window (default the model's n_ctx).
        lr: peak Adam learning rate (default 2e-4 * sqrt(16384 / d_sae), at most 1e-3).
        warmup, decay: linear warm-up from 0 / decay to 0 at the end, as fractions of the run (< 1) or steps.
        l1_coef: ReLU's L1 coefficient. l0_coef: JumpReLU's L0 coefficient. jumprelu_threshold: its initial
            threshold (None: each latent's quantile of the first buffer that makes L0 start at `k`);
            bandwidth: its estimator's kernel width. sparsity_warmup: the coefficients' linear ramp.
        aux_coef, aux_k: AuxK weight and number of dead latents used (default d_in // 2); TopK / BatchTopK.
        dead_after: training tokens without firing after which a latent counts as dead.
        threshold_lr: BatchTopK's threshold moving-average rate.
        b_dec_init: "geometric_median", "mean" or "zeros" (of the first buffer, normalised).
        normalize: scale inputs (and targets) to mean norm sqrt(d); the constants are saved and folded on export.
        buffer_tokens: activations per shuffled fill. model_batch: windows per model forward.
        val_split: the tail of the corpus held out for evaluation.
        evaluate, eval_tokens: evaluate on held-out tokens at the end (`res.evals`).
        seed: initialisation, window order and shuffles.
        out: the `.sae` file (one dictionary) or a directory (several); None: nothing is written.
        resume: continue the run saved in `out` with its own settings (only `tokens` may change).
        overwrite: replace existing `.sae` files at `out` with a new run (default: refuse, `OutputError`, before
            anything runs).
        save_every: also write the state every this many steps.
        callbacks: called with each dictionary's metrics dict every step (plus `dictionary`: its index).
        progress: a progress bar (None: the package default). cache_dir: the token cache.
    """
    params = dict(locals())
    t_start = time.perf_counter()
    model_arg, model = model, as_model(model)
    files: list[tuple[dict, dict]] = []
    if resume:
        paths, files = resume_state(out)
        tr = files[0][0]["training"]
        s = dict(tr["settings"])
        if tokens is not None:
            s["tokens"] = tokens
        corpus = corpus if corpus is not None else corpus_from_record(tr.get("corpus"))
    else:
        s = {k_: params[k_] for k_ in SETTINGS}
        s["tokens"] = DEFAULT_TOKENS if tokens is None else tokens
    check_settings(s)
    cfgs = configs(model, s)
    if not resume:
        paths = out_paths(out, cfgs)
    elif len(paths) != len(cfgs):
        raise DictionaryError(f"{out}: {len(paths)} files but the settings make {len(cfgs)} dictionaries")
    check_outputs(paths, [model_arg, corpus], overwrite=overwrite, resume=resume)
    show = progress_enabled(progress)
    arr = corpus_tokens(model, corpus, cache_dir=cache_dir, progress=show)
    ctx = s["context"] or model.cfg.n_ctx
    n_train = len(arr) - int(len(arr) * s["val_split"])
    if n_train < max(s["batch_size"], ctx):
        raise DictionaryError(
            f"the corpus is shorter than one batch: {n_train} training tokens for batch_size={s['batch_size']} "
            f"(windows of {ctx}); use a longer corpus or a smaller batch_size"
        )
    device = model_device(model)
    hooks = list(dict.fromkeys(h for c in cfgs for h in (c.hook, c.out_hook) if h is not None))
    stream = ActivationStream(
        model,
        TokenWindows(arr, ctx, 0, n_train, s["seed"]),
        hooks,
        batch_size=s["batch_size"],
        buffer_tokens=s["buffer_tokens"],
        model_batch=s["model_batch"],
        seed=s["seed"],
    )
    total = s["tokens"] // s["batch_size"]
    pin = model_pin(model)
    trainers = []
    for i, c in enumerate(cfgs):
        sae = make_dictionary(c, seed=s["seed"] + i).to(device)
        if c.arch == "jumprelu" and s["jumprelu_threshold"] is not None:
            sae.threshold.data.fill_(s["jumprelu_threshold"])
        sae.base = pin
        lr = s["lr"] or min(1e-3, 2e-4 * math.sqrt(16384 / c.d_sae))
        sched = Schedule(
            lr,
            total,
            steps_of(s["warmup"], total, "warmup"),
            steps_of(s["decay"], total, "decay"),
            steps_of(s["sparsity_warmup"], total, "sparsity_warmup"),
        )
        coef = s["l1_coef"] if c.arch == "relu" else s["l0_coef"]
        trainers.append(
            Trainer(
                sae,
                sched,
                coef=coef,
                aux_coef=s["aux_coef"],
                aux_k=s["aux_k"] or max(1, c.d_in // 2),
                dead_after=s["dead_after"],
                threshold_lr=s["threshold_lr"],
            )
        )
    step = 0
    if resume:
        tr = files[0][0]["training"]
        step = int(tr["step"])
        stream.load_state_dict(tr["stream"])
        for t, (m, tensors) in zip(trainers, files):
            t.sae.load_state_dict({k_: v for k_, v in tensors.items() if k_ in t.sae.state_dict()})
            t.load_state(tensors, m["training"]["optimizer"], m["training"].get("history") or [])
    else:
        first = stream.peek()
        for t in trainers:
            c = t.sae.cfg
            t.init_from(
                first[c.hook],
                first[c.out_hook] if c.transcoder else None,
                normalize=s["normalize"],
                b_dec_init=s["b_dec_init"],
                target_l0=c.k if c.arch == "jumprelu" and s["jumprelu_threshold"] is None else None,
            )
    record = corpus_record(corpus)

    def save(done: bool, evals: DictionaryEval | None = None) -> None:
        for i, (t, p) in enumerate(zip(trainers, paths)):
            training = {
                "settings": s,
                "step": step,
                "total_steps": total,
                "tokens_seen": step * s["batch_size"],
                "stream": stream.state_dict(),
                "optimizer": t.state_record(),
                "history": t.history,
                "corpus": record,
                "group": [q.name for q in paths],
                "index": i,
                "complete": done,
                "eval": evals.rows[i] if evals is not None else None,
            }
            t.sae.training_state = training
            save_sae(t.sae, p, training=training, state=t.state_tensors())

    from tqdm.auto import tqdm

    bar = tqdm(
        total=total,
        initial=step,
        desc=f"training {len(cfgs)} dictionar{'y' if len(cfgs) == 1 else 'ies'}",
        unit="step",
        disable=not show,
    )
    interrupted, in_update, dict_s = False, False, 0.0
    try:
        while step < total:
            batch = stream.next()
            t0 = time.perf_counter()
            in_update = True
            recs = []
            for t in trainers:
                c = t.sae.cfg
                recs.append(t.step(step + 1, batch[c.hook], batch[c.out_hook] if c.transcoder else None))
            step += 1
            in_update = False
            dict_s += time.perf_counter() - t0
            for i, r in enumerate(recs):
                r["tokens"] = step * s["batch_size"]
                for cb in callbacks:
                    cb({**r, "dictionary": i})
            r = recs[0]
            bar.set_postfix_str(
                f"mse {r['mse']:.3g} | EV {r['explained_variance']:.3f} | L0 {r['l0']:.1f} | dead "
                f"{100 * r['dead_fraction']:.1f}%",
                refresh=False,
            )
            bar.update(1)
            if paths and save_every and step % save_every == 0 and step < total:
                save(False)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
    evals = None
    if not interrupted and evaluate and len(arr) - n_train >= ctx:
        windows = spaced_windows(arr, ctx, n_train, len(arr), math.ceil(eval_tokens / ctx))
        evals = evaluate_windows(model, [t.sae for t in trainers], windows, progress=show)
    if paths and not (interrupted and in_update):  # a half-done step keeps the previous checkpoint
        save(not interrupted and step >= total, evals)
    for t in trainers:
        t.sae.eval()
        if evals is not None:
            t.sae.training_state["eval"] = evals.rows[trainers.index(t)]
    return SAETrainResult(
        dictionaries=[t.sae for t in trainers],
        histories=[t.history for t in trainers],
        evals=evals,
        paths=paths if paths and all(p.exists() for p in paths) else [],
        step=step,
        tokens=step * s["batch_size"],
        seconds=time.perf_counter() - t_start,
        timing={"forward_s": stream.forward_seconds, "dictionary_s": dict_s},
        interrupted=interrupted,
    )


__all__ = ["SAETrainResult", "train_sae"]
