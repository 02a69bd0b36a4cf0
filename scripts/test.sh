#!/usr/bin/env bash
# Set everything up, then run the whole test suite: unit tests, every notebook (nbmake) and the browser tests.
#   bash scripts/test.sh            everything
#   bash scripts/test.sh -m "not browser and not slow"   the fast suite (extra args go to pytest)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The browser tests drive JupyterLab in Debian's Chromium: install it once where it is missing (as root).
if [[ ! -x ${TINYGPT_CHROMIUM:-/usr/bin/chromium} && ${TINYGPT_SKIP_BROWSER:-0} != 1 ]] && command -v apt-get >/dev/null \
  && [[ $(id -u) == 0 ]]; then
  echo "installing chromium for the browser tests..."
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null
fi
. .venv/bin/activate
export TINYGPT_CACHE_DIR=${TINYGPT_CACHE_DIR:-$PWD/.venv/tinygpt-cache}
export TINYGPT_THREADS=${TINYGPT_THREADS:-1}  # two pytest workers on two cores: one torch thread each in notebooks
python -m pytest -n 2 tests notebooks --nbmake --nbmake-kernel=python3 --nbmake-timeout=300 "$@"
