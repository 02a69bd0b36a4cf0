"""Mixtral and Qwen2-MoE (`MixtralForCausalLM`, `Qwen2MoeForCausalLM`): the Llama decoder with sparse MoE blocks.

Attention, norms and embeddings map as in `tinygpt.interop.hf.llama`; each block's feed-forward is a
`tinygpt.arch.hf_moe.HFMoE` (`moe_style` "mixtral" / "qwen2_moe"):

    tinygpt                            Mixtral (model.layers.i.)        Qwen2-MoE (model.layers.i.)
    blocks.i.moe.router.weight [N, d]  block_sparse_moe.gate.weight     mlp.gate.weight
    blocks.i.moe.experts.j.gate_proj   block_sparse_moe.experts.j.w1    mlp.experts.j.gate_proj
    blocks.i.moe.experts.j.up_proj     block_sparse_moe.experts.j.w3    mlp.experts.j.up_proj
    blocks.i.moe.experts.j.down_proj   block_sparse_moe.experts.j.w2    mlp.experts.j.down_proj
    blocks.i.moe.shared_expert.*_proj  -                                mlp.shared_expert.*_proj
    blocks.i.moe.shared_expert_gate    -                                mlp.shared_expert_gate

That per-expert layout is what checkpoints on disk hold (and what transformers 5 still writes); transformers 5's
in-memory stacked layout (`mlp.experts.gate_up_proj` [N, 2·F, d], gate rows first, and `mlp.experts.down_proj`
[N, d, F]) is read too. Exports write the per-expert layout.

Config: Mixtral `num_local_experts→moe_experts, num_experts_per_tok→moe_topk, intermediate_size→d_mlp,
router_aux_loss_coef→moe_aux_coef`; Qwen2-MoE `num_experts, num_experts_per_tok, moe_intermediate_size→d_mlp,
norm_topk_prob→moe_norm_topk, shared_expert_intermediate_size→moe_shared_d_mlp, qkv_bias`. Refused, naming the
field: Qwen2-MoE dense layers (`decoder_sparse_step` != 1, `mlp_only_layers`), and whatever the Llama decoder
refuses (a binding sliding window, other rope types, ...). `router_jitter_noise` only acts in training (not
carried over); tinygpt's router z-loss is off on import (`moe_z_coef=0`, HF has none).
"""

from __future__ import annotations

from typing import Any

import torch

from tinygpt.interop.hf.common import InteropError, transformers_module
from tinygpt.interop.hf.llama import DECODER_FIELDS, DECODER_RULES, check_decoder, decoder_fields, decoder_hf_kwargs
from tinygpt.interop.hf.spec import Family, Group, refuse

__all__ = ["MOE", "MoEFamily"]

_ARCHS = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}
_FIELDS = DECODER_FIELDS | {
    "moe_experts",
    "moe_topk",
    "moe_style",
    "moe_norm_topk",
    "moe_shared_d_mlp",
    "moe_aux_coef",
    "moe_z_coef",
}
_W = {"gate": "w1", "up": "w3", "down": "w2"}  # Mixtral's expert names
_L = r"blocks\.(\d+)\.moe\."  # a block's MoE module


