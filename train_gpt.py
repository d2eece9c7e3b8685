"""Parameter Golf training system: one file, configured by environment variables.

Run:  python train_gpt.py   or   torchrun --standalone --nproc_per_node=8 train_gpt.py
Stages: config -> runtime -> data -> model -> training -> Hessians -> GPTQ -> artifact ->
rebuild from the artifact -> evaluation (plain / sliding / phased TTT) -> final lines + run record.
Importing this file has no side effects; tests import its functions.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import io
import json
import lzma
import base64
import math
import os
import platform
import struct
import sys
import time
import uuid
import zlib
from dataclasses import dataclass, field, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# =============================================================================================
# Config: Hyperparameters (one field per env var), presets, validation.
# =============================================================================================

ARTIFACT_LIMIT_BYTES = 16_000_000  # challenge cap, decimal bytes (spec §6.4)


@dataclass
class Hyperparameters:
    """Every field is read from the env var of the same name in upper case. Defaults = `sota`."""
    preset: str = "sota"
    # data and run identity
    data_dir: str = "./data"
    data_path: str = ""            # "" = derived from data_dir / vocab_size / caseops_enabled
    tokenizer_path: str = ""       # "" = derived likewise
    vocab_size: int = 8192
    caseops_enabled: bool = True
    run_id: str = ""               # "" = random
    seed: int = 1337
    artifact_dir: str = ""         # "" = runs/<run_id>
    train_loader: str = "packed"   # packed (document packing) | shuffled (random sequences)
    val_max_tokens: int = 0        # 0 = the whole validation set (anything else is not a challenge score)
    # schedule and budget
    iterations: int = 20000
    max_wallclock_seconds: float = 600.0
    gptq_reserve_seconds: float = 8.0   # fixed margin on top of the measured Hessian estimate (spec §11)
    warmup_steps: int = 20              # compile warm-up steps, rolled back before the timer starts
    lr_warmup_steps: int = 0
    warmdown_frac: float = 0.85
    min_lr: float = 0.1
    train_batch_tokens: int = 786_432
    train_seq_len: int = 2048
    eval_seq_len: int = 2048
    eval_stride: int = 0                # 0 = no sliding-window eval; else its stride
    val_loss_every: int = 0
    val_batch_tokens: int = 524_288
    train_log_every: int = 500
    # model
    num_layers: int = 11
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: float = 4.0
    mlp_negative_slope: float = 0.5     # 0 = relu^2 (baseline), 0.5 = LeakyReLU(0.5)^2
    tie_embeddings: bool = True
    logit_softcap: float = 30.0
    rope_base: float = 10000.0
    rope_dims: int = 16                 # 0 = rotate the whole head dim
    rope_yarn: bool = False
    ln_scale: bool = True
    qk_gain_init: float = 5.0
    xsa_last_n: int = 11
    skip_gates_enabled: bool = True
    num_loops: int = 2
    loop_start: int = 3
    loop_end: int = 5
    enable_looping_at: float = 0.35
    parallel_start_layer: int = 8       # 0 = off
    parallel_final_lane: str = "mean"   # mean | attn | mlp
    smear_gate_enabled: bool = True
    gate_window: int = 12
    sparse_attn_gate_enabled: bool = True
    sparse_attn_gate_scale: float = 0.5
    tied_embed_init_std: float = 0.005
    attn_backend: str = "auto"          # auto | sdpa | flex | flash3
    compile: str = "auto"               # auto (CUDA only) | 1 | 0
    autocast_bf16: str = "auto"         # auto (CUDA only; CPU measured slower, docs/performance.md) | 1 | 0
    # optimizer
    embed_lr: float = 0.6
    tied_embed_lr: float = 0.03
    matrix_lr: float = 0.026
    scalar_lr: float = 0.02
    muon_momentum: float = 0.97
    muon_backend_steps: int = 5
    muon_coeffs: str = "polar_express"  # polar_express | standard
    muon_momentum_warmup_start: float = 0.92
    muon_momentum_warmup_steps: int = 1500
    muon_row_normalize: bool = True
    beta1: float = 0.9
    beta2: float = 0.99
    adam_eps: float = 1e-8
    grad_clip_norm: float = 0.3
    adam_wd: float = 0.02
    muon_wd: float = 0.095
    embed_wd: float = 0.085
    ema_decay: float = 0.9965
    # quantization and artifact
    gptq_calibration_batches: int = 16
    calibration_batch_tokens: int = 98_304   # tokens per rank per calibration batch (48 x 2048)
    matrix_bits: int = 6
    embed_bits: int = 7
    clip_mode: str = "fixed"            # fixed | adaptive | budget
    matrix_clip_sigmas: float = 12.85
    embed_clip_sigmas: float = 14.0
    mlp_clip_sigmas: float = 11.5
    attn_clip_sigmas: float = 13.0
    adaptive_clip_exponent: float = -0.15
    adaptive_clip_min: float = 6.0
    adaptive_clip_max: float = 24.0
    target_artifact_bytes: int = 15_960_000
    lqer_enabled: bool = True
    lqer_rank: int = 4
    lqer_top_k: int = 3
    lqer_asym_group: int = 64
    compressor: str = "zstd"            # zstd | lzma | raw
    save_prequant: bool = True
    requant_from: str = ""              # path of a saved pre-quantization state: skip training
    # evaluation
    eval_only: bool = False
    artifact: str = ""                  # artifact path for EVAL_ONLY=1
    eval_time_budget: float = 600.0
    save_token_losses: str = ""         # "" = off; else a directory for per-token float32 losses
    ttt_enabled: bool = True
    ttt_lora_rank: int = 80
    ttt_lora_lr: float = 1e-4
    ttt_lora_alpha: float = 144.0
    ttt_chunk_size: int = 48
    ttt_eval_seq_len: int = 2048
    ttt_batch_size: int = 64
    ttt_grad_steps: int = 1
    ttt_weight_decay: float = 0.5
    ttt_beta1: float = 0.0
    ttt_beta2: float = 0.99
    phased_ttt_prefix_docs: int = 2500
    phased_ttt_num_phases: int = 3
    global_ttt_lr: float = 0.001
    global_ttt_momentum: float = 0.9
    global_ttt_chunk_tokens: int = 32768
    global_ttt_grad_clip: float = 1.0

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_env(cls, env=None) -> "Hyperparameters":
        env = os.environ if env is None else env
        preset = env.get("PRESET", "sota")
        if preset not in PRESETS:
            raise ConfigError(f"PRESET={preset!r} is not a preset; choose one of {sorted(PRESETS)}")
        values = {"preset": preset, **PRESETS[preset]}
        types = {f.name: f.type for f in fields(cls)}
        for name in types:
            raw = env.get(name.upper())
            if raw is not None and name != "preset":
                values[name] = _parse_env_value(name.upper(), raw, types[name])
        hp = cls(**values)
        hp.unknown_env_warnings = _near_miss_env_vars(env, types)
        return hp

    def resolved_paths(self) -> tuple[str, str]:
        if self.caseops_enabled:
            ds = f"fineweb10B_sp{self.vocab_size}_lossless_caps_caseops_v1_reserved"
            tok = f"fineweb_{self.vocab_size}_bpe_lossless_caps_caseops_v1_reserved.model"
        else:
            ds, tok = f"fineweb10B_sp{self.vocab_size}", f"fineweb_{self.vocab_size}_bpe.model"
        data = self.data_path or os.path.join(self.data_dir, "datasets", ds)
        tokz = self.tokenizer_path or os.path.join(self.data_dir, "tokenizers", tok)
        return data, tokz

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def validate(self, world_size: int = 1, check_files: bool = True) -> None:
        """Reject impossible values before any data is read; messages name the env var."""
        def bad(name, why):
            raise ConfigError(f"{name.upper()}={getattr(self, name)!r}: {why}")
        positive = ["vocab_size", "train_batch_tokens", "train_seq_len", "eval_seq_len", "val_batch_tokens",
                    "num_layers", "model_dim", "num_heads", "num_kv_heads", "muon_backend_steps",
                    "train_log_every", "gate_window", "matrix_bits", "embed_bits", "ttt_chunk_size",
                    "ttt_batch_size", "ttt_eval_seq_len", "lqer_asym_group", "calibration_batch_tokens",
                    "global_ttt_chunk_tokens"]
        for n in positive:
            if getattr(self, n) <= 0:
                bad(n, "must be > 0")
        non_negative = ["iterations", "max_wallclock_seconds", "gptq_reserve_seconds", "warmup_steps",
                        "lr_warmup_steps", "min_lr", "eval_stride", "val_loss_every", "xsa_last_n",
                        "num_loops", "parallel_start_layer", "embed_lr", "tied_embed_lr", "matrix_lr",
                        "scalar_lr", "adam_eps", "grad_clip_norm", "adam_wd", "muon_wd", "embed_wd",
                        "gptq_calibration_batches", "lqer_rank", "lqer_top_k", "val_max_tokens",
                        "ttt_lora_rank", "ttt_grad_steps", "phased_ttt_prefix_docs", "phased_ttt_num_phases",
                        "eval_time_budget", "logit_softcap", "tied_embed_init_std", "rope_dims",
                        "muon_momentum_warmup_steps"]
        for n in non_negative:
            if getattr(self, n) < 0:
                bad(n, "must be >= 0")
        for n in ["warmdown_frac", "enable_looping_at", "ema_decay", "beta1", "beta2", "muon_momentum",
                  "muon_momentum_warmup_start", "ttt_beta1", "ttt_beta2", "mlp_negative_slope"]:
            if not 0.0 <= getattr(self, n) <= 1.0:
                bad(n, "must be in [0, 1]")
        if self.iterations == 0 and self.max_wallclock_seconds == 0:
            bad("iterations", "and MAX_WALLCLOCK_SECONDS=0: one of them must bound training")
        if self.model_dim % self.num_heads:
            bad("model_dim", f"must be divisible by NUM_HEADS={self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            bad("num_heads", f"must be divisible by NUM_KV_HEADS={self.num_kv_heads}")
        head_dim = self.model_dim // self.num_heads
        if head_dim % 2:
            bad("model_dim", f"gives an odd head dim {head_dim}; MODEL_DIM/NUM_HEADS must be even")
        if self.rope_dims > head_dim or self.rope_dims % 2:
            bad("rope_dims", f"must be even and <= head dim {head_dim} (0 = whole head)")
        if self.mlp_mult <= 0 or int(self.mlp_mult * self.model_dim) <= 0:
            bad("mlp_mult", "must be > 0")
        if world_size <= 0 or 8 % world_size:
            raise ConfigError(f"WORLD_SIZE={world_size}: must divide 8 (1, 2, 4 or 8 processes)")
        micro = self.train_batch_tokens // 8
        if self.train_batch_tokens % 8 or micro % self.train_seq_len:
            bad("train_batch_tokens", f"must be a multiple of 8*TRAIN_SEQ_LEN={8 * self.train_seq_len}")
        if self.val_batch_tokens < self.eval_seq_len:
            bad("val_batch_tokens", f"must be >= EVAL_SEQ_LEN={self.eval_seq_len}")
        if self.eval_stride > self.eval_seq_len:
            bad("eval_stride", f"must be <= EVAL_SEQ_LEN={self.eval_seq_len}")
        if self.num_loops and not (0 <= self.loop_start <= self.loop_end < self.num_layers):
            bad("loop_start", f"LOOP_START..LOOP_END={self.loop_start}..{self.loop_end} must lie in "
                f"[0, NUM_LAYERS-1={self.num_layers - 1}]")
        if self.parallel_start_layer >= self.num_layers:
            bad("parallel_start_layer", f"must be < NUM_LAYERS={self.num_layers} (0 = off)")
        if self.gate_window > self.model_dim:
            bad("gate_window", f"must be <= MODEL_DIM={self.model_dim}")
        choices = {"train_loader": ("packed", "shuffled"), "parallel_final_lane": ("mean", "attn", "mlp"),
                   "attn_backend": ("auto", "sdpa", "flex", "flash3"), "compile": ("auto", "0", "1"),
                   "autocast_bf16": ("auto", "0", "1"), "muon_coeffs": tuple(NS_COEFFICIENTS),
                   "clip_mode": ("fixed", "adaptive", "budget"), "compressor": tuple(COMPRESSORS)}
        for n, allowed in choices.items():
            if getattr(self, n) not in allowed:
                bad(n, f"must be one of {list(allowed)}")
        for n in ["matrix_bits", "embed_bits"]:
            if not 2 <= getattr(self, n) <= 8:
                bad(n, "must be in [2, 8]")
        if self.adaptive_clip_min <= 0 or self.adaptive_clip_max < self.adaptive_clip_min:
            bad("adaptive_clip_min", f"need 0 < ADAPTIVE_CLIP_MIN <= ADAPTIVE_CLIP_MAX={self.adaptive_clip_max}")
        if self.target_artifact_bytes <= 0 or self.target_artifact_bytes > ARTIFACT_LIMIT_BYTES:
            bad("target_artifact_bytes", f"must be in (0, {ARTIFACT_LIMIT_BYTES}]")
        if self.eval_only and not self.artifact:
            raise ConfigError("EVAL_ONLY=1 needs ARTIFACT=<path of an artifact written by this script>")
        if not check_files:
            return
        for var, path in [("ARTIFACT", self.artifact if self.eval_only else ""),
                          ("REQUANT_FROM", self.requant_from)]:
            if path and not os.path.isfile(path):
                raise ConfigError(f"{var}={path!r}: no such file")
        data_path, tok_path = self.resolved_paths()
        fetch = ("fetch it with `python data/cached_challenge_fineweb.py --variant "
                 f"sp{self.vocab_size}{' --caseops' if self.caseops_enabled else ''}` or build the offline "
                 "sample with `python data/build_offline_sample.py` (then PRESET=cpu_smoke)")
        if not glob.glob(os.path.join(data_path, "fineweb_val_*.bin")):
            raise ConfigError(f"DATA_PATH={data_path!r}: no fineweb_val_*.bin shards there; {fetch}")
        if not self.eval_only and not glob.glob(os.path.join(data_path, "fineweb_train_*.bin")):
            raise ConfigError(f"DATA_PATH={data_path!r}: no fineweb_train_*.bin shards there; {fetch}")
        if not os.path.isfile(tok_path):
            raise ConfigError(f"TOKENIZER_PATH={tok_path!r}: no such file; {fetch}")
        if self.caseops_enabled and not glob.glob(os.path.join(data_path, "fineweb_val_bytes_*.bin")):
            raise ConfigError(f"CASEOPS_ENABLED=1 but DATA_PATH={data_path!r} has no fineweb_val_bytes_*.bin "
                              "byte sidecar; set CASEOPS_ENABLED=0 or rebuild the data with --caseops")


class ConfigError(ValueError):
    """A bad setting: the message names the env var, its value and what is accepted."""


# Bundles of defaults; explicit env vars still override. `sota` = the record's reproduce command (spec §9).
PRESETS: dict[str, dict] = {
    "sota": {},
    "baseline": dict(  # the challenge's naive baseline (root train_gpt.py of the challenge repo)
        vocab_size=1024, caseops_enabled=False, num_layers=9, model_dim=512, num_heads=8, num_kv_heads=4,
        mlp_mult=2.0, mlp_negative_slope=0.0, train_seq_len=1024, eval_seq_len=1024,
        train_batch_tokens=524_288, rope_dims=0, ln_scale=False, qk_gain_init=1.5, xsa_last_n=0,
        skip_gates_enabled=False, num_loops=0, parallel_start_layer=0, smear_gate_enabled=False,
        sparse_attn_gate_enabled=False, tied_embed_lr=0.05, matrix_lr=0.04, scalar_lr=0.04,
        muon_momentum=0.95, muon_coeffs="standard", muon_momentum_warmup_start=0.85,
        muon_momentum_warmup_steps=500, muon_row_normalize=False, beta2=0.95, grad_clip_norm=0.0,
        adam_wd=0.0, muon_wd=0.0, embed_wd=0.0, ema_decay=0.0, warmdown_frac=0.06, min_lr=0.0,
        tied_embed_init_std=0.005, matrix_bits=8, embed_bits=8, clip_mode="fixed", lqer_enabled=False,
        ttt_enabled=False, warmup_steps=20),
    "cpu_smoke": dict(  # the whole sota pipeline, small enough for 2 CPU cores in a few minutes
        data_path="./data/datasets/offline_sample_sp1024",
        tokenizer_path="./data/tokenizers/offline_sample_1024_bpe.model",
        vocab_size=1024, caseops_enabled=False, num_layers=6, model_dim=128, num_heads=4, num_kv_heads=2,
        train_seq_len=256, eval_seq_len=256, train_batch_tokens=16_384, val_batch_tokens=16_384,
        iterations=400, max_wallclock_seconds=150.0, gptq_reserve_seconds=2.0, warmup_steps=2,
        xsa_last_n=6, loop_start=2, loop_end=3, num_loops=1, parallel_start_layer=4, rope_dims=16,
        train_log_every=25, val_max_tokens=65_536, gptq_calibration_batches=4, calibration_batch_tokens=8192,
        matrix_lr=0.03, tied_embed_lr=0.05, muon_momentum_warmup_steps=100, ema_decay=0.99,
        target_artifact_bytes=2_000_000, eval_stride=128, ttt_lora_rank=8, ttt_lora_alpha=16.0,
        ttt_lora_lr=3e-3, ttt_chunk_size=32, ttt_eval_seq_len=256, ttt_batch_size=16,
        phased_ttt_prefix_docs=32, phased_ttt_num_phases=2, global_ttt_chunk_tokens=4096,
        eval_time_budget=300.0),
}

# Env vars that belong to torchrun, the shell or tools, never reported as near misses of a field.
_FOREIGN_ENV = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE", "PRESET", "PATH", "HOME", "SEED_"}


def _parse_env_value(var: str, raw: str, typ) -> object:
    typ = {"bool": bool, "int": int, "float": float, "str": str}.get(typ, typ) if isinstance(typ, str) else typ
    text = raw.strip()
    try:
        if typ is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            return int(float(text)) if "e" in text.lower() and float(text).is_integer() else int(text)
        if typ is float:
            return float(text)
        return text
    except ValueError:
        kind = {bool: "0 or 1", int: "an integer", float: "a number"}[typ]
        raise ConfigError(f"{var}={raw!r}: expected {kind}") from None


def _edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _near_miss_env_vars(env, types) -> list[str]:
    """Set env vars that are not fields but are 1-2 edits from one: a sweep would silently run the default."""
    names = [n.upper() for n in types]
    out = []
    for var in sorted(env):
        if var in names or var in _FOREIGN_ENV or not var.isupper():
            continue
        best = min(names, key=lambda n: _edit_distance(var, n))
        if _edit_distance(var, best) <= 2 and len(var) >= 4:
            out.append(f"env var {var} is not a setting of train_gpt.py; did you mean {best}?")
    return out


# =============================================================================================
# Runtime: ranks, device, process group, logger, seeding.
# =============================================================================================

@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    distributed: bool
    grad_accum_steps: int
    run_dir: str
    logger: "RunLogger"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class RunLogger:
    """Rank-0 logger: console + logs/<run_id>.txt (and the run dir), flushed per line."""

    def __init__(self, paths: list[str], enabled: bool, echo: bool = True):
        self.enabled, self.echo, self.files = enabled, echo, []
        if enabled:
            for p in paths:
                os.makedirs(os.path.dirname(p) or ".", exist_ok=True)
                self.files.append(open(p, "a", encoding="utf-8"))

    def log(self, msg: str = "", console: bool = True) -> None:
        if not self.enabled:
            return
        if console and self.echo:
            print(msg, flush=True)
        for f in self.files:
            f.write(msg + "\n")
            f.flush()

    def close(self) -> None:
        for f in self.files:
            f.close()
        self.files = []


def init_runtime(hp: Hyperparameters, echo: bool = True) -> Runtime:
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                **({"device_id": device} if device.type == "cuda" else {}))
    if not hp.run_id:
        hp.run_id = _agree_run_id(distributed, device)
    run_dir = hp.artifact_dir or os.path.join("runs", hp.run_id)
    logger = RunLogger([os.path.join("logs", f"{hp.run_id}.txt"), os.path.join(run_dir, "log.txt")],
                       enabled=rank == 0, echo=echo)
    seed_everything(hp.seed)
    return Runtime(rank, world, local_rank, device, distributed, 8 // world, run_dir, logger)


def _agree_run_id(distributed: bool, device: torch.device) -> str:
    rid = time.strftime("%Y%m%d_%H%M%S_") + uuid.uuid4().hex[:6]
    if distributed:
        box = [rid]
        dist.broadcast_object_list(box, src=0)
        rid = box[0]
    return rid


def seed_everything(seed: int) -> None:
    import random
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def all_reduce_(t: torch.Tensor, op=None) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def agree_any(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is true on any rank (the wall-clock stop is one decision)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(all_reduce_(t, dist.ReduceOp.MAX if dist.is_initialized() else None).item() > 0)


# =============================================================================================
# Data: shard format, tokenizer byte accounting, validation set, training loaders.
# =============================================================================================

SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_INTS = 20240520, 1, 256
SHARD_HEADER_BYTES = SHARD_HEADER_INTS * 4


class ShardError(ValueError):
    """A shard file that does not follow the official format; the message names the file."""


def write_shard(path: str, tokens) -> None:
    """Official shard: 256 int32 header (magic, version, count), then uint16 tokens. Atomic."""
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ShardError(f"{path}: tokens must be 1-D, got shape {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() >= 2**16):
        raise ShardError(f"{path}: token ids must lie in [0, 65535] to fit uint16")
    if arr.size >= 2**31:
        raise ShardError(f"{path}: {arr.size} tokens do not fit one shard (< 2^31)")
    header = np.zeros(SHARD_HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, arr.size)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(arr.astype("<u2", copy=False).tobytes())
    os.replace(tmp, path)


def read_shard_header(path: str) -> int:
    """Validate a shard's header and size; return its token count."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(SHARD_HEADER_BYTES)
    except OSError as e:
        raise ShardError(f"{path}: cannot read shard ({e.strerror})") from None
    if len(raw) < SHARD_HEADER_BYTES:
        raise ShardError(f"{path}: {len(raw)} bytes, shorter than the {SHARD_HEADER_BYTES}-byte header")
    header = np.frombuffer(raw, dtype="<i4")
    if header[0] != SHARD_MAGIC:
        raise ShardError(f"{path}: magic {header[0]} != {SHARD_MAGIC}; not a shard file")
    if header[1] != SHARD_VERSION:
        raise ShardError(f"{path}: version {header[1]} unsupported (expected {SHARD_VERSION})")
    n = int(header[2])
    if n < 0 or size != SHARD_HEADER_BYTES + 2 * n:
        raise ShardError(f"{path}: header says {n} tokens ({SHARD_HEADER_BYTES + 2 * n} bytes) but the file "
                         f"has {size} bytes; truncated or corrupt")
    return n


