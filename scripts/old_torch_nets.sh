#!/usr/bin/env bash
# The compile nets on the oldest supported torch (requirements.txt: torch 2.9 to 2.13), in a venv of their own so
# that the project's .venv (CI's torch 2.13) is untouched. CPU only, like CI.
#
#   scripts/old_torch_nets.sh              # torch 2.9.1 (CPU wheel), venv in runs/venv_torch_old (kept: reruns are fast)
#   OLD_TORCH=2.10.0 scripts/old_torch_nets.sh          # any other version of the range
#   OLD_TORCH_INDEX=<url> scripts/old_torch_nets.sh     # where the CPU wheel comes from (see below)
#   scripts/old_torch_nets.sh -x -k flex                # extra arguments go to pytest
#
# Which nets: every test that runs torch.compile / dynamo (graph counts, recompiles, fullgraph, static shapes, the
# FA3 probe) in tests/test_cuda_nets.py and tests/test_cuda_wave2.py, without the inductor pipeline run
# (test_compiled_bf16_pipeline: ~15 minutes on 2 cores; add it with OLD_TORCH_FULL=1).
# The CPU wheel: PyTorch's CPU index by default (OLD_TORCH_INDEX); where only PyPI is reachable, set
# OLD_TORCH_INDEX=pypi: PyPI's Linux wheel is the CUDA build (GBs with its nvidia-* dependencies) but runs on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION="${OLD_TORCH:-2.9.1}"
INDEX="${OLD_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
VENV="${OLD_TORCH_VENV:-runs/venv_torch_old}"
PY=python3
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
have=$("$VENV/bin/python" -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null || echo none)
if [ "$have" != "$VERSION" ]; then
  if [ "$INDEX" = pypi ]; then
    timeout 1800 "$VENV/bin/pip" install -q "torch==$VERSION"
  else
    timeout 1800 "$VENV/bin/pip" install -q "torch==$VERSION" --index-url "$INDEX"
  fi
fi
# the rest of requirements-dev.txt except its torch and triton pins (triton pairs with each torch release; the
# compile nets need none: inductor on CPU generates C++)
timeout 900 "$VENV/bin/pip" install -q numpy sentencepiece zstandard huggingface_hub pytest
"$VENV/bin/python" -c "import torch; print('torch', torch.__version__)"
SELECT="compile or graph or static or flex or recompile or fullgraph or mutates or library_ops"
[ "${OLD_TORCH_FULL:-0}" = 1 ] || SELECT="($SELECT) and not compiled_bf16_pipeline"
exec timeout 3600 "$VENV/bin/python" -m pytest -q tests/test_cuda_nets.py tests/test_cuda_wave2.py -k "$SELECT" "$@"
