"""The errors of `tinygpt.dictionary`: every one is a `TinyGPTError` (and a `ValueError`)."""

from __future__ import annotations

from tinygpt.errors import TinyGPTValueError


class DictionaryError(TinyGPTValueError):
    """A bad argument for a sparse dictionary (unknown hook or architecture, k > d_sae, a corpus too short...)."""


class DictionaryFileError(DictionaryError):
    """A `.sae` file or SAELens directory is missing, truncated, corrupt or foreign."""


class DictionaryMismatchError(DictionaryError):
    """A dictionary (or feature index) used with a model it was not trained on."""


__all__ = ["DictionaryError", "DictionaryFileError", "DictionaryMismatchError"]
