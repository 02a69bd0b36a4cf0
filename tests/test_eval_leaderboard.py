"""The leaderboard (`tinygpt.eval.leaderboard`): byte and BPE models ranked on the same text, a report on disk."""

from __future__ import annotations

import os
import re

import pytest
from _eval_helpers import TEXT, byte_identical_bpe_pair, small, uniform

from tinygpt import save
from tinygpt.eval import leaderboard

pytestmark = pytest.mark.usefixtures("isolated_cache")  # conftest: TINYGPT_CACHE_DIR in the test's tmp dir


def test_leaderboard_ranks_byte_and_bpe_models_on_the_same_text_and_writes_a_report(tmp_path, bpe):
    folder = tmp_path / "models"
    save(uniform(small()), folder / "uniform.tinygpt")  # bpb 8
    save(uniform(small(bpe.vocab_size, bpe)), folder / "sub" / "bpe_uniform.tinygpt")
    byte_model, _ = byte_identical_bpe_pair()
    save(byte_model, folder / "peaked.tinygpt")
    (folder / "broken.tinygpt").write_bytes(b"not a checkpoint at all")
    held = tmp_path / "held.txt"
    held.write_text(TEXT)
    board = leaderboard(folder, held, progress=False)
    assert [r.file for r in board.rows] == sorted([r.file for r in board.rows], key=lambda f: board_bpb(board, f))
    assert {r.file for r in board.rows} == {"uniform.tinygpt", "sub/bpe_uniform.tinygpt", "peaked.tinygpt"}
    assert [f for f, _ in board.skipped] == ["broken.tinygpt"]
    by = {r.file: r for r in board.rows}
    assert by["uniform.tinygpt"].bpb == pytest.approx(8.0, abs=1e-6)
    assert by["sub/bpe_uniform.tinygpt"].tokenizer == f"bpe {bpe.vocab_size}"
    assert by["sub/bpe_uniform.tinygpt"].bpb < 8.0  # fewer tokens than bytes at log2(300) bits each
    assert board.n_bytes == len(TEXT.encode())
    fig = board.figure()
    assert sum(len(t.x) for t in fig.data) == 3
    md = board.write_report(tmp_path / "out" / "report.md")
    body = md.read_text()
    assert "| 1 |" in body and "uniform.tinygpt" in body and "broken.tinygpt" in body
    html = (tmp_path / "out" / "report.bpb.html").read_text()
    assert not re.search(r"<script[^>]*src=", html) and len(html) > 1_000_000  # plotly.js embedded: works offline
    assert not [f for f in (tmp_path / "out").iterdir() if f.name.startswith(".")]  # no temp files left
    mask = os.umask(0o022)
    os.umask(mask)
    assert md.stat().st_mode & 0o777 == 0o666 & ~mask  # readable like any other file (mkstemp makes 0600)


def board_bpb(board, file):
    return next(r.bpb for r in board.rows if r.file == file)
