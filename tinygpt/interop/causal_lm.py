"""One adapter for "a tinygpt or Hugging Face causal LM": logits for tokens, a tokenizer, a device, eval mode.

    lm = as_causal_lm("teacher.tinygpt")          # or a GPT, or a local Hugging Face model directory
    logits = lm.logits(tokens)                     # tokens [batch, pos] -> [batch, pos, d_vocab], no gradients
    nxt = lm.start(prompt)                         # prefill with a KV cache -> next-token logits [batch, vocab]
    nxt = lm.step(new_tokens)                      # one token per row [batch] -> the next logits [batch, vocab]
    lm.tokenizer.encode("text")                    # a tinygpt `Tokenizer` either way

Distillation's teachers (`tinygpt.training.distill`) and Magpie's / `chat`'s models (`tinygpt.training.magpie`)
are `CausalLM`s. A Hugging Face model is loaded offline with `AutoModelForCausalLM` / `AutoTokenizer`
(`tinygpt.interop.hf.load_hf_causal_lm`); its tokenizer is wrapped as an `HFTokenizer`, a tinygpt `Tokenizer`,
so templates, tokenizer comparison (`tinygpt.tokenizer.vocab_mismatch`) and sampling treat both kinds alike.

Every forward runs under `torch.no_grad()` in eval mode (`tinygpt.inputs.eval_mode`: the model's own training
flags are restored afterwards).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tinygpt.checkpoint import CheckpointError, as_model, content_hash
from tinygpt.errors import TinyGPTError
from tinygpt.inputs import eval_mode, model_device
from tinygpt.model import GPT
from tinygpt.tokenizer import Tokenizer, TokenizerError


class NotACausalLM(TinyGPTError, TypeError):
    """An object that is neither a tinygpt model, a `.tinygpt` path nor a Hugging Face model directory."""


class HFTokenizer(Tokenizer):
    """A `transformers` tokenizer seen as a tinygpt `Tokenizer` (encode without added BOS/EOS, decode verbatim).

    Attributes:
        hf: the wrapped `transformers` tokenizer.
    """

    kind = "hf"

    def __init__(self, tok: Any):
        self.hf = tok
        self.eos_id = tok.eos_token_id
        self.bos_id = tok.bos_token_id if tok.bos_token_id is not None else self.eos_id

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self.hf.get_added_vocab())

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_str(self, i: int) -> str:
        return self.hf.convert_ids_to_tokens(int(i))

    def to_dict(self) -> dict[str, Any]:
        raise TokenizerError(
            "a Hugging Face tokenizer is not stored in .tinygpt files; convert it with tinygpt.load_tokenizer(DIR)"
        )

    def vocab_items(self) -> list[tuple[str, int]]:
        return list(self.hf.get_vocab().items())

    def __repr__(self) -> str:
        return f"HFTokenizer({type(self.hf).__name__}, vocab_size={self.vocab_size})"


class CausalLM:
    """A frozen causal language model behind one interface (see the module docstring).

    Attributes:
        kind: "tinygpt" or "hf".
        model: the wrapped `nn.Module`.
        source: the file or directory it came from (None for an in-memory model).
        tokenizer: a tinygpt `Tokenizer` (`HFTokenizer` for "hf").
        n_ctx: the longest sequence it accepts (None if unknown).
        d_vocab: the size of its logits.
    """

    kind: str = "?"
    model: nn.Module
    source: str | None = None
    tokenizer: Tokenizer
    n_ctx: int | None = None
    d_vocab: int = 0

    @property
    def device(self) -> torch.device:
        return model_device(self.model)

    def to(self, device: str | torch.device) -> CausalLM:
        self.model.to(device)
        return self

    def _forward(self, tokens: Tensor, cached: bool | None) -> Tensor:
        """tokens [batch, pos] -> logits [batch, pos, vocab]; `cached`: None (no cache), False (start a fresh KV
        cache) or True (extend it)."""
        raise NotImplementedError

    @torch.no_grad()
    def logits(self, tokens: Tensor) -> Tensor:
        """tokens [batch, pos] -> logits [batch, pos, d_vocab] (no cache, no gradients)."""
        with eval_mode(self.model):
            return self._forward(tokens.to(self.device), cached=None)

    @torch.no_grad()
    def start(self, tokens: Tensor) -> Tensor:
        """Run the prompt tokens [batch, pos] into a fresh KV cache; returns the next-token logits [batch, vocab]
        (float32)."""
        with eval_mode(self.model):
            return self._forward(tokens.to(self.device), cached=False)[:, -1].float()

    @torch.no_grad()
    def step(self, tokens: Tensor) -> Tensor:
        """Feed one new token per row [batch] after `start`; returns the next logits [batch, vocab] (float32)."""
        with eval_mode(self.model):
            return self._forward(tokens[:, None].to(self.device), cached=True)[:, -1].float()

    @property
    def fingerprint(self) -> str:
        """sha256 of the weights (every state-dict tensor's name, dtype, shape and bytes); cached."""
        if getattr(self, "_fingerprint", None) is None:
            self._fingerprint = content_hash(self.model.state_dict())
        return self._fingerprint

    def record(self) -> dict[str, Any]:
        """What a checkpoint stores to find and verify the model again."""
        return {"kind": self.kind, "path": self.source, "fingerprint": self.fingerprint}

    @property
    def train_state(self) -> dict[str, Any]:
        """The tinygpt model's training state (its SFT record says which chat template it learned); {} for HF."""
        return {}

    def tinygpt_tokenizer(self) -> Tokenizer:
        """The model's tokenizer as one a tinygpt model can carry (e.g. for a fresh distillation student)."""
        return self.tokenizer


class GPTCausalLM(CausalLM):
    """A tinygpt `GPT` (any architecture) as a `CausalLM`."""

    kind = "tinygpt"

    def __init__(self, model: GPT, source: str | None = None):
        if model.tokenizer is None:
            raise TokenizerError("the model has no tokenizer attached; set model.tokenizer")
        self.model = model
        self.source = source if source is not None else getattr(model, "source_path", None)
        self.tokenizer = model.tokenizer
        self.n_ctx = model.cfg.n_ctx
        self.d_vocab = model.cfg.d_vocab
        self._cache = None

    def _forward(self, tokens: Tensor, cached: bool | None) -> Tensor:
        if cached is None:
            return self.model(tokens)
        if not cached:
            self._cache = self.model.make_cache(tokens.shape[0], self.n_ctx)
        return self.model(tokens, past_kv_cache=self._cache)

    @property
    def train_state(self) -> dict[str, Any]:
        return self.model.train_state or {}


class HFCausalLM(CausalLM):
    """A Hugging Face `AutoModelForCausalLM` as a `CausalLM`."""

    kind = "hf"

    def __init__(self, model: nn.Module, tokenizer: Any, source: str | None = None):
        self.model = model
        self.tokenizer = tokenizer if isinstance(tokenizer, Tokenizer) else HFTokenizer(tokenizer)
        self.source = source
        c = model.config
        self.n_ctx = getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None)
        out = model.get_output_embeddings()
        self.d_vocab = int(out.weight.shape[0]) if out is not None else int(c.vocab_size)
        self._past = None
        self._tinygpt_tok: Tokenizer | None = None

    def _forward(self, tokens: Tensor, cached: bool | None) -> Tensor:
        if cached is None:
            return self.model(input_ids=tokens).logits
        out = self.model(input_ids=tokens, past_key_values=self._past if cached else None, use_cache=True)
        self._past = out.past_key_values
        return out.logits

    def tinygpt_tokenizer(self) -> Tokenizer:
        if self._tinygpt_tok is None:
            if self.source is None:
                raise TokenizerError("an in-memory Hugging Face model has no tokenizer files; pass tokenizer=")
            from tinygpt.interop.hf import tokenizer_from_hf_dir

            self._tinygpt_tok = tokenizer_from_hf_dir(self.source)
        return self._tinygpt_tok


