#!/usr/bin/env bash
# Set everything up, then run the main job:
#   bash scripts/run.sh              JupyterLab opened on notebooks/00_tour.ipynb
#   bash scripts/run.sh --headless   train `tiny` on the built-in Shakespeare, save it, print samples
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
if [[ "${1:-}" == "--headless" ]]; then
  mkdir -p runs
  tinygpt train --preset tiny --steps "${STEPS:-300}" --val-every 100 --out runs/tiny.tinygpt --overwrite
  tinygpt sample runs/tiny.tinygpt --prompt "ROMEO:" --tokens 300 --temperature 0.8 --seed 0 --num-samples 2
  tinygpt inspect runs/tiny.tinygpt | head -8
else
  exec jupyter lab notebooks/00_tour.ipynb
fi
