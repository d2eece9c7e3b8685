"""bench/flops.py against torch's FlopCounterMode, bench/throughput.py on CPU, scripts/gpu_check.sh --cpu.

GPU_CHECK_SKIP=1 skips the (~40 s) gpu_check.sh --cpu run."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import ROOT, TINY, T

sys.path.insert(0, ROOT)
from bench.flops import (keys_per_query, keys_per_query_from_ids, layer_applications,  # noqa: E402
                         training_flops_per_token)


def counted(model, ids, y) -> dict:
    """FlopCounterMode's count of one forward + backward, split by aten op."""
    with FlopCounterMode(display=False) as fc:
        model(ids, y).backward()
    return {str(k).split(".")[-1]: v for k, v in fc.get_flop_counts()["Global"].items()}


def rows_with_docs(hp, bos):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, hp.vocab_size, (2, hp.train_seq_len), generator=g)
    ids[0, 40], ids[0, 41], ids[1, 100] = bos, bos, bos
    return ids, torch.randint(0, hp.vocab_size, ids.shape, generator=g)


@pytest.mark.parametrize("looping", [False, True])
def test_flops_match_flop_counter(looping):
    """Matmul part exactly; attention with the counter's convention for what it can see: the reference
    attention (a per-document loop of plain matmuls, counted as bmm) computes the full n x n square per
    document = the 'dense_doc' convention. The model's SDPA path on CPU is not counted at all by
    FlopCounterMode (the CPU flash kernel has no FLOP formula), so there the counter sees only matmuls."""
    hp = T.Hyperparameters.from_env(dict(TINY))
    bos = 1
    ids, y = rows_with_docs(hp, bos)
    torch.manual_seed(0)
    model = T.GPT(hp, bos, "reference")
    model.looping = looping
    c = counted(model, ids, y)
    n = ids.numel()
    r = training_flops_per_token(hp, looping, keys=keys_per_query_from_ids(ids, bos, "dense_doc"))
    matmul = r["linear"] + r["gates"] + r["head"] + r["smear"]
    assert c["mm"] / n == pytest.approx(matmul, rel=1e-9)
    assert c["bmm"] / n == pytest.approx(r["attention"], rel=1e-9)
    assert sum(c.values()) / n == pytest.approx(r["total"], rel=0.02)
    # the SDPA model: the counter sees the matmuls only (documented above)
    model.attn_backend = "sdpa"
    model.zero_grad(set_to_none=True)
    c2 = counted(model, ids, y)
    assert c2.get("mm", 0) / n == pytest.approx(matmul, rel=1e-9)
    if sum(c2.values()) != c2.get("mm", 0):  # a torch whose counter does count SDPA: full T x T per row
        r2 = training_flops_per_token(hp, looping, attention="dense_row")
        assert sum(c2.values()) / n == pytest.approx(r2["total"], rel=0.02)


def test_flop_model_conventions():
    hp = T.Hyperparameters.from_env({"PRESET": "sota"})
    assert layer_applications(hp, False) == 11 and layer_applications(hp, True) == 17
    assert keys_per_query(2048, None) == pytest.approx(1024.5)
    assert keys_per_query(2048, 500) == pytest.approx(250.5)
    assert keys_per_query(2048, 5000, "dense_doc") == 2048
    assert keys_per_query(2048, 500, "dense_row") == 2048
    ids = torch.tensor([[1, 5, 5, 1, 5, 5, 5, 5]])
    assert keys_per_query_from_ids(ids, 1) == pytest.approx((6 + 15) / 8)  # docs of 3 and 5 tokens
    assert keys_per_query_from_ids(ids, 1, "dense_doc") == pytest.approx((9 + 25) / 8)
    r = training_flops_per_token(hp, False)
    d, V = hp.model_dim, hp.vocab_size
    assert r["head"] == 6 * d * V
    # without attention and gates, the count is the familiar 6 x (matmul parameters)
    assert r["linear"] + r["head"] == pytest.approx(6 * r["matmul_params"])
    assert training_flops_per_token(hp, True)["total"] > r["total"]


def test_throughput_runs_on_cpu(tmp_path):
    out = tmp_path / "t.json"
    env = {**os.environ, "NUM_LAYERS": "2", "MODEL_DIM": "64", "NUM_HEADS": "2", "NUM_KV_HEADS": "1",
           "TRAIN_SEQ_LEN": "128", "TRAIN_BATCH_TOKENS": "1024", "XSA_LAST_N": "2", "LOOP_START": "0",
           "LOOP_END": "1", "PARALLEL_START_LAYER": "1", "GATE_WINDOW": "8"}
    env.pop("PRESET", None)
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "throughput.py"), "--steps", "2", "--warmup", "1",
                        "--grad-accum", "2", "--peak-sizes", "128,256", "--peak-reps", "2", "--data", "synthetic",
                        "--json", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "| tokens/s" in p.stdout and "| MFU (vs fp32 peak)" in p.stdout and "forward" in p.stdout
    r = json.loads(out.read_text())
    s = r["step"]
    assert r["preset"] == "cpu_smoke" and s["steps"] == 2 and s["tokens_per_step"] == 1024
    assert s["ms_per_step"] > 0 and r["mfu"] > 0 and r["peak_fp32"] > 0  # MFU itself is noisy on a shared CPU
    assert set(s["phase_ms"]) == {"forward", "backward", "optimizer", "ema"}


@pytest.mark.skipif(os.environ.get("GPU_CHECK_SKIP") == "1", reason="GPU_CHECK_SKIP=1")
def test_gpu_check_cpu_mode(tmp_path):
    env = {**os.environ, "GPU_CHECK_OUT": str(tmp_path / "gc"), "E2E_KEEP_ARTIFACT": "1"}
    for k in [k for k in env if k in ("PRESET", "OUT")]:
        env.pop(k)
    p = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), "--cpu"], env=env,
                       capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-2000:])
    summary = (tmp_path / "gc" / "summary.txt").read_text()
    assert " 0 fail" in summary and "end_to_end" in summary and "throughput" in summary
    checks = json.loads((tmp_path / "gc" / "checks.json").read_text())["results"]
    assert checks and all(c["ok"] is not False for c in checks) and sum(c["ok"] is True for c in checks) >= 8
    record = json.loads((tmp_path / "gc" / "e2e_record.json").read_text())
    kept = (tmp_path / "gc" / "e2e_model.ptz").read_bytes()  # E2E_KEEP_ARTIFACT: the codes for compress_bench
    assert len(kept) == record["artifact"]["model_bytes"]
    assert T.unpack_artifact(kept)
