"""End-to-end runs of train_gpt.py on the offline sample: one process, two gloo ranks, reload, eval-only."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import HANG_TIMEOUT_S, ROOT, TINY, T

RUN_ENV = {**TINY, "ITERATIONS": "40", "MAX_WALLCLOCK_SECONDS": "0", "TRAIN_LOG_EVERY": "10",
           "MATRIX_LR": "0.02", "TTT_LORA_RANK": "4", "PHASED_TTT_PREFIX_DOCS": "2", "PHASED_TTT_NUM_PHASES": "1",
           "EVAL_TIME_BUDGET": "600", "OMP_NUM_THREADS": "1"}


def run(cmd, env, cwd, timeout=HANG_TIMEOUT_S):
    full = {**os.environ, **env}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        full.pop(k, None) if k not in env else None
    p = subprocess.run(cmd, env=full, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert p.returncode in (0, 3), p.stdout[-3000:] + p.stderr[-3000:]
    return p


def stage_line(text, stage):
    m = re.search(rf"^{stage} val_loss:(\S+) val_bpb:(\S+) eval_time", text, re.M)
    return float(m.group(1)), float(m.group(2))


@pytest.fixture(scope="module")
def single_run(sample, tmp_path_factory):
    d = tmp_path_factory.mktemp("run1")
    env = {**RUN_ENV, **sample, "RUN_ID": "one", "ARTIFACT_DIR": str(d / "art"), "SAVE_TOKEN_LOSSES": str(d / "tl")}
    p = run([sys.executable, os.path.join(ROOT, "train_gpt.py")], env, d)
    return d, env, p.stdout


def test_end_to_end_learns_and_writes_everything(single_run, sample):
    d, env, out = single_run
    rec = json.load(open(d / "art" / "run_record.json"))
    for stage in ("prequant", "quantized", "quantized_sliding", "quantized_ttt_phased"):
        assert stage in rec["stages"], stage
        assert rec["stages"][stage]["tokens"] == 4096
    assert re.search(r"^artifact_bytes:\d+ code_bytes:\d+ model_bytes:\d+", out, re.M)
    a = rec["artifact"]
    assert a["artifact_bytes"] == a["code_bytes"] + a["model_bytes"] == os.path.getsize(a["path"]) + a["code_bytes"]
    assert rec["train"]["steps"] == 40 and not rec["train"]["budget_compliant"]  # fixed-step mode
    c = rec["compliance"]  # the split check (tests/test_data_guard.py): the offline sample is clean, not canonical
    assert (c["val_docs_in_train"], c["train_shards"], c["val_docs"], c["canonical_split"]) == (0, 1, 40, False)
    assert re.search(r"^split_check: val_docs:40 val_docs_in_train:0 train_shards:1 ", out, re.M)
    assert (d / "logs" / "one.txt").exists() and (d / "art" / "prequant_model.pt").exists()
    assert rec["code_sha256"] in open(d / "logs" / "one.txt").read()
    # untrained model on the same validation tokens
    hp = T.Hyperparameters.from_env({**RUN_ENV, **sample})
    sp = T.load_tokenizer(hp.tokenizer_path, hp.vocab_size)
    luts = T.build_byte_luts(sp, hp.vocab_size)
    val = T.load_validation(hp, luts)
    rt = T.Runtime(0, 1, 0, torch.device("cpu"), False, 8, str(d), T.RunLogger([], False))
    untrained = T.eval_val(T.GPT(hp, luts.bos_id), val, hp, rt)
    assert rec["final"]["val_bpb"] < untrained.val_bpb - 1.0
    assert rec["stages"]["quantized"]["bytes"] == untrained.bytes


def test_reload_in_fresh_process_gives_same_bpb(single_run, tmp_path):
    d, env, out = single_run
    env2 = {**env, "EVAL_ONLY": "1", "ARTIFACT": str(d / "art" / "final_model.ptz"), "ARTIFACT_DIR": str(tmp_path),
            "RUN_ID": "reload", "TTT_ENABLED": "0", "EVAL_STRIDE": "0", "SAVE_TOKEN_LOSSES": ""}
    p = run([sys.executable, os.path.join(ROOT, "train_gpt.py")], env2, tmp_path)
    assert stage_line(p.stdout, "quantized") == stage_line(out, "quantized")


def test_over_limit_artifact_is_kept_and_fails_loudly(single_run, tmp_path, monkeypatch):
    d, env, _ = single_run
    art = d / "art" / "final_model.ptz"
    for k, v in {**env, "EVAL_ONLY": "1", "ARTIFACT": str(art), "ARTIFACT_DIR": str(tmp_path), "RUN_ID": "over",
                 "TTT_ENABLED": "0", "EVAL_STRIDE": "0", "TARGET_ARTIFACT_BYTES": "900", "SAVE_TOKEN_LOSSES": ""}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(T, "ARTIFACT_LIMIT_BYTES", 1000)
    assert T.main() == 3
    log = open(tmp_path / "log.txt").read()
    assert "ERROR: ARTIFACT OVER THE 16,000,000-BYTE LIMIT" in log and art.exists()
    assert json.load(open(tmp_path / "run_record.json"))["artifact"]["under_limit"] is False


def test_requant_sweep_without_training(single_run, tmp_path):
    d, env, _ = single_run
    env2 = {**env, "REQUANT_FROM": str(d / "art" / "prequant_model.pt"), "CLIP_MODE": "adaptive",
            "ARTIFACT_DIR": str(tmp_path), "RUN_ID": "requant", "TTT_ENABLED": "0", "EVAL_STRIDE": "0",
            "SAVE_TOKEN_LOSSES": ""}
    p = run([sys.executable, os.path.join(ROOT, "train_gpt.py")], env2, tmp_path)
    assert "training skipped" in p.stdout and "clip:adaptive offset" in p.stdout
    assert "GPTQ:reusing" in p.stdout and (d / "art" / "hessians.pt").exists()
    assert "train_loss" not in p.stdout
    rec = json.load(open(tmp_path / "run_record.json"))
    assert rec["stages"]["prequant"]["val_bpb"] == pytest.approx(
        json.load(open(d / "art" / "run_record.json"))["stages"]["prequant"]["val_bpb"], abs=1e-9)


def test_two_gloo_ranks_match_one_process(sample, tmp_path):
    env = {**RUN_ENV, **sample, "ITERATIONS": "5", "TTT_ENABLED": "0", "EVAL_STRIDE": "0", "WARMUP_STEPS": "0"}
    run([sys.executable, os.path.join(ROOT, "train_gpt.py")],
        {**env, "RUN_ID": "w1", "ARTIFACT_DIR": str(tmp_path / "w1")}, tmp_path)
    two = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(ROOT, "train_gpt.py")], {**env, "RUN_ID": "w2", "ARTIFACT_DIR": str(tmp_path / "w2")},
              tmp_path)
    r1 = json.load(open(tmp_path / "w1" / "run_record.json"))
    r2 = json.load(open(tmp_path / "w2" / "run_record.json"))
    assert r2["world_size"] == 2 and "grad_accum_steps:4" in two.stdout
    l1 = [e["train_loss"] for e in r1["train_log"]]
    l2 = [e["train_loss"] for e in r2["train_log"]]
    assert len(l1) == 5 and l1 == pytest.approx(l2, abs=2e-4)
    assert r1["stages"]["quantized"]["val_bpb"] == pytest.approx(r2["stages"]["quantized"]["val_bpb"], abs=2e-3)


def test_token_losses_written_in_validation_order(single_run):
    import numpy as np
    d, env, _ = single_run
    rec = json.load(open(d / "art" / "run_record.json"))
    for stage, r in rec["stages"].items():
        if stage == "prequant":
            continue
        arr = np.load(d / "tl" / f"{stage}.npy")
        assert arr.dtype == np.float32 and arr.shape == (r["tokens"],)
        assert float(arr.astype(np.float64).mean()) == pytest.approx(r["val_loss"], rel=1e-5)


def test_package_two_real_cpu_runs(single_run, sample, tmp_path):
    """Two short real CPU runs (two seeds) packaged as a (non-record) submission folder."""
    d, env, _ = single_run
    env2 = {**env, "SEED": "7", "RUN_ID": "two", "ARTIFACT_DIR": str(tmp_path / "two"), "SAVE_TOKEN_LOSSES": ""}
    run([sys.executable, os.path.join(ROOT, "train_gpt.py")], env2, tmp_path)
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "make_submission.py"), str(d / "art"), str(tmp_path / "two"),
           "--name", "cpu_test", "--author", "CI", "--github-id", "ci", "--blurb", "test", "--out-root", str(tmp_path / "subs")]
    refused = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
    assert refused.returncode != 0 and "budget" in (refused.stdout + refused.stderr).lower()
    ok = subprocess.run(cmd + ["--non-record"], capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    (folder,) = list((tmp_path / "subs").iterdir())
    names = {p.name for p in folder.iterdir()}
    assert {"train_gpt.py", "submission.json", "README.md"} <= names
    assert any(n.startswith("train_seed") for n in names)
    sub = json.load(open(folder / "submission.json"))
    assert sorted(sub["seeds"]) == [7, 1337] and sub.get("non_record") is True
    assert open(folder / "train_gpt.py", "rb").read() == open(os.path.join(ROOT, "train_gpt.py"), "rb").read()


def test_shipped_wrapper_is_the_same_program(single_run, tmp_path):
    """The minified, self-extracting form (short local names, squeezed spaces) trains, quantizes and scores
    exactly like the source it came from."""
    d, env, out = single_run
    shipped = tmp_path / "train_gpt.py"
    shipped.write_bytes((d / "art" / "train_gpt_shipped.py").read_bytes())
    env2 = {**env, "RUN_ID": "shipped", "ARTIFACT_DIR": str(tmp_path / "art"), "SAVE_TOKEN_LOSSES": ""}
    p = run([sys.executable, str(shipped)], env2, tmp_path)
    for stage in ("quantized", "quantized_sliding", "quantized_ttt_phased"):
        assert stage_line(p.stdout, stage) == stage_line(out, stage), stage
    pre = [json.load(open(p / "run_record.json"))["stages"]["prequant"] for p in (tmp_path / "art", d / "art")]
    assert [(r["val_loss"], r["val_bpb"]) for r in pre] == [(pre[1]["val_loss"], pre[1]["val_bpb"])] * 2
    assert (tmp_path / "art" / "final_model.ptz").read_bytes() == (d / "art" / "final_model.ptz").read_bytes()


def test_over_limit_packing_is_refitted_with_budget_clipping(single_run, tmp_path, monkeypatch):
    d, env, _ = single_run
    rec = json.load(open(d / "art" / "run_record.json"))
    limit = int(rec["artifact"]["artifact_bytes"] * 0.97)
    for k, v in {**env, "REQUANT_FROM": str(d / "art" / "prequant_model.pt"), "ARTIFACT_DIR": str(tmp_path),
                 "RUN_ID": "fit", "TTT_ENABLED": "0", "EVAL_STRIDE": "0", "SAVE_TOKEN_LOSSES": "",
                 "TARGET_ARTIFACT_BYTES": str(limit - 500)}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(T, "ARTIFACT_LIMIT_BYTES", limit)
    assert T.main() == 0
    log = open(tmp_path / "log.txt").read()
    over = re.search(r"artifact_fit: (\d+) bytes > (\d+): re-quantizing with CLIP_MODE=budget", log)
    # the same packing as the run's, but for LQER's SVD, which may round differently under another thread count
    assert over and int(over.group(2)) == limit and abs(int(over.group(1)) - rec["artifact"]["artifact_bytes"]) < 64
    cost = re.search(r"artifact_fit: the fitted artifact costs ([-+]\S+) bpb", log)
    assert cost and float(cost.group(1)) > -0.01
    fit = json.load(open(tmp_path / "run_record.json"))
    assert fit["artifact"]["under_limit"] and fit["artifact"]["artifact_bytes"] <= limit
    assert "quantized_over_limit" in fit["stages"]
