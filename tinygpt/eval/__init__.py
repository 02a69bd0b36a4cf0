"""Evaluation: loss, perplexity and bits per byte, leaderboards, memorization, the evaluation matrix."""

from tinygpt.eval.perplexity import *  # noqa: F401,F403