def load_shard(path: str, mmap: bool = True) -> np.ndarray:
    n = read_shard_header(path)
    if mmap:
        return np.memmap(path, dtype="<u2", mode="r", offset=SHARD_HEADER_BYTES, shape=(n,))
    return np.fromfile(path, dtype="<u2", offset=SHARD_HEADER_BYTES, count=n)


def list_shards(data_path: str, split: str) -> list[str]:
    """Sorted shard files of a split; `val` never includes the `_bytes_` sidecars."""
    files = sorted(glob.glob(os.path.join(data_path, f"fineweb_{split}_*.bin")))
    return [f for f in files if "_bytes_" not in os.path.basename(f)]


@dataclass
class TokenByteLUTs:
    """Per-token byte accounting from a SentencePiece model (spec §2.2)."""
    base_bytes: torch.Tensor         # int16 [V]
    has_leading_space: torch.Tensor  # bool [V]
    is_boundary: torch.Tensor        # bool [V]
    bos_id: int

    def target_bytes(self, prev: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        dev = tgt.device
        b = self.base_bytes.to(dev)[tgt].to(torch.int32)
        space = self.has_leading_space.to(dev)[tgt] & ~self.is_boundary.to(dev)[prev]
        return b + space.to(torch.int32)


def build_byte_luts(sp, vocab_size: int) -> TokenByteLUTs:
    n = max(sp.vocab_size(), vocab_size)
    base = torch.zeros(n, dtype=torch.int16)
    space = torch.zeros(n, dtype=torch.bool)
    boundary = torch.ones(n, dtype=torch.bool)
    for t in range(sp.vocab_size()):
        if sp.is_control(t) or sp.is_unknown(t) or sp.is_unused(t):
            continue
        boundary[t] = False
        if sp.is_byte(t):
            base[t] = 1
            continue
        piece = sp.id_to_piece(t)
        if piece.startswith("\u2581"):
            space[t], piece = True, piece[1:]
        base[t] = len(piece.encode("utf-8"))
    bos = sp.bos_id()
    if bos < 0:
        raise ConfigError("TOKENIZER_PATH: the SentencePiece model has no BOS piece; documents need one")
    return TokenByteLUTs(base, space, boundary, bos)


def load_tokenizer(path: str, vocab_size: int):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=path)
    if sp.vocab_size() != vocab_size:
        raise ConfigError(f"VOCAB_SIZE={vocab_size} but TOKENIZER_PATH={path!r} has {sp.vocab_size()} pieces")
    return sp


