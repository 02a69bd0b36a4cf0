"""The errors a user can cause; the CLI prints them as one clear line instead of a traceback."""

from tinygpt.arch.backends import BackendUnavailable
from tinygpt.checkpoint import CheckpointError
from tinygpt.config import ConfigError
from tinygpt.data import CorpusError
from tinygpt.tokenizer import TokenizerError
from tinygpt.training.loop import TrainingDiverged

USER_ERRORS = (
    BackendUnavailable,
    CheckpointError,
    ConfigError,
    CorpusError,
    TokenizerError,
    TrainingDiverged,
    ValueError,
    OSError,
)

__all__ = [
    "USER_ERRORS",
    "BackendUnavailable",
    "CheckpointError",
    "ConfigError",
    "CorpusError",
    "TokenizerError",
    "TrainingDiverged",
]
