#!/usr/bin/env bash
# The test command (README): the whole CPU suite; the 20 slowest tests are listed at the end (the suite's
# time goal: docs/performance.md, "Test suite"). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3; [ -x .venv/bin/python ] && PY=.venv/bin/python
# OpenMP threads sleep instead of spinning while they wait: on a shared 2-core box spinning starves the work
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
# Serial, the suite keeps one core busy (its tiny models are Python-bound): with pytest-xdist (requirements-dev)
# one worker per core (TEST_WORKERS), each test file whole in one worker (its module fixtures run once), one
# torch thread each. TEST_WORKERS=0: serial.
workers="${TEST_WORKERS:-$(( $(nproc) < 2 ? 1 : 2 ))}"
parallel=()
if [ "$workers" -gt 1 ] && "$PY" -c "import xdist" 2>/dev/null; then
  parallel=(-n "$workers" --dist loadfile)
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
exec "$PY" -m pytest -q --durations=20 "${parallel[@]}" tests "$@"
