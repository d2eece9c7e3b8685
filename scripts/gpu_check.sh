#!/usr/bin/env bash
# One command for a fresh single H100/H200 with no network (about 8 minutes), or `--cpu` (about 2-3 minutes
# on 2 cores) for the same pipeline on CPU:
#   (a) environment report  (b) missing packages from wheels/ (never the network)  (c) scripts/gpu_check.py:
#   every CUDA path vs its CPU reference  (d) bench/throughput.py: sota step time + MFU (torch.compile, global
#   batch by 8 micro-steps)  (e) a short end-to-end train_gpt.py run (train, quantize, pack, reload, eval)
#   (f) the final pass/fail table.
# Results: $GPU_CHECK_OUT (default: $OUT if set, else runs/gpu_check_<time>): env.txt, checks.json,
# throughput.json, e2e/ (run dir), *.log.
# Knobs (env): GPU_CHECK_STEPS (timed throughput steps, 5), BENCH_GRAD_ACCUM (micro-steps, 8) and
# TRAIN_BATCH_TOKENS (global batch) to shrink the throughput step, E2E_SECONDS (MAX_WALLCLOCK_SECONDS, 90),
# E2E_VAL_TOKENS (VAL_MAX_TOKENS of the e2e eval, 131072), GPU_CHECK_SKIP_E2E=1, GPU_CHECK_SKIP_THROUGHPUT=1.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=cuda
[ "${1:-}" = "--cpu" ] && MODE=cpu
PY=python3; [ -x .venv/bin/python ] && PY=.venv/bin/python
OUTDIR="${GPU_CHECK_OUT:-${OUT:-runs/gpu_check_$(date +%Y%m%d_%H%M%S)}}"
mkdir -p "$OUTDIR"
T0=$(date +%s)
stage() { echo; echo "=== $* ($(( $(date +%s) - T0 ))s)"; }

stage "(a) environment"
{
  echo "mode: $MODE  host: $(hostname)  date: $(date -u +%FT%TZ)  commit: $(git rev-parse --short HEAD 2>/dev/null || echo none)"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv,noheader 2>&1 | sed 's/^/gpu: /'
  else
    echo "gpu: nvidia-smi not found"
  fi
  $PY - <<'PYEOF' 2>&1
import platform, sys
print(f"python: {platform.python_version()}  ({sys.executable})")
try:
    import torch
    print(f"torch: {torch.__version__} cuda:{torch.version.cuda} available:{torch.cuda.is_available()} "
          + (f"device:{torch.cuda.get_device_name(0)} cc:{torch.cuda.get_device_capability(0)}" if torch.cuda.is_available() else ""))
except Exception as e:
    print(f"torch: NOT IMPORTABLE ({e})")
for mod in ("triton", "flash_attn_interface", "zstandard", "sentencepiece", "numpy"):
    try:
        m = __import__(mod)
        print(f"{mod}: {getattr(m, '__version__', 'importable')}")
    except Exception as e:
        print(f"{mod}: not importable ({type(e).__name__})")
PYEOF
} | tee "$OUTDIR/env.txt"
[ "$MODE" = cuda ] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi > "$OUTDIR/nvidia-smi.txt" 2>&1

stage "(b) packages (wheels/ only, never the network)"
for mod in zstandard sentencepiece; do
  if $PY -c "import $mod" 2>/dev/null; then
    echo "$mod: present"
  elif [ -d wheels ]; then
    echo "$mod: missing, installing from wheels/"
    $PY -m pip install --no-index --find-links wheels/ "$mod" 2>&1 | tail -2
  else
    echo "$mod: MISSING and no wheels/ folder (artifact/tokenizer stages will fail)"
  fi
done
if [ ! -f data/datasets/offline_sample_sp1024/fineweb_train_000000.bin ]; then
  echo "building the offline sample dataset (stdlib text, no network)"
  $PY data/build_offline_sample.py > "$OUTDIR/build_sample.log" 2>&1 || echo "offline sample build FAILED (see build_sample.log)"
