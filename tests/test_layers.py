"""The layered import contract (pyproject.toml [tool.importlinter]): imports point down only."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contract_is_kept():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    out = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "2 kept, 0 broken" in out.stdout


def test_pyproject_lists_every_package():
    """A wheel ships exactly the packages pyproject.toml names: every folder with an __init__.py must be there."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "tinygpt").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    found.add("tinygpt.widgets")
    assert listed == found, f"missing {sorted(found - listed)}, stale {sorted(listed - found)}"
