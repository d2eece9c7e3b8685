#!/usr/bin/env bash
# The test command (README): the whole CPU suite; the 20 slowest tests are listed at the end (the suite's
# time goal: docs/performance.md, "Test suite"). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3; [ -x .venv/bin/python ] && PY=.venv/bin/python
# OpenMP threads sleep instead of spinning while they wait: on a shared 2-core box spinning starves the work
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
exec "$PY" -m pytest -q --durations=20 tests "$@"
