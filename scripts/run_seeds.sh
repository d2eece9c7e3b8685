#!/usr/bin/env bash
# The 3-seed loop of a record attempt: one train_gpt.py run per seed, each in its own run dir
# ($RUNS_ROOT/<NAME>_seed<seed>, RUN_ID the same), a summary table, then the commands that
# package the runs and test their significance.
#
#   NAME=my_try scripts/run_seeds.sh                    # seeds 42 0 1234 on 8 GPUs
#   NAME=smoke PRESET=cpu_smoke NPROC=1 SEEDS="1 2" scripts/run_seeds.sh
#
# Every other env var (PRESET, MATRIX_LR, ...) passes through to every run unchanged.
#   SEEDS      (default "42 0 1234")   NPROC (default 8)   RUNS_ROOT (default runs)
#   TRAIN_CMD  launcher (default: python -m torch.distributed.run --standalone --nproc_per_node=$NPROC train_gpt.py)
#   FORCE=1    rerun a seed whose run dir already holds run_record.json (default: skip it)
set -uo pipefail
cd "$(dirname "$0")/.."

NAME=${NAME:-seeds}
SEEDS=${SEEDS:-"42 0 1234"}
NPROC=${NPROC:-8}
RUNS_ROOT=${RUNS_ROOT:-runs}
PYTHON=${PYTHON:-python}
TRAIN_CMD=${TRAIN_CMD:-"$PYTHON -m torch.distributed.run --standalone --nproc_per_node=$NPROC train_gpt.py"}

dirs=()
failed=()
for seed in $SEEDS; do
  id="${NAME}_seed${seed}"
  dir="$RUNS_ROOT/$id"
  dirs+=("$dir")
  if [[ -f "$dir/run_record.json" && "${FORCE:-0}" != "1" ]]; then
    echo "== $id: $dir/run_record.json exists, skipped (FORCE=1 to rerun)"
    continue
  fi
  echo "== $id: SEED=$seed RUN_ID=$id ARTIFACT_DIR=$dir $TRAIN_CMD"
  mkdir -p "$dir"
  # shellcheck disable=SC2086  # TRAIN_CMD is a command line
  if ! SEED="$seed" RUN_ID="$id" ARTIFACT_DIR="$dir" $TRAIN_CMD 2>&1 | tee "$dir/console.txt"; then
    echo "== $id: FAILED (see $dir/console.txt)"
    failed+=("$id")
  fi
done

echo
echo "== $NAME: seeds $SEEDS"
"$PYTHON" scripts/summarize_runs.py "${dirs[@]}"
echo
echo "Next steps:"
echo "  $PYTHON scripts/significance.py --runs ${dirs[*]} --ref sota"
echo "  $PYTHON scripts/make_submission.py ${dirs[*]} --name $NAME --author \"<name>\" --github-id <id> --blurb \"<what is new>\""
echo "  $PYTHON scripts/log_run.py ${dirs[*]} --learned \"<what these runs taught us>\""
if ((${#failed[@]})); then
  echo "failed: ${failed[*]}"
  exit 1
fi
