"""The Triton kernels against their eager references under TRITON_INTERPRET=1 (CPU), values and gradients,
fp32 and bf16, sizes that are not multiples of the block."""
import os
import subprocess
import sys

import pytest

from conftest import HANG_TIMEOUT_S, ROOT, T

pytestmark = pytest.mark.skipif(not T.HAS_TRITON, reason="triton not installed (pip install -r requirements-dev.txt)")


@pytest.mark.parametrize("case", ["ce", "mlp"])
def test_triton_kernel_matches_reference(case):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    p = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "kernel_cases.py"), case], env=env,
                       capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
    assert p.returncode == 0 and f"{case} ok" in p.stdout, p.stdout[-2000:] + p.stderr[-3000:]


def test_fused_kernels_only_on_cuda_training():
    import torch
    x = torch.zeros(2)
    assert not T.use_fused_kernels(x, True)  # CPU: eager reference
