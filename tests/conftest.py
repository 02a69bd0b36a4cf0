"""Shared test set-up: one torch thread per test process.

The suite runs under pytest-xdist with one worker per core; a second torch thread per worker only adds
contention (tiny ops get up to 100x slower on a loaded 2-core machine).
"""

import os

import torch

torch.set_num_threads(int(os.environ.get("TINYGPT_TEST_THREADS", "1")))
