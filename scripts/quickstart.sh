#!/usr/bin/env bash
# The newcomer's main job: build the offline sample if missing, then run the whole pipeline
# (train -> Hessians -> GPTQ -> artifact -> reload -> plain/sliding/phased-TTT eval) with PRESET=cpu_smoke.
# Extra env vars pass through (e.g. MAX_WALLCLOCK_SECONDS=60 scripts/quickstart.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3; [ -x .venv/bin/python ] && PY=.venv/bin/python
t0=$(date +%s)
if [ ! -f data/datasets/offline_sample_sp1024/fineweb_val_000000.bin ] || [ ! -f data/tokenizers/offline_sample_1024_bpe.model ]; then
  "$PY" data/build_offline_sample.py
fi
t1=$(date +%s)
echo "quickstart: sample ready in $((t1 - t0))s"
PRESET=cpu_smoke RUN_ID="${RUN_ID:-quickstart_$(date +%Y%m%d_%H%M%S)}" "$PY" train_gpt.py
echo "quickstart: done in $(( $(date +%s) - t0 ))s"
