"""Tokenizers both ways: tinygpt's byte / BPE tokenizers as `transformers` fast tokenizers, and a directory's back.

The byte tokenizer is written as a byte-level `tokenizer.json` (a BPE with the 256 GPT-2 byte symbols as ids
0..255 and no merges) that `PreTrainedTokenizerFast` loads and that encodes any text to exactly the ids
`ByteTokenizer` gives; a BPE tokenizer writes its own `tokenizer.json`. Importing reads the directory's tokenizer
back (a byte-level vocabulary becomes a `ByteTokenizer` again).
"""

from __future__ import annotations

import os
from pathlib import Path

from tinygpt.interop.hf.common import InteropError, transformers_module
from tinygpt.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, bytes_to_unicode, vocab_mismatch

__all__ = ["byte_tokenizer_json", "hf_tokenizer", "tokenizer_from_hf_dir"]


def byte_tokenizer_json() -> str:
    """A `tokenizers` JSON for the byte tokenizer: id i is byte i, no merges, byte-level pre-tokenizer/decoder."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    b2u = bytes_to_unicode()
    tok = HFTokenizer(models.BPE(vocab={b2u[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok.to_str()


def hf_tokenizer(tokenizer: Tokenizer, n_ctx: int | None = None):
    """A `transformers.PreTrainedTokenizerFast` equivalent to a tinygpt tokenizer (same ids for any text)."""
    T = transformers_module()
    from tokenizers import Tokenizer as HFTokenizer

    if isinstance(tokenizer, ByteTokenizer):
        backend = HFTokenizer.from_str(byte_tokenizer_json())
        if tokenizer.added_tokens:  # e.g. a chat template's tokens: ids 256, 257, ... as in tinygpt
            backend.add_special_tokens(list(tokenizer.added_tokens))
    elif isinstance(tokenizer, BPETokenizer):
        backend = HFTokenizer.from_str(tokenizer.tok.to_str())  # a copy: transformers may set padding options
    else:
        raise InteropError(f"cannot export a {type(tokenizer).__name__} to Hugging Face format")
    specials = {}
    for key, i in (("eos_token", tokenizer.eos_id), ("bos_token", tokenizer.bos_id)):
        if i is not None:
            specials[key] = backend.id_to_token(i)
    kw = {"model_max_length": n_ctx} if n_ctx else {}
    return T.PreTrainedTokenizerFast(tokenizer_object=backend, **specials, **kw)


def tokenizer_from_hf_dir(directory: str | os.PathLike) -> Tokenizer:
    """The tinygpt tokenizer of a Hugging Face model directory (a byte-level vocabulary -> `ByteTokenizer`).

    Reads `tokenizer.json`, or `vocab.json` + `merges.txt`, or any fast tokenizer `transformers` can load there.
    """
    d = Path(directory)
    if (d / "tokenizer.json").exists() or ((d / "vocab.json").exists() and (d / "merges.txt").exists()):
        tok: Tokenizer = BPETokenizer.from_file(d)
    else:
        T = transformers_module()
        try:
            fast = T.AutoTokenizer.from_pretrained(str(d), local_files_only=True)
            tok = BPETokenizer.from_str(fast.backend_tokenizer.to_str(), source=str(d))
        except Exception as e:  # noqa: BLE001 - transformers raises many kinds
            raise InteropError(
                f"{d} holds no tokenizer tinygpt can read (tokenizer.json, vocab.json + merges.txt, or a fast "
                f"tokenizer): {e}; pass tokenizer= explicitly"
            ) from e
    as_bytes = ByteTokenizer(t for t, _ in sorted(tok.special_tokens.items(), key=lambda kv: kv[1]))
    return as_bytes if vocab_mismatch(tok, as_bytes) is None else tok
