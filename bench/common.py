"""Shared plumbing for the comparison benches (arch_bench, quant_bench, ttt_bench).

Everything here calls train_gpt.py's public API; nothing re-implements a stage. Hyperparameters are built
exactly as train_gpt.py builds them (PRESET + UPPER_CASE overrides); the benches pass their own overrides
first and any UPPER_CASE field set in the environment wins (e.g. DATA_PATH=... for other data).
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import hashlib  # noqa: E402
import importlib.util  # noqa: E402

import torch  # noqa: E402

# BENCH_TRAIN_GPT=<path>: benchmark that copy of train_gpt.py (e.g. `git show HEAD:train_gpt.py > /tmp/t.py`)
# instead of the working tree's, so a bench can pin a committed version while the script is being edited.
TRAIN_GPT_PATH = os.environ.get("BENCH_TRAIN_GPT") or os.path.join(ROOT, "train_gpt.py")
if os.environ.get("BENCH_TRAIN_GPT"):
    _spec = importlib.util.spec_from_file_location("train_gpt", TRAIN_GPT_PATH)
    T = importlib.util.module_from_spec(_spec)
    sys.modules["train_gpt"] = T
    _spec.loader.exec_module(T)
else:
    import train_gpt as T  # noqa: E402
with open(TRAIN_GPT_PATH, "rb") as _f:
    TRAIN_GPT_SHA = hashlib.sha256(_f.read()).hexdigest()[:12]

SAMPLE_DATA = os.path.join(ROOT, "data", "datasets", "offline_sample_sp1024")
SAMPLE_TOKENIZER = os.path.join(ROOT, "data", "tokenizers", "offline_sample_1024_bpe.model")

# The cpu_smoke shape: the sota features shrunk to 2 CPU cores. Applied to every preset a bench compares
# so that only the features differ.
CPU_SHAPE = dict(
    DATA_PATH=SAMPLE_DATA, TOKENIZER_PATH=SAMPLE_TOKENIZER, VOCAB_SIZE="1024", CASEOPS_ENABLED="0",
    NUM_LAYERS="6", MODEL_DIM="128", NUM_HEADS="4", NUM_KV_HEADS="2", TRAIN_SEQ_LEN="256",
    EVAL_SEQ_LEN="256", TRAIN_BATCH_TOKENS="8192", VAL_BATCH_TOKENS="131072", VAL_MAX_TOKENS="32768",
    WARMUP_STEPS="2", TRAIN_LOG_EVERY="1000000")

# --smoke: a model small enough that a whole bench runs in a few seconds (same as tests/conftest.py TINY).
SMOKE_SHAPE = dict(
    NUM_LAYERS="4", MODEL_DIM="64", NUM_HEADS="2", NUM_KV_HEADS="1", TRAIN_SEQ_LEN="128", EVAL_SEQ_LEN="128",
    TRAIN_BATCH_TOKENS="2048", VAL_BATCH_TOKENS="32768", VAL_MAX_TOKENS="4096", WARMUP_STEPS="1",
    CALIBRATION_BATCH_TOKENS="1024", GPTQ_CALIBRATION_BATCHES="2", QUANT_MIN_NUMEL="1024", GATE_WINDOW="8",
    XSA_LAST_N="4", LOOP_START="1", LOOP_END="2", NUM_LOOPS="1", PARALLEL_START_LAYER="3", ROPE_DIMS="16",
    TTT_EVAL_SEQ_LEN="128", TTT_CHUNK_SIZE="32", TTT_BATCH_SIZE="8", TTT_LORA_RANK="4",
    PHASED_TTT_PREFIX_DOCS="4", GLOBAL_TTT_CHUNK_TOKENS="1024", EVAL_STRIDE="64",
    GPTQ_RESERVE_SECONDS="0")  # a 2-3 s budget: any reserve is a large share of it


def env_fields() -> dict:
    """UPPER_CASE Hyperparameters fields set in the environment (they override the bench's choices)."""
    names = {f.name.upper() for f in dataclasses.fields(T.Hyperparameters)} - {"PRESET"}
    return {k: v for k, v in os.environ.items() if k in names}


def make_hp(preset: str, *layers: dict) -> T.Hyperparameters:
    env = {"PRESET": preset}
    for layer in layers:
        env.update({k: str(v) for k, v in layer.items()})
    env.update(env_fields())
    hp = T.Hyperparameters.from_env(env)
    if not hp.run_id:
        hp.run_id = "bench"
    hp.validate(1)
    return hp


def cpu_runtime(run_dir: str, quiet: bool = True) -> T.Runtime:
    return T.Runtime(0, 1, 0, torch.device("cpu"), False, 8, run_dir, T.RunLogger([], enabled=not quiet))


def set_threads(n: int) -> None:
    torch.set_num_threads(max(1, n))


def add_common_args(ap) -> None:
    """Options every comparison bench takes."""
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="tiny model, seconds of training: checks the bench runs")
    ap.add_argument("--json", default="")
    ap.add_argument("--verbose", action="store_true")