fi

stage "(c) correctness checks: scripts/gpu_check.py"
if [ "$MODE" = cpu ]; then
  timeout 240 $PY scripts/gpu_check.py --cpu --json "$OUTDIR/checks.json" 2>&1 | tee "$OUTDIR/checks.log"
else
  timeout 150 $PY scripts/gpu_check.py --json "$OUTDIR/checks.json" 2>&1 | tee "$OUTDIR/checks.log"
fi

stage "(d) throughput"
if [ "${GPU_CHECK_SKIP_THROUGHPUT:-0}" != 1 ]; then
  if [ "$MODE" = cpu ]; then
    BENCH_GRAD_ACCUM="${BENCH_GRAD_ACCUM:-2}" TRAIN_BATCH_TOKENS="${TRAIN_BATCH_TOKENS:-2048}" \
      timeout 120 $PY bench/throughput.py --preset cpu_smoke --steps "${GPU_CHECK_STEPS:-2}" --warmup 1 \
      --peak-reps 3 --json "$OUTDIR/throughput.json" 2>&1 | tee "$OUTDIR/throughput.log"
  else
    # sota on one GPU: the 786,432-token global batch as 8 micro-steps of 98,304 tokens (as train_gpt does).
    timeout 150 $PY bench/throughput.py --preset sota --steps "${GPU_CHECK_STEPS:-5}" --warmup 3 \
      --json "$OUTDIR/throughput.json" 2>&1 | tee "$OUTDIR/throughput.log"
  fi
fi

stage "(e) end-to-end train_gpt.py"
if [ "${GPU_CHECK_SKIP_E2E:-0}" != 1 ]; then
  E2E=(RUN_ID=gpu_check_e2e "ARTIFACT_DIR=$OUTDIR/e2e")
  if [ "$MODE" = cpu ]; then
    E2E+=(PRESET=cpu_smoke "MAX_WALLCLOCK_SECONDS=${E2E_SECONDS:-20}" TTT_ENABLED=0 EVAL_STRIDE=0
          "VAL_MAX_TOKENS=${E2E_VAL_TOKENS:-8192}")
    LIMIT=400  # generous: a loaded shared CPU can be 10x slower than the ~20 s this takes
  else
    E2E+=(PRESET=sota "MAX_WALLCLOCK_SECONDS=${E2E_SECONDS:-90}" "VAL_MAX_TOKENS=${E2E_VAL_TOKENS:-131072}"
          PHASED_TTT_PREFIX_DOCS=32 EVAL_STRIDE=0 WARMUP_STEPS=3)
    if ! ls data/datasets/fineweb10B_sp8192_lossless_caps_caseops_v1_reserved/fineweb_train_*.bin >/dev/null 2>&1; then
      echo "FineWeb sp8192 CaseOps not present: sota architecture on the offline sample (vocab 1024)"
      E2E+=(VOCAB_SIZE=1024 CASEOPS_ENABLED=0 DATA_PATH=./data/datasets/offline_sample_sp1024
            TOKENIZER_PATH=./data/tokenizers/offline_sample_1024_bpe.model)
    fi
    LIMIT=300
  fi
  echo "env: ${E2E[*]}"
  env "${E2E[@]}" timeout $LIMIT $PY train_gpt.py > "$OUTDIR/e2e.log" 2>&1
  echo "train_gpt.py exit $?"
  grep -E "^(stopping_early|budget|artifact_bytes|final |ERROR|config error)|val_bpb" "$OUTDIR/e2e.log" | tail -12
fi

stage "(f) summary"
$PY scripts/gpu_check.py --summarize "$OUTDIR" | tee "$OUTDIR/summary.txt"
RC=${PIPESTATUS[0]}
echo "results in $OUTDIR ($(( $(date +%s) - T0 ))s total)"
exit $RC
