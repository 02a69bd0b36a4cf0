"""Shared by the tests of `tinygpt.model` (test_model_gpt, test_model_layers, test_model_cache, test_model_stack):
a small config whose dims are all distinct, TransformerLens' hook table, and seeded, perturbed models."""

from __future__ import annotations

import torch

from tinygpt import GPT, GPTConfig

# All dims distinct, so a transposed or mislabelled axis cannot pass a shape check.
BATCH, POS, D_MODEL, N_HEADS, D_HEAD, D_MLP, D_VOCAB = 2, 7, 24, 3, 8, 40, 256
SMALL = GPTConfig(n_layers=2, d_model=D_MODEL, n_heads=N_HEADS, d_mlp=D_MLP, n_ctx=32)

# TransformerLens' canonical hook names for a GPT-2 style HookedTransformer, with TransformerLens' shapes.
TL_HOOKS = {
    "hook_embed": ("batch", "pos", "d_model"),
    "hook_pos_embed": ("batch", "pos", "d_model"),
    "blocks.{i}.hook_resid_pre": ("batch", "pos", "d_model"),
    "blocks.{i}.ln1.hook_scale": ("batch", "pos", 1),
    "blocks.{i}.ln1.hook_normalized": ("batch", "pos", "d_model"),
    "blocks.{i}.attn.hook_q": ("batch", "pos", "n_heads", "d_head"),
    "blocks.{i}.attn.hook_k": ("batch", "pos", "n_heads", "d_head"),
    "blocks.{i}.attn.hook_v": ("batch", "pos", "n_heads", "d_head"),
    "blocks.{i}.attn.hook_attn_scores": ("batch", "n_heads", "pos", "pos"),
    "blocks.{i}.attn.hook_pattern": ("batch", "n_heads", "pos", "pos"),
    "blocks.{i}.attn.hook_z": ("batch", "pos", "n_heads", "d_head"),
    "blocks.{i}.hook_attn_out": ("batch", "pos", "d_model"),
    "blocks.{i}.hook_resid_mid": ("batch", "pos", "d_model"),
    "blocks.{i}.ln2.hook_scale": ("batch", "pos", 1),
    "blocks.{i}.ln2.hook_normalized": ("batch", "pos", "d_model"),
    "blocks.{i}.mlp.hook_pre": ("batch", "pos", "d_mlp"),
    "blocks.{i}.mlp.hook_post": ("batch", "pos", "d_mlp"),
    "blocks.{i}.hook_mlp_out": ("batch", "pos", "d_model"),
    "blocks.{i}.hook_resid_post": ("batch", "pos", "d_model"),
    "ln_final.hook_scale": ("batch", "pos", 1),
    "ln_final.hook_normalized": ("batch", "pos", "d_model"),
}
# Called only behind TransformerLens' hook switches (model.set_use_attn_result(True), ...; tinygpt.model.heads).
SWITCH_HOOKS = {
    "blocks.{i}.hook_attn_in": ("batch", "pos", "n_heads", "d_model"),
    "blocks.{i}.hook_q_input": ("batch", "pos", "n_heads", "d_model"),
    "blocks.{i}.hook_k_input": ("batch", "pos", "n_heads", "d_model"),
    "blocks.{i}.hook_v_input": ("batch", "pos", "n_heads", "d_model"),
    "blocks.{i}.attn.hook_result": ("batch", "pos", "n_heads", "d_model"),
    "blocks.{i}.hook_mlp_in": ("batch", "pos", "d_model"),
}
DIMS = {"batch": BATCH, "pos": POS, "d_model": D_MODEL, "n_heads": N_HEADS, "d_head": D_HEAD, "d_mlp": D_MLP}


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.3, skip: tuple[str, ...] = ()) -> None:
    """Perturb every parameter (LayerNorm gains and all biases included) so that no check passes only
    because the default init makes something zero, one or uniform."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(skip):
                continue
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)
            p.add_(noise * scale)


def make_model(cfg: GPTConfig = SMALL, seed: int = 0, **changes) -> GPT:
    torch.manual_seed(seed)
    model = GPT(cfg.replace(**changes) if changes else cfg)
    randomize(model, seed)
    return model.eval()


def tiny_model(seed: int = 0, **overrides) -> GPT:
    """A seeded 2-layer model (d_model 32, 2 heads, n_ctx 64, byte vocabulary) in eval mode; `overrides` are
    further `GPTConfig` fields."""
    torch.manual_seed(seed)
    cfg = dict(n_layers=2, d_model=32, n_heads=2, n_ctx=64)
    cfg.update(overrides)
    return GPT(GPTConfig(**cfg)).eval()


def single_thread():
    """A fixture body (`yield from single_thread()`): these models are tiny, so intra-op threads only add
    overhead, and on a shared 2-core machine oversubscribed OpenMP threads make small ops up to 100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
