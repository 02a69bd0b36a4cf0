"""The hookable GPT (`tinygpt.model.gpt`): TransformerLens hook names and shapes, exact residual stream, Hugging
Face GPT-2 parity, ActivationCache helpers, weight views, tokens, context limits and errors (the block pieces:
test_model_layers; caches: test_model_cache; running from a layer: test_model_stack)."""

from __future__ import annotations

import math

import pytest
import torch
from _model_helpers import (  # noqa: F401
    BATCH,
    D_HEAD,
    D_MLP,
    D_MODEL,
    D_VOCAB,
    DIMS,
    N_HEADS,
    POS,
    SMALL,
    SWITCH_HOOKS,
    TL_HOOKS,
    make_model,
    randomize,
    single_thread,
)
from transformer_lens import ActivationCache

from tinygpt import GPT, GPTConfig, KVCache
from tinygpt.interop.hf import copy_hf_gpt2_weights


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    yield from single_thread()


@pytest.fixture(scope="module")
def model() -> GPT:
    return make_model()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, D_VOCAB, (BATCH, POS), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def run(model, tokens):
    with torch.no_grad():
        return model.run_with_cache(tokens)


def expand(name: str, n_layers: int) -> list[str]:
    return [name.format(i=i) for i in range(n_layers)] if "{i}" in name else [name]


# ---------------------------------------------------------------------------------------- hook points
def test_every_transformer_lens_hook_exists_with_its_shape(model, run):
    _, cache = run
    assert isinstance(cache, ActivationCache)
    for template, dims in TL_HOOKS.items():
        for name in expand(template, model.cfg.n_layers):
            assert name in model.hook_dict, name
            want = tuple(DIMS[d] if isinstance(d, str) else d for d in dims)
            assert tuple(cache[name].shape) == want, name
    every = {n for t in TL_HOOKS for n in expand(t, model.cfg.n_layers)}
    switched = {n for t in SWITCH_HOOKS for n in expand(t, model.cfg.n_layers)}  # not called with switches off
    assert set(cache.keys()) == set(model.hook_dict) - switched >= every
    assert switched <= set(model.hook_dict)


def test_residual_stream_is_additive_and_exact(model, run):
    _, cache = run
    assert torch.equal(cache["blocks.0.hook_resid_pre"], cache["hook_embed"] + cache["hook_pos_embed"])
    for i in range(model.cfg.n_layers):
        pre, mid, post = (cache[f"blocks.{i}.hook_resid_{s}"] for s in ("pre", "mid", "post"))
        assert torch.equal(mid, pre + cache[f"blocks.{i}.hook_attn_out"])
        assert torch.equal(post, mid + cache[f"blocks.{i}.hook_mlp_out"])
        if i + 1 < model.cfg.n_layers:
            assert torch.equal(cache[f"blocks.{i + 1}.hook_resid_pre"], post)


def test_cached_activations_are_consistent_with_the_weights(model, run):
    logits, cache = run
    assert torch.allclose(cache["ln_final.hook_normalized"] @ model.W_U + model.b_U, logits, atol=1e-5)
    post = torch.nn.functional.gelu(cache["blocks.1.mlp.hook_pre"], approximate="tanh")
    assert torch.allclose(cache["blocks.1.mlp.hook_post"], post, atol=1e-6)
    z = cache["blocks.0.attn.hook_z"]
    attn_out = torch.einsum("bphd,hdm->bpm", z, model.blocks[0].attn.W_O) + model.blocks[0].attn.b_O
    assert torch.allclose(attn_out, cache["blocks.0.hook_attn_out"], atol=1e-5)


# ------------------------------------------------------------------------------------- numerics
def test_random_init_loss_is_near_log_vocab():
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layers=2, d_model=64, n_heads=4, n_ctx=128))
    toks = torch.randint(0, 256, (4, 128), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = m(toks, return_type="loss")
    assert abs(loss.item() - math.log(256)) < 0.1


def test_loss_matches_manual_cross_entropy(model, tokens):
    with torch.no_grad():
        logits, loss = model(tokens, return_type="both")
        per_token = model(tokens, return_type="loss", loss_per_token=True)
    manual = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, D_VOCAB), tokens[:, 1:].reshape(-1))
    assert torch.allclose(loss, manual, atol=1e-6)
    assert per_token.shape == (BATCH, POS - 1)
    assert torch.allclose(per_token.mean(), loss, atol=1e-6)


