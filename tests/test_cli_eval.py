"""`tinygpt eval`, `tinygpt leaderboard` and `tinygpt memorization` (`tinygpt.cli.eval`)."""

from __future__ import annotations

import json
import re

import pytest
from _eval_helpers import TEXT, small, uniform

from tinygpt import save
from tinygpt.cli import main
from tinygpt.eval import evaluate

pytestmark = pytest.mark.usefixtures("isolated_cache")  # conftest: TINYGPT_CACHE_DIR in the test's tmp dir


def test_cli_eval_and_leaderboard(tmp_path, capsys, bpe):
    model = small(seed=5)
    path = save(model, tmp_path / "m" / "a.tinygpt")
    save(uniform(small(bpe.vocab_size, bpe)), tmp_path / "m" / "b.tinygpt")
    held = tmp_path / "held.txt"
    held.write_text(TEXT)
    assert main(["eval", str(path), "--corpus", str(held), "--no-progress"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    m = re.fullmatch(r"loss (\d+\.\d{3}) \| ppl (\d+\.\d{2}) \| bpb (\d+\.\d{3})", first)
    assert m, first
    ref = evaluate(model, TEXT, progress=False)
    assert float(m.group(1)) == pytest.approx(ref.loss, abs=1e-3)
    assert float(m.group(3)) == pytest.approx(ref.bpb, abs=1e-3)
    out = tmp_path / "report.md"
    assert main(["leaderboard", str(tmp_path / "m"), "--corpus", str(held), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "a.tinygpt" in printed and "b.tinygpt" in printed and out.exists()
    assert main(["eval", str(path), "--corpus", str(tmp_path / "missing.txt"), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err
    for name, texts in (("t", TEXT.splitlines()), ("h", [ln[::-1] for ln in TEXT.splitlines()])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:3]))
    args = ["memorization", str(path), "--train", str(tmp_path / "t.jsonl"), "--heldout", str(tmp_path / "h.jsonl")]
    assert main([*args, "--prefix", "6", "--continuation", "5", "-n", "3", "--no-progress"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[1].split()[:2] == ["train", "3"] and rows[2].split()[:2] == ["heldout", "3"]
