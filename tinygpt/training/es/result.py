"""ES settings (`ESConfig`, saved in the checkpoint) and what `es` returns (`ESResult`, a `TrainResult`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from tinygpt.training.loop import TrainResult
from tinygpt.training.settings import SettingError, field_names


@dataclass
class ESConfig:
    """Settings of an ES run (stored in the checkpoint it writes).

    Attributes:
        steps, population, sigma, lr: ES steps, members per step (even: antithetic pairs), noise scale, step size.
        weight_decay: decay of matrices, `θ ← θ − lr · weight_decay · θ` each step.
        params: parameter name patterns (None: all trainable).
        batch_size, ctx: the windows every member is scored on (loss reward); ctx defaults to the model's n_ctx.
        val_split, val_every, val_batches: held-out loss of the centre every `val_every` steps (loss reward).
        prompts, samples, max_new_tokens, temperature, top_k: generation for a text reward.
        batched: vmap members together (None: on CUDA only); member_batch: members per vmapped forward.
        save_every: write the checkpoint every N steps (and at the end) when `out` is set (0: at the end only).
        seed: noise, batches and sampling.
        log_every: a plain progress line every N steps (None: automatic without a terminal; 0: never; see
            `tinygpt.training.logline`).
    """

    steps: int = 50
    population: int = 40
    sigma: float = 0.02
    lr: float = 0.01
    weight_decay: float = 0.0
    params: str | list[str] | None = None
    batch_size: int = 8
    ctx: int | None = None
    val_split: float = 0.01
    val_every: int = 10
    val_batches: int = 4
    prompts: list[str] = field(default_factory=lambda: ["\n"])
    samples: int = 4
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int | None = None
    batched: bool | None = None
    member_batch: int = 8
    save_every: int = 0
    seed: int = 0
    log_every: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.prompts, str):
            self.prompts = [self.prompts]
        self.prompts = list(self.prompts)
        checks = {
            "steps": (self.steps >= 0, "an integer >= 0"),
            "population": (
                self.population >= 2 and self.population % 2 == 0,
                "an even number >= 2: members come in antithetic pairs",
            ),
            "sigma": (self.sigma > 0, "the noise scale, > 0 (e.g. 0.001)"),
            "lr": (self.lr >= 0, ">= 0"),
            "weight_decay": (self.weight_decay >= 0, ">= 0"),
            "batch_size": (self.batch_size >= 1, "an integer >= 1"),
            "ctx": (self.ctx is None or self.ctx >= 1, "an integer >= 1, or None for the model's n_ctx"),
            "val_split": (0 <= self.val_split < 1, "in [0, 1)"),
            "val_every": (self.val_every >= 0, "an integer >= 0 (0 = never)"),
            "val_batches": (self.val_batches >= 1, "an integer >= 1"),
            "prompts": (
                bool(self.prompts) and all(isinstance(p, str) and p for p in self.prompts),
                "a non-empty list of non-empty strings",
            ),
            "samples": (self.samples >= 1, "an integer >= 1"),
            "max_new_tokens": (self.max_new_tokens >= 1, "an integer >= 1"),
            "temperature": (self.temperature >= 0, ">= 0 (0 = greedy)"),
            "member_batch": (self.member_batch >= 1, "an integer >= 1"),
            "save_every": (self.save_every >= 0, "an integer >= 0 (0 = only at the end)"),
            "seed": (self.seed >= 0, "an integer >= 0"),
        }
        for name, (ok, requirement) in checks.items():
            if not ok:
                raise SettingError(f"invalid ES setting {name}={getattr(self, name)!r}: must be {requirement}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> ESConfig:
        """The settings of a checkpoint's `es` record (which also holds the objective and the parameter names)."""
        return cls(**{k: v for k, v in rec.items() if k in field_names(cls)})


@dataclass(repr=False)
class ESResult(TrainResult):
    """What `es` returns: a `TrainResult` (model, config, history, path, elapsed, interrupted, `.figure()`) plus
    the ES story.

    Attributes:
        model: the evolved model (in eval mode; the same object that was passed in, updated in place).
        config: the `ESConfig`.
        objective: "loss" (reward = −loss on a batch) or "reward" (a callable on generated text).
        history: one dict per step: `step`, `reward` (the centre's, before the update, on that step's batch or
            sampling seed), `loss` (loss objective), `pop_mean`, `pop_std`, `pop_max`, `pop_min` (the members'
            rewards), `update_norm` and `update_rms` (‖Δθ‖ and its root mean square per weight),
            `evals_per_sec`, `elapsed`, and `val_loss` when validated.
        final_reward: the centre's reward after the last update (a fresh batch / sampling seed).
        final_val_loss: held-out loss after the last update (the last record's `val_loss`).
        n_params: parameters evolved; path: checkpoint written (or None); elapsed; interrupted (Ctrl-C or a
            callback raising KeyboardInterrupt stops cleanly after restoring the centre).
        samples: the centre's completions at the end (text reward).
    """

    objective: str = "loss"
    final_reward: float | None = None
    n_params: int = 0
    samples: list[str] = field(default_factory=list, repr=False)

    @property
    def rewards(self) -> list[float]:
        return [h["reward"] for h in self.history]

    def figure(self):
        """Plotly figure: the centre's loss (or reward) per step, the population's range, validation loss."""
        import plotly.graph_objects as go

        steps = [h["step"] for h in self.history]
        loss = self.objective == "loss"
        sgn = -1.0 if loss else 1.0  # plot loss for the loss objective
        lo = [sgn * h["pop_max" if loss else "pop_min"] for h in self.history]
        hi = [sgn * h["pop_min" if loss else "pop_max"] for h in self.history]
        name = "loss" if loss else "reward"
        fig = go.Figure()
        fig.add_trace(go.Scatter(x=steps, y=hi, mode="lines", line={"width": 0}, showlegend=False, hoverinfo="skip"))
        fig.add_trace(
            go.Scatter(
                x=steps,
                y=lo,
                mode="lines",
                line={"width": 0},
                fill="tonexty",
                fillcolor="rgba(99,110,250,0.2)",
                name=f"population {name} (min-max)",
            )
        )
        fig.add_trace(go.Scatter(x=steps, y=[sgn * h["reward"] for h in self.history], name=f"centre {name}"))
        if self.val_losses:
            vs, vl = zip(*self.val_losses)
            fig.add_trace(go.Scatter(x=vs, y=vl, name="val loss", mode="lines+markers"))
        c = self.config
        fig.update_layout(
            title=f"evolution strategies: N={c.population}, σ={c.sigma:g}, lr={c.lr:g}",
            xaxis_title="step",
            yaxis_title=name,
            template="plotly_white",
        )
        return fig

    def __repr__(self) -> str:
        first = self.history[0]["reward"] if self.history else float("nan")
        if self.objective == "loss":
            what = f"loss {-first:.4f} -> {self.history[-1]['loss']:.4f}" if self.history else "no steps"
            if self.final_val_loss is not None:
                what += f", val loss {self.final_val_loss:.4f}"
        else:
            end = self.final_reward if self.final_reward is not None else float("nan")
            what = f"reward {first:.4f} -> {end:.4f}" if self.history else "no steps"
        flag = ", interrupted" if self.interrupted else ""
        return f"ESResult(step {self.step}, {what}, {self.n_params:,} params evolved, {self.elapsed:.1f}s{flag})"


__all__ = ["ESConfig", "ESResult"]