# ---------------------------------------------------------------------------------- HF parity
def test_parity_with_hugging_face_gpt2(tokens):
    import transformers  # the `interop` extra, part of `dev`: a hard requirement of the test suite

    hf_cfg = transformers.GPT2Config(
        vocab_size=D_VOCAB, n_positions=32, n_embd=D_MODEL, n_layer=2, n_head=N_HEADS, n_inner=D_MLP,
        activation_function="gelu_new", layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    randomize(hf, seed=5, scale=0.2)
    assert hf.lm_head.weight is hf.transformer.wte.weight
    ours = GPT(SMALL.replace(tie_embeddings=True)).eval()
    copy_hf_gpt2_weights(ours, hf)
    with torch.no_grad():
        want = hf(tokens).logits
        got = ours(tokens)
        got_eager, cache = ours.run_with_cache(tokens)
        hidden = hf(tokens, output_hidden_states=True).hidden_states
    assert want.abs().max() > 0.1  # a non-trivial comparison
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert torch.allclose(got_eager, want, atol=1e-5, rtol=0)
    for i in range(2):  # hidden_states[i] is the residual stream entering block i
        assert torch.allclose(cache[f"blocks.{i}.hook_resid_pre"], hidden[i], atol=1e-5)


# ----------------------------------------------------------------------- ActivationCache helpers
def test_accumulated_resid_with_ln(model, run):
    _, cache = run
    acc, labels = cache.accumulated_resid(apply_ln=True, return_labels=True)
    assert acc.shape == (model.cfg.n_layers + 1, BATCH, POS, D_MODEL)
    assert labels == ["0_pre", "1_pre", "final_post"]
    assert torch.allclose(acc[-1], cache["ln_final.hook_normalized"], atol=1e-5)
    raw = cache.accumulated_resid()
    assert torch.equal(raw[1], cache["blocks.1.hook_resid_pre"])


def test_decompose_resid_sums_to_the_final_residual(model, run):
    _, cache = run
    parts, labels = cache.decompose_resid(return_labels=True)
    assert labels == ["embed", "pos_embed", "0_attn_out", "0_mlp_out", "1_attn_out", "1_mlp_out"]
    assert parts.shape == (6, BATCH, POS, D_MODEL)
    assert torch.allclose(parts.sum(0), cache["blocks.1.hook_resid_post"], atol=1e-5)


def test_logit_attrs_sum_to_the_logits():
    # TransformerLens' logit_attrs applies the final LN's centring and cached scale but not its affine
    # weight/bias (it assumes folded LN), so keep ln_final at weight 1, bias 0 for an exact identity.
    m = GPT(SMALL)
    randomize(m, seed=7, skip=("ln_final",))
    m.eval()
    toks = torch.randint(0, D_VOCAB, (BATCH, POS), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits, cache = m.run_with_cache(toks)
    target = toks[:, -1]  # [batch]: the logit of each sequence's last token at the last position
    parts = cache.decompose_resid(pos_slice=-1)  # [components, batch, d_model]
    attrs = cache.logit_attrs(parts, target, pos_slice=-1)
    assert attrs.shape == (6, BATCH)
    assert torch.allclose(attrs.sum(0), logits[torch.arange(BATCH), -1, target] - m.b_U[target], atol=1e-4)
    # decompose_resid(apply_ln=True) is the per-component share of the final LN output.
    scaled = cache.decompose_resid(apply_ln=True)
    assert torch.allclose(scaled.sum(0), cache["ln_final.hook_normalized"], atol=1e-5)
    # With a string token (to_single_token), over every position.
    attrs_a = cache.logit_attrs(cache.decompose_resid(), "a")
    assert torch.allclose(attrs_a.sum(0), logits[..., ord("a")], atol=1e-4)


def test_direct_logit_attribution_with_a_trained_final_ln(model, run, tokens):
    # The recipe in docs/hooks.md: fold ln_final.w into the directions, add ln_final.b @ W_U as a constant.
    logits, cache = run
    assert not torch.allclose(model.ln_final.w, torch.ones(D_MODEL))  # really a non-trivial LN
    token = tokens[:, -1]
    parts = cache.decompose_resid(pos_slice=-1)
    directions = model.ln_final.w[:, None] * model.W_U[:, token]  # [d_model, batch]
    attrs = (cache.apply_ln_to_stack(parts, pos_slice=-1) * directions.T).sum(-1)
    constant = model.ln_final.b @ model.W_U[:, token]
    assert torch.allclose(attrs.sum(0) + constant, logits[torch.arange(BATCH), -1, token], atol=1e-4)


def test_cache_shorthand_and_head_results(model, run):
    _, cache = run
    assert torch.equal(cache["pattern", 0], cache["blocks.0.attn.hook_pattern"])
    assert torch.equal(cache["pattern", -1], cache["blocks.1.attn.hook_pattern"])
    assert torch.equal(cache["resid_post", 1], cache["blocks.1.hook_resid_post"])
    assert torch.equal(cache["q", 1, "attn"], cache["blocks.1.attn.hook_q"])
    heads, labels = cache.stack_head_results(return_labels=True)
    assert heads.shape == (model.cfg.n_layers * N_HEADS, BATCH, POS, D_MODEL)
    assert labels == [f"L{layer}H{h}" for layer in range(2) for h in range(N_HEADS)]
    for layer in range(2):
        per_layer = heads[layer * N_HEADS : (layer + 1) * N_HEADS].sum(0) + model.blocks[layer].attn.b_O
        assert torch.allclose(per_layer, cache[f"blocks.{layer}.hook_attn_out"], atol=1e-5)


def test_per_head_weight_views(model, run):
    _, cache = run
    attn = model.blocks[1].attn
    x = cache["blocks.1.ln1.hook_normalized"]
    for W, b, hook in ((attn.W_Q, attn.b_Q, "hook_q"), (attn.W_K, attn.b_K, "hook_k"), (attn.W_V, attn.b_V, "hook_v")):
        assert W.shape == (N_HEADS, D_MODEL, D_HEAD) and b.shape == (N_HEADS, D_HEAD)
        recomputed = torch.einsum("bpm,hmd->bphd", x, W) + b
        assert torch.allclose(recomputed, cache[f"blocks.1.attn.{hook}"], atol=1e-5), hook
    assert attn.W_O.shape == (N_HEADS, D_HEAD, D_MODEL)
    assert model.W_Q.shape == (2, N_HEADS, D_MODEL, D_HEAD)
    assert torch.equal(model.W_Q[1], attn.W_Q)
    assert model.blocks[0].mlp.W_in.shape == (D_MODEL, D_MLP)
    assert model.blocks[0].mlp.W_out.shape == (D_MLP, D_MODEL)
    assert model.W_E.shape == (D_VOCAB, D_MODEL) and model.W_U.shape == (D_MODEL, D_VOCAB)
    assert model.W_pos.shape == (SMALL.n_ctx, D_MODEL)


def test_per_head_views_share_storage():
    m = make_model()
    attn = m.blocks[0].attn
    with torch.no_grad():
        attn.W_Q[1, 5, 2] = 123.0  # head 1, d_model row 5, d_head column 2
        attn.W_O[2, 3, 4] = -7.0  # head 2, d_head row 3, d_model column 4
        m.blocks[0].mlp.W_in[1, 6] = 9.0
        m.W_U[3, 10] = 4.0
    assert attn.q_proj.weight[1 * D_HEAD + 2, 5] == 123.0
    assert attn.o_proj.weight[4, 2 * D_HEAD + 3] == -7.0
    assert m.blocks[0].mlp.fc_in.weight[6, 1] == 9.0
    assert m.unembed.weight[10, 3] == 4.0


# ------------------------------------------------------------------------------------------- tokens
def test_to_tokens_and_str_tokens(model):
    toks = model.to_tokens("hello")
    assert toks.dtype == torch.long and toks.tolist() == [list(b"hello")]
    batch = model.to_tokens(["ab", "abcd"])
    assert batch.shape == (2, 4) and batch[0, 2:].tolist() == [0, 0]
    assert model.to_tokens("x" * 100).shape == (1, model.cfg.n_ctx)  # truncated to the context
    assert model.to_string(toks[0]) == "hello"
    assert model.to_string(batch[:, :2]) == ["ab", "ab"]
    assert model.to_str_tokens("héllo") == ["h", "\\xc3", "\\xa9", "l", "l", "o"]
    assert model.to_str_tokens(torch.tensor([[72, 105]])) == ["H", "i"]
    with pytest.raises(ValueError, match="no BOS token"):
        model.to_tokens("hi", prepend_bos=True)
    logits = model("hello")  # text input is tokenized
    assert logits.shape == (1, 5, D_VOCAB)


def test_to_single_token(model):
    assert model.to_single_token("a") == 97
    with pytest.raises(ValueError, match="2 tokens"):
        model.to_single_token("ab")
    with pytest.raises(ValueError, match="2 tokens"):
        model.to_single_token("é")  # one character, two bytes
    with pytest.raises(ValueError, match="0 tokens"):
        model.to_single_token("")


def test_tokens_to_residual_directions(model):
    d = model.tokens_to_residual_directions("a")
    assert d.shape == (D_MODEL,) and torch.equal(d, model.W_U[:, 97])
    assert torch.equal(model.tokens_to_residual_directions(97), d)
    many = model.tokens_to_residual_directions(torch.tensor([[1, 2, 3], [4, 5, 6]]))
    assert many.shape == (2, 3, D_MODEL) and torch.equal(many[1, 2], model.W_U[:, 6])
    assert model.tokens_to_residual_directions(torch.tensor([7, 8])).shape == (2, D_MODEL)
    with pytest.raises(ValueError, match="not one"):
        model.tokens_to_residual_directions("ab")


def test_model_without_tokenizer_explains_itself():
    m = GPT(GPTConfig(n_layers=1, d_model=16, n_heads=2, n_ctx=16, d_vocab=300))
    assert m.tokenizer is None
    with pytest.raises(ValueError, match="no tokenizer attached"):
        m.to_tokens("hi")
    assert m(torch.tensor([[299, 0, 5]])).shape == (1, 3, 300)


def test_activation_patching_resid_pre(model):
    from transformer_lens import patching

    clean = torch.tensor([list(b"abcde")])
    corrupted = torch.tensor([list(b"abcdz")])  # differs only at the last position
    answer = ord("f")

    def metric(logits):
        return logits[0, -1, answer]

    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean)
        clean_value, corrupted_value = metric(model(clean)), metric(model(corrupted))
        result = patching.get_act_patch_resid_pre(model, corrupted, clean_cache, metric)
    assert result.shape == (model.cfg.n_layers, 5)
    # Patching the only differing position restores the clean run; other positions change nothing.
    assert torch.allclose(result[:, -1], clean_value.expand(2), atol=1e-5)
    assert torch.allclose(result[:, :-1], corrupted_value.expand(2, 4), atol=1e-5)
    assert not torch.isclose(clean_value, corrupted_value, atol=1e-3)


# ------------------------------------------------------------------------- storage, dtypes, caches
def test_tied_embeddings_share_storage():
    m = GPT(SMALL.replace(tie_embeddings=True))
    assert m.unembed.weight is m.embed.weight
    assert m.unembed.weight.data_ptr() == m.embed.weight.data_ptr()
    with torch.no_grad():
        m.embed.weight[3, 0] = 42.0
    assert m.W_U[0, 3] == 42.0
    assert m.n_params() == SMALL.replace(tie_embeddings=True).n_params()


def test_bfloat16_model_runs_forward(tokens):
    m = make_model(dtype="bfloat16")
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        logits, loss = m(tokens, return_type="both")
        eager, cache = m.run_with_cache(tokens)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert cache["blocks.0.attn.hook_pattern"].dtype == torch.bfloat16
    ref = make_model()(tokens).detach()
    assert (logits.float() - ref).abs().max() < 0.25 * ref.abs().max()  # same model, lower precision


def test_sequence_longer_than_context_is_a_clear_error(model):
    n_ctx = model.cfg.n_ctx
    with torch.no_grad():
        assert model(torch.zeros(1, n_ctx, dtype=torch.long)).shape == (1, n_ctx, D_VOCAB)
        with pytest.raises(ValueError, match=rf"{n_ctx + 1} tokens exceeds .*n_ctx={n_ctx}"):
            model(torch.zeros(1, n_ctx + 1, dtype=torch.long))
        kv = KVCache(model.cfg, 1, n_ctx + 4, "cpu", torch.float32)
        model(torch.zeros(1, n_ctx - 1, dtype=torch.long), past_kv_cache=kv)
        with pytest.raises(ValueError, match="exceeds"):
            model(torch.zeros(1, 2, dtype=torch.long), past_kv_cache=kv)


def test_bad_return_type(model, tokens):
    with pytest.raises(ValueError, match="return_type"):
        model(tokens, return_type="probs")
    assert model(tokens, return_type=None) is None


def test_conveniences_are_registered_by_the_layers_above():
    """`GPT.generate` and `GPT.save` are `tinygpt.generate` and `tinygpt.save`, registered by `tinygpt.sampling` and
    `tinygpt.checkpoint` (the model layer imports neither); `GPTConfig.n_params` counts with the model's counter."""
    import tinygpt.checkpoint
    import tinygpt.sampling
    from tinygpt.model import gpt

    assert gpt._METHODS["generate"] is tinygpt.sampling.generate and gpt._METHODS["save"] is tinygpt.checkpoint.save
    assert SMALL.n_params() == GPT(SMALL).n_params()
