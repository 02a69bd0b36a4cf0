"""Shared test set-up: one torch thread per test process, and fixtures the surgery tests share.

The suite runs under pytest-xdist with one worker per core; a second torch thread per worker only adds
contention (tiny ops get up to 100x slower on a loaded 2-core machine).
"""

import os

import pytest
import torch
import torch.nn as nn

torch.set_num_threads(int(os.environ.get("TINYGPT_TEST_THREADS", "1")))


# ------------------------------------------------------------------ shared by the surgery and dashboard tests
@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    """A fixed batch of byte tokens [4, 33]: inputs `[:, :-1]`, next-token targets `[:, 1:]`."""
    return torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(1))


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_bitwise_equal(model: nn.Module, snap: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert set(now) == set(snap)
    for k, v in snap.items():
        assert now[k].dtype == v.dtype and torch.equal(now[k], v), k


@torch.no_grad()
def _loss_of(model, tokens: torch.Tensor) -> float:
    return float(model(tokens[:, :-1], return_type="loss", targets=tokens[:, 1:]))


@pytest.fixture(scope="session")
def snapshot():
    """`snapshot(model)`: a copy of the model's state dict (compare with `assert_bitwise_equal`)."""
    return _snapshot


@pytest.fixture(scope="session")
def assert_bitwise_equal():
    """`assert_bitwise_equal(model, snap)`: the model's state dict equals `snap` bit for bit (names, dtypes)."""
    return _assert_bitwise_equal


@pytest.fixture(scope="session")
def loss_of():
    """`loss_of(model, tokens)`: the mean next-token loss of a token batch [batch, pos], as a float."""
    return _loss_of


def _decode_in_chunks(model, tokens: torch.Tensor, chunks: list[int]) -> tuple[torch.Tensor, object]:
    model_cache = model.make_cache(tokens.shape[0])
    outs, s = [], 0
    for n in chunks:
        outs.append(model(tokens[:, s : s + n], past_kv_cache=model_cache))
        s += n
    assert s == tokens.shape[1] == model_cache.length
    return torch.cat(outs, 1), model_cache


@pytest.fixture(scope="session")
def decode_in_chunks():
    """`decode_in_chunks(model, tokens, chunks)`: feed tokens [batch, pos] through one KV cache in consecutive
    chunks of the given lengths (which must add up to pos); returns (logits [batch, pos, vocab], the cache)."""
    return _decode_in_chunks


#: Tiny models of every architecture variant (GPTConfig knobs), for tests that must hold on all of them.
ARCH_VARIANTS = {
    "dense": {},
    "moe": {"moe_experts": 3, "moe_topk": 2},
    "mod": {"mod": True, "mod_every": 2},
    "diff_attn": {"diff_attn": True},
    "yoco": {"yoco": True, "yoco_window": 8},
}


@pytest.fixture(params=list(ARCH_VARIANTS))
def arch_model(request):
    """A fresh, seeded 2-layer model (d_model 32, n_ctx 64, byte vocabulary) in eval mode, once per variant."""
    from tinygpt import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(n_layers=2, d_model=32, n_heads=2, n_ctx=64, **ARCH_VARIANTS[request.param])).eval()


# ------------------------------------------------------------------ shared by the training and data tests
@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """`TINYGPT_CACHE_DIR` inside the test's tmp dir (`tmp_path / "envcache"`): no token cache leaks between tests.

    Use it per module: `pytestmark = pytest.mark.usefixtures("isolated_cache")`.
    """
    monkeypatch.setenv("TINYGPT_CACHE_DIR", str(tmp_path / "envcache"))
    return tmp_path / "envcache"


CITIZENS = [
    "First Citizen: Before we proceed any further, hear me speak.",
    "All: Speak, speak.",
    "First Citizen: You are all resolved rather to die than to famish?",
    "All: Resolved. resolved.",
    "First Citizen: First, you know Caius Marcius is chief enemy to the people.",
]


@pytest.fixture
def make_corpus(tmp_path):
    """`make_corpus(n_lines=5, repeat=12, name="corpus.txt")`: a text file of the first `n_lines` lines of the
    Citizens' scene (Coriolanus, act 1) repeated `repeat` times (5 lines x 12: ~3.6 KB)."""

    def make(n_lines: int = 5, repeat: int = 12, name: str = "corpus.txt"):
        p = tmp_path / name
        p.write_text(("\n".join(CITIZENS[:n_lines]) + "\n") * repeat)
        return p

    return make


# ------------------------------------------------------------------ shared by the evaluation tests
@pytest.fixture(scope="module")
def bpe():
    """The evaluation tests' 300-token byte-level BPE (`_eval_helpers.make_bpe`), once per module (test_sampling
    and test_tokenizer define their own `bpe`)."""
    from _eval_helpers import make_bpe

    return make_bpe()


# ------------------------------------------------------------------ shared by the circuit tests (issue 15)
@pytest.fixture(scope="session")
def induction_model():
    """`train_induction_model(seed=3)` (the seed of tests/test_interp_toy.py; ~40-60 CPU-seconds), once per
    session: its induction head is L1H0 and every layer-0 head carries the previous-token signal. Read-only:
    tests must not change its weights."""
    from tinygpt.interp import train_induction_model

    return train_induction_model(seed=3, progress=False)
