#!/usr/bin/env bash
# Example env-var sweep: one train_gpt.py run per value of one env var, each in its own run dir
# (ARTIFACT_DIR=$RUNS_ROOT/sweep_<name>_<value>, RUN_ID=sweep_<name>_<value>), then a summary table.
#
#   SWEEP_VAR=MATRIX_LR SWEEP_VALUES="0.020 0.026 0.032" scripts/sweep.sh
#   PRESET=cpu_smoke NPROC=1 SWEEP_VAR=EMA_DECAY SWEEP_VALUES="0.99 0.995" scripts/sweep.sh
#
# Every other env var (PRESET, SEED, ITERATIONS, MAX_WALLCLOCK_SECONDS, ...) passes through to
# every run unchanged. A run whose dir already holds run_record.json is skipped (FORCE=1 reruns it).
#   NPROC      processes per node for torchrun (default 8)
#   RUNS_ROOT  parent folder of the run dirs (default runs)
#   TRAIN_CMD  the launcher (default: python -m torch.distributed.run --standalone
#              --nproc_per_node=$NPROC train_gpt.py)
#   DRY_RUN=1  print the commands only
set -uo pipefail
cd "$(dirname "$0")/.."

SWEEP_VAR=${SWEEP_VAR:-MATRIX_LR}
SWEEP_VALUES=${SWEEP_VALUES:-"0.020 0.026 0.032"}
SWEEP_NAME=${SWEEP_NAME:-$(printf '%s' "$SWEEP_VAR" | tr '[:upper:]' '[:lower:]')}
NPROC=${NPROC:-8}
RUNS_ROOT=${RUNS_ROOT:-runs}
PYTHON=${PYTHON:-python}
TRAIN_CMD=${TRAIN_CMD:-"$PYTHON -m torch.distributed.run --standalone --nproc_per_node=$NPROC train_gpt.py"}

if ! [[ "$SWEEP_VAR" =~ ^[A-Z][A-Z0-9_]*$ ]]; then
  echo "sweep.sh: SWEEP_VAR=$SWEEP_VAR is not an env var name" >&2; exit 2
fi

dirs=()
failed=()
for value in $SWEEP_VALUES; do
  id="sweep_${SWEEP_NAME}_${value//\//_}"
  dir="$RUNS_ROOT/$id"
  dirs+=("$dir")
  if [[ -f "$dir/run_record.json" && "${FORCE:-0}" != "1" ]]; then
    echo "== $id: $dir/run_record.json exists, skipped (FORCE=1 to rerun)"
    continue
  fi
  echo "== $id: $SWEEP_VAR=$value RUN_ID=$id ARTIFACT_DIR=$dir $TRAIN_CMD"
  [[ "${DRY_RUN:-0}" == "1" ]] && continue
  mkdir -p "$dir"
  # shellcheck disable=SC2086  # TRAIN_CMD is a command line
  if ! env "$SWEEP_VAR=$value" RUN_ID="$id" ARTIFACT_DIR="$dir" $TRAIN_CMD 2>&1 | tee "$dir/console.txt"; then
    echo "== $id: FAILED (see $dir/console.txt)"
    failed+=("$id")
  fi
done

[[ "${DRY_RUN:-0}" == "1" ]] && exit 0
echo
echo "== sweep $SWEEP_VAR over: $SWEEP_VALUES"
"$PYTHON" scripts/summarize_runs.py "${dirs[@]}"
if ((${#failed[@]})); then
  echo "failed: ${failed[*]}"
  exit 1
fi
