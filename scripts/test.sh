#!/usr/bin/env bash
# The test command (README): the whole CPU suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3; [ -x .venv/bin/python ] && PY=.venv/bin/python
exec "$PY" -m pytest -q tests "$@"
