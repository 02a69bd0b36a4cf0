#!/usr/bin/env bash
# Create .venv (if needed) and install tinygpt with everything it needs, reproducibly:
# CPU torch 2.13.0 first (pip finds the local wheel), then the package under constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.tinygpt-installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
  python -m pip install -q --disable-pip-version-check "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
  python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev]" 2>&1 | grep -v "is ignored" || true
  python -c "import torch, tinygpt; assert torch.__version__.startswith('2.13.0'), torch.__version__"
  echo "$want" > "$stamp"
fi