@dataclass
class ValidationData:
    tokens: torch.Tensor              # int64 [N], starts with BOS; N-1 targets
    target_bytes: torch.Tensor        # int32 [N-1], bytes of the original text each target accounts for
    source: str

    @property
    def num_targets(self) -> int:
        return self.tokens.numel() - 1


def load_validation(hp: Hyperparameters, luts: TokenByteLUTs) -> ValidationData:
    data_path, _ = hp.resolved_paths()
    files = list_shards(data_path, "val")
    toks = np.concatenate([load_shard(f, mmap=False) for f in files]).astype(np.int64)
    byte_side = None
    if hp.caseops_enabled:
        side_files = sorted(glob.glob(os.path.join(data_path, "fineweb_val_bytes_*.bin")))
        byte_side = np.concatenate([load_shard(f, mmap=False) for f in side_files]).astype(np.int32)
        if byte_side.size < toks.size:
            raise ShardError(f"{data_path}: byte sidecar has {byte_side.size} entries < {toks.size} val tokens")
    limit = toks.size if hp.val_max_tokens == 0 else min(toks.size, hp.val_max_tokens + 1)
    usable = ((limit - 1) // hp.eval_seq_len) * hp.eval_seq_len
    if usable <= 0:
        raise ShardError(f"{data_path}: {toks.size} validation tokens, fewer than EVAL_SEQ_LEN+1={hp.eval_seq_len + 1}")
    tokens = torch.from_numpy(toks[: usable + 1])
    if byte_side is not None:
        tb = torch.from_numpy(byte_side[1: usable + 1])
        source = "caseops byte sidecar"
    else:
        tb = luts.target_bytes(tokens[:-1], tokens[1:])
        source = "sentencepiece LUTs"
    return ValidationData(tokens, tb.to(torch.int32), source)


class TokenStream:
    """Endless memory-mapped stream over sorted shards (wraps around); spans may cross shard ends."""

    def __init__(self, files: list[str]):
        if not files:
            raise ShardError("no training shards (fineweb_train_*.bin) found")
        self.files = files
        self.sizes = [read_shard_header(f) for f in files]
        self.total = sum(self.sizes)
        self.file_idx, self.pos = 0, 0
        self._cache: tuple[int, np.ndarray] | None = None

    def _shard(self, i: int) -> np.ndarray:
        if self._cache is None or self._cache[0] != i:
            self._cache = (i, load_shard(self.files[i]))
        return self._cache[1]

    def take(self, n: int) -> np.ndarray:
        out, filled = np.empty(n, dtype=np.int64), 0
        while filled < n:
            shard = self._shard(self.file_idx)
            k = min(n - filled, self.sizes[self.file_idx] - self.pos)
            out[filled: filled + k] = shard[self.pos: self.pos + k]
            filled += k
            self.pos += k
            if self.pos >= self.sizes[self.file_idx]:
                self.file_idx, self.pos = (self.file_idx + 1) % len(self.files), 0
        return out


class PackedDocumentLoader:
    """Document packing (spec §1.9): one contiguous span of the stream per optimizer micro-step, split
    across ranks; rows of TRAIN_SEQ_LEN tokens whose document boundaries are the BOS positions (the model
    masks attention at them). Deterministic, seed-independent, disjoint across ranks."""

    def __init__(self, files: list[str], rank: int, world_size: int, local_tokens: int, seq_len: int,
                 device: torch.device):
        if local_tokens % seq_len:
            raise ConfigError(f"micro-batch of {local_tokens} tokens is not a multiple of TRAIN_SEQ_LEN={seq_len}")
        self.stream = TokenStream(files)
        self.rank, self.world, self.local, self.seq_len, self.device = rank, world_size, local_tokens, seq_len, device

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        span = self.local + 1
        chunk = self.stream.take(self.world * span)
        mine = torch.from_numpy(chunk[self.rank * span: (self.rank + 1) * span])
        x = mine[:-1].reshape(-1, self.seq_len)
        y = mine[1:].reshape(-1, self.seq_len)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


class ShuffledSequenceLoader:
    """Random dense sequences (spec §1.10), seeded; every rank sees all files but takes the disjoint
    subset perm[rank::W] of each file's sequence starts. Used for GPTQ calibration and TRAIN_LOADER=shuffled."""

    def __init__(self, files: list[str], rank: int, world_size: int, local_tokens: int, seq_len: int,
                 device: torch.device, seed: int):
        if not files:
            raise ShardError("no training shards (fineweb_train_*.bin) found")
        self.files, self.rank, self.world = files, rank, world_size
        self.seq_len, self.device = seq_len, device
        self.batch = max(1, local_tokens // seq_len)
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.sizes = [read_shard_header(f) for f in files]
        if max(self.sizes) < (seq_len + 1) * world_size:
            raise ShardError(f"training shards hold {max(self.sizes)} tokens, too few for one sequence of "
                             f"{seq_len + 1} per rank")
        self._refill()

    def _refill(self) -> None:
        self.starts = []
        for n in self.sizes:
            count = max(0, (n - 1) // self.seq_len)
            phase = int(self.rng.integers(0, max(1, n - count * self.seq_len)))
            count = (n - 1 - phase) // self.seq_len
            perm = self.rng.permutation(count) * self.seq_len + phase
            self.starts.append(list(perm[self.rank::self.world]))

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = []
        for _ in range(self.batch):
            left = np.array([len(s) for s in self.starts], dtype=np.float64)
            if left.sum() == 0:
                self._refill()
                left = np.array([len(s) for s in self.starts], dtype=np.float64)
            i = int(self.rng.choice(len(self.files), p=left / left.sum()))
            s = int(self.starts[i].pop())
            rows.append(np.asarray(load_shard(self.files[i])[s: s + self.seq_len + 1], dtype=np.int64))
        t = torch.from_numpy(np.stack(rows))
        return t[:, :-1].to(self.device), t[:, 1:].to(self.device)


def segment_ids(ids: torch.Tensor, bos_id: int) -> torch.Tensor:
    """Document index of every position of each row: a new segment starts at each BOS (and at column 0)."""
    return torch.cumsum((ids == bos_id).to(torch.int32), dim=-1)


def cu_seqlens_from_rows(ids: torch.Tensor, bos_id: int) -> tuple[torch.Tensor, int]:
    """Flattened varlen boundaries for FlashAttention: segment starts at each row start and each BOS."""
    B, T = ids.shape
    starts = (ids == bos_id).clone()
    starts[:, 0] = True
    pos = torch.nonzero(starts.reshape(-1), as_tuple=False).flatten().to(torch.int32)
    cu = torch.cat([pos, torch.tensor([B * T], dtype=torch.int32, device=ids.device)])
    return cu, int((cu[1:] - cu[:-1]).max().item())
