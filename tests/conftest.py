"""Shared fixtures: the offline sample dataset (built once per test run) and tiny configs."""
import datetime
import os
import subprocess
import sys

# Before torch loads OpenMP: its threads spin-wait by default, which on 2 cores shared with other processes (the
# suite's own subprocesses, a loaded CI box) starves the thread doing the work: test_model.py took 476 s spinning,
# 181 s passive at load ~13 (docs/performance.md). Subprocesses inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Subprocess time-outs guard against hangs, never against slowness: a loaded 2-core box runs 5-10x slower
HANG_TIMEOUT_S = 1800
sys.path.insert(0, ROOT)
# OMP_NUM_THREADS, when set, is the thread count the suite runs at (the portability runs vary it); else up to 2
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, min(2, os.cpu_count() or 1))))

import train_gpt as T  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import gpu_check  # noqa: E402  (scripts/gpu_check.py owns the shared test helpers it also needs)


@pytest.fixture(scope="session")
def sample(tmp_path_factory):
    """A real SentencePiece tokenizer + shards built offline from the Python stdlib (data/build_offline_sample.py)."""
    out = tmp_path_factory.mktemp("sample")
    subprocess.run([sys.executable, os.path.join(ROOT, "data", "build_offline_sample.py"), "--out-root", str(out),
                    "--max-docs", "400", "--val-docs", "40"], check=True, capture_output=True)
    return {"DATA_PATH": str(out / "datasets" / "offline_sample_sp1024"),
            "TOKENIZER_PATH": str(out / "tokenizers" / "offline_sample_1024_bpe.model")}


TINY = dict(PRESET="cpu_smoke", NUM_LAYERS="4", MODEL_DIM="64", NUM_HEADS="2", NUM_KV_HEADS="1",
            TRAIN_SEQ_LEN="128", EVAL_SEQ_LEN="128", TRAIN_BATCH_TOKENS="2048", VAL_BATCH_TOKENS="32768",
            LOOP_START="1", LOOP_END="2", NUM_LOOPS="1", PARALLEL_START_LAYER="3", XSA_LAST_N="4", ROPE_DIMS="16",
            GATE_WINDOW="8", VAL_MAX_TOKENS="4096", QUANT_MIN_NUMEL="1024", WARMUP_STEPS="1",
            GPTQ_CALIBRATION_BATCHES="2", CALIBRATION_BATCH_TOKENS="1024", TTT_EVAL_SEQ_LEN="128",
            TTT_CHUNK_SIZE="32", TTT_BATCH_SIZE="8", TTT_LORA_RANK="4", PHASED_TTT_PREFIX_DOCS="4",
            GLOBAL_TTT_CHUNK_TOKENS="1024", EVAL_STRIDE="64")


def tiny_hp(**over) -> "T.Hyperparameters":
    env = {**TINY, **{k.upper(): str(v) for k, v in over.items()}}
    return T.Hyperparameters.from_env(env)


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Give every parameter (zero-initialised gates and projections included) a random value."""
    return gpu_check.randomize(model, seed, scale)


def cpu_runtime(tmp_path, world=1, rank=0, grad_accum=None):
    """The runtime of rank `rank` of `world` on CPU; gradient accumulation 8 // world as train_gpt's, unless given."""
    return T.Runtime(rank, world, 0, torch.device("cpu"), False, grad_accum or 8 // world, str(tmp_path),
                     T.RunLogger([], enabled=False))


@pytest.fixture
def fake_fa3(monkeypatch):
    """tests/fake_fa3's stand-in importable as `flash_attn_interface` for one test (loaded once per process: its
    custom ops register on load); .CALLS counts its real (non-fake) forward and backward calls."""
    from bench.memory_trace import fa3_stand_in
    mod = fa3_stand_in()
    monkeypatch.setitem(sys.modules, "flash_attn_interface", mod)
    monkeypatch.setattr(mod, "CALLS", {"forward": 0, "backward": 0})
    return mod


def _rank_entry(rank, world, worker, pg_file, out):
    # a collective that one rank never reaches fails after a minute instead of hanging the suite
    dist.init_process_group("gloo", init_method=f"file://{pg_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    result = worker(rank, world)
    if rank == 0:
        torch.save(result, out)
    dist.barrier()
    dist.destroy_process_group()
    # done and saved: skip the interpreter's teardown, where gloo's threads once aborted a loaded CI machine's rank
    # ("terminate called without an active exception", SIGABRT) after every collective had finished
    sys.stdout.flush()
    os._exit(0)


def run_on_ranks(worker, tmp_path, worlds=(1, 2)) -> dict:
    """Run worker(rank, world) -> result on each world size of gloo ranks; {world: rank 0's result}."""
    outs = {}
    for world in worlds:
        out = str(tmp_path / f"result_w{world}.pt")
        mp.spawn(_rank_entry, args=(world, worker, str(tmp_path / f"pg_w{world}"), out), nprocs=world, join=True)
        outs[world] = torch.load(out)
    return outs
