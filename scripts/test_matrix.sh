#!/usr/bin/env bash
# Portability runs of the test suite: the same tests under each torch thread count and CPU kernel ISA, so that
# a comparison fragile to summation order or kernel choice shows up here and not on the next CI machine.
# Usage: [MATRIX_THREADS="1 2"] [MATRIX_ISAS="default avx2 avx512"] scripts/test_matrix.sh [pytest args...]
# (default: the whole suite, every combination). One line per run at the end; exit 1 if any run failed.
# ATEN_CPU_CAPABILITY picks ATen's vectorised kernels (default = scalar, avx2, avx512); avx512 runs only where
# /proc/cpuinfo lists avx512f.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=python3; [ -x .venv/bin/python ] && PY=.venv/bin/python
isas="${MATRIX_ISAS:-default avx2}"; [ -z "${MATRIX_ISAS:-}" ] && grep -qw avx512f /proc/cpuinfo 2>/dev/null && isas="$isas avx512"
summary=()
for threads in ${MATRIX_THREADS:-1 2}; do
  for isa in $isas; do
    start=$(date +%s)
    tail=$(OMP_NUM_THREADS=$threads ATEN_CPU_CAPABILITY=$isa "$PY" -m pytest -q -p no:cacheprovider "${@:-tests}" 2>&1 | tail -n 15)
    line=$(echo "$tail" | grep -E "passed|failed|error" | tail -n 1)
    echo "$tail" | grep -E "^(FAILED|ERROR)" || true
    summary+=("threads=$threads isa=$isa: $line ($(( $(date +%s) - start )) s)")
  done
done
printf '%s\n' "${summary[@]}"
! printf '%s\n' "${summary[@]}" | grep -qE "failed|error"
