#!/usr/bin/env bash
# Set everything up, then run the whole test suite: unit tests and every notebook (nbmake).
#   bash scripts/test.sh            everything
#   bash scripts/test.sh -m "not browser and not slow"   the fast suite (extra args go to pytest)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export TINYGPT_CACHE_DIR=${TINYGPT_CACHE_DIR:-$PWD/.venv/tinygpt-cache}
python -m pytest -n 2 tests notebooks --nbmake --nbmake-kernel=python3 --nbmake-timeout=180 "$@"