def as_causal_lm(spec: Any, *, device: str | torch.device | None = None, what: str = "model") -> CausalLM:
    """A `CausalLM` from a tinygpt `GPT`, a `.tinygpt` path, a local Hugging Face model directory, or one as given.

    Args:
        spec: the model.
        device: where to put it (a model passed in is moved too).
        what: how messages name it ("teacher", "model").
    Raises:
        CheckpointError: the path does not exist.
        NotACausalLM: anything else (a Hugging Face model object must be given as its directory, where its
            tokenizer is).
    """
    if isinstance(spec, CausalLM):
        lm = spec
    elif isinstance(spec, (str, os.PathLike)):
        p = Path(spec)
        if p.is_dir():
            from tinygpt.interop.hf import load_hf_causal_lm

            lm = HFCausalLM(*load_hf_causal_lm(p, device=device), source=str(p))
        elif p.exists():
            lm = GPTCausalLM(as_model(p, device=device, what=what), str(p))
        else:
            raise CheckpointError(
                f"{what} {spec} does not exist; pass a .tinygpt file or a Hugging Face model directory"
            )
    elif isinstance(spec, nn.Module) and hasattr(spec, "cfg"):
        lm = GPTCausalLM(spec)
    elif hasattr(spec, "config") and hasattr(spec, "generate"):
        raise NotACausalLM(f"pass a Hugging Face {what} as its directory (the tokenizer is loaded from there)")
    else:
        raise NotACausalLM(
            f"cannot use a {type(spec).__name__} as the {what}; pass a GPT, a .tinygpt path or a Hugging Face directory"
        )
    return lm.to(device) if device is not None else lm


__all__ = ["CausalLM", "GPTCausalLM", "HFCausalLM", "HFTokenizer", "NotACausalLM", "as_causal_lm"]