def parse_common(ap, argv):
    """Parse, set the thread count and return (args, training seconds: capped at 3 s for --smoke)."""
    args = ap.parse_args(argv)
    set_threads(args.threads)
    return args, (min(args.seconds, 3.0) if args.smoke else args.seconds)


def load_data(hp: T.Hyperparameters):
    data_path, tok_path = hp.resolved_paths()
    sp = T.load_tokenizer(tok_path, hp.vocab_size)
    luts = T.build_byte_luts(sp, hp.vocab_size)
    val = T.load_validation(hp, luts)
    files = T.list_shards(data_path, "train")
    return luts, val, files


def cpu_clock():
    """Seconds of CPU this process got, per torch thread: on a machine shared with other jobs, a budget on
    this clock gives each arm the same compute however busy the machine is (at full use it runs like wall)."""
    n = max(torch.get_num_threads(), 1)
    return lambda: time.process_time() / n


def train_model(hp: T.Hyperparameters, rt: T.Runtime, luts, val, files, clock: str = "wall"):
    """train() under its time budget (MAX_WALLCLOCK_SECONDS on the wall clock, or on cpu_clock() with
    clock="cpu"), then the EMA weights applied as main() does. Returns the model (looping as training
    ended) and the TrainResult."""
    T.seed_everything(hp.seed)
    model = T.GPT(hp, luts.bos_id, "sdpa").to(rt.device)
    res, ema = T.train(hp, rt, model, files, None, luts,
                       **({"clock": cpu_clock()} if clock == "cpu" else {}))
    if hp.ema_decay > 0:
        ema.apply_to(model)
    model.looping = res.looping_step is not None
    return model, res


def load_prequant(path: str, hp: T.Hyperparameters, bos_id: int) -> T.GPT:
    saved = torch.load(path, map_location="cpu")
    model = T.GPT(hp, bos_id, "sdpa")
    model.load_state_dict(saved["state"])
    model.looping = bool(saved["looping"])
    return model


def save_prequant(model: T.GPT, path: str) -> None:
    buf = io.BytesIO()
    torch.save({"state": model.state_dict(), "looping": model.looping}, buf)
    T.write_atomic(path, buf.getvalue())


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except Exception:
        return "unknown"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def machine_info() -> dict:
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "commit": git_commit(), "cpu": cpu_name(),
            "torch_threads": torch.get_num_threads(), "os_cpus": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(),
            "train_gpt": os.path.relpath(TRAIN_GPT_PATH, ROOT) if TRAIN_GPT_PATH.startswith(ROOT) else TRAIN_GPT_PATH,
            "train_gpt_sha256_12": TRAIN_GPT_SHA, "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}


def table(headers: list[str], rows: list[list]) -> str:
    """A markdown table (prints well in a terminal and pastes into RESULTS.md)."""
    cells = [[str(h) for h in headers]] + [[c if isinstance(c, str) else fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells[1:]])


def fmt(x) -> str:
    if isinstance(x, float):
        if x != x:
            return "nan"
        return f"{x:.4f}" if abs(x) < 100 else f"{x:,.0f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def write_json(path: str | None, obj: dict) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    print(f"wrote {path}")