class MoEFamily(Family):
    """Mixtral / Qwen2-MoE (see the module docstring)."""

    model_types = ("mixtral", "qwen2_moe")
    prefix = "model."
    rules = DECODER_RULES
    moe_rules = {
        "mixtral": (
            (_L + r"router\.weight", r"model.layers.\1.block_sparse_moe.gate.weight"),
            *(
                (_L + rf"experts\.(\d+)\.{p}_proj\.weight", rf"model.layers.\1.block_sparse_moe.experts.\2.{w}.weight")
                for p, w in _W.items()
            ),
        ),
        "qwen2_moe": (
            (_L + r"router\.weight", r"model.layers.\1.mlp.gate.weight"),
            (
                _L + r"(experts\.\d+|shared_expert)\.(gate|up|down)_proj\.weight",
                r"model.layers.\1.mlp.\2.\3_proj.weight",
            ),
            (_L + r"shared_expert_gate\.weight", r"model.layers.\1.mlp.shared_expert_gate.weight"),
        ),
    }

    def rules_for(self, model_type: str) -> tuple:
        return (*self.rules, *self.moe_rules[model_type])

    def groups(self, cfg: Any, model_type: str, available: set[str] | None) -> list[Group]:
        """transformers-5 stacked experts, only when a checkpoint holds them instead of per-expert tensors."""
        if available is None:
            return []
        out = []
        n, f = cfg.moe_experts, cfg.d_mlp
        for i in range(cfg.n_layers):
            base = f"model.layers.{i}.mlp.experts."
            if base + "gate_up_proj" not in available:
                continue
            ours = tuple(
                f"blocks.{i}.moe.experts.{j}.{p}_proj.weight" for j in range(n) for p in ("gate", "up", "down")
            )

            def split(ts, n=n, f=f):
                gate_up, down = ts
                return [t for j in range(n) for t in (gate_up[j, :f], gate_up[j, f:], down[j])]

            def merge(ts, n=n):
                return [
                    torch.stack([torch.cat((ts[3 * j], ts[3 * j + 1])) for j in range(n)]),
                    torch.stack([ts[3 * j + 2] for j in range(n)]),
                ]

            out.append(Group(ours, (base + "gate_up_proj", base + "down_proj"), split, merge))
            if model_type == "mixtral":  # the router moved from block_sparse_moe to mlp as well
                out.append(
                    Group(
                        (f"blocks.{i}.moe.router.weight",),
                        (f"model.layers.{i}.mlp.gate.weight",),
                        lambda ts: list(ts),
                        lambda ts: list(ts),
                    )
                )
        return out

    def config_fields(self, c: Any, *, n_ctx: int | None = None, dropout: float | None = None) -> dict[str, Any]:
        mt = c.model_type
        problems: list[str] = []
        if mt == "mixtral":
            fields = decoder_fields(c, problems, n_ctx=n_ctx, d_mlp=c.intermediate_size)
            fields.update(
                moe_experts=c.num_local_experts,
                moe_topk=c.num_experts_per_tok,
                moe_style="mixtral",
                bias=False,
                qkv_bias=None,
            )
        else:
            fields = decoder_fields(c, problems, n_ctx=n_ctx, d_mlp=c.moe_intermediate_size)
            step, dense = getattr(c, "decoder_sparse_step", 1), list(getattr(c, "mlp_only_layers", []) or [])
            if step != 1:
                problems.append(f"decoder_sparse_step={step} (dense layers between sparse ones; tinygpt's MoE models "
                                "are sparse in every layer)")  # fmt: skip
            if dense:
                problems.append(f"mlp_only_layers={dense} (dense layers in a MoE model)")
            if c.num_experts < 1:
                problems.append(f"num_experts={c.num_experts}")
            fields.update(
                moe_experts=c.num_experts,
                moe_topk=c.num_experts_per_tok,
                moe_style="qwen2_moe",
                moe_norm_topk=bool(c.norm_topk_prob),
                moe_shared_d_mlp=int(getattr(c, "shared_expert_intermediate_size", 0) or 0),
                bias=False,
                qkv_bias=bool(getattr(c, "qkv_bias", True)),
            )
        fields.update(moe_aux_coef=float(getattr(c, "router_aux_loss_coef", 0.001)), moe_z_coef=0.0)
        refuse(mt, problems)
        return fields

    def check(self, cfg: Any, model_type: str) -> None:
        if model_type == "mixtral":
            need = (False, False)
        else:
            need = (False, bool(getattr(cfg, "qkv_bias", None)))
        problems = check_decoder(cfg, model_type, _FIELDS, need)
        if not cfg.moe_experts or cfg.moe_style != model_type:
            problems.append(f"moe_experts={cfg.moe_experts}, moe_style={cfg.moe_style!r} (needs {model_type!r})")
        if problems:
            raise InteropError(f"{_ARCHS[model_type]} cannot express {', '.join(problems)}; keep the model as .tinygpt")

    def hf_config(self, cfg: Any, tokenizer: Any, model_type: str) -> Any:
        T = transformers_module()
        kw = decoder_hf_kwargs(cfg, tokenizer)
        kw.update(num_experts_per_tok=cfg.moe_topk, router_aux_loss_coef=cfg.moe_aux_coef)
        if model_type == "mixtral":
            kw.update(num_local_experts=cfg.moe_experts, sliding_window=None, router_jitter_noise=0.0)
            return T.MixtralConfig(architectures=[_ARCHS[model_type]], **kw)
        kw.update(
            num_experts=cfg.moe_experts,
            moe_intermediate_size=cfg.d_mlp,
            shared_expert_intermediate_size=cfg.moe_shared_d_mlp,
            norm_topk_prob=cfg.moe_norm_topk,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            qkv_bias=bool(getattr(cfg, "qkv_bias", None)),
            use_sliding_window=False,
            sliding_window=None,
        )
        return T.Qwen2MoeConfig(architectures=[_ARCHS[model_type]], **kw)


MOE = MoEFamily()
