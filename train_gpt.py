"""Parameter Golf training system: one file, configured by environment variables.

Run:  python train_gpt.py   or   torchrun --standalone --nproc_per_node=8 train_gpt.py
Stages: config -> runtime -> data -> model -> training -> Hessians -> GPTQ -> artifact ->
rebuild from the artifact -> evaluation (plain / sliding / phased TTT) -> final lines + run record.
Importing this file has no side effects; tests import its functions.
"""
from __future__ import annotations

import ast
import builtins
import contextlib
import copy
import dataclasses
import datetime
import functools
import glob
import hashlib
import io
import json
import lzma
import math
import os
import platform
import random
import re
import struct
import subprocess
import sys
import tempfile
import time
import tokenize
import uuid
import zlib
from dataclasses import dataclass, field, fields
from typing import NamedTuple

if __name__ == "__main__":  # before torch loads OpenMP, whose threads spin-wait by default: on 2 cores shared
    # with other jobs a cpu_smoke forward + backward took 37-57 s spinning, 0.7-1.2 s passive (docs/performance.md)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import sentencepiece as spm
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import zstandard
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

# =============================================================================================
# Config: Hyperparameters (one field per env var), presets, validation.
# =============================================================================================

ARTIFACT_LIMIT_BYTES = 16_000_000  # challenge cap, decimal bytes (spec §6.4)


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
    "frontier": dict(  # #2135 (docs/record_settings.md F Part D) + the siblings docs/strategy.md argues for
        ngram_tilt_enabled=True, eval_seq_len=2560, ttt_eval_seq_len=2560, phased_ttt_num_phases=1,
        ttt_lora_lr=8e-5, ttt_weight_decay=2.0, ttt_k_lora=False, matrix_lr=0.028, gptq_calibration_batches=32,
        lqer_asym_group=32, gated_attn_quant_gate=False,
        train_seq_len=3072, train_seq_schedule="1024@0.1,2048@0.7,3072@1.0",  # B1 (#2014)
        qk_gain_init=5.25, awq_lite_enabled=True,  # B5, B6 (B3's short-doc chunks would overrun the eval)
        lqer_rank=2, lqer_top_k=4,  # B7 (#2060)
        # our TTT and clock choices, not yet measured against the record's (docs/strategy.md §3)
        ttt_warm_start_a=False, ttt_lora_a_init="shared", ttt_batch_order="longest_first",
        phased_ttt_membership="exact", eval_clock="strict"),
    "cpu_smoke": dict(  # the whole sota pipeline, small enough for 2 CPU cores in a few minutes
        data_path="./data/datasets/offline_sample_sp1024",
        tokenizer_path="./data/tokenizers/offline_sample_1024_bpe.model",
        vocab_size=1024, caseops_enabled=False, num_layers=6, model_dim=128, num_heads=4, num_kv_heads=2,
        train_seq_len=256, eval_seq_len=256, train_batch_tokens=8192, val_batch_tokens=131_072,
        iterations=1000, max_wallclock_seconds=120.0, gptq_reserve_seconds=0.5, warmup_steps=2,
        xsa_last_n=6, loop_start=2, loop_end=3, num_loops=1, parallel_start_layer=4, rope_dims=16,
        train_log_every=25, val_max_tokens=32_768, gptq_calibration_batches=4, gptq_min_calibration_batches=2,
        calibration_batch_tokens=8192,
        matrix_lr=0.03, tied_embed_lr=0.05, muon_momentum_warmup_steps=100, ema_decay=0.9,
        target_artifact_bytes=2_000_000, eval_stride=128, quant_min_numel=4096, ttt_lora_rank=8,
        ttt_lora_alpha=16.0, ttt_lora_lr=3e-3, ttt_chunk_size=64, ttt_eval_seq_len=256, ttt_batch_size=32,
        phased_ttt_prefix_docs=16, phased_ttt_num_phases=2, global_ttt_chunk_tokens=4096,
        eval_time_budget=180.0),
}

# Env vars that belong to torchrun, the shell or tools, never reported as near misses of a field.
_FOREIGN_ENV = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE", "PRESET", "PATH", "HOME"}


MODEL, OPTIM, QUANT, EVAL, RUN = "model", "optimizer", "quantization", "evaluation", "run"  # setting groups


def setting(default, group: str, lo=None, hi=None, above=None, choices=None, artifact: bool = False):
    """A Hyperparameters field with what it accepts beside it: lo <= v <= hi, v > above, v in choices (a callable
    for tables defined further down). The artifact stores every MODEL field and those marked artifact=True:
    exactly what rebuilding the model from its bytes needs."""
    return field(default=default, metadata={"group": group, "lo": lo, "hi": hi, "above": above,
                                            "choices": choices, "artifact": artifact or group == MODEL})


@dataclass
class Hyperparameters:
    """Every field is read from the env var of the same name in upper case. Defaults = `sota` (spec §9)."""
    preset: str = setting("sota", RUN)
    # ---- run: data, identity, schedule and budget ----------------------------------------------------------
    data_dir: str = setting("./data", RUN)
    data_path: str = setting("", RUN)              # "" = derived from data_dir / vocab_size / caseops_enabled
    tokenizer_path: str = setting("", RUN)         # "" = derived likewise
    caseops_enabled: bool = setting(True, RUN)
    run_id: str = setting("", RUN)                 # "" = random
    seed: int = setting(1337, RUN)
    artifact_dir: str = setting("", RUN)           # "" = runs/<run_id>
    train_loader: str = setting("packed", RUN, choices=("packed", "shuffled"))  # document packing | random rows
    val_overlap_scan_tokens: int = setting(2_000_000, RUN, lo=0)  # head of each train shard searched for val docs
    allow_val_overlap: bool = setting(False, RUN)  # 1 = train even when validation documents are in the train shards
    val_max_tokens: int = setting(0, RUN, lo=0)    # 0 = the whole validation set (else not a challenge score)
    extra_env: str = setting("", RUN)              # comma list of deliberate env vars that resemble settings
    iterations: int = setting(20000, RUN, lo=0)
    max_wallclock_seconds: float = setting(600.0, RUN, lo=0)
    warmup_steps: int = setting(20, RUN, lo=0)     # compile warm-up steps, rolled back before the timer starts
    train_batch_tokens: int = setting(786_432, RUN, above=0)
    train_seq_len: int = setting(2048, RUN, above=0, artifact=True)  # YaRN stretches beyond it
    train_seq_schedule: str = setting("", RUN)     # "" = TRAIN_SEQ_LEN throughout; "1024@0.1,2048@0.7,3072@1.0"
    train_seq_schedule_mode: str = setting("wallclock", RUN, choices=("wallclock", "step"))
    seq_change_warmup_steps: int = setting(32, RUN, lo=0)  # LR re-warm-up after a schedule change (#2014)
    val_loss_every: int = setting(0, RUN, lo=0)
    train_log_every: int = setting(500, RUN, above=0)
    attn_backend: str = setting("auto", RUN, choices=("auto", "sdpa", "flex", "flash3"))
    fused_ce_enabled: bool = setting(True, RUN)    # Triton softcapped CE wherever gradients flow (CUDA only)
    fused_mlp_enabled: bool = setting(False, RUN)  # Triton LeakyReLU^2 up-projection: off until it beats compiled
    compile: str = setting("auto", RUN, choices=("auto", "0", "1"))  # auto = CUDA only
    autocast_bf16: str = setting("auto", RUN, choices=("auto", "0", "1"))  # auto = CUDA (CPU measured slower)
    # ---- model: every field is stored in the artifact ------------------------------------------------------
    vocab_size: int = setting(8192, MODEL, above=0)
    num_layers: int = setting(11, MODEL, above=0)
    model_dim: int = setting(512, MODEL, above=0)
    num_heads: int = setting(8, MODEL, above=0)
    num_kv_heads: int = setting(4, MODEL, above=0)
    mlp_mult: float = setting(4.0, MODEL, above=0)
    mlp_negative_slope: float = setting(0.5, MODEL, lo=0, hi=1)  # 0 = relu^2 (baseline), 0.5 = LeakyReLU(0.5)^2
    tie_embeddings: bool = setting(True, MODEL)
    logit_softcap: float = setting(30.0, MODEL, lo=0)
    asym_logit_rescale: bool = setting(False, MODEL)  # learned +/- softcaps (#1923), trained with the model
    rope_base: float = setting(10000.0, MODEL)
    rope_dims: int = setting(16, MODEL, lo=0)      # 0 = rotate the whole head dim
    rope_yarn: bool = setting(False, MODEL)
    ln_scale: bool = setting(True, MODEL)
    qk_gain_init: float = setting(5.0, MODEL)
    xsa_last_n: int = setting(11, MODEL, lo=0)
    skip_gates_enabled: bool = setting(True, MODEL)
    num_loops: int = setting(2, MODEL, lo=0)
    loop_start: int = setting(3, MODEL)
    loop_end: int = setting(5, MODEL)
    parallel_start_layer: int = setting(8, MODEL, lo=0)  # 0 = off
    parallel_final_lane: str = setting("mean", MODEL, choices=("mean", "attn", "mlp"))
    smear_gate_enabled: bool = setting(True, MODEL)
    gate_window: int = setting(12, MODEL, above=0)
    sparse_attn_gate_enabled: bool = setting(True, MODEL)
    sparse_attn_gate_scale: float = setting(0.5, MODEL)
    # ---- optimizer and schedule ----------------------------------------------------------------------------
    tied_embed_init_std: float = setting(0.005, OPTIM, lo=0)
    embed_lr: float = setting(0.6, OPTIM, lo=0)
    tied_embed_lr: float = setting(0.03, OPTIM, lo=0)
    head_lr: float = setting(0.008, OPTIM, lo=0)   # untied output head (the challenge baseline's HEAD_LR)
    matrix_lr: float = setting(0.026, OPTIM, lo=0)
    scalar_lr: float = setting(0.02, OPTIM, lo=0)
    muon_momentum: float = setting(0.97, OPTIM, lo=0, hi=1)
    muon_backend_steps: int = setting(5, OPTIM, above=0)
    muon_coeffs: str = setting("polar_express", OPTIM, choices=lambda: tuple(NS_COEFFICIENTS))
    muon_momentum_warmup_start: float = setting(0.92, OPTIM, lo=0, hi=1)
    muon_momentum_warmup_steps: int = setting(1500, OPTIM, lo=0)
    muon_row_normalize: bool = setting(True, OPTIM)
    beta1: float = setting(0.9, OPTIM, lo=0, hi=1)
    beta2: float = setting(0.99, OPTIM, lo=0, hi=1)
    adam_eps: float = setting(1e-8, OPTIM, lo=0)
    grad_clip_norm: float = setting(0.3, OPTIM, lo=0)
    adam_wd: float = setting(0.02, OPTIM, lo=0)
    muon_wd: float = setting(0.095, OPTIM, lo=0)
    embed_wd: float = setting(0.085, OPTIM, lo=0)
    ema_decay: float = setting(0.9965, OPTIM, lo=0, hi=1)
    lr_warmup_steps: int = setting(0, OPTIM, lo=0)
    warmdown_frac: float = setting(0.85, OPTIM, lo=0, hi=1)
    min_lr: float = setting(0.1, OPTIM, lo=0)
    enable_looping_at: float = setting(0.35, OPTIM, lo=0, hi=1)
    # ---- quantization and artifact -------------------------------------------------------------------------
    gptq_reserve_seconds: float = setting(1.0, QUANT, lo=0)  # budget end kept free: a last calibration batch slower
                                                             # than those before it still ends inside (§11)
    gptq_calibration_batches: int = setting(16, QUANT, lo=0)  # the batches training leaves time for (more fill a
                                                              # leftover, fewer if the budget runs out first)
    gptq_min_calibration_batches: int = setting(4, QUANT, lo=1)  # collected even past the budget (logged as such)
    calibration_batch_tokens: int = setting(98_304, QUANT, above=0)  # tokens per rank per batch (48 x 2048)
    quant_min_numel: int = setting(65_536, QUANT, lo=0)  # float matrices up to this size stay fp16 (spec §5.3)
    matrix_bits: int = setting(6, QUANT, lo=2, hi=8)
    embed_bits: int = setting(7, QUANT, lo=2, hi=8)
    clip_mode: str = setting("fixed", QUANT, choices=("fixed", "adaptive", "budget"))
    matrix_clip_sigmas: float = setting(12.85, QUANT)
    embed_clip_sigmas: float = setting(14.0, QUANT)
    mlp_clip_sigmas: float = setting(11.5, QUANT)
    attn_clip_sigmas: float = setting(13.0, QUANT)
    adaptive_clip_exponent: float = setting(-0.15, QUANT)
    adaptive_clip_min: float = setting(6.0, QUANT, above=0)
    adaptive_clip_max: float = setting(24.0, QUANT)
    target_artifact_bytes: int = setting(15_960_000, QUANT, above=0, hi=ARTIFACT_LIMIT_BYTES)
    lqer_enabled: bool = setting(True, QUANT)
    lqer_rank: int = setting(4, QUANT, lo=0)
    lqer_top_k: int = setting(3, QUANT, lo=0)
    lqer_asym_group: int = setting(64, QUANT, above=0, artifact=True)  # dequantization needs it
    gated_attn_quant_gate: bool = setting(True, QUANT)  # attention gate int8 per row (#1855) or fp16 (#2135)
    awq_lite_enabled: bool = setting(False, QUANT)  # the most salient column groups at AWQ_LITE_BITS (#1908)
    awq_lite_bits: int = setting(8, QUANT, lo=2, hi=8)
    awq_lite_group_top_k: int = setting(1, QUANT, lo=0)
    awq_lite_group_size: int = setting(64, QUANT, above=0)
    compressor: str = setting("rans", QUANT, choices=lambda: (*COMPRESSORS, "rans"))  # rans = weight coder
    save_prequant: bool = setting(True, QUANT)     # write prequant_model.pt + hessians.pt for REQUANT_FROM sweeps
    requant_from: str = setting("", QUANT)         # a saved prequant_model.pt: skip training (reuses hessians.pt)
    # ---- evaluation and test-time training -----------------------------------------------------------------
    eval_only: bool = setting(False, EVAL)
    artifact: str = setting("", EVAL)              # artifact path for EVAL_ONLY=1
    eval_seq_len: int = setting(2048, EVAL, above=0)
    eval_stride: int = setting(0, EVAL, lo=0)      # 0 = no sliding-window eval; else its stride
    val_batch_tokens: int = setting(524_288, EVAL, above=0)
    eval_time_budget: float = setting(600.0, EVAL, lo=0)
    save_token_losses: str = setting("", EVAL)     # "" = off; else a directory for per-token float32 losses
    ttt_enabled: bool = setting(True, EVAL)
    ttt_lora_rank: int = setting(80, EVAL, lo=0)
    ttt_lora_lr: float = setting(1e-4, EVAL)
    ttt_lora_alpha: float = setting(144.0, EVAL)
    ttt_chunk_size: int = setting(48, EVAL, above=0)
    ttt_eval_seq_len: int = setting(2048, EVAL, above=0)
    ttt_batch_size: int = setting(64, EVAL, above=0)
    ttt_grad_steps: int = setting(1, EVAL, lo=0)
    ttt_warm_start_a: bool = setting(True, EVAL)   # keep A across document batches (the record); 0 = a fresh A per
                                                   # batch, so a doc's score does not depend on earlier batches
    ttt_lora_a_init: str = setting("slot", EVAL, choices=("slot", "shared"))  # A drawn per batch slot (the record)
                                                   # | one A per adapter for every slot and batch (Generator(SEED))
    ttt_batch_order: str = setting("record", EVAL, choices=("record", "longest_first"))  # record: cut the docs
                                                   # sorted by ascending length into batches, the batch with the
                                                   # longest doc first | longest_first: cut from the longest doc
    eval_clock: str = setting("record", EVAL, choices=("record", "strict"))  # what EVAL_TIME_BUDGET times:
                                                   # record = the final eval after deserialization and the TTT
                                                   # warm-up on synthetic tokens | strict = from reading the artifact
    ttt_weight_decay: float = setting(0.5, EVAL)
    ttt_local_lr_mult: float = setting(1.0, EVAL, lo=0)  # x TTT_LORA_LR (#1953)
    ttt_q_lora: bool = setting(True, EVAL)         # adapter targets (the head, O and MLP always adapt)
    ttt_k_lora: bool = setting(True, EVAL)
    ttt_v_lora: bool = setting(True, EVAL)
    ttt_mask: str = setting("", EVAL, choices=("", "no_qv"))  # no_qv: no Q and V adapters (#1953)
    ttt_short_score_first_enabled: bool = setting(False, EVAL)  # shorter chunks for batches of short docs (#2014)
    ttt_short_score_first_steps: str = setting("256:8,2000:24", EVAL)  # "max doc length:chunk,..."
    ttt_beta1: float = setting(0.0, EVAL, lo=0, hi=1)
    ttt_beta2: float = setting(0.99, EVAL, lo=0, hi=1)
    phased_ttt_prefix_docs: int = setting(2500, EVAL, lo=0)
    phased_ttt_num_phases: int = setting(3, EVAL, lo=0)
    phased_ttt_membership: str = setting("record", EVAL, choices=("record", "exact"))  # record: pause after the
                                                   # batch that crosses a phase boundary, SGD on the `boundary`
                                                   # shortest scored docs | exact: pause at the boundary, SGD on all
    global_ttt_lr: float = setting(0.001, EVAL)
    global_ttt_momentum: float = setting(0.9, EVAL)
    global_ttt_chunk_tokens: int = setting(32768, EVAL, above=0)
    global_ttt_grad_clip: float = setting(1.0, EVAL)
    ngram_tilt_enabled: bool = setting(False, EVAL)  # causal token n-gram tilt of TTT scoring (#2135, A1)
    token_order: int = setting(16, EVAL, lo=2)      # n-gram order: the context is TOKEN_ORDER-1 tokens
    token_threshold: float = setting(0.8, EVAL, lo=0, hi=1)  # hint when its share of the context's counts >= this
    token_boost: float = setting(2.625, EVAL, lo=0)  # beta added to the hinted token's logit

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_env(cls, env=None) -> "Hyperparameters":
        """Preset defaults, then every UPPER_CASE field set in `env`. Set variables that are not settings but
        resemble one are kept in `near_misses` for validate() to report."""
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
        hp.near_misses = _near_miss_env_vars(env, types)
        return hp

    @classmethod
    def artifact_fields(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.metadata["artifact"]]

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
        """Reject impossible values before any data is read: every error at once, each naming the env var, its
        value and what is accepted."""
        errors = []

        def bad(name, why):
            errors.append(f"{name.upper()}={getattr(self, name)!r}: {why}")
        for f in fields(self):
            m, v = f.metadata, getattr(self, f.name)
            choices = m["choices"]() if callable(m["choices"]) else m["choices"]
            if choices and v not in choices:
                bad(f.name, f"must be one of {list(choices)}")
            elif m["lo"] is not None and m["hi"] is not None and not m["lo"] <= v <= m["hi"]:
                bad(f.name, f"must be in [{m['lo']}, {m['hi']}]")
            elif m["above"] is not None and m["hi"] is not None and not m["above"] < v <= m["hi"]:
                bad(f.name, f"must be in ({m['above']}, {m['hi']}]")
            elif m["lo"] is not None and v < m["lo"]:
                bad(f.name, f"must be >= {m['lo']}")
            elif m["above"] is not None and v <= m["above"]:
                bad(f.name, f"must be > {m['above']}")
        shapes_ok = self.num_heads > 0 and self.num_kv_heads > 0 and self.model_dim > 0 and self.num_layers > 0
        if self.iterations == 0 and self.max_wallclock_seconds == 0:
            bad("iterations", "and MAX_WALLCLOCK_SECONDS=0: one of them must bound training")
        if shapes_ok and self.model_dim % self.num_heads:
            bad("model_dim", f"must be divisible by NUM_HEADS={self.num_heads}")
        if shapes_ok and self.num_heads % self.num_kv_heads:
            bad("num_heads", f"must be divisible by NUM_KV_HEADS={self.num_kv_heads}")
        head_dim = self.model_dim // max(self.num_heads, 1)
        if shapes_ok and head_dim % 2:
            bad("model_dim", f"gives an odd head dim {head_dim}; MODEL_DIM/NUM_HEADS must be even")
        if shapes_ok and (self.rope_dims > head_dim or self.rope_dims % 2):
            bad("rope_dims", f"must be even and <= head dim {head_dim} (0 = whole head)")
        if world_size <= 0 or 8 % world_size:
            errors.append(f"WORLD_SIZE={world_size}: must divide 8 (1, 2, 4 or 8 processes)")
        if self.train_seq_len > 0 and (self.train_batch_tokens % 8 or self.train_batch_tokens // 8 % self.train_seq_len):
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
        if self.adaptive_clip_max < self.adaptive_clip_min:
            bad("adaptive_clip_max", f"must be >= ADAPTIVE_CLIP_MIN={self.adaptive_clip_min}")
        try:
            stages = parse_seq_schedule(self)
            local = self.train_batch_tokens // 8
            if any(not 0 < st.until <= 1 or st.length <= 0 or local % st.length for st in stages) or \
                    max(st.length for st in stages) != self.train_seq_len:
                raise ValueError
        except ValueError:
            bad("train_seq_schedule", f"must be LEN@FRAC,... with 0 < FRAC <= 1, each LEN dividing "
                f"TRAIN_BATCH_TOKENS/8={self.train_batch_tokens // 8} and the largest LEN = TRAIN_SEQ_LEN="
                f"{self.train_seq_len}, e.g. 1024@0.1,2048@0.7,3072@1.0")
        try:
            if any(c <= 0 for _, c in parse_short_chunks(self)):
                raise ValueError
        except ValueError:
            bad("ttt_short_score_first_steps", "must be MAX_DOC_LEN:CHUNK,... with positive integers, "
                "e.g. 256:8,2000:24")
        if self.ngram_tilt_enabled and not self.ttt_enabled:
            bad("ngram_tilt_enabled", "tilts TTT scoring: it needs TTT_ENABLED=1")
        if self.eval_only and not self.artifact:
            errors.append("EVAL_ONLY=1 needs ARTIFACT=<path of an artifact written by this script>")
        deliberate = {v.strip().upper() for v in self.extra_env.split(",")}
        errors += [f"{var} is set but is not a setting of train_gpt.py; did you mean {best}? (if {var} is meant "
                   f"for something else, add it to EXTRA_ENV)" for var, best in self.near_misses if var not in deliberate]
        if check_files:
            errors += self.file_errors()
        if errors:
            raise ConfigError(errors[0] if len(errors) == 1 else
                              f"{len(errors)} errors in the configuration:\n  " + "\n  ".join(errors))

    def file_errors(self) -> list[str]:
        errors = [f"{var}={path!r}: no such file" for var, path in [
            ("ARTIFACT", self.artifact if self.eval_only else ""), ("REQUANT_FROM", self.requant_from)]
            if path and not os.path.isfile(path)]
        data_path, tok_path = self.resolved_paths()
        fetch = ("fetch it with `python data/cached_challenge_fineweb.py --variant "
                 f"sp{self.vocab_size}{' --caseops' if self.caseops_enabled else ''}` or build the offline "
                 "sample with `python data/build_offline_sample.py` (then PRESET=cpu_smoke)")
        if not glob.glob(os.path.join(data_path, "fineweb_val_*.bin")):
            errors.append(f"DATA_PATH={data_path!r}: no fineweb_val_*.bin shards there; {fetch}")
        if not self.eval_only and not glob.glob(os.path.join(data_path, "fineweb_train_*.bin")):
            errors.append(f"DATA_PATH={data_path!r}: no fineweb_train_*.bin shards there; {fetch}")
        if not os.path.isfile(tok_path):
            errors.append(f"TOKENIZER_PATH={tok_path!r}: no such file; {fetch}")
        if self.caseops_enabled and not glob.glob(os.path.join(data_path, "fineweb_val_bytes_*.bin")):
            errors.append(f"CASEOPS_ENABLED=1 but DATA_PATH={data_path!r} has no fineweb_val_bytes_*.bin byte "
                          "sidecar; set CASEOPS_ENABLED=0 or rebuild the data with --caseops")
        outputs = [(f"ARTIFACT_DIR={self.artifact_dir!r}", self.artifact_dir or "runs"),
                   ("logs/ (the run log folder, in the working directory)", "logs"),
                   (f"SAVE_TOKEN_LOSSES={self.save_token_losses!r}", self.save_token_losses)]
        errors += [f"{what}: {why}" for what, path in outputs if path and (why := unwritable(path))]
        return errors


def unwritable(path: str) -> str | None:
    """Why a directory cannot be made or written at `path` (None when it can): the run writes there only after
    minutes of training."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return f"{probe} is a file, not a directory"
    try:
        tempfile.TemporaryFile(dir=probe).close()
    except OSError as e:
        return f"cannot create files in {probe} ({e.strerror})"
    return None


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


def _near_miss_env_vars(env, types) -> list[tuple[str, str]]:
    """(variable, setting) for set env vars that are not settings but are 1-2 edits from one: a sweep would
    silently run the default."""
    names = [n.upper() for n in types]
    out = []
    for var in sorted(env):
        if var in names or var in _FOREIGN_ENV or not var.isupper():
            continue
        best = min(names, key=lambda n: _edit_distance(var, n))
        if _edit_distance(var, best) <= 2 and len(var) >= 4:
            out.append((var, best))
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


# Ranks wait in a collective while others compile cold (minutes on 8 GPUs); NCCL's default 10 min is too close.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


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
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT,
                                **({"device_id": device} if device.type == "cuda" else {}))
    if not hp.run_id:
        hp.run_id = _agree_run_id(distributed)
    run_dir = hp.artifact_dir or os.path.join("runs", hp.run_id)
    logger = RunLogger([os.path.join("logs", f"{hp.run_id}.txt"), os.path.join(run_dir, "log.txt")],
                       enabled=rank == 0, echo=echo)
    seed_everything(hp.seed)
    return Runtime(rank, world, local_rank, device, distributed, 8 // world, run_dir, logger)


def _agree_run_id(distributed: bool) -> str:
    rid = time.strftime("%Y%m%d_%H%M%S_") + uuid.uuid4().hex[:6]
    if distributed:
        box = [rid]
        dist.broadcast_object_list(box, src=0)
        rid = box[0]
    return rid


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def all_reduce_(t: torch.Tensor, op=None) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


# =============================================================================================
# Data: shard format, tokenizer byte accounting, validation set, training loaders.
# =============================================================================================

SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_INTS = 20240520, 1, 256
SHARD_HEADER_BYTES = SHARD_HEADER_INTS * 4


class ShardError(ValueError):
    """A shard file that does not follow the official format; the message names the file."""


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


# ---- validation overlap guard: the validation documents must not be in the training shards ------------------
# A data prep left at 10,000 validation documents instead of 50,000 puts the other 40,000 at the start of the train
# shards; challenge submissions were excluded for it (docs/data_guard.md). A document is known by its length and its
# first VAL_KEY_TOKENS tokens.
VAL_KEY_TOKENS = 32
# Identical pages in two FineWeb crawls may put a few validation documents in even the canonical train split (not
# measured here); a leaky prep puts most of them there. Stop above this fraction of validation documents.
VAL_OVERLAP_TOLERANCE = 0.01
# The canonical exports as the challenge's logs count them (docs/record_settings.md): (vocab, CaseOps) -> train
# shards, validation documents, validation targets cut to whole CANONICAL_VAL_UNIT-token rows (the record's
# EVAL_SEQ_LEN). sp1024: the official manifest as the baseline's logs show it.
CANONICAL_SPLITS = {(8192, True): (80, 50_000, 47_851_520), (1024, False): (80, 50_000, 62_021_632)}
CANONICAL_VAL_UNIT = 2048


def document_keys(tokens: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """uint64 key of each document tokens[start:end] (start = its BOS) longer than VAL_KEY_TOKENS: its length and
    first VAL_KEY_TOKENS tokens. Shorter ones are not keyed: unrelated short documents share their few tokens."""
    long = ends - starts > VAL_KEY_TOKENS
    starts, key = starts[long], (ends - starts)[long].astype(np.uint64)
    for col in tokens[starts[:, None] + 1 + np.arange(VAL_KEY_TOKENS)].astype(np.uint64).T:  # FNV prime, mod 2^64
        key = key * np.uint64(0x100000001B3) + col
    return key


@dataclass
class SplitCheck:
    """What start-up found about the split (logged and in the compliance block)."""
    val_docs: int
    val_targets: int                  # whole CANONICAL_VAL_UNIT rows, as the canonical counts are taken
    train_shards: int
    val_docs_in_train: int            # validation documents found starting a document in the scanned train tokens
    scanned_tokens: int
    train_tokens: int
    seconds: float
    leaks: dict                       # shard name -> validation documents found in it
    canonical: bool


def check_split(hp: Hyperparameters, train_files: list[str], bos_id: int) -> SplitCheck:
    """Key every validation document, stream the document starts in the head (VAL_OVERLAP_SCAN_TOKENS; 0 = all)
    of each train shard and count the validation keys there; compare the split's counts with the canonical one."""
    t0 = time.perf_counter()
    val = np.concatenate([load_shard(f) for f in list_shards(hp.resolved_paths()[0], "val")])
    starts = np.flatnonzero(val == bos_id)
    val_keys = np.unique(document_keys(val, starts, np.append(starts[1:], len(val))))
    leaks, scanned, total = {}, 0, 0
    for f in train_files:
        tok = load_shard(f)
        head = len(tok) if hp.val_overlap_scan_tokens == 0 else min(len(tok), hp.val_overlap_scan_tokens)
        s = np.flatnonzero(tok[:head] == bos_id)  # the last start's document may run on: not keyed
        keys = document_keys(tok, s[:-1], s[1:])
        found = int((val_keys[np.searchsorted(val_keys, keys).clip(max=len(val_keys) - 1)] == keys).sum())
        if found:
            leaks[os.path.basename(f)] = found
        scanned, total = scanned + head, total + len(tok)
    val_targets = (len(val) - 1) // CANONICAL_VAL_UNIT * CANONICAL_VAL_UNIT
    counts = (len(train_files), len(starts), val_targets)
    canonical = CANONICAL_SPLITS.get((hp.vocab_size, hp.caseops_enabled)) == counts
    return SplitCheck(len(starts), val_targets, len(train_files), sum(leaks.values()), scanned, total,
                      time.perf_counter() - t0, leaks, canonical)


def enforce_split(check: SplitCheck, hp: Hyperparameters, log) -> None:
    """Log the check; stop (ConfigError) when too many validation documents are in the scanned train tokens."""
    per_100m = check.seconds * 1e8 / max(check.scanned_tokens, 1)
    log(f"split_check: val_docs:{check.val_docs} val_docs_in_train:{check.val_docs_in_train} train_shards:"
        f"{check.train_shards} scanned:{check.scanned_tokens}/{check.train_tokens} train tokens in "
        f"{check.seconds:.2f}s ({per_100m:.2f}s per 100M) canonical:{int(check.canonical)}")
    if not check.canonical:
        log(f"WARNING: not the canonical split (train shards, val docs, val tokens) "
            f"{CANONICAL_SPLITS.get((hp.vocab_size, hp.caseops_enabled))}: this data has ({check.train_shards}, "
            f"{check.val_docs}, {check.val_targets}); a leaderboard run needs the canonical data")
    limit = VAL_OVERLAP_TOLERANCE * check.val_docs * check.scanned_tokens / max(check.train_tokens, 1)
    if check.val_docs_in_train > limit:
        worst = max(check.leaks, key=check.leaks.get)
        msg = (f"{check.val_docs_in_train} of {check.val_docs} validation documents are in the training shards "
               f"(most in {worst}: {check.leaks[worst]}): the data was prepared with too few validation documents; "
               "re-export it with 50,000 (or set ALLOW_VAL_OVERLAP=1)")
        if not hp.allow_val_overlap:
            raise ConfigError(f"DATA_PATH={hp.resolved_paths()[0]!r}: {msg}")
        log(f"WARNING: ALLOW_VAL_OVERLAP=1: {msg}")
    elif check.val_docs_in_train:
        log(f"WARNING: {check.val_docs_in_train} validation document(s) also start a training document "
            f"({', '.join(check.leaks)}), within the {VAL_OVERLAP_TOLERANCE:.0%} that cross-crawl duplicates allow")


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
    across ranks, as one flat row; the model cuts it into documents at BOS and every GPT.doc_piece_len tokens
    into a document (as the record, never at fixed row starts). Deterministic, seed-independent, disjoint."""

    def __init__(self, files: list[str], rank: int, world_size: int, local_tokens: int, seq_len: int,
                 device: torch.device):
        if local_tokens % seq_len:
            raise ConfigError(f"micro-batch of {local_tokens} tokens is not a multiple of TRAIN_SEQ_LEN={seq_len}")
        self.stream = TokenStream(files)
        self.rank, self.world, self.local, self.seq_len, self.device = rank, world_size, local_tokens, seq_len, device

    def next_host_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) on the CPU: the training step derives FlashAttention's cu_seqlens from them (attention_extras)."""
        span = self.local + 1
        chunk = self.stream.take(self.world * span)
        mine = torch.from_numpy(chunk[self.rank * span: (self.rank + 1) * span])
        return mine[None, :-1], mine[None, 1:]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.next_host_batch()
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
        x, y = self.next_host_batch()
        return x.to(self.device), y.to(self.device)

    def next_host_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
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
        return t[:, :-1], t[:, 1:]


def segment_starts(ids: torch.Tensor, bos_id: int, piece_len: int = 0) -> torch.Tensor:
    """Where a segment starts in each row: column 0, each BOS and, with piece_len, every piece_len tokens into a
    document (the record's cut at doc start + k*TRAIN_SEQ_LEN)."""
    col = torch.arange(ids.size(1), device=ids.device)
    starts = (ids == bos_id) | (col == 0)
    if piece_len and ids.size(1) > piece_len:
        starts = starts | ((col - last_start(starts)) % piece_len == 0)
    return starts


def last_start(starts: torch.Tensor) -> torch.Tensor:
    """Column of the latest segment start at or before each position."""
    col = torch.arange(starts.size(-1), device=starts.device)
    return torch.cummax(torch.where(starts, col, 0), dim=-1).values


# FlashAttention's varlen kernels launch tiles for every segment of cu_seqlens, empty ones included, and the
# backward sizes its fp32 dq/dk/dv accumulators by tokens + 128 x segments. Compiled forwards therefore get
# cu_seqlens from the host (varlen_cu_seqlens: the real segments, padded to a multiple of FA3_CU_MULTIPLE, the
# record's buckets) as an input whose length is a dynamic dimension: one graph for every bucket, no host sync.
FA3_CU_MULTIPLE = 64
# The in-graph fallback (a compiled caller without host tokens) holds every row start plus one document per this
# many tokens (FineWeb averages ~960 tokens per document, spec §7.4); a batch beyond it stops with a device-side
# assert. At [1, 98304] that is 6,145 segments for ~100 documents: callers that can pass varlen_cu_seqlens do.
FA3_MIN_MEAN_DOC_TOKENS = 16


def cu_seqlens_capacity(B: int, T: int) -> int:
    return B + -(-B * T // FA3_MIN_MEAN_DOC_TOKENS)


def varlen_cu_seqlens(ids: torch.Tensor, bos_id: int, piece_len: int = 0) -> torch.Tensor:
    """cu_seqlens of CPU token rows [B, T], computed on the host before they go to the device: the segments of
    segment_starts (row starts, BOS, piece cuts), then B*T repeated up to a multiple of FA3_CU_MULTIPLE segments
    (empty segments launch nothing worth counting). int32 [round_up(segments, 64) + 1]. No scalar is read back."""
    assert ids.device.type == "cpu", "varlen_cu_seqlens runs on the host copy of the tokens"
    B, T = ids.shape
    pos = torch.nonzero(segment_starts(ids, bos_id, piece_len).reshape(-1)).flatten().to(torch.int32)
    cap = -(-pos.numel() // FA3_CU_MULTIPLE) * FA3_CU_MULTIPLE
    return torch.cat([pos, pos.new_full((cap - pos.numel() + 1,), B * T)])


def cu_seqlens_from_segments(seg: torch.Tensor) -> torch.Tensor:
    """Flattened varlen boundaries (FlashAttention), the in-graph fallback: a segment starts at each row start and
    each BOS, so no segment is longer than the row (max_seqlen = T). Static length cu_seqlens_capacity(B, T) + 1:
    the unused tail repeats B*T (empty segments). Traceable: no host sync, no data-dependent shape."""
    B, T = seg.shape
    starts = torch.cat([torch.ones_like(seg[:, :1], dtype=torch.bool), seg[:, 1:] != seg[:, :-1]], 1).reshape(-1)
    cap = cu_seqlens_capacity(B, T)
    torch._assert_async(starts.sum() <= cap, "more documents in one batch than cu_seqlens_capacity() holds")
    pos = torch.nonzero_static(starts, size=cap, fill_value=B * T).flatten().to(torch.int32)
    return torch.cat([pos, pos.new_full((1,), B * T)])


# =============================================================================================
# Kernels: attention backends (document-masked), softcapped cross-entropy, fused MLP up-projection. Each
# accelerated path has an eager reference of the same signature; CPU runs the reference.
# =============================================================================================

# Masked SDPA with GQA on CUDA runs PyTorch's math kernel (flash rejects masks, mem-efficient rejects GQA): fp32
# probabilities, O(T^2) saved activations (~110 GiB at the record's 48 x 2048 micro-batch). Refused above this.
SDPA_CUDA_MAX_SEQ_LEN = 512


class DocStructure(NamedTuple):
    """Document structure of one forward's rows, prepared once and shared by every layer."""
    seg: torch.Tensor       # [B, T] document id of every position (one id per row when rows_are_docs)
    prepared: object        # sdpa: bool mask [B,1,T,T]; flash3: cu_seqlens int32; flex: BlockMask; else None
    pos: torch.Tensor       # [B or 1, T] position inside its segment: the rotary angle (RoPE is relative)
    piece_len: int          # no segment is longer (FlashAttention's max_seqlen)


def choose_attention_backend(hp: Hyperparameters, device: torch.device) -> str:
    """ATTN_BACKEND=auto: FlashAttention 3 when importable on CUDA, else compiled FlexAttention; SDPA on CPU."""
    requested = hp.attn_backend
    if requested in ("auto", "flash3") and (device.type == "cuda" or requested == "flash3"):
        try:
            import flash_attn_interface  # noqa: F401
            return "flash3"
        except ImportError:
            if requested == "flash3":
                raise ConfigError("ATTN_BACKEND=flash3 but flash_attn_interface is not importable; install the FA3 "
                                  "wheel (docs/runpod_guide.md) or use ATTN_BACKEND=auto (FlexAttention)") from None
    if device.type != "cuda":
        if requested == "flex":
            raise ConfigError("ATTN_BACKEND=flex needs CUDA (FlexAttention has no CPU backward); use sdpa or auto")
        return "sdpa"
    longest = max(hp.train_seq_len, hp.eval_seq_len, hp.ttt_eval_seq_len)
    if requested == "sdpa" and longest > SDPA_CUDA_MAX_SEQ_LEN:
        raise ConfigError(f"ATTN_BACKEND=sdpa on CUDA with sequences of {longest} tokens (TRAIN_SEQ_LEN / "
                          f"EVAL_SEQ_LEN / TTT_EVAL_SEQ_LEN): masked SDPA with GQA runs the math kernel, O(T^2) "
                          f"memory; allowed up to {SDPA_CUDA_MAX_SEQ_LEN}. Use ATTN_BACKEND=auto (flex or flash3)")
    return "sdpa" if requested == "sdpa" else "flex"


def fa3_fullgraph_problem(device: torch.device) -> str | None:
    """Why torch.compile(fullgraph=True) cannot trace flash_attn_interface's varlen call, or None when it can: FA3
    wheels that register their kernels with torch.library trace; older ones call the C extension from a plain
    autograd.Function, a graph break that would stop the run at its first compiled step. A tiny forward and
    backward on `device`, compiled with aot_eager (seconds, before any training)."""
    try:
        from flash_attn_interface import flash_attn_varlen_func
    except ImportError as e:
        return f"flash_attn_interface is not importable ({e})"

    def attend(q, k, v, cu):
        out = flash_attn_varlen_func(q, k, v, cu, cu, 64, 64, causal=True)
        return out[0] if isinstance(out, tuple) else out
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(128, h, 64, generator=g).to(device, torch.bfloat16).requires_grad_() for h in (2, 1, 1))
    cu = torch.tensor([0, 64, 128], dtype=torch.int32, device=device)
    try:
        torch.compile(attend, backend="aot_eager", fullgraph=True)(q, k, v, cu).float().sum().backward()
    except Exception as e:
        return f"its varlen call does not compile with fullgraph=True ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
    return None


def attention_backend_for_run(hp: Hyperparameters, device: torch.device) -> tuple[str, str]:
    """(backend, why): choose_attention_backend, then, when FA3 would run compiled, fa3_fullgraph_problem. An FA3
    that does not trace falls back to flex under ATTN_BACKEND=auto and is refused under ATTN_BACKEND=flash3,
    before any data is read (a graph break would otherwise surface at the first training step)."""
    backend = choose_attention_backend(hp, device)
    why = {"flash3": "flash_attn_interface importable", "flex": "FlexAttention (no importable FA3)",
           "sdpa": "SDPA"}.get(backend, backend)
    if backend == "flash3" and compile_enabled(hp, device):
        problem = fa3_fullgraph_problem(device)
        if problem and hp.attn_backend == "flash3":
            raise ConfigError(f"ATTN_BACKEND=flash3 with torch.compile: {problem}. Install an FA3 build that "
                              f"registers torch.library ops (docs/runpod_guide.md), or use ATTN_BACKEND=auto")
        if problem:
            backend = "flex" if device.type == "cuda" else "sdpa"
            return backend, f"FA3 importable but {problem}: using {backend}"
        why += ", varlen call traced with fullgraph=True"
    return backend, why


def document_causal_mask(seg: torch.Tensor) -> torch.Tensor:
    T = seg.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=seg.device).tril()
    return ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]


def with_previous_block(t: torch.Tensor, fill) -> torch.Tensor:
    """[B, nb, P, ...] -> [B, nb, 2P, ...]: each block preceded by the block before it (`fill` before the first)."""
    prev = torch.cat([torch.full_like(t[:, :1], fill), t[:, :-1]], 1)
    return torch.cat([prev, t], 2)


def banded_causal_mask(seg: torch.Tensor, piece_len: int) -> torch.Tensor:
    """For rows far longer than their longest segment (packed training rows): queries in blocks of piece_len
    see keys of their own and the previous block only, which holds every key of their segment. Bool
    [B, nb, 1, P, 2P]; T x 2P work instead of T^2. Padding is a segment of its own (no row is all False)."""
    B, T = seg.shape
    nb = -(-T // piece_len)
    seg = F.pad(seg, (0, nb * piece_len - T), value=-1).view(B, nb, piece_len)
    idx = torch.arange(nb * piece_len, device=seg.device).view(1, nb, piece_len).expand(B, -1, -1)
    seg_k, idx_k = with_previous_block(seg, -2), with_previous_block(idx, -1)
    return ((seg[..., :, None] == seg_k[..., None, :]) & (idx[..., :, None] >= idx_k[..., None, :]))[:, :, None]


FLEX_BLOCK = 128  # FlexAttention's default sparse block


def _causal(b, h, qi, ki):
    return qi >= ki


def causal_block_mask(T, max_len: int, device) -> BlockMask:
    """Plain causal BlockMask for rows of T <= max_len + FLEX_BLOCK tokens, its block tensors sized by max_len,
    not T: a mask of ceil(T/128) blocks specializes T <= 128 (one block) and TTT compiled twice per graph. Row i
    of blocks: the diagonal block (masked by _causal), then the i blocks before it, fully visible."""
    n = -(-max_len // FLEX_BLOCK) + 1
    idx = torch.arange(n, device=device, dtype=torch.int32)
    diag_first = ((idx[:, None] + idx[None, :]) % n)[None, None].contiguous()
    return BlockMask.from_kv_blocks(torch.ones_like(idx)[None, None], diag_first, idx[None, None],
                                    idx.expand(n, n)[None, None].contiguous(), FLEX_BLOCK, _causal, (T, T))


def flex_block_mask(seg: torch.Tensor, rows_are_docs: bool, max_len: int = 0):
    B, T = seg.shape
    if rows_are_docs:
        return causal_block_mask(T, max_len or T, seg.device)

    def doc_causal(b, h, qi, ki):
        return (qi >= ki) & (seg[b, qi] == seg[b, ki])
    # outside a compiled graph, build the mask with a compiled kernel rather than a dense [B, T, T] tensor
    return create_block_mask(doc_causal, B, None, T, T, device=seg.device, _compile=not torch.compiler.is_compiling())


def prepare_attention(backend: str, ids: torch.Tensor, bos_id: int, rows_are_docs: bool = False,
                      piece_len: int = 0, cu_seqlens: torch.Tensor | None = None, max_len: int = 0) -> DocStructure:
    """Document structure for a backend. rows_are_docs: the caller guarantees one document per row (TTT), so
    attention is plain causal and the structure does not depend on the tokens (symbolic row widths compile).
    piece_len: documents are also cut every piece_len tokens (packed training rows). cu_seqlens (flash3):
    varlen_cu_seqlens of the same rows, from the host (attention_extras); without it a compiled forward uses the
    fixed-capacity fallback and an eager one computes it from a host copy. max_len (flex, rows_are_docs): the
    longest row the model runs, the static size of the causal block mask."""
    B, T = ids.shape
    longest = min(T, piece_len) if piece_len else T
    if rows_are_docs:
        seg, pos = torch.zeros_like(ids, dtype=torch.int32), torch.arange(T, device=ids.device)[None]
    else:
        starts = segment_starts(ids, bos_id, piece_len)
        seg = torch.cumsum(starts.to(torch.int32), dim=-1)
        pos = torch.arange(T, device=ids.device) - last_start(starts)
    if backend == "sdpa":
        banded = piece_len and T > 2 * piece_len
        return DocStructure(seg, banded_causal_mask(seg, piece_len) if banded else document_causal_mask(seg), pos,
                            longest)
    if backend == "flash3":
        if rows_are_docs:
            cu = torch.arange(0, B + 1, device=ids.device, dtype=torch.int32) * T
        elif cu_seqlens is not None:
            cu = cu_seqlens
        elif torch.compiler.is_compiling() or ids.is_meta or torch._subclasses.fake_tensor.is_fake(ids):
            cu = cu_seqlens_from_segments(seg)  # no data to read (traced, meta, fake): the fixed capacity
        else:  # eager (Hessians, COMPILE=0): the exact segments; the host copy is one sync per forward
            cu = varlen_cu_seqlens(ids.cpu(), bos_id, piece_len).to(ids.device)
        return DocStructure(seg, cu, pos, longest)
    if backend == "flex":
        return DocStructure(seg, flex_block_mask(seg, rows_are_docs, max_len), pos, longest)
    return DocStructure(seg, None, pos, longest)


def attention_sdpa(q, k, v, doc: DocStructure):
    """q [B,T,H,D], k/v [B,T,Hkv,D] -> [B,T,H,D]; causal within a document (boolean mask: dense [B,1,T,T] or
    banded [B,nb,1,P,2P], see banded_causal_mask)."""
    mask, gqa = doc.prepared, q.size(2) != k.size(2)
    if mask.dim() == 4:
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask, enable_gqa=gqa)
        return y.transpose(1, 2)
    B, T, H, D = q.shape
    nb, P = mask.size(1), mask.size(3)

    def blocks(t):  # [B, T, h, D] -> [B, nb, P, h, D]
        return F.pad(t, (0, 0, 0, 0, 0, nb * P - T)).view(B, nb, P, t.size(2), D)
    qb, kb, vb = blocks(q), with_previous_block(blocks(k), 0), with_previous_block(blocks(v), 0)
    y = F.scaled_dot_product_attention(qb.transpose(2, 3), kb.transpose(2, 3), vb.transpose(2, 3), attn_mask=mask,
                                       enable_gqa=gqa)
    return y.transpose(2, 3).reshape(B, nb * P, H, D)[:, :T]


def attention_flash3(q, k, v, doc: DocStructure):
    from flash_attn_interface import flash_attn_varlen_func
    B, T, H, D = q.shape
    cu = doc.prepared
    out = flash_attn_varlen_func(q.reshape(B * T, H, D), k.reshape(B * T, -1, D), v.reshape(B * T, -1, D),
                                 cu, cu, doc.piece_len, doc.piece_len, causal=True)
    out = out[0] if isinstance(out, tuple) else out
    return out.reshape(B, T, H, D)


def attention_flex(q, k, v, doc: DocStructure):
    """Inside a compiled graph flex_attention is traced into a fused kernel; called eagerly (e.g. by Hessian
    collection) it goes through its own compiled wrapper: eager flex would materialise every score matrix."""
    if torch.compiler.is_compiling():
        attend = flex_attention
    else:
        attend = getattr(attention_flex, "compiled", None) or torch.compile(flex_attention, dynamic=False)
        attention_flex.compiled = attend
    y = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=doc.prepared, enable_gqa=True)
    return y.transpose(1, 2)


def attention_reference(q, k, v, doc: DocStructure):
    """Plain per-document loop: what every backend must equal."""
    seg = doc.seg
    out = torch.zeros_like(q)
    rep = q.size(2) // k.size(2)
    for b in range(q.size(0)):
        for d in torch.unique(seg[b]):
            idx = (seg[b] == d).nonzero().flatten()
            qs, ks, vs = q[b, idx].transpose(0, 1), k[b, idx].transpose(0, 1), v[b, idx].transpose(0, 1)
            ks, vs = ks.repeat_interleave(rep, 0), vs.repeat_interleave(rep, 0)
            att = (qs @ ks.transpose(-1, -2)) / math.sqrt(q.size(-1))
            n = idx.numel()
            att = att.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=q.device).tril(), float("-inf"))
            out[b, idx] = (att.softmax(-1) @ vs).transpose(0, 1)
    return out


ATTENTION_BACKENDS = {"sdpa": attention_sdpa, "flash3": attention_flash3, "flex": attention_flex,
                      "reference": attention_reference}


def softcap(z: torch.Tensor, cap, cap_neg=None) -> torch.Tensor:
    """cap*tanh(z/cap) (spec §3.12); with cap_neg, negative logits take their own cap (AsymLogit, #1923)."""
    if cap_neg is None:
        return cap * torch.tanh(z / cap) if cap > 0 else z
    return torch.where(z >= 0, cap * torch.tanh(z / cap), cap_neg * torch.tanh(z / cap_neg))


def softcap_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, cap, reduction: str = "mean",
                          cap_neg=None) -> torch.Tensor:
    """Cross-entropy of the full softmax over the softcapped logits, in fp32."""
    z = softcap(logits.float(), cap, cap_neg)
    return F.cross_entropy(z.reshape(-1, z.size(-1)), targets.reshape(-1), reduction=reduction)


class TokenScores(NamedTuple):
    nll: torch.Tensor           # [B, T] -log p(target)
    hint_logprob: torch.Tensor  # [B, T] log p(hint): what the n-gram tilt needs (spec A1.2)


def softcap_scores(logits: torch.Tensor, targets: torch.Tensor, hint: torch.Tensor, cap, cap_neg=None) -> TokenScores:
    """Per-position NLL of the targets and log-probability of the hinted tokens, from one fp32 log-softmax."""
    logp = F.log_softmax(softcap(logits.float(), cap, cap_neg), dim=-1)
    return TokenScores(-logp.gather(-1, targets[..., None])[..., 0], logp.gather(-1, hint[..., None])[..., 0])


def leaky_relu_sq_up(x: torch.Tensor, w: torch.Tensor, slope: float) -> torch.Tensor:
    """MLP up-projection + activation: act(x W^T)^2 with act = LeakyReLU(slope) (ReLU when slope = 0)."""
    a = F.leaky_relu(F.linear(x, w), slope) if slope > 0 else F.relu(F.linear(x, w))
    return a * a  # not .square(): CUDA autocast runs pow in fp32 (a saved fp32 [tokens, hidden] copy)


try:  # Triton is optional: CUDA acceleration of the two references above (checked under TRITON_INTERPRET=1)
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

if HAS_TRITON:
    @triton.jit
    def _softcap_ce_fwd_kernel(z_ptr, z_stride, t_ptr, loss_ptr, lse_ptr, V, cap,
                               HAS_CAP: tl.constexpr, BLOCK: tl.constexpr):
        # c*tanh(z/c) = 2c*sigmoid(2z/c) - c; the constant -c cancels inside the softmax, so it is dropped.
        cap = tl.cast(cap, tl.float32)  # torch.compile passes Python floats as fp64: keep the math in fp32
        row = tl.program_id(0).to(tl.int64)
        base = z_ptr + row * z_stride
        m = tl.zeros([], dtype=tl.float32) - float("inf")
        s = tl.zeros([], dtype=tl.float32)
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < V
            z = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
            c = 2.0 * cap * tl.sigmoid(2.0 * z / cap) if HAS_CAP else z
            c = tl.where(mask, c, -float("inf"))
            m_new = tl.maximum(m, tl.max(c, 0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(c - m_new), 0)
            m = m_new
        lse = m + tl.log(s)
        zt = tl.load(base + tl.load(t_ptr + row)).to(tl.float32)
        ct = 2.0 * cap * tl.sigmoid(2.0 * zt / cap) if HAS_CAP else zt
        tl.store(loss_ptr + row, lse - ct)
        tl.store(lse_ptr + row, lse)

    @triton.jit
    def _softcap_ce_bwd_kernel(z_ptr, z_stride, t_ptr, lse_ptr, g_ptr, dz_ptr, dz_stride, V, cap,
                               HAS_CAP: tl.constexpr, BLOCK: tl.constexpr):
        cap = tl.cast(cap, tl.float32)
        row = tl.program_id(0).to(tl.int64)
        lse = tl.load(lse_ptr + row)
        g = tl.load(g_ptr + row)
        t = tl.load(t_ptr + row)
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < V
            z = tl.load(z_ptr + row * z_stride + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_CAP:
                sig = tl.sigmoid(2.0 * z / cap)
                grad = (tl.exp(2.0 * cap * sig - lse) - (offs == t).to(tl.float32)) * (4.0 * sig * (1.0 - sig))
            else:
                grad = tl.exp(z - lse) - (offs == t).to(tl.float32)
            tl.store(dz_ptr + row * dz_stride + offs, (g * grad).to(dz_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _leaky_sq_up_kernel(x_ptr, w_ptr, pre_ptr, act_ptr, M, N, K, sxm, sxk, swn, swk, som, son, slope,
                            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr):
        # one [BM, BN] tile of h = x W^T; the epilogue writes both h (for backward) and LeakyReLU(h)^2
        slope = tl.cast(slope, tl.float32)
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + rk
            a = tl.load(x_ptr + rm[:, None] * sxm + kk[None, :] * sxk, mask=(rm[:, None] < M) & (kk[None, :] < K),
                        other=0.0)
            b = tl.load(w_ptr + rn[None, :] * swn + kk[:, None] * swk, mask=(rn[None, :] < N) & (kk[:, None] < K),
                        other=0.0)
            if UPCAST:  # the CPU interpreter has no bf16 dot; fp32 products of bf16 inputs are the same math
                acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(a, b)
        act = tl.where(acc > 0, acc, slope * acc)
        out = rm[:, None] * som + rn[None, :] * son
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        tl.store(pre_ptr + out, acc.to(pre_ptr.dtype.element_ty), mask=mask)
        tl.store(act_ptr + out, (act * act).to(act_ptr.dtype.element_ty), mask=mask)


class _SoftcapCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, t, cap):
        N, V = z.shape
        loss = torch.empty(N, dtype=torch.float32, device=z.device)
        lse = torch.empty(N, dtype=torch.float32, device=z.device)
        block = min(1024, triton.next_power_of_2(V))
        _softcap_ce_fwd_kernel[(N,)](z, z.stride(0), t, loss, lse, V, cap, HAS_CAP=cap > 0, BLOCK=block)
        ctx.save_for_backward(z, t, lse)
        ctx.cap, ctx.block = cap, block
        return loss

    @staticmethod
    def backward(ctx, g):
        z, t, lse = ctx.saved_tensors
        dz = torch.empty_like(z)
        _softcap_ce_bwd_kernel[(z.size(0),)](z, z.stride(0), t, lse, g.float().contiguous(), dz, dz.stride(0),
                                             z.size(1), ctx.cap, HAS_CAP=ctx.cap > 0, BLOCK=ctx.block)
        return dz, None, None


def softcap_cross_entropy_fused(logits: torch.Tensor, targets: torch.Tensor, cap: float,
                                reduction: str = "mean") -> torch.Tensor:
    """Triton version of softcap_cross_entropy: one pass over the vocab per row (online log-sum-exp), the
    backward recomputes probabilities from the saved LSE; softcapped logits are never materialised."""
    z = logits.reshape(-1, logits.size(-1)).contiguous()
    loss = _SoftcapCE.apply(z, targets.reshape(-1).contiguous(), float(cap))
    return {"mean": loss.mean, "sum": loss.sum}.get(reduction, lambda: loss)()


class _LeakyReluSqUp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, slope):
        M, K = x.shape
        N = w.size(0)
        pre = torch.empty(M, N, dtype=x.dtype, device=x.device)
        act = torch.empty_like(pre)
        bm, bn, bk = (128, 128, 64) if x.is_cuda else (32, 32, 32)
        grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
        _leaky_sq_up_kernel[grid](x, w, pre, act, M, N, K, x.stride(0), x.stride(1), w.stride(0), w.stride(1),
                                  pre.stride(0), pre.stride(1), slope, BM=bm, BN=bn, BK=bk, UPCAST=not x.is_cuda)
        ctx.save_for_backward(x, w, pre)
        ctx.slope = slope
        return act

    @staticmethod
    def backward(ctx, g):
        x, w, pre = ctx.saved_tensors
        # d/dh of (a h)^2 = 2 a^2 h with a = 1 (h > 0) or slope (h <= 0)
        gpre = g * torch.where(pre > 0, 2.0 * pre, (2.0 * ctx.slope * ctx.slope) * pre)
        return gpre @ w, gpre.T @ x, None


def leaky_relu_sq_up_fused(x: torch.Tensor, w: torch.Tensor, slope: float) -> torch.Tensor:
    """Triton version of leaky_relu_sq_up: the activation is fused into the GEMM epilogue."""
    shape = x.shape
    out = _LeakyReluSqUp.apply(x.reshape(-1, shape[-1]).contiguous(), w.to(x.dtype).contiguous(), float(slope))
    return out.view(*shape[:-1], w.size(0))


def use_fused_kernels(x: torch.Tensor, enabled: bool) -> bool:
    """Fused kernels run on CUDA where gradients flow (training, TTT, global SGD): they save only their inputs
    and recompute in backward. No-grad eval runs the references, which inductor fuses."""
    return enabled and HAS_TRITON and x.is_cuda and torch.is_grad_enabled()


# =============================================================================================
# Model: norms, rotary, attention, MLP, block, GPT. Every architectural feature is a flag on the one
# forward path; TTT LoRA adapters enter as the optional `lora` argument.
# =============================================================================================

CONTROL_TENSOR_PATTERNS = ("attn_scale", "mlp_scale", "resid_mix", "q_gain", "skip_weights", "skip_gates",
                           "parallel_post_lambdas", "parallel_resid_lambdas", "attn_gate_w", "smear_gate",
                           "smear_lambda", "softcap_pos", "softcap_neg")


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    # CUDA autocast runs rms_norm in fp32 from torch 2.12: keep the input dtype (FA3 needs q, k, v alike)
    return F.rms_norm(x, (x.size(-1),)).to(x.dtype)


def rotary_tables(T: int, rope_dims: int, base: float, train_seq_len: int, yarn: bool, device=None):
    """fp32 cos/sin [T, rope_dims/2]; YaRN-style base stretch only when T exceeds the training length."""
    if yarn and T > train_seq_len and rope_dims > 2:
        base = base * (T / train_seq_len) ** (rope_dims / (rope_dims - 2))
    inv_freq = base ** (-torch.arange(0, rope_dims, 2, dtype=torch.float32, device=device) / rope_dims)
    ang = torch.arange(T, dtype=torch.float32, device=device)[:, None] * inv_freq[None]
    return ang.cos(), ang.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first 2*cos.size(-1) dims of each head (partial RoPE); the rest pass through."""
    half = cos.size(-1)
    a, b, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return torch.cat([a * c + b * s, b * c - a * s, rest], dim=-1)


class LoRAWeights(NamedTuple):
    """Adapters of a slice of documents as the forward takes them: per target, A [b, r, in] and B [b, out, r];
    delta(x) = (x A^T) B^T * scale. Plain tensors, so one compiled graph serves every slice."""
    A: dict
    B: dict
    scale: float


class BatchedLoRA(nn.Module):
    """Per-document low-rank adapters for TTT: one (A, B) pair per (layer slot, target), batched over docs.
    B starts at zero so a fresh adapter is the identity."""

    def __init__(self, bsz: int, rank: int, alpha: float, shapes: dict[str, tuple[int, int]], device):
        super().__init__()
        self.bsz, self.rank, self.scale = bsz, rank, alpha / rank
        self.names = sorted(shapes)
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        for name in self.names:
            fan_in, fan_out = shapes[name]
            self.A[name] = nn.Parameter(torch.empty(bsz, rank, fan_in, device=device))
            self.B[name] = nn.Parameter(torch.zeros(bsz, fan_out, rank, device=device))
        self.reset(reinit_a=True)

    @torch.no_grad()
    def reset(self, reinit_a: bool) -> None:
        for name in self.names:
            self.B[name].zero_()
            if reinit_a:
                bound = 1.0 / math.sqrt(self.A[name].size(-1))
                self.A[name].uniform_(-bound, bound)

    def weights(self, lo: int, hi: int) -> LoRAWeights:
        """The adapters of documents lo..hi-1 (views: gradients reach the parameters)."""
        return LoRAWeights({n: self.A[n][lo:hi] for n in self.names}, {n: self.B[n][lo:hi] for n in self.names},
                           self.scale)


def _add_delta(y, lora: LoRAWeights | None, name: str, x):
    if lora is None or name not in lora.A:
        return y
    A, B = lora.A[name].to(x.dtype), lora.B[name].to(x.dtype)
    return y + torch.bmm(torch.bmm(x, A.transpose(1, 2)), B.transpose(1, 2)) * lora.scale


class CausalSelfAttention(nn.Module):
    def __init__(self, hp: Hyperparameters):
        super().__init__()
        d, H, Hkv = hp.model_dim, hp.num_heads, hp.num_kv_heads
        self.H, self.Hkv, self.D = H, Hkv, d // H
        self.c_q = nn.Linear(d, d, bias=False)
        self.c_k = nn.Linear(d, Hkv * self.D, bias=False)
        self.c_v = nn.Linear(d, Hkv * self.D, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.q_gain = nn.Parameter(torch.full((H,), hp.qk_gain_init))
        self.gate_window, self.gate_scale = hp.gate_window, hp.sparse_attn_gate_scale
        self.attn_gate_w = nn.Parameter(torch.zeros(H, hp.gate_window)) if hp.sparse_attn_gate_enabled else None

    def forward(self, u, doc: DocStructure, rope, xsa: bool, backend: str, lora=None, slot: int = 0):
        B, T, _ = u.shape
        q = _add_delta(self.c_q(u), lora, f"{slot}_q", u).view(B, T, self.H, self.D)
        k = _add_delta(self.c_k(u), lora, f"{slot}_k", u).view(B, T, self.Hkv, self.D)
        v = _add_delta(self.c_v(u), lora, f"{slot}_v", u).view(B, T, self.Hkv, self.D)
        q, k = rms_norm(q), rms_norm(k)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        q = q * self.q_gain.to(q.dtype)[None, None, :, None]
        y = ATTENTION_BACKENDS[backend](q, k, v, doc)
        if xsa:  # remove each head's component along its own token's value direction (XSA)
            g = self.H // self.Hkv
            yv = y.view(B, T, self.Hkv, g, self.D)
            vn = F.normalize(v, dim=-1)[:, :, :, None, :]
            y = (yv - (yv * vn).sum(-1, keepdim=True) * vn).view(B, T, self.H, self.D)
        if self.attn_gate_w is not None:
            gate = torch.sigmoid(self.gate_scale * (u[..., : self.gate_window] @ self.attn_gate_w.to(u.dtype).T))
            y = y * gate[..., None]
        return _add_delta(self.proj(y.reshape(B, T, -1)), lora, f"{slot}_o", u)


class MLP(nn.Module):
    def __init__(self, hp: Hyperparameters):
        super().__init__()
        hidden = int(hp.mlp_mult * hp.model_dim)
        self.fc = nn.Linear(hp.model_dim, hidden, bias=False)
        self.proj = nn.Linear(hidden, hp.model_dim, bias=False)
        self.slope, self.fused = hp.mlp_negative_slope, hp.fused_mlp_enabled

    def forward(self, u, lora=None, slot: int = 0):
        up = leaky_relu_sq_up_fused if use_fused_kernels(u, self.fused) else leaky_relu_sq_up
        return _add_delta(self.proj(up(u, self.fc.weight.to(u.dtype), self.slope)), lora, f"{slot}_mlp", u)


class Block(nn.Module):
    def __init__(self, hp: Hyperparameters, layer: int):
        super().__init__()
        d = hp.model_dim
        self.attn, self.mlp = CausalSelfAttention(hp), MLP(hp)
        self.attn_scale = nn.Parameter(torch.ones(d))
        self.mlp_scale = nn.Parameter(torch.ones(d))
        self.resid_mix = nn.Parameter(torch.stack([torch.ones(d), torch.zeros(d)]))
        self.in_scale = 1.0 / math.sqrt(layer + 1) if hp.ln_scale else 1.0
        self.xsa = layer >= hp.num_layers - hp.xsa_last_n

    def forward(self, x, x0, doc, rope, backend, lora=None, slot=0):
        mix = self.resid_mix.to(x.dtype)
        h = mix[0] * x + mix[1] * x0
        h = h + self.attn_scale.to(x.dtype) * self.attn(rms_norm(h) * self.in_scale, doc, rope, self.xsa,
                                                         backend, lora, slot)
        return h + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(h) * self.in_scale, lora, slot)

    def forward_parallel(self, lanes, x0, doc, rope, backend, post, resid, lora=None, slot=0):
        lane0, lane1 = lanes
        mix = self.resid_mix.to(x0.dtype)
        a = self.attn_scale.to(x0.dtype) * self.attn(rms_norm(mix[0] * lane0 + mix[1] * x0) * self.in_scale,
                                                     doc, rope, self.xsa, backend, lora, slot)
        m = self.mlp_scale.to(x0.dtype) * self.mlp(rms_norm(lane1) * self.in_scale, lora, slot)
        post, resid = post.to(x0.dtype), resid.to(x0.dtype)
        return (resid[0] * lane0 + post[0, 0] * a + post[1, 0] * m,
                resid[1] * lane1 + post[0, 1] * a + post[1, 1] * m)


def layer_schedule(num_layers: int, looping: bool, num_loops: int, loop_start: int, loop_end: int):
    """(encoder, decoder) physical layer indices; with looping the segment repeats NUM_LOOPS extra times."""
    order = list(range(num_layers))
    if looping and num_loops > 0:
        seg = order[loop_start: loop_end + 1]
        order = order[:loop_start] + seg * (num_loops + 1) + order[loop_end + 1:]
    n_enc = len(order) // 2
    return order[:n_enc], order[n_enc:]


class GPT(nn.Module):
    def __init__(self, hp: Hyperparameters, bos_id: int, attn_backend: str = "sdpa"):
        super().__init__()
        self.hp, self.bos_id, self.attn_backend = hp, bos_id, attn_backend
        d, L = hp.model_dim, hp.num_layers
        self.tok_emb = nn.Embedding(hp.vocab_size, d)
        self.blocks = nn.ModuleList([Block(hp, i) for i in range(L)])
        enc, dec = layer_schedule(L, True, hp.num_loops, hp.loop_start, hp.loop_end)
        self.num_skips = min(len(enc), len(dec))
        self.skip_weights = nn.Parameter(torch.ones(self.num_skips, d))
        self.skip_gates = nn.Parameter(torch.zeros(self.num_skips, d)) if hp.skip_gates_enabled else None
        if hp.parallel_start_layer > 0:
            self.parallel_post_lambdas = nn.Parameter(torch.ones(L, 2, 2))
            self.parallel_resid_lambdas = nn.Parameter(torch.full((L, 2), 1.1))
        if hp.smear_gate_enabled:
            self.smear_gate = nn.Linear(hp.gate_window, 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.lm_head = None if hp.tie_embeddings else nn.Linear(d, hp.vocab_size, bias=False)
        if hp.asym_logit_rescale:  # both start at LOGIT_SOFTCAP (the symmetric cap); trained by scalar AdamW
            self.softcap_pos = nn.Parameter(torch.tensor(hp.logit_softcap))
            self.softcap_neg = nn.Parameter(torch.tensor(hp.logit_softcap))
        self.head_input = nn.Identity()  # hook point: Hessian of the (tied) output head
        self.looping = False
        self.doc_piece_len = 0  # > 0: documents are also cut every this many tokens (set by training, as looping)
        # rotary tables for every row length the run uses (non-persistent: never in the artifact)
        cos, sin = rotary_tables(max(hp.train_seq_len, hp.eval_seq_len, hp.ttt_eval_seq_len), self.rope_dims,
                                 hp.rope_base, hp.train_seq_len, False)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.tok_emb.weight, std=self.hp.tied_embed_init_std)
        for b in self.blocks:
            for lin in (b.attn.c_q, b.attn.c_k, b.attn.c_v, b.mlp.fc):
                nn.init.orthogonal_(lin.weight)
            nn.init.zeros_(b.attn.proj.weight)
            nn.init.zeros_(b.mlp.proj.weight)
        if self.lm_head is not None:
            nn.init.zeros_(self.lm_head.weight)
        if self.hp.smear_gate_enabled:
            nn.init.zeros_(self.smear_gate.weight)

    def schedule(self):
        return layer_schedule(self.hp.num_layers, self.looping, self.hp.num_loops, self.hp.loop_start,
                              self.hp.loop_end)

    @property
    def rope_dims(self) -> int:
        return self.hp.rope_dims or self.hp.model_dim // self.hp.num_heads

    def rope(self, doc: DocStructure, dtype):
        """cos/sin [B or 1, T, rope_dims/2] at each position's offset in its segment: a gather from the
        precomputed tables, or (YaRN beyond the training length, or longer segments than planned) from tables
        computed in the graph for the static longest segment."""
        hp, n = self.hp, doc.piece_len
        if (hp.rope_yarn and n > hp.train_seq_len) or n > self.rope_cos.size(0):
            cos, sin = rotary_tables(n, self.rope_dims, hp.rope_base, hp.train_seq_len, hp.rope_yarn,
                                     self.rope_cos.device)
        else:
            cos, sin = self.rope_cos, self.rope_sin
        return cos[doc.pos].to(dtype), sin[doc.pos].to(dtype)

    def smear(self, x, ids):
        """SmearGate: e_t += lambda*sigmoid(w.e_t[:W]) * e_{t-1}, never across a BOS (document start)."""
        g = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[..., : self.hp.gate_window]))
        keep = (ids[:, 1:] != self.bos_id).to(x.dtype)[..., None]
        return torch.cat([x[:, :1], x[:, 1:] + g[:, 1:] * x[:, :-1] * keep], dim=1)

    def forward_hidden(self, ids: torch.Tensor, lora: LoRAWeights | None = None,
                       rows_are_docs: bool = False, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        hp = self.hp
        x = self.tok_emb(ids)
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        if hp.smear_gate_enabled:
            x = self.smear(x, ids)
        x = rms_norm(x)
        piece = self.doc_piece_len if self.training else 0
        x0, doc = x, prepare_attention(self.attn_backend, ids, self.bos_id, rows_are_docs, piece, cu_seqlens,
                                       self.rope_cos.size(0))
        rope = self.rope(doc, x.dtype)
        enc, dec = self.schedule()
        skips = []
        for slot, i in enumerate(enc):
            x = self.blocks[i](x, x0, doc, rope, self.attn_backend, lora, slot)
            skips.append(x)
        # decoder: x is the residual stream (with parallel lanes: the attention lane, which takes the skips)
        mlp_lane = None
        for k, i in enumerate(dec):
            if mlp_lane is None and 0 < hp.parallel_start_layer <= i:
                mlp_lane = x
            if k < self.num_skips and skips:
                x = self.merge_skip(k, x, skips.pop())
            slot = len(enc) + k
            if mlp_lane is None:
                x = self.blocks[i](x, x0, doc, rope, self.attn_backend, lora, slot)
            else:
                x, mlp_lane = self.blocks[i].forward_parallel((x, mlp_lane), x0, doc, rope, self.attn_backend,
                                                              self.parallel_post_lambdas[i],
                                                              self.parallel_resid_lambdas[i], lora, slot)
        if mlp_lane is not None:
            x = {"mean": 0.5 * (x + mlp_lane), "attn": x, "mlp": mlp_lane}[hp.parallel_final_lane]
        return self.head_input(rms_norm(x))

    def merge_skip(self, k: int, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """U-Net skip k into the stream: gated lerp (spec §3.8) or a plain weighted add."""
        w = self.skip_weights[k].to(x.dtype) * skip
        if self.skip_gates is None:
            return x + w
        return torch.lerp(w, x, torch.sigmoid(self.skip_gates[k]).to(x.dtype))

    def forward_logits(self, ids: torch.Tensor, lora: LoRAWeights | None = None,
                       rows_are_docs: bool = False, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """Raw (pre-softcap) logits; with adapters they are summed in fp32 (the softcap and log-softmax after
        them run in fp32: bf16 rounding there costs TTT, spec A2.4)."""
        h = self.forward_hidden(ids, lora, rows_are_docs, cu_seqlens)
        w = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        z = F.linear(h, w.to(h.dtype))
        return z if lora is None else _add_delta(z.float(), lora, "head", h)

    def caps(self) -> tuple:
        """(cap, cap for negative logits or None): the learned pair with ASYM_LOGIT_RESCALE."""
        if self.hp.asym_logit_rescale:
            return self.softcap_pos, self.softcap_neg
        return self.hp.logit_softcap, None

    def forward(self, ids, targets, lora: LoRAWeights | None = None, reduction: str = "mean",
                rows_are_docs: bool = False, hint: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None):
        """Loss of `targets`; reduction none gives per-position NLL [B, T]. rows_are_docs, cu_seqlens: see
        prepare_attention (attention_extras gives cu_seqlens). With `hint` [B, T] (token ids): TokenScores, the NLL
        and log p(hint) per position."""
        logits = self.forward_logits(ids, lora, rows_are_docs, cu_seqlens)
        cap, cap_neg = self.caps()
        if hint is not None:
            return softcap_scores(logits, targets, hint, cap, cap_neg)
        if cap_neg is not None or not use_fused_kernels(logits, self.hp.fused_ce_enabled):
            loss = softcap_cross_entropy(logits, targets, cap, reduction, cap_neg)
        else:
            loss = softcap_cross_entropy_fused(logits, targets, self.hp.logit_softcap, reduction)
        return loss if reduction != "none" else loss.view(targets.shape)

    def lora_shapes(self, hp: Hyperparameters) -> dict[str, tuple[int, int]]:
        """Adapter targets per layer slot (repeated layers get their own adapters), plus the output head."""
        d, kv = hp.model_dim, hp.num_kv_heads * (hp.model_dim // hp.num_heads)
        enc, dec = self.schedule()
        shapes = {"head": (d, hp.vocab_size)}
        targets = {"q": (d, d), "k": (d, kv), "v": (d, kv), "o": (d, d), "mlp": (d, d)}
        off = {"q": not hp.ttt_q_lora or hp.ttt_mask == "no_qv", "k": not hp.ttt_k_lora,
               "v": not hp.ttt_v_lora or hp.ttt_mask == "no_qv"}
        for s in range(len(enc) + len(dec)):
            shapes.update({f"{s}_{t}": shape for t, shape in targets.items() if not off.get(t)})
        return shapes


def attention_extras(model: GPT, ids: torch.Tensor, device: torch.device) -> dict:
    """Keyword arguments of a forward on the host rows `ids` (before they go to `device`): with flash3, cu_seqlens
    from varlen_cu_seqlens (at the piece length the forward will use), its length marked dynamic so that every
    bucket runs in one compiled graph. Other backends: none."""
    if model.attn_backend != "flash3":
        return {}
    cu = varlen_cu_seqlens(ids, model.bos_id, model.doc_piece_len if model.training else 0)
    cu = cu.to(device, non_blocking=True)
    torch._dynamo.mark_dynamic(cu, 0)
    return {"cu_seqlens": cu}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def is_control_tensor(name: str) -> bool:
    return any(p in name for p in CONTROL_TENSOR_PATTERNS)


# =============================================================================================
# Optimizer: Newton-Schulz orthogonalization, sharded Muon, Adam groups, gradient clipping, EMA, and the
# learning-rate / momentum schedules as functions of training progress.
# =============================================================================================

# Per-iteration (a, b, c) of X <- aX + (bA + cA^2)X, A = XX^T. Polar Express: spec §4.2 (PR #1855 lineage);
# standard: the quintic of the original Muon (Keller Jordan, 2024), repeated every step.
NS_COEFFICIENTS = {
    "polar_express": [(8.156554524902461, -22.48329292557795, 15.878769915207462),
                      (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                      (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                      (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                      (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)],
    "standard": [(3.4445, -4.7750, 2.0315)],
}


def orthogonalize(G: torch.Tensor, steps: int, coeffs: str = "polar_express", dtype=None) -> torch.Tensor:
    """Approximate the polar factor U V^T of each matrix in G ([..., r, c]) by Newton-Schulz iterations.
    Computed in `dtype`: by default bf16 on CUDA (as the record), fp32 elsewhere."""
    table = NS_COEFFICIENTS[coeffs]
    X = G.to(dtype or (torch.bfloat16 if G.is_cuda else torch.float32))
    transpose = X.size(-2) > X.size(-1)
    if transpose:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for i in range(steps):
        a, b, c = table[min(i, len(table) - 1)]
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    return (X.mT if transpose else X).to(G.dtype)


def _reduce_scatter(out, inp):
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, inp)


def _all_gather(out, inp):
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, inp)


class Muon:
    """Muon on 2-D matrices, grouped by shape. Each shape group is stacked, padded to a multiple of the
    world size and reduce-scattered, so each rank averages, momentum-updates and orthogonalizes only its
    share; the updates are all-gathered and applied on every replica. One process: no collectives."""

    def __init__(self, params: list[nn.Parameter], hp: Hyperparameters, world_size: int, rank: int):
        self.hp, self.world, self.rank = hp, world_size, rank
        self.lr = hp.matrix_lr
        self.momentum = hp.muon_momentum
        groups: dict[tuple, list] = {}
        for p in params:
            groups.setdefault(tuple(p.shape), []).append(p)
        # largest groups first: their collectives start earliest
        self.groups = sorted(groups.values(), key=lambda g: -g[0].numel() * len(g))
        self.state: list[torch.Tensor | None] = [None] * len(self.groups)
        self._shards: list[torch.Tensor] = []

    def _padded(self, n: int) -> int:
        return -(-n // self.world) * self.world

    def reduce_grads(self) -> None:
        """Average gradients across ranks; keep this rank's shard of each group (fp32)."""
        self._shards = []
        for group in self.groups:
            n, per = len(group), self._padded(len(group)) // self.world
            stacked = torch.zeros((self._padded(n),) + tuple(group[0].shape), device=group[0].device)
            for i, p in enumerate(group):
                if p.grad is not None:
                    stacked[i].copy_(p.grad)
            if self.world > 1:
                shard = torch.empty((per,) + stacked.shape[1:], device=stacked.device)
                _reduce_scatter(shard, stacked)
                shard /= self.world
            else:
                shard = stacked
            self._shards.append(shard)

    def shard_sq_norm(self) -> torch.Tensor:
        return sum((s.float().square().sum() for s in self._shards), torch.zeros((), device=self._shards[0].device))

    @torch.no_grad()
    def step(self, grad_scale: "float | torch.Tensor" = 1.0) -> None:
        hp = self.hp
        for gi, (group, shard) in enumerate(zip(self.groups, self._shards)):
            g = shard * grad_scale
            buf = self.state[gi]
            if buf is None:
                buf = self.state[gi] = torch.zeros_like(g)
            buf.mul_(self.momentum).add_(g)
            u = g + self.momentum * buf  # Nesterov
            if hp.muon_row_normalize:
                u = u / u.float().norm(dim=-1, keepdim=True).clamp_min(1e-7)
            u = orthogonalize(u, hp.muon_backend_steps, hp.muon_coeffs)
            if self.world > 1:
                full = torch.empty((self._padded(len(group)),) + tuple(u.shape[1:]), device=u.device, dtype=u.dtype)
                _all_gather(full, u.contiguous())
            else:
                full = u
            rows, cols = group[0].shape
            scale = math.sqrt(max(1.0, rows / cols))
            for i, p in enumerate(group):
                if hp.muon_wd > 0:
                    p.mul_(1 - self.lr * hp.muon_wd)
                p.add_(full[i].to(p.dtype), alpha=-self.lr * scale)

    def state_dict(self):
        return [None if s is None else s.clone() for s in self.state]

    def load_state_dict(self, st):
        self.state = [None if s is None else s.clone() for s in st]


class Optimizers:
    """Muon on the block matrices, AdamW on the embedding / head and on the control tensors. One step:
    average grads across ranks, clip the global norm of the averaged gradient, update, zero."""

    def __init__(self, model: GPT, hp: Hyperparameters, rt_world: int, rt_rank: int):
        self.hp, self.model, self.world = hp, model, rt_world
        matrices, scalars, embed, head = [], [], [], []
        for name, p in model.named_parameters():
            if name == "tok_emb.weight":
                embed.append(p)
            elif name.startswith("lm_head"):
                head.append(p)
            elif p.ndim == 2 and not is_control_tensor(name):
                matrices.append(p)
            else:
                scalars.append(p)
        self.muon = Muon(matrices, hp, rt_world, rt_rank)
        fused = {"fused": True} if next(model.parameters()).is_cuda else {}
        betas, eps = (hp.beta1, hp.beta2), hp.adam_eps
        groups = [dict(params=embed, lr=hp.tied_embed_lr if hp.tie_embeddings else hp.embed_lr,
                       weight_decay=hp.embed_wd),
                  dict(params=scalars, lr=hp.scalar_lr, weight_decay=hp.adam_wd)]
        if head:
            groups.append(dict(params=head, lr=hp.head_lr, weight_decay=0.0))
        for g in groups:
            g["base_lr"] = g["lr"]
        self.adam = torch.optim.AdamW(groups, betas=betas, eps=eps, **fused)
        self.replicated = [p for g in groups for p in g["params"]]

    def set_schedule(self, lr_mult: float, momentum: float) -> None:
        for g in self.adam.param_groups:
            g["lr"] = g["base_lr"] * lr_mult
        self.muon.lr = self.hp.matrix_lr * lr_mult
        self.muon.momentum = momentum

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """Returns the global gradient norm before clipping as a device tensor (read it only when logging)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.replicated]
        for p, g in zip(self.replicated, grads):
            p.grad = g
        if self.world > 1:
            flat = torch.cat([g.reshape(-1) for g in grads])
            all_reduce_(flat)
            flat /= self.world
            off = 0
            for g in grads:
                g.copy_(flat[off: off + g.numel()].view_as(g))
                off += g.numel()
        self.muon.reduce_grads()
        sq = self.muon.shard_sq_norm()
        if self.world > 1:
            all_reduce_(sq)
        sq = sq + sum((g.float().square().sum() for g in grads), torch.zeros((), device=sq.device))
        norm = sq.sqrt()
        scale = 1.0
        if self.hp.grad_clip_norm > 0:  # decided on the device: a host read of the norm would sync every step
            clip = self.hp.grad_clip_norm
            scale = torch.where(norm > clip, clip / (norm + 1e-6), torch.ones_like(norm))
            torch._foreach_mul_(grads, scale)
        self.muon.step(scale)
        self.adam.step()
        self.model.zero_grad(set_to_none=True)
        return norm.detach()

    def state_dict(self):
        return {"adam": copy.deepcopy(self.adam.state_dict()), "muon": self.muon.state_dict()}

    def load_state_dict(self, st):
        self.adam.load_state_dict(copy.deepcopy(st["adam"]))
        self.muon.load_state_dict(st["muon"])


class ModelEMA:
    """fp32 exponential moving average of every floating state tensor (spec §4.6)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        if self.decay <= 0:
            return
        sd = model.state_dict()
        keys = list(self.shadow)
        torch._foreach_lerp_([self.shadow[k] for k in keys], [sd[k].float() for k in keys], 1.0 - self.decay)

    @torch.no_grad()
    def apply_to(self, model: nn.Module) -> None:
        sd = model.state_dict()
        for k, v in self.shadow.items():
            sd[k].copy_(v.to(sd[k].dtype))


def lr_multiplier(frac: float, step: int, hp: Hyperparameters) -> float:
    """Linear warm-up over LR_WARMUP_STEPS steps, flat, then linear warmdown over the last WARMDOWN_FRAC of
    training progress down to the MIN_LR floor (spec §4.4)."""
    warm = min(1.0, (step + 1) / hp.lr_warmup_steps) if hp.lr_warmup_steps > 0 else 1.0
    if hp.warmdown_frac <= 0 or frac < 1.0 - hp.warmdown_frac:
        return warm
    return warm * max((1.0 - frac) / hp.warmdown_frac, hp.min_lr)


def muon_momentum_at(step: int, hp: Hyperparameters) -> float:
    if hp.muon_momentum_warmup_steps <= 0:
        return hp.muon_momentum
    f = min(step / hp.muon_momentum_warmup_steps, 1.0)
    return (1 - f) * hp.muon_momentum_warmup_start + f * hp.muon_momentum


# =============================================================================================
# Training: warm-up (rolled back), the timed loop under the wall-clock budget that reserves the measured
# Hessian-collection time, periodic validation, EMA.
# =============================================================================================

@dataclass
class TrainResult:
    steps: int = 0
    train_time_ms: float = 0.0
    tokens_per_s: float = 0.0
    stop_reason: str = ""
    hessian_estimate_s: float = 0.0
    looping_step: int | None = None
    train_log: list = field(default_factory=list)
    val_log: list = field(default_factory=list)

    @property
    def step_avg_ms(self) -> float:
        return self.train_time_ms / max(self.steps, 1)


def usable_train_seconds(hp: Hyperparameters, hessian_estimate_s: float) -> float:
    """Training seconds left once the measured Hessian cost and the fixed margin are reserved."""
    return max(hp.max_wallclock_seconds - hessian_estimate_s - hp.gptq_reserve_seconds, 0.0)


def training_fraction(elapsed_s: float, step: int, hp: Hyperparameters, hessian_estimate_s: float) -> float:
    if hp.max_wallclock_seconds > 0:
        return min(elapsed_s / max(usable_train_seconds(hp, hessian_estimate_s), 1e-9), 1.0)
    return min(step / max(hp.iterations, 1), 1.0)


def stop_reason(elapsed_s: float, step: int, next_step_s: float, hp: Hyperparameters,
                hessian_estimate_s: float) -> str:
    """'' to go on; else why training stops. The wall-clock rule stops when the next step (as TrainBudget
    predicts it) would not fit before the estimated Hessian time; the collection then stops at the budget
    itself (CalibrationDeadline), so the estimate only decides how the budget is shared."""
    if hp.iterations and step >= hp.iterations:
        return "iterations"
    if hp.max_wallclock_seconds > 0 and elapsed_s + next_step_s > usable_train_seconds(hp, hessian_estimate_s):
        return "wallclock_cap"
    return ""


STEP_HISTORY = 20  # steps the stop rule looks back on: a hiccup among them is assumed to recur
SLOWDOWN_WINDOW = 5  # recent steps whose median measures a slowdown (an oversubscribed CPU went 11x in 1 step)


class TrainBudget:
    """The step-time side of the wall-clock rule, fed the agreed (slowest rank's) step durations, so every rank
    decides alike. The next step is predicted as the slowest of the last STEP_HISTORY steps (one slow step in
    twenty, 5x the mean, still fits); the reserved Hessian time grows with the slowdown of the last
    SLOWDOWN_WINDOW steps (median) against the first STEP_HISTORY (the same forward on the same machine: if
    steps got 2x slower, so will calibration). It never shrinks."""

    def __init__(self, hessian_probe_s: float):
        self.hessian_probe_s = self.hessian_s = hessian_probe_s
        self.steps: list[float] = []

    def record(self, step_s: float) -> float:
        """Add a step; return the slowdown factor when it raised the Hessian estimate by over 10%, else 0."""
        self.steps.append(step_s)
        slowdown = float(np.median(self.steps[-SLOWDOWN_WINDOW:]) / max(np.median(self.steps[:STEP_HISTORY]), 1e-9))
        if self.hessian_probe_s * slowdown > 1.1 * self.hessian_s:
            self.hessian_s = self.hessian_probe_s * slowdown
            return slowdown
        return 0.0

    def next_step_s(self) -> float:
        return max(self.steps[-STEP_HISTORY:], default=0.0)


def autocast_context(hp: Hyperparameters, device: torch.device):
    use = hp.autocast_bf16 == "1" or (hp.autocast_bf16 == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use)


# Graphs per compiled function: 2 training schedules, eval, TTT score and train, global SGD, periodic val
# (the record used 64). Past the limit dynamo would silently run eager: fail instead.
DYNAMO_RECOMPILE_LIMIT = 64


def compile_enabled(hp: Hyperparameters, device: torch.device) -> bool:
    return hp.compile == "1" or (hp.compile == "auto" and device.type == "cuda")


def maybe_compile(fn, hp: Hyperparameters, device: torch.device):
    """torch.compile with fullgraph=True (a graph break is an error, not a silent slow path) and dynamic=False:
    every shape is static unless marked (TTT's row width: mark_row_width_dynamic; FA3's cu_seqlens length:
    attention_extras). Dynamo caches graphs per code object, so the eval after training would otherwise
    recompile GPT.forward with automatic dynamic shapes: symbolic rows and width, other kernels than the ones
    warmed up. Callers keep row counts fixed."""
    if not compile_enabled(hp, device):
        return fn
    for name, value in (("recompile_limit", DYNAMO_RECOMPILE_LIMIT), ("cache_size_limit", DYNAMO_RECOMPILE_LIMIT),
                        ("fail_on_recompile_limit_hit", True)):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, value)
    return torch.compile(fn, dynamic=False, fullgraph=True)


def mark_row_width_dynamic(*tensors: torch.Tensor) -> None:
    """One compiled graph for every row width (TTT chunks grow by TTT_CHUNK_SIZE up to TTT_EVAL_SEQ_LEN)."""
    for t in tensors:
        torch._dynamo.mark_dynamic(t, 1)


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def agree_elapsed(local_s: float, device: torch.device) -> float:
    """The slowest rank's elapsed seconds, on every rank: the schedule, looping switch and stop decision are
    functions of it, so replicas never drift apart however their clocks differ."""
    t = torch.tensor([local_s], dtype=torch.float64, device=device)
    return float(all_reduce_(t, dist.ReduceOp.MAX if dist.is_initialized() else None))


def micro_batch_shape(hp: Hyperparameters, rt: Runtime) -> tuple[int, int]:
    """[rows, width] of one rank's micro-batch as make_train_loader's loader returns it: packed, one flat row of
    TRAIN_BATCH_TOKENS / (WORLD_SIZE x grad accumulation) tokens; shuffled, rows of TRAIN_SEQ_LEN. Benchmarks
    build their batches from this, so they compile the graphs the run compiles."""
    local = hp.train_batch_tokens // (rt.world_size * rt.grad_accum_steps)
    return (1, local) if hp.train_loader == "packed" else (max(1, local // hp.train_seq_len), hp.train_seq_len)


def make_train_loader(hp: Hyperparameters, rt: Runtime, files: list[str]):
    rows, width = micro_batch_shape(hp, rt)
    local = rows * width
    if hp.train_loader == "packed":
        return PackedDocumentLoader(files, rt.rank, rt.world_size, local, hp.train_seq_len, rt.device)
    return ShuffledSequenceLoader(files, rt.rank, rt.world_size, local, hp.train_seq_len, rt.device, hp.seed)


def calibration_loader(hp: Hyperparameters, rt: Runtime, files: list[str]) -> ShuffledSequenceLoader:
    return ShuffledSequenceLoader(files, rt.rank, rt.world_size, hp.calibration_batch_tokens, hp.train_seq_len,
                                  rt.device, hp.seed + 1)


MIN_TRAIN_BUDGET_FRACTION = 0.5  # a config whose reserved Hessian time leaves less of the budget is refused


def probe_hessian_seconds(model: GPT, hp: Hyperparameters, rt: Runtime, train_files: list[str], clock) -> float:
    """Time one calibration batch exactly as collect_hessians() will run them after training (same loader,
    model state, eval mode, looping as training ends); return the time GPTQ_CALIBRATION_BATCHES of them take,
    which training leaves free (the collection itself stops at the budget: CalibrationDeadline). Raises
    ConfigError when that leaves less than MIN_TRAIN_BUDGET_FRACTION of MAX_WALLCLOCK_SECONDS for training."""
    model.looping = hp.num_loops > 0
    calib = calibration_loader(hp, rt, train_files)
    collect_hessians(model, calib, 1, hp, rt)  # first call pays one-off costs (allocator, attention compile)
    sync_device(rt.device)
    t0 = clock()
    collect_hessians(model, calib, 1, hp, rt)
    sync_device(rt.device)  # CUDA work is asynchronous: time it to completion
    per_batch = agree_elapsed(clock() - t0, rt.device)
    model.looping = False
    estimate = per_batch * hp.gptq_calibration_batches
    left = usable_train_seconds(hp, estimate)
    rt.logger.log(f"hessian_estimate: {estimate:.2f}s ({hp.gptq_calibration_batches} batches x {per_batch * 1000:.0f}ms)"
                  f" + reserve {hp.gptq_reserve_seconds:.1f}s; training budget {left:.1f}s")
    if left < MIN_TRAIN_BUDGET_FRACTION * hp.max_wallclock_seconds:
        raise ConfigError(
            f"MAX_WALLCLOCK_SECONDS={hp.max_wallclock_seconds:g}: collecting Hessians is estimated at {estimate:.1f}s "
            f"(GPTQ_CALIBRATION_BATCHES={hp.gptq_calibration_batches} x CALIBRATION_BATCH_TOKENS="
            f"{hp.calibration_batch_tokens} tokens per rank, {per_batch:.2f}s per batch measured) + "
            f"GPTQ_RESERVE_SECONDS={hp.gptq_reserve_seconds:g}, leaving {left:.1f}s for training, under "
            f"{MIN_TRAIN_BUDGET_FRACTION:.0%} of the budget. Lower GPTQ_CALIBRATION_BATCHES or "
            f"CALIBRATION_BATCH_TOKENS, or raise MAX_WALLCLOCK_SECONDS")
    return estimate


class CalibrationDeadline:
    """When Hessian collection stops, so that training + Hessians end inside MAX_WALLCLOCK_SECONDS whatever the
    estimate said: another batch starts only while the slowest one so far, begun now, still ends `seconds`
    after `t0`; never before `floor` batches (GPTQ needs data: those may run past it, `forced` counts them),
    never past `most`. Decided on the ranks' agreed (slowest) clock, so every rank stops at the same batch."""

    def __init__(self, seconds: float, floor: int, most: float, device: torch.device, t0: float,
                 clock=time.perf_counter):
        self.seconds, self.floor, self.most, self.device, self.t0, self.clock = seconds, floor, most, device, t0, clock
        self.batches, self.forced, self.elapsed, self.slowest = 0, 0, 0.0, 0.0

    def another(self) -> bool:
        sync_device(self.device)  # the batch before must have run to be timed
        elapsed = agree_elapsed(self.clock() - self.t0, self.device)
        if self.batches:
            self.slowest = max(self.slowest, elapsed - self.elapsed)
        self.elapsed = elapsed
        fits = elapsed + self.slowest <= self.seconds
        go = self.batches < self.floor or (fits and self.batches < self.most)
        self.forced += go and not fits
        self.batches += go
        return go


def calibration_deadline(hp: Hyperparameters, res: TrainResult, device: torch.device, t0: float,
                         clock=time.perf_counter) -> CalibrationDeadline | None:
    """The Hessian collection's share of the budget: what training left of MAX_WALLCLOCK_SECONDS minus
    GPTQ_RESERVE_SECONDS. After a wall-clock stop the whole share is used (more batches than planned when the
    estimate was high: an idle rest would be slack); after an ITERATIONS stop at most the planned batches.
    None in fixed-step mode (no budget: exactly GPTQ_CALIBRATION_BATCHES)."""
    if hp.max_wallclock_seconds <= 0:
        return None
    seconds = hp.max_wallclock_seconds - res.train_time_ms / 1000 - hp.gptq_reserve_seconds
    most = math.inf if res.stop_reason == "wallclock_cap" else hp.gptq_calibration_batches
    floor = max(1, min(hp.gptq_min_calibration_batches, hp.gptq_calibration_batches))
    return CalibrationDeadline(seconds, floor, most, device, t0, clock)


def make_train_step(hp: Hyperparameters, rt: Runtime, model: GPT, opt: Optimizers):
    """One optimizer step: grad_accum_steps micro-batches through the compiled model, then the update at the
    schedule's LR and momentum. Returns the mean loss (a device tensor)."""
    fwd = maybe_compile(model, hp, rt.device)

    def train_step(loader, step: int, frac: float, lr_scale: float = 1.0) -> torch.Tensor:
        total = torch.zeros((), device=rt.device)
        for _ in range(rt.grad_accum_steps):
            x, y = loader.next_host_batch()
            extras = attention_extras(model, x, rt.device)
            x, y = x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)
            with autocast_context(hp, rt.device):
                loss = fwd(x, y, **extras)
            (loss / rt.grad_accum_steps).backward()
            total += loss.detach()
        opt.set_schedule(lr_scale * lr_multiplier(frac, step, hp), muon_momentum_at(step, hp))
        opt.step()
        return total / rt.grad_accum_steps
    return train_step


class SeqStage(NamedTuple):
    length: int   # documents are cut into pieces of at most this many tokens
    until: float  # while training progress <= this


def parse_seq_schedule(hp: Hyperparameters) -> list[SeqStage]:
    """TRAIN_SEQ_SCHEDULE "len@frac,..." (#2014's progressive context) sorted by frac, ending at 1.0; empty =
    one stage at TRAIN_SEQ_LEN. Raises ValueError on a malformed entry."""
    if not hp.train_seq_schedule.strip():
        return [SeqStage(hp.train_seq_len, 1.0)]
    stages = []
    for part in hp.train_seq_schedule.split(","):
        length, at, until = part.strip().partition("@")
        if not at:
            raise ValueError(f"{part!r} is not LEN@FRAC")
        stages.append(SeqStage(int(length), float(until)))
    stages.sort(key=lambda st: st.until)
    if stages[-1].until < 1.0:
        stages.append(SeqStage(stages[-1].length, 1.0))
    return stages


def stage_at(stages: list[SeqStage], progress: float) -> SeqStage:
    return next((st for st in stages if progress <= st.until), stages[-1])


def seq_progress(hp: Hyperparameters, frac: float, step: int) -> float:
    return step / max(hp.iterations, 1) if hp.train_seq_schedule_mode == "step" else frac


def shapes_to_warm(hp: Hyperparameters) -> list[tuple[int, bool]]:
    """(piece length, looping) pairs the run will train with: on the wall-clock schedule, a stage sees looping
    off if it starts before ENABLE_LOOPING_AT and on if it ends after it; in step mode every pair."""
    stages, out, start = parse_seq_schedule(hp), [], 0.0
    for st in stages:
        for looping in ([False, True] if hp.num_loops > 0 else [False]):
            hit = st.until > hp.enable_looping_at if looping else hp.num_loops == 0 or start < hp.enable_looping_at
            if (hit or hp.train_seq_schedule_mode == "step") and (st.length, looping) not in out:
                out.append((st.length, looping))
        start = st.until
    return out


def warm_up(hp: Hyperparameters, rt: Runtime, model: GPT, opt: Optimizers, train_step, train_files) -> None:
    """WARMUP_STEPS real steps with each (piece length, layer schedule) the run will use (compiling each graph
    and warming the allocator), then weights, optimizer state and looping rolled back: the timed run starts
    from the true init (§4.5)."""
    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt_state = opt.state_dict()
    loader = make_train_loader(hp, rt, train_files)
    for piece, looping in shapes_to_warm(hp):
        model.looping, model.doc_piece_len = looping, piece
        t0 = time.perf_counter()
        for _ in range(hp.warmup_steps):
            train_step(loader, 0, 0.0)
        sync_device(rt.device)  # the first step of each shape compiles its graph
        rt.logger.log(f"warmup: {hp.warmup_steps} steps piece:{piece} looping:{int(looping)} "
                      f"{time.perf_counter() - t0:.1f}s")
    model.load_state_dict(snapshot)
    opt.load_state_dict(opt_state)
    model.zero_grad(set_to_none=True)
    model.looping, model.doc_piece_len = False, 0


def train(hp: Hyperparameters, rt: Runtime, model: GPT, train_files: list[str], val: ValidationData | None,
          luts: TokenByteLUTs, clock=time.perf_counter) -> tuple[TrainResult, ModelEMA]:
    """The timed run: after the Hessian probe (a budget it leaves no room in stops here) and the warm-up, steps
    under the wall-clock rule of TrainBudget on the ranks' agreed clock; the loader restarts at the data's
    beginning."""
    log = rt.logger.log
    opt = Optimizers(model, hp, rt.world_size, rt.rank)
    train_step = make_train_step(hp, rt, model, opt)
    res = TrainResult()
    if hp.max_wallclock_seconds > 0:
        res.hessian_estimate_s = probe_hessian_seconds(model, hp, rt, train_files, clock)
    if hp.warmup_steps > 0:
        warm_up(hp, rt, model, opt, train_step, train_files)
    loader = make_train_loader(hp, rt, train_files)
    ema = ModelEMA(model, hp.ema_decay)
    budget = TrainBudget(res.hessian_estimate_s)
    tokens_per_step = hp.train_batch_tokens
    local_elapsed, elapsed, step = 0.0, 0.0, 0
    stages, seq_changed_at = parse_seq_schedule(hp), 0
    model.train()
    while True:
        agreed = agree_elapsed(local_elapsed, rt.device)
        if step:
            rescaled = budget.record(agreed - elapsed)
            if rescaled:
                log(f"hessian_estimate: {budget.hessian_s:.2f}s (steps now {rescaled:.2f}x as slow as at the start)")
        elapsed = agreed
        frac = training_fraction(elapsed, step, hp, budget.hessian_s)
        if hp.num_loops > 0 and not model.looping and frac >= hp.enable_looping_at:
            model.looping, res.looping_step = True, step
            enc, dec = model.schedule()
            log(f"layer_loop:enabled step:{step} frac:{frac:.3f} encoder:{enc} decoder:{dec}")
        stage = stage_at(stages, seq_progress(hp, frac, step))
        if stage.length != model.doc_piece_len:
            if step:
                seq_changed_at = step
                log(f"train_seq_len: {model.doc_piece_len} -> {stage.length} step:{step} frac:{frac:.3f}")
            model.doc_piece_len = stage.length
        reason = stop_reason(elapsed, step, budget.next_step_s(), hp, budget.hessian_s)
        if reason:  # every rank computed it from the same agreed clock
            res.stop_reason = reason
            break
        t0 = clock()
        rewarm = min((step - seq_changed_at + 1) / hp.seq_change_warmup_steps, 1.0) \
            if seq_changed_at and hp.seq_change_warmup_steps else 1.0
        loss = train_step(loader, step, frac, rewarm)
        ema.update(model)
        sync_device(rt.device)
        local_elapsed += clock() - t0
        step += 1
        if step <= 5 or step % hp.train_log_every == 0:
            loss = float(all_reduce_(loss.detach().clone())) / rt.world_size  # mean over the global batch
            tps = step * tokens_per_step / max(local_elapsed, 1e-9)
            res.train_log.append({"step": step, "train_loss": loss, "train_time_ms": local_elapsed * 1000})
            log(f"{step}/{hp.iterations} train_loss: {loss:.4f} train_time: {local_elapsed / 60:.1f}m tok/s: {tps:.0f}")
        if hp.val_loss_every and val is not None and step % hp.val_loss_every == 0:
            r = eval_val(model, val, hp, rt)
            res.val_log.append({"step": step, "val_loss": r.val_loss, "val_bpb": r.val_bpb,
                                "train_time_ms": local_elapsed * 1000})
            log(f"{step}/{hp.iterations} val_loss: {r.val_loss:.4f} val_bpb: {r.val_bpb:.4f}")
            model.train()
    model.doc_piece_len = 0
    res.steps, res.train_time_ms, res.hessian_estimate_s = step, elapsed * 1000, budget.hessian_s
    res.tokens_per_s = step * tokens_per_step / max(elapsed, 1e-9)
    if res.stop_reason == "wallclock_cap":
        log(f"stopping_early: wallclock_cap train_time: {elapsed * 1000:.0f}ms step: {step}/{hp.iterations}")
    if rt.device.type == "cuda":
        log(f"peak memory allocated: {torch.cuda.max_memory_allocated() >> 20} MiB "
            f"reserved: {torch.cuda.max_memory_reserved() >> 20} MiB")
    return res, ema


# =============================================================================================
# Quantization: Hessians from training data, GPTQ with SDClip per-row scales, clip selection (fixed /
# adaptive Hessian sensitivity / byte budget), LQER low-rank error correction, quantize_state().
# =============================================================================================

@contextlib.contextmanager
def true_fp32():
    """TF32 off for CUDA matmuls and convolutions inside (init_runtime turns it on for training): the Hessian sums
    X^T X and GPTQ's Cholesky, inverse and error propagation run in true fp32 whatever the global setting, so
    the numerics that ship are the ones scripts/gpu_check.py validates. Restores the previous flags."""
    mm, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    prev = mm.allow_tf32, cudnn.allow_tf32
    mm.allow_tf32 = cudnn.allow_tf32 = False
    try:
        yield
    finally:
        mm.allow_tf32, cudnn.allow_tf32 = prev


GPTQ_BLOCK = 128          # columns per GPTQ block (spec §5.5)
GPTQ_DAMP = 0.01          # diagonal damping, fraction of mean(diag H) (spec §5.5)
GATE_INT8_MAX_NUMEL = 8192  # gate tensors up to this size are stored int8 per row (spec §5.3)


def hessian_taps(model: GPT) -> dict[nn.Module, list[str]]:
    """Module whose forward input X gives the Hessian X^T X of each listed weight. c_q, c_k and c_v read one
    input, so one tap serves the three; fc.weight is applied inside MLP.forward, so its tap is the MLP."""
    taps = {}
    for i, b in enumerate(model.blocks):
        taps[b.attn.c_q] = [f"blocks.{i}.attn.c_{n}.weight" for n in "qkv"]
        taps[b.attn.proj] = [f"blocks.{i}.attn.proj.weight"]
        taps[b.mlp] = [f"blocks.{i}.mlp.fc.weight"]
        taps[b.mlp.proj] = [f"blocks.{i}.mlp.proj.weight"]
    taps[model.head_input] = ["lm_head.weight" if model.lm_head is not None else "tok_emb.weight"]
    return taps


@torch.no_grad()
def collect_hessians(model: GPT, loader, batches: int, hp: Hyperparameters, rt: Runtime,
                     deadline: CalibrationDeadline | None = None) -> dict[str, torch.Tensor]:
    """H = mean over batches of X^T X for the input of every quantized linear map, from TRAINING data
    (the loader reads only fineweb_train_* files), summed across ranks (one per hessian_taps() module).
    `batches` batches, or with a deadline as many as it lets start (its .batches)."""
    taps = hessian_taps(model)
    sums: dict[nn.Module, torch.Tensor] = {}

    def hook(mod, inp, out):
        # autocast would run x^T x in bf16 (and refuse the fp32 accumulator), TF32 would round X to 10 mantissa
        # bits: accumulate in true fp32
        with torch.autocast(inp[0].device.type, enabled=False), true_fp32():
            x = inp[0].detach().reshape(-1, inp[0].size(-1)).float()
            if mod in sums:
                sums[mod].addmm_(x.T, x)
            else:
                sums[mod] = x.T @ x
    hooks = [mod.register_forward_hook(hook) for mod in taps]
    was_training = model.training
    model.eval()
    n = 0
    try:
        while deadline.another() if deadline is not None else n < batches:
            n += 1
            x, _y = loader.next_batch()
            with autocast_context(hp, rt.device):
                model.forward_hidden(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    out = {}
    for mod, names in taps.items():
        H = sums[mod]
        if rt.world_size > 1:
            all_reduce_(H)
        H /= n * rt.world_size
        out.update(dict.fromkeys(names, H))
    return out


def quant_kind(name: str, t: torch.Tensor, hp: Hyperparameters) -> str:
    """Routing (spec §5.3): int8 gate rows, fp16 passthrough for small/control tensors, else GPTQ."""
    if name.endswith("attn_gate_w") and t.numel() <= GATE_INT8_MAX_NUMEL and hp.gated_attn_quant_gate:
        return "int8_row"
    if not t.is_floating_point() or t.ndim != 2 or is_control_tensor(name) or t.numel() <= hp.quant_min_numel:
        return "fp16"
    return "gptq"


def tensor_bits(name: str, hp: Hyperparameters) -> int:
    return hp.embed_bits if name in ("tok_emb.weight", "lm_head.weight") else hp.matrix_bits


def group_clip_sigmas(name: str, hp: Hyperparameters) -> float:
    if name in ("tok_emb.weight", "lm_head.weight"):
        return hp.embed_clip_sigmas
    if ".mlp." in name:
        return hp.mlp_clip_sigmas
    if ".attn." in name:
        return hp.attn_clip_sigmas
    return hp.matrix_clip_sigmas


# GPTQ row steps lie on a grid 2^(1/8) apart, and the artifact stores the grid index (~2.7 bits a row after lzma;
# fp16 steps take ~10). Rounding jitters a row's clip by up to +-4.4 %: the mean squared step, and so the error,
# grows by 0.13 % (E[2^2u], u uniform in +-1/16), where 1/32 takes 1.9 bits a row more (bench/RESULTS.md §4.2).
SCALE_GRID_STEPS = 8
SCALE_GRID_RANGE = (-24 * SCALE_GRID_STEPS, 15 * SCALE_GRID_STEPS)  # fp16's smallest subnormal .. largest octave


def grid_scales(e: torch.Tensor, steps: int) -> torch.Tensor:
    """fp16 steps of grid indices, computed on the CPU in float64 so that packer and loader agree to the bit."""
    return torch.from_numpy(np.exp2(e.cpu().double().numpy() / steps)).half()


def sdclip_scales(W: torch.Tensor, sigmas: float, bits: int) -> torch.Tensor:
    """Per-row step s = k * std(row) / (2^(bits-1)-1) (§5.4), rounded to the grid that is stored."""
    s = sigmas * W.float().std(dim=1) / (2 ** (bits - 1) - 1)
    e = torch.round(torch.log2(s.clamp_min(1e-30)) * SCALE_GRID_STEPS).clamp(*SCALE_GRID_RANGE)
    return grid_scales(e, SCALE_GRID_STEPS).float().to(W.device)


def rtn_quantize(W: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    R = 2 ** (bits - 1) - 1
    return torch.clamp(torch.round(W.float() / scale[:, None]), -R, R).to(torch.int8)


@true_fp32()
def gptq_quantize(W: torch.Tensor, H: torch.Tensor, scale: torch.Tensor, bits: int, hi_cols: list[int] | None = None,
                  hi_scale: torch.Tensor | None = None, hi_bits: int = 8) -> torch.Tensor:
    """GPTQ (spec §5.5): act-order columns, damped inverse Hessian via Cholesky, blockwise error propagation.
    Returns int8 codes in [-R, R] with the given per-row scales; columns `hi_cols` are coded at hi_bits with
    hi_scale instead (AWQ-lite), their error propagated like any other."""
    R, R_hi = 2 ** (bits - 1) - 1, 2 ** (hi_bits - 1) - 1
    W = W.detach().float().clone()
    H = H.detach().float().clone().to(W.device)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(torch.diag(H), descending=True)
    inv = torch.argsort(perm)
    W, H = W[:, perm], H[perm][:, perm]
    damp = GPTQ_DAMP * torch.diag(H).mean()
    for attempt in range(6):
        try:
            Hd = H + damp * (10 ** attempt) * torch.eye(H.size(0), device=H.device)
            U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hd)), upper=True)
            break
        except RuntimeError:  # not positive definite: damp harder
            continue
    else:
        raise RuntimeError("GPTQ: Hessian is not positive definite even with heavy damping")
    s = scale.float().to(W.device)[:, None]
    s_hi = s if hi_scale is None else hi_scale.float().to(W.device)[:, None]
    hi = torch.zeros(W.size(1), dtype=torch.bool)
    hi[hi_cols or []] = True
    hi = hi[perm.cpu()].tolist()
    Q = torch.zeros_like(W, dtype=torch.int8)
    cols = W.size(1)
    for i1 in range(0, cols, GPTQ_BLOCK):
        i2 = min(i1 + GPTQ_BLOCK, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        E1 = torch.zeros_like(W1)
        for j in range(i2 - i1):
            w = W1[:, j: j + 1]
            sj, Rj = (s_hi, R_hi) if hi[i1 + j] else (s, R)
            q = torch.clamp(torch.round(w / sj), -Rj, Rj)
            Q[:, i1 + j] = q[:, 0].to(torch.int8)
            e = (w - q * sj) / U1[j, j]
            W1[:, j:] -= e * U1[j: j + 1, j:]
            E1[:, j: j + 1] = e
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return Q[:, inv].contiguous()


@true_fp32()
def hessian_weighted_error(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W - Wq) H (W - Wq)^T): the expected output error of the layer over the calibration inputs."""
    E = (W.float() - Wq.float()).to(H.device)
    return float(((E @ H.float()) * E).sum())


def adaptive_clip_sigmas(stats: list[dict], hp: Hyperparameters) -> tuple[dict[str, float], float]:
    """Per-tensor sigma = clamp(exp(exponent*log(mean diag H * row var W) + offset), min, max); `offset` is
    bisected so that the numel-weighted mean log sigma equals that of the fixed per-group sigmas (same
    overall budget, redistributed by sensitivity; spec §5.7)."""
    numel = torch.tensor([s["numel"] for s in stats], dtype=torch.float64)
    sens = torch.tensor([max(s["h_mean"] * s["row_var"], 1e-30) for s in stats], dtype=torch.float64)
    base = torch.tensor([s["base_sigma"] for s in stats], dtype=torch.float64)
    raw = hp.adaptive_clip_exponent * sens.log()
    target = float((numel * base.log()).sum() / numel.sum())
    lo_c, hi_c = math.log(hp.adaptive_clip_min), math.log(hp.adaptive_clip_max)

    def mean_log(o):
        return float((numel * (raw + o).clamp(lo_c, hi_c)).sum() / numel.sum())
    lo, hi = -60.0, 60.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if mean_log(mid) < target else (lo, mid)
    offset = 0.5 * (lo + hi)
    sig = (raw + offset).clamp(lo_c, hi_c).exp()
    return {s["name"]: float(v) for s, v in zip(stats, sig)}, offset


def lqer_factors(E: torch.Tensor, rank: int, group: int) -> dict[str, torch.Tensor]:
    """Rank-r SVD of the quantization error E ~ A B; A coded INT2 with one scale, B coded INT4 in groups of
    `group` consecutive values (spec §5.6, asymmetric path)."""
    U, S, Vh = torch.linalg.svd(E.float(), full_matrices=False)
    r = min(rank, S.numel())
    A, B = U[:, :r] * S[:r], Vh[:r]
    sA = (A.abs().max() / 1.5).clamp_min(1e-10).half().float()
    qA = torch.clamp(torch.round(A / sA), -2, 1).to(torch.int8)
    flat = B.reshape(-1)
    pad = (-flat.numel()) % group
    groups = torch.cat([flat, flat.new_zeros(pad)]).view(-1, group)
    sB = (groups.abs().amax(dim=1) / 7.5).clamp_min(1e-10).half().float()
    qB = torch.clamp(torch.round(groups / sB[:, None]), -8, 7).to(torch.int8).reshape(-1)[: flat.numel()]
    return {"lqA": qA, "lqAs": sA.half().reshape(1), "lqB": qB.view_as(B), "lqBs": sB.half()}


def lqer_dequant(f: dict[str, torch.Tensor], group: int) -> torch.Tensor:
    A = f["lqA"].float() * f["lqAs"].float()
    flat = f["lqB"].float().reshape(-1)
    pad = (-flat.numel()) % group
    g = torch.cat([flat, flat.new_zeros(pad)]).view(-1, group) * f["lqBs"].float()[:, None]
    return A @ g.reshape(-1)[: flat.numel()].view_as(f["lqB"])


@dataclass
class QEntry:
    """One tensor of the quantized model. kind: gptq (codes q + per-row fp16 step on the scale grid, optional LQER),
    int8_row (gate codes + scale), fp16 (data)."""
    kind: str
    shape: tuple
    dtype: str
    q: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    data: torch.Tensor | None = None
    bits: int = 8
    sigma: float = 0.0
    lqer: dict | None = None
    awq: dict | None = None  # AWQ-lite: "q" int8 [rows, n*group] codes of columns "starts"+group, "s" fp16 [rows]


def dequantize_entry(e: QEntry, lqer_group: int) -> torch.Tensor:
    if e.kind == "fp16":
        out = e.data.float()
    else:
        out = e.q.float() * e.scale.float()[:, None]
        if e.awq is not None:
            out[:, awq_columns(e.awq)] = e.awq["q"].float() * e.awq["s"].float()[:, None]
        if e.lqer is not None:
            out = out + lqer_dequant(e.lqer, lqer_group)
    return out.to(getattr(torch, e.dtype)).view(e.shape)


def awq_columns(awq: dict) -> list[int]:
    g = awq["q"].size(1) // len(awq["starts"])
    return [c for st in awq["starts"] for c in range(st, st + g)]


def awq_lite_groups(state: dict[str, torch.Tensor], hessians: dict[str, torch.Tensor], stats: list[dict],
                    hp: Hyperparameters) -> dict[str, list[int]]:
    """AWQ-lite (#1908, spec B6): the AWQ_LITE_GROUP_TOP_K column groups of AWQ_LITE_GROUP_SIZE, over every GPTQ
    tensor below AWQ_LITE_BITS, with the largest sum of act_rms[c] * mean|W[:, c]|; act_rms is the root of the
    Hessian diagonal (the same hook inputs; the common row count does not change the ranking)."""
    if not hp.awq_lite_enabled:
        return {}
    g, cands = hp.awq_lite_group_size, []
    for st in stats:
        if st["bits"] >= hp.awq_lite_bits:
            continue
        W = state[st["name"]]
        sal = hessians[st["name"]].diagonal().float().cpu().clamp_min(0).sqrt() * W.abs().mean(0)
        cands += [(float(sal[c: c + g].sum()), st["name"], c) for c in range(0, W.size(1) - g + 1, g)]
    chosen: dict[str, list[int]] = {}
    for _, name, c in sorted(cands, reverse=True)[: hp.awq_lite_group_top_k]:
        chosen.setdefault(name, []).append(c)
    return {n: sorted(v) for n, v in chosen.items()}


def dequantize_state(qs: dict[str, QEntry], lqer_group: int) -> dict[str, torch.Tensor]:
    return {k: dequantize_entry(e, lqer_group) for k, e in qs.items()}


def nearest_neighbour_order(feat: torch.Tensor) -> list[int]:
    """Greedy walk: start at row 0, then repeatedly the unused row nearest in L1 to the last (lowest index on
    ties), the frontier's row order (spec §A7.2)."""
    left = torch.ones(len(feat), dtype=torch.bool, device=feat.device)
    order = [0]
    for _ in range(len(feat) - 1):
        left[order[-1]] = False
        order.append(int((feat - feat[order[-1]]).abs().sum(1).masked_fill(~left, float("inf")).argmin()))
    return order


def sort_hidden_units(state: dict[str, torch.Tensor], hessians: dict[str, torch.Tensor]
                      ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Reorder every MLP's hidden units so that consecutive units have similar weights (greedy nearest
    neighbour in L1 over the fc row and the proj column, each scaled like its quantization rows). The model
    computes the same function (the activation is elementwise), no permutation is stored, and the weight
    coder's "code above" context sees a similar unit. The proj Hessian follows the permutation."""
    state, hessians = dict(state), dict(hessians)
    for fc_name in [n for n in state if n.endswith(".mlp.fc.weight")]:
        proj_name = fc_name.replace(".mlp.fc.", ".mlp.proj.")
        fc, proj = state[fc_name].float(), state[proj_name].float()
        feat = torch.cat([fc / fc.std(1, keepdim=True).clamp_min(1e-12),
                          (proj / proj.std(1, keepdim=True).clamp_min(1e-12)).T], 1)
        idx = torch.tensor(nearest_neighbour_order(feat), device=fc.device)
        state[fc_name], state[proj_name] = state[fc_name][idx], state[proj_name][:, idx]
        if proj_name in hessians:
            hessians[proj_name] = hessians[proj_name][idx.to(hessians[proj_name].device)][:, idx]
    return state, hessians


def quantize_state(state: dict[str, torch.Tensor], hessians: dict[str, torch.Tensor], hp: Hyperparameters,
                   log=print, code_bytes: int = 0, model_bytes_of=None) -> tuple[dict[str, QEntry], list[dict]]:
    """Quantize a model state dict. Returns the entries and the per-tensor clip table. `model_bytes_of`
    (entries -> compressed model bytes) is needed by CLIP_MODE=budget, which fits the artifact to its target."""
    state = {k: v.detach().float().cpu() for k, v in state.items()}
    direct = {name: direct_entry(name, t, hp) for name, t in state.items()}  # None: a GPTQ tensor
    missing = [n for n, e in direct.items() if e is None and n not in hessians]
    if missing:
        raise KeyError(f"no Hessian collected for {missing}")
    stats = clip_stats(state, hessians, [n for n, e in direct.items() if e is None], hp)
    sigmas = choose_clip_sigmas(stats, hp, log)
    base = {n: e for n, e in direct.items() if e is not None}
    awq = awq_lite_groups(state, hessians, stats, hp)
    if awq:
        log(f"awq_lite: {hp.awq_lite_bits}-bit column groups {awq}")
    quantize = functools.partial(quantize_gptq, state, hessians, stats, base, hp, awq)
    if hp.clip_mode == "budget" and stats:
        if model_bytes_of is None:
            raise ValueError("CLIP_MODE=budget needs the artifact packer to measure bytes")
        sigmas, entries = budget_clip_sigmas(state, hessians, stats, sigmas, quantize, model_bytes_of,
                                             hp.target_artifact_bytes - code_bytes, hp, log)
    else:
        entries = quantize(sigmas)
    lq = [n for n, e in entries.items() if e.lqer is not None]
    if lq:
        log(f"lqer: rank {hp.lqer_rank} on {lq}")
    table = [{**{k: s[k] for k in ("name", "numel", "h_mean", "row_var")}, "sigma": sigmas[s["name"]],
              "bits": s["bits"]} for s in stats]
    return entries, table


# Passthrough tensors (branch scales, skip weights and gates) keep PASSTHROUGH_MANTISSA_BITS of fp16's 10 mantissa
# bits: ~3 bits a value fewer after lzma. Not the residual mixes, which scale the whole residual stream: rounding
# them to 5 bits moved val_bpb by +0.032, any other group by < 0.0008 (bench/RESULTS.md §4.2); nor tensors too
# small to save anything (gains, lambdas, the logit caps, the smear gate).
PASSTHROUGH_MANTISSA_BITS = 7
FULL_FP16_PASSTHROUGH = ("resid_mix",)
PASSTHROUGH_ROUND_MIN_NUMEL = 256


def fp16_bits(h: torch.Tensor) -> torch.Tensor:
    """The fp16 bit patterns of `h` as int32 in [0, 2^16)."""
    return h.detach().cpu().half().contiguous().view(torch.int16).int() & 0xFFFF


def int16_of(b: torch.Tensor) -> torch.Tensor:
    """int32 values in [0, 2^16) as the int16 tensor of the same bits."""
    return torch.where(b >= 1 << 15, b - (1 << 16), b).short()


def from_fp16_bits(b: torch.Tensor) -> torch.Tensor:
    return int16_of(b).view(torch.float16)


def round_mantissa(h: torch.Tensor, bits: int = PASSTHROUGH_MANTISSA_BITS) -> torch.Tensor:
    """fp16 values rounded to the nearest with `bits` mantissa bits (the others zero; never rounded up to inf)."""
    drop, b = 10 - bits, fp16_bits(h)
    mag = ((b & 0x7FFF) + (1 << drop >> 1)) >> drop << drop
    return from_fp16_bits((b & 0x8000) | mag.clamp_max(0x7BFF >> drop << drop))


def direct_entry(name: str, t: torch.Tensor, hp: Hyperparameters) -> QEntry | None:
    """The entry of a tensor stored without GPTQ (fp16 passthrough, int8 gate rows); None for GPTQ tensors."""
    kind = quant_kind(name, t, hp)
    if kind == "fp16":
        full = t.numel() < PASSTHROUGH_ROUND_MIN_NUMEL or any(p in name for p in FULL_FP16_PASSTHROUGH)
        return QEntry("fp16", tuple(t.shape), "float32", data=t.half() if full else round_mantissa(t))
    if kind == "int8_row":
        s = (t.abs().amax(dim=1) / 127).clamp_min(1e-10).half().float()
        return QEntry("int8_row", tuple(t.shape), "float32", q=rtn_quantize(t, s, 8), scale=s.half(), bits=8)
    return None


def clip_stats(state: dict[str, torch.Tensor], hessians: dict[str, torch.Tensor], names: list[str],
               hp: Hyperparameters) -> list[dict]:
    """Per GPTQ tensor: size, Hessian scale, row variance, group sigma and bits (what clip choices read)."""
    out = []
    for name in names:
        W, H = state[name], hessians[name].cpu()
        out.append({"name": name, "numel": W.numel(), "h_mean": float(torch.diag(H).clamp_min(0).mean()),
                    "row_var": float(W.var(dim=1).mean()), "base_sigma": group_clip_sigmas(name, hp),
                    "bits": tensor_bits(name, hp)})
    return out


def choose_clip_sigmas(stats: list[dict], hp: Hyperparameters, log=print) -> dict[str, float]:
    """CLIP_MODE=fixed: the group sigmas; adaptive and budget start from the Hessian-sensitivity sigmas."""
    sigmas = {s["name"]: s["base_sigma"] for s in stats}
    matrices = [s for s in stats if s["name"] not in ("tok_emb.weight", "lm_head.weight")]
    if hp.clip_mode in ("adaptive", "budget") and matrices:
        adaptive, offset = adaptive_clip_sigmas(matrices, hp)
        sigmas.update(adaptive)
        log(f"clip:adaptive offset:{offset:.6f} exponent:{hp.adaptive_clip_exponent}")
    return sigmas


def quantize_gptq(state: dict[str, torch.Tensor], hessians: dict[str, torch.Tensor], stats: list[dict],
                  base: dict[str, QEntry], hp: Hyperparameters, awq: dict[str, list[int]],
                  sigmas: dict[str, float]) -> dict[str, QEntry]:
    """All entries: `base` plus every GPTQ tensor at its sigma (AWQ-lite column groups `awq` at AWQ_LITE_BITS),
    then LQER factors on the LQER_TOP_K tensors with the largest error of that mixed reconstruction."""
    out = dict(base)
    for s in stats:
        name, W, bits = s["name"], state[s["name"]], s["bits"]
        scale = sdclip_scales(W, sigmas[name], bits)
        H = hessians[name]  # GPTQ runs where the Hessians live (the GPU in a real run)
        starts = awq.get(name)
        hi = [c for st in starts for c in range(st, st + hp.awq_lite_group_size)] if starts else None
        s_hi = sdclip_scales(W, sigmas[name], hp.awq_lite_bits) if starts else None
        q = gptq_quantize(W.to(H.device), H, scale.to(H.device), bits, hi,
                          None if s_hi is None else s_hi.to(H.device), hp.awq_lite_bits).cpu()
        e = QEntry("gptq", tuple(W.shape), "float32", q=q, scale=scale.half(), bits=bits, sigma=sigmas[name])
        if starts:  # the high-precision codes leave the int-`bits` matrix (zeros there) for their own stream
            e.awq = {"q": q[:, hi].clone(), "s": s_hi.half(), "starts": starts}
            q[:, hi] = 0
        out[name] = e
    names = [s["name"] for s in stats]
    if hp.lqer_enabled and hp.lqer_rank > 0 and names:
        err = {n: state[n] - dequantize_entry(out[n], hp.lqer_asym_group) for n in names}
        for n in sorted(names, key=lambda n: -float(err[n].norm()))[: hp.lqer_top_k]:
            out[n].lqer = lqer_factors(err[n], hp.lqer_rank, hp.lqer_asym_group)
    return out


BUDGET_SIGMA_GRID = (0.55, 0.65, 0.75, 0.85, 0.92, 1.0, 1.08, 1.18, 1.3, 1.45, 1.65, 1.9, 2.2)  # x adaptive sigma
BUDGET_TOLERANCE = 0.005  # land within 0.5 % under the byte target


def order0_entropy_bytes(codes: torch.Tensor) -> float:
    counts = torch.bincount((codes.reshape(-1).to(torch.int64) + 128), minlength=256).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log2()).sum() * counts.sum() / 8)


def budget_clip_sigmas(state, hessians, stats, start_sigmas, quantize, model_bytes_of, target_bytes: int,
                       hp: Hyperparameters, log):
    """CLIP_MODE=budget: per-tensor sigma from a grid to minimise the summed Hessian-weighted error subject
    to the compressed model landing just under `target_bytes`. Per-tensor (error, bytes) curves come from
    round-to-nearest codes (bytes ~ order-0 entropy); a Lagrange multiplier is bisected to meet the byte
    target, then the estimate is corrected against the real packed size and re-solved."""
    curves = []
    for s in stats:
        W, H, name = state[s["name"]], hessians[s["name"]].cpu(), s["name"]
        pts = []
        for m in BUDGET_SIGMA_GRID:
            sig = min(max(start_sigmas[name] * m, hp.adaptive_clip_min * 0.5), hp.adaptive_clip_max * 2)
            scale = sdclip_scales(W, sig, s["bits"])
            q = rtn_quantize(W, scale, s["bits"])
            pts.append((sig, hessian_weighted_error(W, q.float() * scale[:, None], H), order0_entropy_bytes(q)))
        curves.append((name, pts))

    def solve(budget: float):
        def pick(lam):
            choice, total = {}, 0.0
            for name, pts in curves:
                sig, _e, b = min(pts, key=lambda p: p[1] + lam * p[2])
                choice[name], total = sig, total + b
            return choice, total
        lo, hi = 0.0, 1.0
        while pick(hi)[1] > budget and hi < 1e30:
            hi *= 10
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            lo, hi = (lo, mid) if pick(mid)[1] <= budget else (mid, hi)
        return pick(hi)
    est_total = sum(min(p[2] for p in pts) for _n, pts in curves)
    entries = quantize(start_sigmas)
    actual = model_bytes_of(entries)
    overhead = actual - sum(order0_entropy_bytes(entries[n].q) for n, _ in curves)  # scales, fp16, header
    goal = target_bytes * (1 - BUDGET_TOLERANCE / 2)
    budget, sigmas = goal - overhead, dict(start_sigmas)
    best = None  # (bytes, sigmas, entries) of the largest packing that fits: the grid is discrete, so the
    for it in range(6):  # correction can oscillate between two solutions either side of the target
        choice, est = solve(budget)
        sigmas.update(choice)
        entries = quantize(sigmas)
        actual = model_bytes_of(entries)
        log(f"clip:budget iter:{it} est_code_bytes:{est:.0f} model_bytes:{actual} target:{target_bytes}")
        if actual <= target_bytes and (best is None or actual > best[0]):
            best = (actual, dict(sigmas), entries)
        if target_bytes * (1 - BUDGET_TOLERANCE) <= actual <= target_bytes:
            break
        budget += goal - actual
    if best is not None:
        return best[1], best[2]
    log(f"clip:budget WARNING could not reach target {target_bytes} (min estimate {est_total:.0f})")
    return sigmas, entries


# =============================================================================================
# Artifact: versioned container (magic, header, per-group compressed streams), self-extracting code
# wrapper, exact byte accounting, atomic writes.
# =============================================================================================

ARTIFACT_MAGIC = b"PGQA"
ARTIFACT_VERSION = 4  # 2: a codec per stream and the weight coder; 3: GPTQ row steps as grid indices;
#                       4: passthrough tensors without their zero mantissa bits, the grid's resolution in the header,
#                          row-step indices in the weight coder
SHUFFLED_STREAMS = ("fp16", "scale_e", "passthrough")  # 2-byte values, stored high bytes apart from low bytes
CODE_GROUPS = ("tok_emb", "attn.c_q", "attn.c_k", "attn.c_v", "attn.proj", "mlp.fc", "mlp.proj", "other")


class ArtifactError(ValueError):
    """A truncated, corrupted or foreign artifact: never decoded into a wrong model."""


COMPRESSORS = {
    "zstd": (lambda b: zstandard.ZstdCompressor(level=22).compress(b),
             lambda b: zstandard.ZstdDecompressor().decompress(b)),
    "lzma": (lambda b: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME), lzma.decompress),
    "raw": (bytes, bytes),
}


def _code_group(name: str) -> str:
    if name in ("tok_emb.weight", "lm_head.weight"):
        return "tok_emb"
    for g in CODE_GROUPS[1:-1]:
        if f".{g}." in name:
            return g
    return "other"


def _byte_shuffle(raw: bytes, width: int) -> bytes:
    """Regroup bytes by position mod width (all low bytes, then high bytes): fp16 compresses better."""
    a = np.frombuffer(raw, dtype=np.uint8)
    return a.reshape(-1, width).T.copy().tobytes() if a.size else raw


def _byte_unshuffle(raw: bytes, width: int) -> bytes:
    a = np.frombuffer(raw, dtype=np.uint8)
    return a.reshape(width, -1).T.copy().tobytes() if a.size else raw


# ---- weight coder: rANS over the GPTQ codes with adaptive context frequencies ----------------------------
# Codes are read row by row ("steps"), all columns ("lanes") at once. A code's context is the expected size of
# codes at its place, from two stored class vectors per tensor (half-octave classes of the mean |code| of each
# row and of each column: input channels and hidden units differ a lot in width), and the code just above it
# (an MLP's hidden units are sorted by similarity first, see sort_hidden_units). Frequencies adapt per context
# and role (attn.c_q, mlp.fc, ...) across the layers, in integer arithmetic only, so encoder and decoder agree
# bit for bit on any machine. One interleaved rANS stream serves all lanes (Giesen, "Interleaved entropy
# coders", 2014): 32-bit states, 16-bit renormalisation, at most one word per lane and step.
RANS_PREC = 15          # frequencies sum to 2^15
RANS_LOW = 1 << 16      # states live in [2^16, 2^32)


class CoderSpec(NamedTuple):
    """The weight coder's context model; stored in the artifact header, so the decoder uses the same."""
    class_range: int = 6      # row/column classes: half-octaves of mean |code| vs the tensor's, +-class_range
    prev_clip: int = 2        # the code above (same column, previous row) clipped to +-prev_clip; 0 = off
    copy_percent: int = 60    # a row whose mean |difference to the row above| is under this % of its mean |code|
                              # is coded as that difference (near-copies: e.g. rare tokens' embeddings); 0 = off
    halve_at: int = 1 << 15   # a context's counts are halved past this total: frequencies follow the layers
    size_prior: int = 16      # pseudo-counts pulling a size context towards the role's distribution
    detail_prior: int = 32    # pseudo-counts pulling a (size, code above) context towards its size's
    refresh: int = 16         # rows between recomputations of the frequency tables (their cost dominates)


class ContextModel:
    """Adaptive frequencies of one role's codes (or of the class vectors); encoder and decoder drive it alike.
    Contexts are (size, detail) pairs; a context's estimate backs off to its size's, and that to the role's
    (Dirichlet pseudo-counts), so a rare context borrows the shape of its parent instead of starting flat."""

    def __init__(self, levels: int, n_size: int, n_detail: int, spec: "CoderSpec"):
        self.levels, self.spec, self.cached, self.stale, self.updates = levels, spec, None, 0, 0
        self.counts = np.zeros((n_size, n_detail, levels), np.int64)

    def tables(self) -> tuple[np.ndarray, np.ndarray]:
        if self.cached is None or self.stale >= min(self.spec.refresh, 1 + self.updates // 8):  # young: every row
            self.cached, self.stale = self.estimate(), 0
        return self.cached

    def estimate(self) -> tuple[np.ndarray, np.ndarray]:
        c2, one, spec = self.counts, 1 << 20, self.spec  # estimates in units of 2^-20, integers throughout
        c1 = c2.sum(1)
        c0 = c1.sum(0)
        p0 = (2 * c0 + 1) * one // (2 * c0.sum() + self.levels)
        p1 = ((c1 * one + spec.size_prior * p0) // np.maximum(c1.sum(1, keepdims=True) + spec.size_prior, 1))[:, None]
        p2 = (c2 * one + spec.detail_prior * p1) // np.maximum(c2.sum(2, keepdims=True) + spec.detail_prior, 1)
        p2 = p2.reshape(-1, self.levels)
        freq = 1 + p2 * ((1 << RANS_PREC) - self.levels) // np.maximum(p2.sum(1, keepdims=True), 1)
        freq[np.arange(len(p2)), p2.argmax(1)] += (1 << RANS_PREC) - freq.sum(1)
        cum = np.zeros((len(p2), self.levels + 1), np.int64)
        np.cumsum(freq, 1, out=cum[:, 1:])
        return freq, cum

    def update(self, ctx: np.ndarray, sym: np.ndarray) -> None:
        flat = self.counts.reshape(-1, self.levels)
        flat += np.bincount(ctx * self.levels + sym, minlength=flat.size).reshape(flat.shape)
        full = flat.sum(1) > self.spec.halve_at
        flat[full] = (flat[full] + 1) // 2
        self.stale, self.updates = self.stale + 1, self.updates + 1


class CodedTensor(NamedTuple):
    """One code tensor as the weight coder reads it: `role` picks its context model, `levels` = 2^bits. `steps`:
    its row-step grid indices minus their median, when they lie within STEP_HALF_RANGE of it (else stored apart)."""
    role: str
    levels: int
    codes: np.ndarray  # int64 [rows, cols] (decoder: only its shape is used)
    steps: np.ndarray | None = None  # int64 [original rows] (decoder: only its length is used)


# Row-step indices go through the weight coder too, a model per role learning their spread around each tensor's
# median (~20 % fewer bytes than lzma on the CPU model), STEP_CHUNK at a time so that it adapts within a tensor.
STEP_HALF_RANGE = 32
STEP_CHUNK = 64


SIZE_REFERENCE = 2.0  # mean |code| that column class 0 (centre) stands for: columns carry the tensor's width


def size_classes(codes: np.ndarray, spec: CoderSpec) -> np.ndarray:
    """Half-octave classes (0-based) of the mean |code| of every row vs the tensor's mean, then of every column
    vs SIZE_REFERENCE (their sum places a code's expected size on one absolute scale across tensors); a row
    coded as its difference to the row above has 2 * class_range + 1 added to its class."""
    r = spec.class_range
    a = np.abs(codes).astype(np.float64)
    mean = max(a.mean(), 1e-3)
    rel = np.concatenate([a.mean(1) / mean, a.mean(0) / SIZE_REFERENCE])
    classes = np.clip(np.round(2 * np.log2(np.maximum(rel, 1 / 64))), -r, r).astype(np.int64) + r
    diff = np.abs(np.diff(codes, axis=0)).mean(1) * 100 < spec.copy_percent * a[1:].mean(1)
    classes[1: len(codes)] += (2 * r + 1) * diff
    return classes


def walk_codes(tensors: list[CodedTensor], spec: CoderSpec, lanes: int, code_row, encode: bool) -> list[CodedTensor]:
    """The one traversal shared by encoder and decoder: per tensor, its row steps, its class vectors, then its rows
    of codes. `code_row(model, ctx, known)` codes one row of symbols (known: the encoder's, None when decoding)."""
    r, n_prev, n_cls = spec.class_range, 2 * spec.prev_clip + 1, 2 * spec.class_range + 1
    classes_model, models, out = ContextModel(2 * n_cls, 1, 1, spec), {}, []
    for t in tensors:
        rows, cols = t.codes.shape
        steps, chunk = [], min(STEP_CHUNK, lanes)
        if t.steps is not None and t.role + "/steps" not in models:
            models[t.role + "/steps"] = ContextModel(2 * STEP_HALF_RANGE, 1, 1, spec)
        for i in range(0, 0 if t.steps is None else len(t.steps), chunk):
            step_model = models[t.role + "/steps"]
            zero = np.zeros(min(chunk, len(t.steps) - i), np.int64)
            sym = code_row(step_model, zero, t.steps[i: i + chunk] + STEP_HALF_RANGE if encode else None)
            step_model.update(zero, sym)
            steps.append(sym - STEP_HALF_RANGE)
        known, classes = size_classes(t.codes, spec) if encode else None, []
        for i in range(0, rows + cols, lanes):
            zero = np.zeros(min(lanes, rows + cols - i), np.int64)
            classes.append(code_row(classes_model, zero, None if known is None else known[i: i + lanes]))
            classes_model.update(zero, classes[-1])
        classes = np.concatenate(classes)
        model = models.setdefault(t.role, ContextModel(t.levels, 4 * r + 1, n_prev, spec))
        copies = models.setdefault(t.role + "/diff", ContextModel(t.levels, 4 * r + 1, 1, spec))
        codes, above, half = np.empty((rows, cols), np.int64), np.zeros(cols, np.int64), t.levels // 2
        for i in range(rows):
            size = classes[rows:] + classes[i] % n_cls
            if classes[i] >= n_cls:  # coded as the difference to the row above, modulo the alphabet
                sym = code_row(copies, size, (t.codes[i] - above) % t.levels if encode else None)
                copies.update(size, sym)
                codes[i] = above = (sym + above + half) % t.levels - half
                continue
            ctx = size * n_prev + np.clip(above, -spec.prev_clip, spec.prev_clip) + spec.prev_clip
            sym = code_row(model, ctx, t.codes[i] + half if encode else None)
            model.update(ctx, sym)
            codes[i] = above = sym - half
        out.append(t._replace(codes=codes, steps=np.concatenate(steps) if steps else None))
    return out


def rans_encode(tensors: list[CodedTensor], spec: CoderSpec) -> bytes:
    """All tensors into one interleaved rANS stream: uint32 lane states, then uint16 words."""
    lanes, freqs, starts = max(t.codes.shape[1] for t in tensors), [], []

    def note(model: ContextModel, ctx: np.ndarray, sym: np.ndarray) -> np.ndarray:
        freq, cum = model.tables()  # each symbol's frequency exactly as the decoder will see it
        freqs.append(freq[ctx, sym].astype(np.uint32))
        starts.append(cum[ctx, sym].astype(np.uint32))
        return sym
    walk_codes(tensors, spec, lanes, note, True)
    x, words = np.full(lanes, RANS_LOW, np.uint64), []
    for f, s in zip(reversed(freqs), reversed(starts)):  # rANS is last-in first-out
        xs, f, s = x[:len(f)], f.astype(np.uint64), s.astype(np.uint64)
        emit = xs >= (f << np.uint64(32 - RANS_PREC))
        words.append((xs[emit] & np.uint64(0xFFFF)).astype("<u2"))
        xs = np.where(emit, xs >> np.uint64(16), xs)
        x[:len(f)] = (xs // f << np.uint64(RANS_PREC)) + xs % f + s
    return x.astype("<u4").tobytes() + b"".join(w.tobytes() for w in reversed(words))


def rans_decode(blob: bytes, tensors: list[CodedTensor], spec: CoderSpec) -> list[CodedTensor]:
    """Inverse of rans_encode, given each tensor's role, levels and shape; ArtifactError on corrupt input."""
    lanes = max(t.codes.shape[1] for t in tensors)
    if len(blob) < 4 * lanes or len(blob) % 2:
        raise ArtifactError("weight-coder stream truncated")
    x = np.frombuffer(blob[: 4 * lanes], "<u4").astype(np.int64)
    words = np.frombuffer(blob[4 * lanes:], "<u2").astype(np.int64)
    pos, mask = 0, (1 << RANS_PREC) - 1

    def decode(model: ContextModel, ctx: np.ndarray, _) -> np.ndarray:
        nonlocal pos
        freq, cum = model.tables()
        xs = x[:len(ctx)]
        slot = xs & mask
        sym = (cum[ctx, 1:] <= slot[:, None]).sum(1)
        xs = freq[ctx, sym] * (xs >> RANS_PREC) + slot - cum[ctx, sym]
        need = xs < RANS_LOW
        n = int(need.sum())
        if pos + n > len(words):
            raise ArtifactError("weight-coder stream truncated")
        xs[need] = (xs[need] << 16) | words[pos: pos + n]
        x[:len(ctx)], pos = xs, pos + n
        return sym
    out = walk_codes(tensors, spec, lanes, decode, False)
    if pos != len(words) or (x != RANS_LOW).any():
        raise ArtifactError("weight-coder stream corrupted (decoder did not end in its initial state)")
    return out


class StreamSlice(NamedTuple):
    """Where one part of a tensor (codes, scales, LQER factors, fp16 data) lives in the artifact: bytes
    offset..offset+length of the decompressed stream `stream`; 2-D codes are stored transposed (column-major
    codes compress better). The header stores it as a JSON list."""
    stream: str
    offset: int
    length: int
    shape: list
    dtype: str
    transposed: bool


def coder_view(name: str, q: torch.Tensor) -> torch.Tensor:
    """Codes as the weight coder reads them: hidden units of the MLP on the step axis in both of its matrices."""
    return q.T if ".mlp.proj." in name else q


def pack_artifact(entries: dict[str, QEntry], config: dict, compressor: str = "zstd") -> bytes:
    """Serialize quantized entries + the model config into one deterministic container. COMPRESSOR=rans codes
    the GPTQ codes with the weight coder and every other stream with the better of zstd and lzma."""
    streams: dict[str, list[bytes]] = {}
    sizes: dict[str, int] = {}
    tensors, coded = [], []

    def put(stream: str, arr: torch.Tensor, transpose: bool = False) -> StreamSlice:
        a = arr.contiguous()
        raw = (a.T.contiguous() if transpose and a.ndim == 2 else a).numpy().tobytes()
        off = sizes.get(stream, 0)
        streams.setdefault(stream, []).append(raw)
        sizes[stream] = off + len(raw)
        return StreamSlice(stream, off, len(raw), list(a.shape), str(a.dtype).replace("torch.", ""),
                           bool(transpose and a.ndim == 2))
    for name in sorted(entries):
        e = entries[name]
        rec = {"name": name, "kind": e.kind, "shape": list(e.shape), "dtype": e.dtype, "bits": e.bits,
               "sigma": e.sigma, "parts": {}}
        drop, bits = 10 - PASSTHROUGH_MANTISSA_BITS, fp16_bits(e.data) if e.kind == "fp16" else None
        if bits is not None and not (bits & ((1 << drop) - 1)).any():  # as round_mantissa left it: drop zero bits
            rec["parts"]["data_r"], rec["mantissa"] = put("passthrough", int16_of(bits >> drop)), 10 - drop
        elif e.kind == "fp16":
            rec["parts"]["data"] = put("fp16", e.data)
        else:
            grid = torch.round(torch.log2(e.scale.float()) * SCALE_GRID_STEPS) if e.kind == "gptq" else None
            lo, hi = SCALE_GRID_RANGE  # steps exactly on the grid are stored as their index, any other as fp16
            on_grid = grid is not None and bool(((grid >= lo) & (grid <= hi)).all()) and \
                torch.equal(grid_scales(grid, SCALE_GRID_STEPS), e.scale)
            idx = grid.long().numpy() if on_grid else None
            median = int(np.median(idx)) if on_grid else 0
            coded_steps = on_grid and compressor == "rans" and int(np.abs(idx - median).max()) < STEP_HALF_RANGE
            if e.kind == "gptq" and compressor == "rans":
                view = coder_view(name, e.q)
                rec["parts"]["q"] = StreamSlice("rans", len(coded), 0, list(e.q.shape), "int8", view is not e.q)
                coded.append(CodedTensor(_code_group(name), 1 << e.bits, view.numpy().astype(np.int64),
                                         idx - median if coded_steps else None))
            else:
                rec["parts"]["q"] = put(f"codes.{_code_group(name)}" if e.kind == "gptq" else "int8", e.q, True)
            if coded_steps:
                rec["step_median"] = median
            elif on_grid:
                rec["parts"]["scale_e"] = put("scale_e", grid.short())
            else:
                rec["parts"]["scale"] = put("fp16", e.scale)
            for k, v in (e.lqer or {}).items():
                rec["parts"][k] = put("fp16" if v.dtype == torch.float16 else "int8", v)
            if e.awq is not None:
                rec["awq_starts"] = e.awq["starts"]
                rec["parts"]["awq_q"], rec["parts"]["awq_s"] = put("int8", e.awq["q"], True), put("fp16", e.awq["s"])
        tensors.append(rec)
    body, stream_meta = [], []
    for sname in sorted(streams):
        raw = b"".join(streams[sname])
        if sname in SHUFFLED_STREAMS:
            raw = _byte_shuffle(raw, 2)
        codecs = ("zstd", "lzma") if compressor == "rans" else (compressor,)
        comp, codec = min(((COMPRESSORS[c][0](raw), c) for c in codecs), key=lambda t: len(t[0]))
        stream_meta.append({"name": sname, "codec": codec, "raw_len": len(raw), "len": len(comp),
                            "crc32": zlib.crc32(comp)})
        body.append(comp)
    spec = CoderSpec()
    if coded:
        comp = rans_encode(coded, spec)
        stream_meta.append({"name": "rans", "codec": "rans", "raw_len": len(comp), "len": len(comp),
                            "crc32": zlib.crc32(comp)})
        body.append(comp)
    header = json.dumps({"version": ARTIFACT_VERSION, "compressor": compressor, "config": config,
                         "coder": spec._asdict(), "scale_grid": SCALE_GRID_STEPS, "streams": stream_meta,
                         "tensors": tensors},
                        sort_keys=True, separators=(",", ":"))
    hz = zlib.compress(header.encode(), 9)
    return ARTIFACT_MAGIC + struct.pack("<HII", ARTIFACT_VERSION, len(hz), zlib.crc32(hz)) + hz + b"".join(body)


def unpack_artifact(blob: bytes) -> tuple[dict[str, QEntry], dict]:
    """Inverse of pack_artifact; raises ArtifactError on any truncation or corruption."""
    if len(blob) < 14 or blob[:4] != ARTIFACT_MAGIC:
        raise ArtifactError("not a Parameter Golf artifact (bad magic or too short)")
    version, hlen, hcrc = struct.unpack("<HII", blob[4:14])
    if not 1 <= version <= ARTIFACT_VERSION:
        raise ArtifactError(f"artifact version {version}; this script reads versions 1 to {ARTIFACT_VERSION}")
    hz = blob[14: 14 + hlen]
    if len(hz) != hlen or zlib.crc32(hz) != hcrc:
        raise ArtifactError("artifact header truncated or corrupted (CRC mismatch)")
    header = json.loads(zlib.decompress(hz))
    pos, raw_streams = 14 + hlen, {}
    for sm in header["streams"]:
        codec = sm.get("codec", header["compressor"])  # version 1: one compressor for every stream
        if codec not in COMPRESSORS and codec != "rans":
            raise ArtifactError(f"unknown compressor {codec!r}")
        comp = blob[pos: pos + sm["len"]]
        if len(comp) != sm["len"] or zlib.crc32(comp) != sm["crc32"]:
            raise ArtifactError(f"artifact stream {sm['name']!r} truncated or corrupted (CRC mismatch)")
        raw = comp if codec == "rans" else COMPRESSORS[codec][1](comp)
        if len(raw) != sm["raw_len"]:
            raise ArtifactError(f"artifact stream {sm['name']!r} decompressed to the wrong length")
        raw_streams[sm["name"]] = _byte_unshuffle(raw, 2) if sm["name"] in SHUFFLED_STREAMS else raw
        pos += sm["len"]
    if pos != len(blob):
        raise ArtifactError(f"artifact has {len(blob) - pos} trailing bytes")
    recs = [(rec, StreamSlice(*rec["parts"]["q"])) for rec in header["tensors"] if "q" in rec["parts"]]
    recs = sorted(((r, q) for r, q in recs if q.stream == "rans"), key=lambda rq: rq[1].offset)
    try:  # intact bytes (CRCs pass) that another coder version wrote decode to nonsense: say so, not IndexError
        decoded = rans_decode(raw_streams.get("rans", b""), [
            CodedTensor(_code_group(r["name"]), 1 << r["bits"], np.broadcast_to(
                np.int64(0), q.shape[::-1] if q.transposed else q.shape),
                np.zeros(r["shape"][0], np.int64) if "step_median" in r else None) for r, q in recs],
            CoderSpec(**header["coder"])) if recs else []
    except ArtifactError:
        raise
    except (IndexError, ValueError, TypeError) as e:
        raise ArtifactError(f"weight-coder stream does not decode ({type(e).__name__}: {e}); written by another "
                            "version of the coder?") from e

    def get(part: StreamSlice) -> torch.Tensor:
        if part.stream == "rans":
            t = torch.from_numpy(decoded[part.offset].codes.astype(np.int8))
            return t.T.contiguous() if part.transposed else t
        arr = np.frombuffer(raw_streams[part.stream][part.offset: part.offset + part.length],
                            dtype=getattr(np, part.dtype)).copy()
        t = torch.from_numpy(arr)
        return t.view(part.shape[1], part.shape[0]).T.contiguous() if part.transposed else t.view(part.shape)
    entries, grid_steps = {}, header.get("scale_grid", 32)  # version 3 had no field: its grid was 2^(1/32)
    for rec in header["tensors"]:
        p = {k: get(StreamSlice(*v)) for k, v in rec["parts"].items()}
        lq = {k: p[k] for k in ("lqA", "lqAs", "lqB", "lqBs") if k in p} or None
        awq = {"q": p["awq_q"], "s": p["awq_s"], "starts": rec["awq_starts"]} if "awq_q" in p else None
        if "data_r" in p:
            p["data"] = from_fp16_bits((p["data_r"].int() & 0xFFFF) << (10 - rec["mantissa"]))
        if "step_median" in rec:  # row steps that the weight coder carried
            carried = decoded[StreamSlice(*rec["parts"]["q"]).offset].steps
            p["scale_e"] = torch.from_numpy(carried + rec["step_median"])
        entries[rec["name"]] = QEntry(rec["kind"], tuple(rec["shape"]), rec["dtype"], q=p.get("q"),
                                      scale=grid_scales(p["scale_e"], grid_steps) if "scale_e" in p else p.get("scale"),
                                      data=p.get("data"), bits=rec["bits"],
                                      sigma=rec["sigma"], lqer=lq, awq=awq)
    return entries, header["config"]


def model_config_for_artifact(hp: Hyperparameters, bos_id: int, looping: bool) -> dict:
    """What a fresh process needs to rebuild the model from the artifact alone: every setting the
    Hyperparameters mark for the artifact (the whole model group), the BOS id and the layer schedule."""
    return {**{k: getattr(hp, k) for k in Hyperparameters.artifact_fields()}, "bos_id": bos_id, "looping": looping}


def model_from_artifact(blob: bytes, hp: Hyperparameters, device: torch.device, backend: str) -> GPT:
    """A fresh model built from the artifact bytes alone (the architecture comes from its header)."""
    entries, cfg = unpack_artifact(blob)
    stored = set(Hyperparameters.artifact_fields())
    arch = dataclasses.replace(hp, **{k: v for k, v in cfg.items() if k in stored})
    model = GPT(arch, cfg["bos_id"], backend).to(device)
    state = dequantize_state(entries, cfg["lqer_asym_group"])
    missing = set(model.state_dict()) ^ set(state)
    if missing:
        raise ArtifactError(f"artifact tensors do not match the model: {sorted(missing)[:5]}")
    model.load_state_dict({k: v.to(device) for k, v in state.items()})
    model.looping = cfg["looping"]
    return model


def code_source() -> bytes:
    """The source of this script (also when it runs from the self-extracting wrapper)."""
    src = globals().get("_PG_SOURCE")
    if src is not None:
        return src
    with open(os.path.abspath(__file__), "rb") as f:
        return f.read()


def minify_source(source: bytes) -> bytes:
    """The same program in fewer bytes: no comments, docstrings or annotations, short names for module-level
    functions and constants and for the locals of functions, no optional spaces. Triton kernels keep their
    text (`tl.constexpr` annotations, the globals they read); names that a string, an attribute, a keyword
    argument or a class body could mean keep theirs, so string lookups, tracebacks and reprs still name them.
    The squeezed text must parse to the same program, else the unsqueezed one is returned."""
    tree = ast.parse(source)
    jit = lambda fn: any("jit" in ast.unparse(d) for d in fn.decorator_list)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and \
                isinstance(getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
        if isinstance(node, ast.FunctionDef) and not jit(node):
            node.returns = None
            a = node.args
            for arg in a.posonlyargs + a.args + a.kwonlyargs + [a.vararg, a.kwarg]:
                if arg is not None:
                    arg.annotation = None
    nodes = list(ast.walk(tree))
    taken = {getattr(n, "id", getattr(n, "arg", getattr(n, "attr", getattr(n, "name", None)))) for n in nodes}
    kept = [s for n in nodes if isinstance(n, ast.Constant) and isinstance(n.value, str) for s in [n.value]] + \
        [n.arg for n in nodes if isinstance(n, (ast.arg, ast.keyword))] + \
        [n.attr for n in nodes if isinstance(n, ast.Attribute)] + \
        [ast.unparse(f) for f in nodes if isinstance(f, ast.FunctionDef) and jit(f)] + \
        [ast.unparse(s.target) for c in nodes if isinstance(c, ast.ClassDef) for s in c.body
         if isinstance(s, ast.AnnAssign)]
    keep = set(re.findall(r"[A-Za-z_]\w*", " ".join(k for k in kept if k)))
    abc = "abcdefghijklmnopqrstuvwxyz"  # locals get lower case, module names upper case: no clashes between them
    short = lambda avoid, abc=abc: (x for x in (f"{c}{i or ''}" for i in range(999) for c in abc)
                                    if x not in avoid and not hasattr(builtins, x))
    tops = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)} | \
        {x.id for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign))
         for t in getattr(n, "targets", [getattr(n, "target", None)]) for x in ast.walk(t) if isinstance(x, ast.Name)}
    names = dict(zip(sorted(t for t in tops - keep if len(t) > 2 and t[:2] != "__"), short(taken, abc.upper())))
    for n in nodes:
        if isinstance(n, ast.Name) and n.id in names:
            n.id = names[n.id]
        elif isinstance(n, ast.FunctionDef) and n.name in names:
            n.name = names[n.name]
        elif isinstance(n, ast.Global):
            n.names = [names.get(x, x) for x in n.names]
    taken |= set(names.values())
    for fn in [n for n in tree.body if isinstance(n, ast.FunctionDef)] + \
            [m for c in tree.body if isinstance(c, ast.ClassDef) for m in c.body if isinstance(m, ast.FunctionDef)]:
        sub = list(ast.walk(fn))
        if jit(fn) or any(isinstance(n, (ast.ClassDef, ast.Global, ast.Nonlocal, ast.ExceptHandler, ast.Import,
                                         ast.ImportFrom)) for n in sub):
            continue
        args = {n.arg for n in sub if isinstance(n, ast.arg)}
        local = sorted({n.id for n in sub if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)} - args)
        names = dict(zip(local, short(taken | args)))
        for n in sub:
            if isinstance(n, ast.Name) and len(n.id) > 2 and n.id in names:
                n.id = names[n.id]
    plain = ast.unparse(tree) + "\n"
    lines = []
    for line in plain.split("\n"):  # one statement per line from unparse: squeeze each on its own
        text, prev = line.lstrip(" "), None
        out = " " * ((len(line) - len(text)) // 4)
        for tok in tokenize.generate_tokens(io.StringIO(text).readline) if text else []:
            if tok.type in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER, tokenize.INDENT, tokenize.DEDENT):
                continue
            if prev in (tokenize.NAME, tokenize.NUMBER) and tok.type in (tokenize.NAME, tokenize.NUMBER, tokenize.STRING):
                out += " "
            out, prev = out + tok.string, tok.type
        lines.append(out)
    squeezed = "\n".join(lines)
    try:
        same = ast.dump(ast.parse(squeezed)) == ast.dump(tree)
    except SyntaxError:
        same = False
    return (squeezed if same else plain).encode()


# Raw LZMA2 with the literal-context settings that suit Python text best (lc=3, pb=0: measured 0.5% smaller
# than the .xz defaults, and no container header); the decoder needs only the filter id.
CODE_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "lc": 3, "lp": 0, "pb": 0}]


def latin1_literal(data: bytes) -> str:
    """`data` as a '''...''' literal of a latin-1 source file: a byte stands for itself except NUL, CR (the
    tokenizer would turn it into LF), backslash and a quote that a quote follows (or that ends the data)."""
    out = []
    for i, b in enumerate(data):
        nxt = data[i + 1: i + 2]
        if b == 0:
            out.append("\\x00" if nxt and 48 <= nxt[0] <= 55 else "\\0")  # "\\0" + octal digit: one escape
        elif b in (13, 92) or b == 39 and nxt in (b"'", b""):
            out.append({13: "\\r", 39: "\\'", 92: "\\\\"}[b])
        else:
            out.append(chr(b))
    return "'''" + "".join(out) + "'''"


def code_wrapper(source: bytes) -> bytes:
    """A self-extracting, stdlib-only form of the script: minified, raw LZMA2, stored as a latin-1 string literal
    (1 byte per byte plus a few escapes, where base85 would add 25%), exec'd as __main__."""
    packed = lzma.compress(minify_source(source), format=lzma.FORMAT_RAW, filters=CODE_LZMA_FILTERS)
    # linecache lets inspect (and so @triton.jit) read the source of the exec'd code
    return ("#coding:latin1\nimport lzma,linecache\n_PG_SOURCE=lzma.decompress(" + latin1_literal(packed) +
            ".encode('l1'),lzma.FORMAT_RAW,None,[{'id':lzma.FILTER_LZMA2}])\n"
            "_n='train_gpt_src.py';linecache.cache[_n]=(len(_PG_SOURCE),None,_PG_SOURCE.decode().splitlines(True),_n)\n"
            "exec(compile(_PG_SOURCE,_n,'exec'))\n").encode("latin-1")


def shipped_code(source: bytes) -> tuple[bytes, str]:
    """What is shipped and counted: the wrapper when it is smaller than the raw source."""
    wrapped = code_wrapper(source)
    return (wrapped, "lzma_wrapper") if len(wrapped) < len(source) else (source, "raw")


def write_atomic(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# =============================================================================================
# Evaluation: plain eval, sliding-window eval, score-first TTT with per-document LoRA and phased global
# SGD. Every number is a sum of per-token NLL (float64) over bytes of the original text.
# =============================================================================================

@dataclass
class EvalResult:
    stage: str
    loss_sum: float
    tokens: int
    bytes: int
    time_ms: float
    token_losses: torch.Tensor | None = None
    info: dict = field(default_factory=dict)

    @property
    def val_loss(self) -> float:
        return self.loss_sum / max(self.tokens, 1)

    @property
    def val_bpb(self) -> float:
        return self.loss_sum / (math.log(2) * max(self.bytes, 1))

    def line(self) -> str:
        return f"{self.stage} val_loss:{self.val_loss:.8f} val_bpb:{self.val_bpb:.8f} eval_time:{self.time_ms:.0f}ms"


class ScoreBoard:
    """Accumulates per-target NLL into validation-stream order; sums are float64 and combined across ranks."""

    def __init__(self, val: ValidationData, device, keep_losses: bool):
        self.val, self.device = val, device
        self.target_bytes = val.target_bytes.to(device)
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.nbytes = torch.zeros((), dtype=torch.float64, device=device)
        self.losses = torch.zeros(val.num_targets, dtype=torch.float32, device=device) if keep_losses else None
        self.scored = torch.zeros(val.num_targets, dtype=torch.int32, device=device) if keep_losses else None

    def add(self, target_pos: torch.Tensor, nll: torch.Tensor) -> None:
        """target_pos: indices into the target stream (target j = token j+1)."""
        self.loss += nll.double().sum()
        self.count += nll.numel()
        self.nbytes += self.target_bytes[target_pos].double().sum()
        if self.losses is not None:
            self.losses[target_pos] = nll.float()
            self.scored[target_pos] += 1

    def result(self, stage: str, t0: float) -> EvalResult:
        for t in (self.loss, self.count, self.nbytes):
            all_reduce_(t)
        losses = None
        if self.losses is not None:
            all_reduce_(self.losses)
            all_reduce_(self.scored)
            if int(self.scored.min()) != 1 or int(self.scored.max()) != 1:
                raise RuntimeError(f"{stage}: some validation token was scored {int(self.scored.max())} times "
                                   f"or never; the eval is broken")
            losses = self.losses.cpu()
        return EvalResult(stage, float(self.loss), int(self.count), int(self.nbytes),
                          (time.perf_counter() - t0) * 1000, losses)


def eval_rows_per_forward(hp: Hyperparameters, seq_len: int) -> int:
    """Rows of seq_len per eval forward on each rank: VAL_BATCH_TOKENS / 8 tokens (the record's
    VAL_BATCH_TOKENS / (WORLD_SIZE x grad accumulation)), whatever the world size, so memory is bounded."""
    return max(1, hp.val_batch_tokens // (8 * seq_len))


def _rank_range(n: int, rank: int, world: int) -> tuple[int, int]:
    return n * rank // world, n * (rank + 1) // world


class DocumentPieces:
    """Runs GPT on flat rows cut as the record's packed rows: a segment starts at the row start, at each BOS and
    every `piece_len` tokens into a document; the smear is cut at BOS only. GPT makes that cut in train mode (its
    training rows); its forward has no other train-mode behaviour (no dropout), so no-grad evals use it too."""

    def __init__(self, model: GPT, piece_len: int):
        self.model, self.piece_len = model, piece_len

    def __enter__(self):
        self.saved = self.model.training, self.model.doc_piece_len
        self.model.train()
        self.model.doc_piece_len = self.piece_len

    def __exit__(self, *exc):
        self.model.train(self.saved[0])
        self.model.doc_piece_len = self.saved[1]


EVAL_GRID_RANKS = 8  # the record's GPUs: its eval_val forwards are laid out for 8 ranks, so ours are at any world size


def eval_spans(n: int, seq: int, rows: int, rank: int, world: int) -> list[tuple[int, int]]:
    """[start, end) target ranges of a rank's plain-eval forwards. The forwards are the record's at its 8 GPUs:
    the n // seq sequences split contiguously over EVAL_GRID_RANKS, `rows` sequences per forward, so the scores
    do not depend on the world size; our ranks take contiguous runs of them. Unlike the record, which drops them,
    the stream's last n % seq targets are scored too (a last forward)."""
    total, spans = n // seq, []
    for r in range(EVAL_GRID_RANKS):
        lo, hi = _rank_range(total, r, EVAL_GRID_RANKS)
        spans += [(s * seq, min(s + rows, hi) * seq) for s in range(lo, hi, rows)]
    if total * seq < n:
        spans.append((total * seq, n))
    a, b = _rank_range(len(spans), rank, world)
    return spans[a:b]


@torch.no_grad()
def eval_val(model: GPT, val: ValidationData, hp: Hyperparameters, rt: Runtime, stage: str = "val",
             keep_losses: bool = False) -> EvalResult:
    """Plain eval with the record's windows: each forward is one flat row of eval_rows_per_forward() sequences
    of EVAL_SEQ_LEN (eval_spans), attention restarting at its start, at each document start and every
    EVAL_SEQ_LEN tokens into a document (DocumentPieces): a document crossing a sequence boundary keeps its
    context. Every target is scored once."""
    t0 = time.perf_counter()
    seq = hp.eval_seq_len
    width = eval_rows_per_forward(hp, seq) * seq
    board = ScoreBoard(val, rt.device, keep_losses)
    fwd = maybe_compile(model, hp, rt.device)
    with DocumentPieces(model, seq):
        for a, b in eval_spans(val.num_targets, seq, width // seq, rt.rank, rt.world_size):
            w = width if fwd is not model else b - a  # compiled: one shape, the tail padded (never scored)
            x = torch.zeros(1, w, dtype=torch.int64)
            y = torch.zeros(1, w, dtype=torch.int64)
            x[0, : b - a], y[0, : b - a] = val.tokens[a:b], val.tokens[a + 1: b + 1]
            with autocast_context(hp, rt.device):
                nll = fwd(x.to(rt.device), y.to(rt.device), reduction="none",
                          **attention_extras(model, x, rt.device)).float()
            board.add(torch.arange(a, b, device=rt.device), nll[0, : b - a])
    return board.result(stage, t0)


@torch.no_grad()
def eval_sliding(model: GPT, val: ValidationData, hp: Hyperparameters, rt: Runtime, stage: str = "sliding",
                 keep_losses: bool = False, stride: int | None = None) -> EvalResult:
    """Windows of EVAL_SEQ_LEN every `stride` tokens; each window scores only the targets no earlier window
    scored, so every target is scored exactly once with up to EVAL_SEQ_LEN-stride tokens of left context. A
    window is one row, attention cut at its start and at each BOS: a piece cut every EVAL_SEQ_LEN tokens into a
    document (eval_val's) never falls inside a window that long."""
    t0 = time.perf_counter()
    seq, stride = hp.eval_seq_len, stride or hp.eval_stride or hp.eval_seq_len
    n = val.num_targets
    starts = list(range(0, max(n - seq, 0) + 1, stride))
    if starts[-1] + seq < n:
        starts.append(n - seq)
    lo, hi = _rank_range(len(starts), rt.rank, rt.world_size)
    board = ScoreBoard(val, rt.device, keep_losses)
    was_training = model.training
    model.eval()
    rows = eval_rows_per_forward(hp, seq)
    fwd = maybe_compile(model, hp, rt.device)
    toks = val.tokens
    st = torch.tensor(starts, dtype=torch.int64)
    # window i scores from the end of window i-1 on (its first `first[i]` positions were scored before)
    first = torch.zeros_like(st)
    first[1:] = (st[:-1] + seq - st[1:]).clamp_min(0)
    cols = torch.arange(seq)
    for b0 in range(lo, hi, rows):
        win = torch.arange(b0, b0 + rows)
        real = win < hi
        win = win.clamp_max(hi - 1)  # the last batch repeats its last window (unscored): one shape throughout
        idx = st[win, None] + cols[None, :]
        x, y = toks[idx].to(rt.device), toks[idx + 1].to(rt.device)
        with autocast_context(hp, rt.device):
            nll = fwd(x, y, reduction="none", **attention_extras(model, toks[idx], rt.device)).float()
        keep = ((cols[None, :] >= first[win, None]) & real[:, None]).to(rt.device)
        board.add(idx.to(rt.device)[keep], nll[keep])
    model.train(was_training)
    return board.result(stage, t0)


def find_docs(tokens: torch.Tensor, bos_id: int) -> list[tuple[int, int]]:
    """(start, length) per document; a document includes the next document's BOS as its last token, so its
    final prediction is 'end of document' (spec §1.7). Predictions over all docs = len(tokens) - 1."""
    starts = (tokens == bos_id).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0] + starts
    n = tokens.numel()
    docs = []
    for i, s in enumerate(starts):
        end = starts[i + 1] + 1 if i + 1 < len(starts) else n
        if end - s >= 2:
            docs.append((s, end - s))
    return docs


def scoring_order(docs: list[tuple[int, int]]) -> list[int]:
    """TTT's document queue, longest first (ties in stream order), as the record's queue: phased TTT adapts on
    its head, ranks take contiguous parts of it, and the n-gram counts follow it."""
    return sorted(range(len(docs)), key=lambda d: -docs[d][1])


class NgramHints(NamedTuple):
    """Per target position g (predicting token g+1): the hinted token and its boost (0 = no hint)."""
    hint: torch.Tensor   # int64 [N-1]
    boost: torch.Tensor  # float32 [N-1]


NGRAM_HASH_SEED = 2135  # fixed multipliers: the hints are a function of the tokens and the scoring order only


def ngram_hints(tokens: torch.Tensor, docs: list[tuple[int, int]], order: list[int], hp: Hyperparameters) -> NgramHints:
    """Token n-gram hints (spec A1.1), causal in the scoring order: the documents are read in `order`, and the
    hint for a position is the most frequent continuation (the first to reach the top count) of its last
    TOKEN_ORDER-1 tokens among positions read before it, given when that continuation's share of them is at
    least TOKEN_THRESHOLD. One vectorised pass: sorting by context hash replaces the record's hash tables."""
    v = tokens.numpy()
    pos = np.concatenate([np.arange(docs[d][0], docs[d][0] + docs[d][1] - 1) for d in order])  # inputs, in order
    x, y = v[pos].astype(np.uint64), v[pos + 1].astype(np.int64)
    ctx = hp.token_order - 1
    mult = np.random.Generator(np.random.PCG64(NGRAM_HASH_SEED)).integers(0, 2**63, ctx, dtype=np.uint64) * 2 + 1
    key = np.zeros(x.size, np.uint64)
    for j in range(ctx):  # hash of x[k-ctx+1..k], wrapping uint64 arithmetic
        key[j:] += x[: x.size - j] * mult[j]
    k = np.arange(ctx - 1, x.size)
    by_ctx = k[np.argsort(key[k], kind="stable")]  # grouped by context, in reading order within a group
    n, idx = by_ctx.size, np.arange(by_ctx.size)
    ks, ys = key[by_ctx], y[by_ctx]
    del x, key, k  # ~0.4 GB each at the record's 47.85M targets, on every rank
    first = np.r_[True, ks[1:] != ks[:-1]]
    gid = np.cumsum(first) - 1
    seen = idx - np.maximum.accumulate(np.where(first, idx, 0))  # earlier positions with this context
    pair = gid * (int(y.max()) + 1) + ys
    by_pair = np.argsort(pair, kind="stable")
    ps = pair[by_pair]
    count = np.empty(n, np.int64)  # occurrences of (context, continuation) up to and including this one
    count[by_pair] = idx - np.maximum.accumulate(np.where(np.r_[True, ps[1:] != ps[:-1]], idx, 0)) + 1
    del pair, by_pair, ps
    top = np.maximum.accumulate(gid * (n + 1) + count) - gid * (n + 1)  # running top count in the group
    new_top = first | (count > np.r_[0, top[:-1]])  # strictly more: ties keep the older continuation
    top_tok = ys[np.maximum.accumulate(np.where(new_top, idx, 0))]
    hint = np.zeros(n, np.int64)
    share = np.zeros(n, np.float32)
    later = ~first
    hint[later] = top_tok[:-1][later[1:]]
    share[later] = top[:-1][later[1:]].astype(np.float32) / seen[later].astype(np.float32)
    gated = share >= np.float32(hp.token_threshold)
    out_hint = np.zeros(v.size - 1, np.int64)
    out_boost = np.zeros(v.size - 1, np.float32)
    target = pos[by_ctx]
    out_hint[target[gated]] = hint[gated]
    out_boost[target[gated]] = hp.token_boost
    return NgramHints(torch.from_numpy(out_hint), torch.from_numpy(out_boost))


def tilted_nll(scores: TokenScores, targets: torch.Tensor, hint: torch.Tensor, boost: torch.Tensor) -> torch.Tensor:
    """-log p'(target) for p'(a) = p(a) e^(boost [a = hint]) / Z, Z = 1 - q + q e^boost, q = p(hint): a full
    normalised distribution (spec A1.2), in fp32; boost 0 returns the NLL unchanged."""
    q = scores.hint_logprob.float().clamp_max(0).exp()
    return scores.nll.float() - boost * (targets == hint) + torch.log1p(q * torch.expm1(boost))


def parse_short_chunks(hp: Hyperparameters) -> list[tuple[int, int]]:
    """TTT_SHORT_SCORE_FIRST_STEPS "max doc length:chunk,..." sorted by length."""
    return sorted(tuple(int(v) for v in part.split(":")) for part in hp.ttt_short_score_first_steps.split(",")
                  if part.strip())


def ttt_chunk_for(hp: Hyperparameters, length: int) -> int:
    """TTT chunk size of a document of `length` tokens (#2014 chose it per batch of similar lengths: short
    documents get more adapter steps before their later tokens are scored)."""
    if hp.ttt_short_score_first_enabled:
        for max_len, chunk in parse_short_chunks(hp):
            if length <= max_len:
                return chunk
    return hp.ttt_chunk_size


class ChunkSpan(NamedTuple):
    """Where one document's chunk sits in its TTT row: targets row[lo:hi] are validation targets
    target_pos..target_pos+hi-lo-1; `trains` when the document has later chunks (the adapter learns from it)."""
    lo: int
    hi: int
    target_pos: int
    trains: bool


TTT_ROW_MULTIPLE = 64  # TTT row widths are padded to a multiple of this: never 1 (one dynamic graph), tile-aligned


def ttt_row_tokens(length: int, C: int, ctx: int) -> int:
    """Tokens in a document's TTT rows over all its chunks (chunk c's row is the doc's last min(end_c, ctx)
    tokens up to end_c = (c+1)C, the last chunk ending at length-1): the work TTT does on it, the unit of
    TTTPlan's costs. Closed form of sum_c min(end_c, ctx)."""
    pred = length - 1
    n = -(-pred // C)
    k = min(n - 1, ctx // C)  # chunks before the last whose row is still shorter than ctx
    return C * k * (k + 1) // 2 + (n - 1 - k) * ctx + min(pred, ctx)


def ttt_rows_per_forward(hp: Hyperparameters) -> int:
    """Documents per TTT forward: VAL_BATCH_TOKENS / 8 tokens of TTT_EVAL_SEQ_LEN rows, at most TTT_BATCH_SIZE;
    a batch runs as several such forwards whose gradients add up before the one adapter step."""
    return max(1, min(hp.ttt_batch_size, hp.val_batch_tokens // (8 * hp.ttt_eval_seq_len)))


class TTTRows(NamedTuple):
    X: torch.Tensor            # [n_rows, width] inputs
    Y: torch.Tensor            # [n_rows, width] targets
    spans: list                # ChunkSpan per batch document (None: no chunk c)
    hint: torch.Tensor | None  # [n_rows, width] n-gram hint per position (with the tilt)
    boost: torch.Tensor | None


def _ttt_rows(val_tokens, docs, batch, c, C, ctx, n_rows, hints: NgramHints | None = None) -> TTTRows:
    """Rows for chunk c of each doc in the batch (n_rows >= len(batch); the rest are padding): window [ws, end)
    of the doc, its targets, and the ChunkSpan of each doc (None when the doc has no chunk c). One row holds
    one document, its tail padded with token 0 (causal attention never lets padding reach a real position)."""
    rows, tgts, spans = [], [], []
    for d in batch:
        s, L = docs[d]
        pred = L - 1
        if c * C >= pred:
            spans.append(None)
            rows.append(None)
            tgts.append(None)
            continue
        end = min((c + 1) * C, pred)
        ws = max(0, end - ctx)
        rows.append(val_tokens[s + ws: s + end])
        tgts.append(val_tokens[s + ws + 1: s + end + 1])
        spans.append(ChunkSpan(c * C - ws, end - ws, s + c * C, end < pred))
    width = -(-max(r.numel() for r in rows if r is not None) // TTT_ROW_MULTIPLE) * TTT_ROW_MULTIPLE
    X = torch.zeros(n_rows, width, dtype=torch.int64)
    Y = torch.zeros(n_rows, width, dtype=torch.int64)
    H = torch.zeros(n_rows, width, dtype=torch.int64) if hints is not None else None
    Bo = torch.zeros(n_rows, width, dtype=torch.float32) if hints is not None else None
    for i, (r, t, sp) in enumerate(zip(rows, tgts, spans)):
        if r is not None:
            X[i, : r.numel()], Y[i, : t.numel()] = r, t
            if hints is not None:  # row position j predicts target sp.target_pos - sp.lo + j
                g0 = sp.target_pos - sp.lo
                H[i, : r.numel()], Bo[i, : r.numel()] = hints.hint[g0: g0 + r.numel()], hints.boost[g0: g0 + r.numel()]
    return TTTRows(X, Y, spans, H, Bo)


def ttt_batches(order: list[int], docs, hp: Hyperparameters) -> list[list[int]]:
    """TTT_BATCH_SIZE documents per batch along `order`, a new batch wherever the chunk size changes: every
    document gets the chunk of its own length, whatever the world size splits off."""
    batches: list[list[int]] = []
    for d in order:
        if not batches or len(batches[-1]) == hp.ttt_batch_size or \
                ttt_chunk_for(hp, docs[d][1]) != ttt_chunk_for(hp, docs[batches[-1][0]][1]):
            batches.append([])
        batches[-1].append(d)
    return batches


def ttt_batch_plan(doc_ids: list[int], docs, hp: Hyperparameters) -> list[list[int]]:
    """TTT's batches in processing order, each in slot order, longest first (a chunk's forwards end at the last
    document still running). TTT_BATCH_ORDER=record: the documents sorted by ascending length (ties in stream
    order) cut into batches from the shortest, the batches then taken by descending longest document (ties keep
    ascending order), so the leftover batch of the longest documents comes first (the record's slots run
    shortest first: only which random A a document gets differs); longest_first: cut from the longest document."""
    if hp.ttt_batch_order == "longest_first":
        return ttt_batches(sorted(doc_ids, key=lambda d: -docs[d][1]), docs, hp)
    batches = ttt_batches(sorted(doc_ids, key=lambda d: (docs[d][1], d)), docs, hp)
    return [sorted(b, key=lambda d: -docs[d][1]) for b in sorted(batches, key=lambda b: -docs[b[-1]][1])]


def assign_batches(batches: list[list[int]], docs, hp: Hyperparameters, world: int) -> list[list[list[int]]]:
    """Whole batches to ranks in queue order, each to the rank with the least TTT work so far (ttt_row_tokens):
    the record's shared queue, where a rank takes the next batch when it is free, without its timing."""
    loads, out = [0] * world, [[] for _ in range(world)]
    for b in batches:
        r = min(range(world), key=lambda i: loads[i])
        out[r].append(b)
        loads[r] += sum(ttt_row_tokens(docs[d][1], ttt_chunk_for(hp, docs[d][1]), hp.ttt_eval_seq_len) for d in b)
    return out


def phase_ends(batch_sizes: list[int], bounds: list[int], membership: str) -> list[int]:
    """How many queue documents are scored when each global-SGD phase pauses. exact: the phase boundary itself.
    record: the end of the batch during which the scored count reaches the boundary, at least one batch after the
    previous pause (the record checks after each batch); a phase whose pause the queue never reaches is dropped.
    (The record's other ranks also finish their batches in flight: 1,296 scored for a boundary of 833 at 8 GPUs.)"""
    if membership == "exact":
        return list(bounds)
    ends, total = [], 0
    for n in batch_sizes:
        total += n
        ends.append(total)
    out, k = [], 0
    for b in bounds:
        while k < len(ends) and ends[k] < b:
            k += 1
        if k == len(ends):
            break
        out.append(ends[k])
        k += 1
    return out


def lora_a_init(lora: BatchedLoRA, hp: Hyperparameters, gen: torch.Generator):
    """The function that gives `lora` a fresh A. TTT_LORA_A_INIT=slot (the record): each batch slot its own
    U(-1/sqrt(in), 1/sqrt(in)) draw, a new one at every call, from `gen`; shared: one draw per adapter from
    Generator(SEED), the same for every slot and batch, so a document's result depends on neither."""
    if hp.ttt_lora_a_init == "shared":
        g = torch.Generator().manual_seed(hp.seed)
        init = {}
        for n in lora.names:
            bound = 1.0 / math.sqrt(lora.A[n].size(-1))
            init[n] = ((torch.rand(lora.A[n].shape[1:], generator=g) * 2 - 1) * bound).to(lora.A[n].device)

    @torch.no_grad()
    def reset():
        for n in lora.names:
            if hp.ttt_lora_a_init == "shared":
                lora.A[n].copy_(init[n].expand_as(lora.A[n]))
            else:
                bound = 1.0 / math.sqrt(lora.A[n].size(-1))
                lora.A[n].uniform_(-bound, bound, generator=gen)
    return reset


def ttt_score_docs(model: GPT, val: ValidationData, docs, my_docs: list[int], hp: Hyperparameters, rt: Runtime,
                   board: ScoreBoard, grad_steps: int, plan: "TTTPlan | None" = None, later_s: float = 0.0,
                   hints: NgramHints | None = None, batches: list[list[int]] | None = None,
                   gen: torch.Generator | None = None) -> None:
    """Score-first TTT: for each batch of documents (`batches`, else ttt_batch_plan of my_docs) and each chunk,
    score the chunk with the current per-document adapters, then train the adapters on that already-scored
    chunk. B and the optimizer reset per batch; A (reset_lora_a) is drawn afresh per batch unless
    TTT_WARM_START_A keeps it across full batches (a shorter batch, as the record, gets a fresh A of its own).
    A batch runs as forwards of ttt_rows_per_forward() documents (compiled: a fixed row count, the batch padded;
    dynamic width). With a plan, each chunk takes the most grad steps (up to grad_steps, never more than the
    batch's earlier chunks, down to 0 = score only) that still let this rank's rest of the pass plus `later_s`
    of planned later work end by the eval deadline. Rank-local: no collective here (ranks hold different
    numbers of batches). With `hints`, scores are n-gram tilted; the adapters still train on the plain NLL."""
    ctx = hp.ttt_eval_seq_len
    batches = ttt_batch_plan(my_docs, docs, hp) if batches is None else batches
    lengths = {d: docs[d][1] for b in batches for d in b}
    rows = ttt_rows_per_forward(hp)
    slots = -(-hp.ttt_batch_size // rows) * rows
    lora = BatchedLoRA(slots, hp.ttt_lora_rank, hp.ttt_lora_alpha, model.lora_shapes(hp), rt.device) \
        if hp.ttt_lora_rank > 0 else None
    if lora is not None:
        gen = gen if gen is not None else torch.Generator(device=rt.device).manual_seed(hp.seed)
        reset_lora_a = lora_a_init(lora, hp, gen)
    fwd = maybe_compile(model, hp, rt.device)
    for p in model.parameters():
        p.requires_grad_(False)
    left = sum(ttt_row_tokens(L, ttt_chunk_for(hp, L), ctx) for L in lengths.values())  # row tokens left
    warm = False  # lora.A holds the A of an earlier full batch (what TTT_WARM_START_A keeps)
    for b0, batch in enumerate(batches):
        steps = grad_steps
        opt = kept_A = None
        if lora is not None:
            short = len(batch) < hp.ttt_batch_size
            if hp.ttt_warm_start_a and short and warm and b0 < len(batches) - 1:
                kept_A = {n: lora.A[n].detach().clone() for n in lora.names}  # for the full batches after it
            with torch.no_grad():
                for n in lora.names:
                    lora.B[n].zero_()
            if not (hp.ttt_warm_start_a and warm and not short):
                reset_lora_a()
            opt = torch.optim.AdamW(lora.parameters(), lr=hp.ttt_lora_lr * hp.ttt_local_lr_mult,
                                    betas=(hp.ttt_beta1, hp.ttt_beta2), eps=1e-10, weight_decay=hp.ttt_weight_decay)
        C = ttt_chunk_for(hp, docs[batch[0]][1])
        n_chunks = max(-(-(docs[d][1] - 1) // C) for d in batch)
        for c in range(n_chunks):
            # Rows end at the last document with a chunk c (a batch runs longest first): a finished document's
            # padding row cost as much as a live one, 7 of 8 rows for 171 of 261 chunks of the cpu_smoke batch.
            live = max(i for i, d in enumerate(batch) if c * C < docs[d][1] - 1) + 1
            n_rows = -(-live // rows) * rows if fwd is not model else live  # compiled: whole forwards of `rows`
            X, Y, spans, H, Bo = (t.to(rt.device) if isinstance(t, torch.Tensor) else t
                                  for t in _ttt_rows(val.tokens, docs, batch[:live], c, C, ctx, n_rows, hints))
            chunk_tokens = sum(sp.hi for sp in spans if sp is not None)  # row tokens (a row ends at its span)
            if plan is not None:
                steps = plan.grad_steps_for(left, steps, later_s)
                t_chunk = plan.clock()
            train_more = lora is not None and steps > 0 and any(sp is not None and sp.trains for sp in spans)
            for g in range(max(1, steps if train_more else 1)):
                for lo in range(0, X.size(0), rows):
                    mine = [(i, sp) for i, sp in enumerate(spans[lo: lo + rows], lo) if sp is not None]
                    if not mine or (g and not any(sp.trains for _, sp in mine)):
                        continue  # padding only; after the scoring pass only the rows that train need a forward
                    xs, ys = X[lo: lo + rows], Y[lo: lo + rows]
                    hs = None if H is None else H[lo: lo + rows]
                    if fwd is not model:
                        mark_row_width_dynamic(*(t for t in (xs, ys, hs) if t is not None))
                    with torch.set_grad_enabled(train_more), autocast_context(hp, rt.device):
                        out = fwd(xs, ys, lora=None if lora is None else lora.weights(lo, lo + xs.size(0)),
                                  reduction="none", rows_are_docs=True, hint=hs)
                    nll = (out.nll if hs is not None else out).float()
                    if g == 0:  # score before any update that has seen these tokens
                        scored = nll if hs is None else tilted_nll(out, ys, hs, Bo[lo: lo + rows])
                        for i, sp in mine:
                            board.add(torch.arange(sp.target_pos, sp.target_pos + sp.hi - sp.lo, device=rt.device),
                                      scored[i - lo, sp.lo: sp.hi].detach())
                    losses = [nll[i - lo, sp.lo: sp.hi].mean() for i, sp in mine if sp.trains]
                    if train_more and losses:
                        torch.stack(losses).sum().backward()
                if train_more:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
            if plan is not None:
                sync_device(rt.device)
                plan.observe(plan.score_s(chunk_tokens, steps if train_more else 0), plan.clock() - t_chunk)
            left -= chunk_tokens
        if plan is not None:
            plan.count_batch(grad_steps, steps)
        if kept_A is not None:
            with torch.no_grad():
                for n in lora.names:
                    lora.A[n].copy_(kept_A[n])
        elif lora is not None and not short:
            warm = True
    for p in model.parameters():
        p.requires_grad_(True)


def sgd_chunk_lrs(targets: int, chunk: int, lr: float) -> list[float]:
    """The LR of each global-SGD chunk, as the record: ceil(targets / chunk) chunks, the last one skipped, a
    cosine from `lr` over the others (chunk c at 0.5 (1 + cos(pi c / (n - 1)))): one chunk alone trains nothing."""
    n = -(-targets // chunk)
    return [lr * 0.5 * (1 + math.cos(math.pi * c / (n - 1))) for c in range(n - 1)]


def global_sgd_on_scored(model: GPT, val: ValidationData, docs, scored: list[int], hp: Hyperparameters,
                         rt: Runtime) -> None:
    """Phased TTT: SGD on the base weights over documents that are already fully scored, as the record: the
    documents in ascending length order (ties in stream order) make one stream, cut into chunks of
    GLOBAL_TTT_CHUNK_TOKENS (sgd_chunk_lrs: momentum, clipped); each of the record's 8 ranks' share of a chunk's
    EVAL_SEQ_LEN sequences is one flat row cut at each BOS and every EVAL_SEQ_LEN tokens into a document
    (DocumentPieces), so documents keep their context across sequences; gradients averaged across ranks."""
    if not scored:
        return
    order = sorted(scored, key=lambda d: (docs[d][1], d))
    stream = torch.cat([val.tokens[s: s + L] for s, L in (docs[d] for d in order)])
    seq = hp.eval_seq_len
    chunk = max(1, round(hp.global_ttt_chunk_tokens / seq)) * seq  # whole sequences: no token of a chunk dropped
    # the record's rows at its 8 GPUs (EVAL_GRID_RANKS): grid rank g's share of a chunk's sequences is one flat
    # row; our rank runs a contiguous run of those rows, so the update does not depend on the world size
    shares = [_rank_range(chunk // seq, g, EVAL_GRID_RANKS) for g in range(EVAL_GRID_RANKS)]
    shares = [sh for sh in shares if sh[1] > sh[0]]
    mine = shares[slice(*_rank_range(len(shares), rt.rank, rt.world_size))]
    n_rows = -(-len(shares) // rt.world_size)  # every rank's batch has this many rows (padding is not counted)
    width = max(b - a for a, b in shares) * seq
    opt = torch.optim.SGD(model.parameters(), lr=hp.global_ttt_lr, momentum=hp.global_ttt_momentum)
    fwd = maybe_compile(model, hp, rt.device)
    with DocumentPieces(model, seq):
        for c, lr in enumerate(sgd_chunk_lrs(stream.numel() - 1, chunk, hp.global_ttt_lr)):
            for g in opt.param_groups:
                g["lr"] = lr
            part = stream[c * chunk: (c + 1) * chunk + 1]  # never the last chunk: always whole
            if mine:
                x = torch.zeros(n_rows, width, dtype=torch.int64)
                y = torch.zeros(n_rows, width, dtype=torch.int64)
                for i, (a, b) in enumerate(mine):
                    x[i, : (b - a) * seq] = part[a * seq: b * seq]
                    y[i, : (b - a) * seq] = part[a * seq + 1: b * seq + 1]
                with autocast_context(hp, rt.device):
                    nll = fwd(x.to(rt.device), y.to(rt.device), reduction="none", **attention_extras(model, x, rt.device))
                real = torch.stack([torch.arange(width) < (b - a) * seq for a, b in mine] +
                                   [torch.zeros(width, dtype=torch.bool)] * (n_rows - len(mine))).to(rt.device)
                (nll[real].sum() / chunk).backward()
            for p in model.parameters():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                if rt.world_size > 1:
                    all_reduce_(p.grad)
            torch.nn.utils.clip_grad_norm_(model.parameters(), hp.global_ttt_grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)


EVAL_DEADLINE_MARGIN = 0.05  # TTT plans to end this share of EVAL_TIME_BUDGET early: a slowdown still growing
TTT_PROBE_EAGER_DOCS = 4  # eager cost is linear in rows: a few documents measure it (the probe is in the eval time)


class TTTPlan:
    """The clock of the TTT eval against EVAL_TIME_BUDGET. Cost per TTT row token (ttt_row_tokens), from the
    throughput probe: scoring `c_score`, plus `c_train` per LoRA grad step; global SGD `c_sgd` per token; every
    prediction is scaled by `drift`, the
    ratio of measured to predicted time of the work done so far (a machine that slows down shows up there).
    Scoring every token is mandatory; what gets cut is adaptation: the latest global SGD phases first (at phase
    boundaries, agreed by all ranks), then LoRA grad steps per batch down to score-only (rank-local)."""

    def __init__(self, rates: "TTTThroughput", grad_steps: int, deadline: float, clock=time.perf_counter):
        c_adapt = 1.0 / max(rates.score_tok_s, 1e-9)
        self.c_score = min(1.0 / max(rates.score_only_tok_s, 1e-9), c_adapt)  # a noisy probe: never above c_adapt
        self.c_train = (c_adapt - self.c_score) / max(grad_steps, 1)
        self.c_sgd = 1.0 / max(rates.sgd_tok_s, 1e-9)
        self.deadline, self.clock = deadline, clock
        self.measured = self.predicted = self.last = 0.0
        self.cuts = {"batches": 0, "fewer_grad_steps": 0, "score_only": 0, "phases_dropped": 0}
        self.why = ""

    @property
    def drift(self) -> float:
        """Measured / predicted time: over all the work so far, or of the latest piece if that is worse (a
        machine that just slowed down is acted on at once, not averaged away)."""
        return max(self.measured / self.predicted if self.predicted > 0 else 1.0, self.last)

    def score_s(self, tokens: float, grad_steps: int) -> float:
        return tokens * (self.c_score + grad_steps * self.c_train)

    def observe(self, predicted_s: float, measured_s: float) -> None:
        self.predicted += predicted_s
        self.measured += measured_s
        self.last = measured_s / max(predicted_s, 1e-9)

    def fits(self, nominal_s: float) -> bool:
        return self.drift * nominal_s <= self.deadline - self.clock()

    def phases_and_steps(self, score_tokens: float, sgd_tokens: list[float], grad_steps: int) -> tuple[int, int]:
        """(global SGD phases kept, grad steps) for the rest of the eval: drop the latest phases first, then
        grad steps down to 1; the last step goes batch by batch (grad_steps_for), so a plan 10% over the
        deadline loses ~10% of the adaptation, not all of it. Scoring is never dropped."""
        kept, steps = len(sgd_tokens), grad_steps

        def nominal(ph, gs):
            return self.score_s(score_tokens, gs) + sum(sgd_tokens[:ph]) * self.c_sgd
        while kept > 0 and not self.fits(nominal(kept, steps)):
            kept -= 1
        while steps > 1 and not self.fits(nominal(kept, steps)):
            steps -= 1
        if (kept, steps) != (len(sgd_tokens), grad_steps):
            self.why = (f"projected {self.drift * nominal(len(sgd_tokens), grad_steps):.0f}s of TTT as planned, "
                        f"{self.deadline - self.clock():.0f}s to the deadline, drift x{self.drift:.2f}")
        return kept, steps

    def grad_steps_for(self, pass_tokens: float, grad_steps: int, later_s: float) -> int:
        """The most grad steps (<= grad_steps) for the next chunk such that the rest of this pass at that
        rate, plus `later_s` of planned later work, ends by the deadline."""
        steps = grad_steps
        while steps > 0 and not self.fits(self.score_s(pass_tokens, steps) + later_s):
            steps -= 1
        if steps < grad_steps:
            self.why = (f"projected {self.drift * (self.score_s(pass_tokens, grad_steps) + later_s):.0f}s of TTT "
                        f"left, {self.deadline - self.clock():.0f}s to the deadline, drift x{self.drift:.2f}")
        return steps

    def count_batch(self, planned_steps: int, final_steps: int) -> None:
        self.cuts["batches"] += 1
        if final_steps < planned_steps:
            self.cuts["fewer_grad_steps" if final_steps else "score_only"] += 1


def eval_ttt(model: GPT, val: ValidationData, hp: Hyperparameters, rt: Runtime, stage: str, phased: bool,
             keep_losses: bool = False, eval_t0: float | None = None, log=print, clock=time.perf_counter) -> EvalResult:
    """Score-first TTT over the validation documents, in the batches of ttt_batch_plan. With `phased`, the
    first PHASED_TTT_PREFIX_DOCS documents of that queue are scored in PHASED_TTT_NUM_PHASES parts (phase_ends);
    after each part the base weights take global SGD on documents scored so far (PHASED_TTT_MEMBERSHIP); the
    rest is scored with the final base. Whole batches are spread over ranks (assign_batches); sums are combined
    with collectives. The throughput probe (synthetic tokens: the compile warm-up) runs first, then the record's
    eval timer starts; a TTTPlan keeps the eval inside EVAL_TIME_BUDGET from that start (EVAL_CLOCK=record) or
    from eval_t0 (strict) by cutting adaptation, re-planned at every phase boundary and before every batch. The
    result's time_ms is from the timer start."""
    t0 = clock()
    eval_t0 = t0 if eval_t0 is None else eval_t0
    model.eval()
    rates = measure_ttt_throughput(model, hp, rt, clock)  # synthetic tokens only: the compile warm-up
    t_timer, timer_real = clock(), time.perf_counter()  # the record's eval timer starts here: all below reads val
    log(f"ttt_warmup: throughput probe on synthetic tokens {t_timer - t0:.1f}s, compile warm-up {rates.warmup_s:.1f}s "
        f"(score only {rates.score_only_tok_s:.0f} tok/s, score+train {rates.score_tok_s:.0f} tok/s, global sgd "
        f"{rates.sgd_tok_s:.0f} tok/s); eval timer started, EVAL_CLOCK={hp.eval_clock}")
    docs = find_docs(val.tokens, model.bos_id)
    queue_batches = ttt_batch_plan(list(range(len(docs))), docs, hp)
    queue = [d for b in queue_batches for d in b]  # documents in the order they are scored: phases take its head
    board = ScoreBoard(val, rt.device, keep_losses)
    hints = None
    if hp.ngram_tilt_enabled:  # inside the eval time, before any scoring
        t_h = clock()
        hints = ngram_hints(val.tokens, docs, queue, hp)
        log(f"ngram_tilt: {int((hints.boost > 0).sum())}/{hints.boost.numel()} positions hinted "
            f"(order {hp.token_order}, threshold {hp.token_threshold}, boost {hp.token_boost}) {clock() - t_h:.1f}s")
    n_prefix = min(hp.phased_ttt_prefix_docs, len(docs)) if phased and hp.phased_ttt_num_phases > 0 else 0
    P = hp.phased_ttt_num_phases if n_prefix else 0
    bounds = sorted({n_prefix * (p + 1) // P for p in range(P)} - {0})  # no empty phase
    ends = phase_ends([len(b) for b in queue_batches], bounds, hp.phased_ttt_membership)  # scored at each pause
    bounds = bounds[:len(ends)]
    # each phase's global SGD: the `bound` shortest documents scored so far (all of them when exact)
    sgd_docs = [sorted(queue[:e], key=lambda d: (docs[d][1], d))[:b] for b, e in zip(bounds, ends)]
    work = [ttt_row_tokens(docs[d][1], ttt_chunk_for(hp, docs[d][1]), hp.ttt_eval_seq_len) for d in queue]
    gen = torch.Generator(device=rt.device).manual_seed(hp.seed)  # per-slot A draws, new ones every phase
    clock_t0 = t_timer if hp.eval_clock == "record" else eval_t0
    plan = TTTPlan(rates, hp.ttt_grad_steps, clock_t0 + (1 - EVAL_DEADLINE_MARGIN) * hp.eval_time_budget, clock)
    prefix_tokens = [sum(docs[d][1] for d in g) / rt.world_size for g in sgd_docs]  # global SGD per phase

    def my_batches(part: list[int]) -> list[list[int]]:
        return assign_batches(ttt_batch_plan(part, docs, hp), docs, hp, rt.world_size)[rt.rank]
    done, p, planned = 0, 0, len(bounds)
    while True:  # every rank runs the same iterations: the plan is agreed at each phase boundary
        left_tokens = sum(work[done:]) / rt.world_size
        kept, steps = plan.phases_and_steps(left_tokens, prefix_tokens[p:len(bounds)], hp.ttt_grad_steps)
        agreed = all_reduce_(torch.tensor([kept, steps], device=rt.device),
                             dist.ReduceOp.MIN if dist.is_initialized() else None)
        kept, steps = int(agreed[0]), int(agreed[1])
        if p == 0 and not plan.fits(plan.score_s(left_tokens, 0)):
            log(f"ttt_budget: WARNING scoring alone needs ~{plan.drift * plan.score_s(left_tokens, 0):.0f}s, "
                f"{plan.deadline - clock():.0f}s are left of EVAL_TIME_BUDGET={hp.eval_time_budget:.0f}s: every "
                f"token is still scored, the budget will be exceeded")
        if p + kept < len(bounds):
            plan.cuts["phases_dropped"] += len(bounds) - p - kept
            log(f"ttt_budget: keeping {p + kept}/{planned} phases, grad_steps {steps} ({plan.why})")
            bounds = bounds[:p + kept]
        if p == 0:
            last = ends[len(bounds) - 1] if bounds else 0
            log(f"ttt_phased: total_docs:{len(docs)} prefix_docs:{bounds[-1] if bounds else 0} prefix_tokens:"
                f"{sum(docs[d][1] for d in sgd_docs[len(bounds) - 1]) if bounds else 0} suffix_docs:"
                f"{len(docs) - last} num_phases:{len(bounds)} boundaries:{bounds} scored_at_pauses:"
                f"{ends[:len(bounds)]} membership:{hp.phased_ttt_membership} batch_order:{hp.ttt_batch_order}")
        if p == len(bounds):
            break
        later = plan.score_s(left_tokens - sum(work[done:ends[p]]) / rt.world_size, steps) + \
            sum(prefix_tokens[p:len(bounds)]) * plan.c_sgd
        ttt_score_docs(model, val, docs, [], hp, rt, board, steps, plan, later, hints,
                       my_batches(queue[done:ends[p]]), gen)
        t_sgd = clock()
        global_sgd_on_scored(model, val, docs, sgd_docs[p], hp, rt)
        sync_device(rt.device)
        plan.observe(prefix_tokens[p] * plan.c_sgd, clock() - t_sgd)
        log(f"ttpp: phase:{p + 1}/{len(bounds)} pd:{ends[p]} gd:{bounds[p]} t:{clock() - t_timer:.1f}s")
        done, p = ends[p], p + 1
    ttt_score_docs(model, val, docs, [], hp, rt, board, steps, plan, hints=hints, batches=my_batches(queue[done:]),
                   gen=gen)
    cuts = all_reduce_(torch.tensor([plan.cuts[k] for k in ("batches", "fewer_grad_steps", "score_only")],
                                    device=rt.device))
    cuts = dict(zip(("batches", "fewer_grad_steps", "score_only"), (int(c) for c in cuts)),
                phases_dropped=plan.cuts["phases_dropped"], grad_steps=steps)
    if cuts["fewer_grad_steps"] or cuts["score_only"] or cuts["phases_dropped"] or steps < hp.ttt_grad_steps:
        log(f"ttt_budget: to keep EVAL_TIME_BUDGET={hp.eval_time_budget:.0f}s cut {cuts['phases_dropped']} global SGD "
            f"phases, grad steps {hp.ttt_grad_steps} -> {steps} for the last pass, {cuts['fewer_grad_steps']} of "
            f"{cuts['batches']} batches to fewer and {cuts['score_only']} to score-only (every token still scored); "
            f"rank 0's last reason: {plan.why}")
    res = board.result(stage, timer_real)  # eval_time: TTT as the record timed it, from the timer start
    res.info = {"phases": len(bounds), "boundaries": bounds, "scored_at_pauses": ends[:len(bounds)],
                "grad_steps": steps, "docs": len(docs), "cuts": cuts, "warmup_s": t_timer - t0}
    return res


class TTTThroughput(NamedTuple):
    score_only_tok_s: float  # TTT scoring without adaptation, row tokens (ttt_row_tokens) per second
    score_tok_s: float       # LoRA score + TTT_GRAD_STEPS train steps, row tokens per second
    sgd_tok_s: float         # global SGD, tokens per second
    warmup_s: float          # the untimed first pass (compiled runs: the TTT graphs' compile time)


def measure_ttt_throughput(model: GPT, hp: Hyperparameters, rt: Runtime, clock=time.perf_counter) -> TTTThroughput:
    """Tokens/s of TTT scoring alone and with LoRA training (documents of 4 chunks: one full forward of them
    when compiled, whose shapes the probe also warms up; a few eagerly) and of global SGD (one
    GLOBAL_TTT_CHUNK_TOKENS chunk), on random tokens (never validation data). Compiled runs go through the probe
    once untimed first: that is the compile warm-up of the TTT graphs."""
    gen = torch.Generator().manual_seed(0)
    compiled = compile_enabled(hp, rt.device)
    n_docs = ttt_rows_per_forward(hp) if compiled else min(ttt_rows_per_forward(hp), TTT_PROBE_EAGER_DOCS)
    L = min(hp.ttt_eval_seq_len, 4 * hp.ttt_chunk_size) + 1
    seq = hp.ttt_eval_seq_len
    n_sgd = max(hp.global_ttt_chunk_tokens, seq + 1) + 1

    def synthetic(n, doc_len):
        toks = torch.randint(2, hp.vocab_size, (n,), generator=gen)
        toks[::doc_len] = model.bos_id
        fval = ValidationData(toks, torch.ones(n - 1, dtype=torch.int32), "synthetic")
        return fval, find_docs(toks, model.bos_id)
    score_val, score_docs = synthetic(n_docs * L, L)
    hints = None
    if hp.ngram_tilt_enabled:  # the tilted scoring graph is the one the eval runs: warm that one
        hints = NgramHints(torch.randint(0, hp.vocab_size, (n_docs * L - 1,), generator=gen),
                           torch.full((n_docs * L - 1,), hp.token_boost))
    sgd_val, sgd_docs = synthetic(n_sgd, seq + 1)
    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
    fake_rt = dataclasses.replace(rt, rank=0, world_size=1)

    def timed(fn) -> float:
        sync_device(rt.device)
        t = clock()
        fn()
        sync_device(rt.device)
        return max(clock() - t, 1e-9)
    rates, warmup_s = None, 0.0
    for measure in ([False, True] if compiled else [True]):
        # with training first: in an eager run that call also pays the one-off costs (the estimate errs high)
        times = [timed(lambda gs=gs: ttt_score_docs(model, score_val, score_docs, list(range(len(score_docs))), hp,
                                                      fake_rt, ScoreBoard(score_val, rt.device, False), gs,
                                                      hints=hints))
                 for gs in (hp.ttt_grad_steps, 0)][::-1]
        times.append(timed(lambda: global_sgd_on_scored(model, sgd_val, sgd_docs, list(range(len(sgd_docs))), hp,
                                                         fake_rt)))
        model.load_state_dict(snapshot)
        if measure:
            n = sum(ttt_row_tokens(L, ttt_chunk_for(hp, L), hp.ttt_eval_seq_len) for _, L in score_docs)
            rates = (n / times[0], n / times[1], n_sgd / times[2])
        else:
            warmup_s = sum(times)
    return TTTThroughput(*rates, warmup_s)


# =============================================================================================
# Main: run the stages, one log line per stage, final lines, compliance block and the JSON run record.
# =============================================================================================

def _versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    for mod in ("sentencepiece", "zstandard", "triton"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            pass
    return out


def _git_commit() -> str | None:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except Exception:
        return None


def env_overrides(hp: Hyperparameters, env=None) -> dict:
    env = os.environ if env is None else env
    base = Hyperparameters(**{"preset": hp.preset, **PRESETS[hp.preset]})
    return {f.name.upper(): env[f.name.upper()] for f in fields(hp)
            if f.name != "preset" and f.name.upper() in env and getattr(hp, f.name) != getattr(base, f.name)}


@dataclass
class Run:
    """What every stage of one run shares."""
    hp: Hyperparameters
    rt: Runtime
    backend: str                  # attention backend (choose_attention_backend)
    source: bytes                 # this script's source: logged, hashed, shipped
    luts: TokenByteLUTs
    val: ValidationData
    train_files: list[str]        # training shards (none for EVAL_ONLY)
    record: dict                  # the run record, filled stage by stage

    def log(self, msg: str = "", console: bool = True) -> None:
        self.rt.logger.log(msg, console)


class Trained(NamedTuple):
    model: GPT | None             # None when the run starts from an artifact (EVAL_ONLY)
    result: TrainResult


class Packed(NamedTuple):
    path: str                     # the artifact file
    code_bytes: int               # bytes of the shipped code (counted with the artifact)
    hessian_s: float              # seconds of Hessian collection (0: none in this run)
    unfitted_bpb: float = 0.0     # quantized val_bpb of the first packing when it was over the limit and refitted
    hessian_batches: int = 0      # calibration batches collected (CalibrationDeadline decides under a budget)


class Evaluated(NamedTuple):
    results: list[EvalResult]
    eval_s: float                 # by EVAL_CLOCK: the strict or the record's eval time
    model_bytes: int
    strict_s: float = 0.0         # artifact load + every eval stage, TTT warm-up included
    record_s: float = 0.0         # the final eval only, after deserialization and the TTT warm-up (the record's)


def start_run(hp: Hyperparameters, rt: Runtime, backend: str) -> Run:
    """Log the header (settings, versions, source), load the tokenizer and validation data, open the record."""
    source = code_source()
    code_sha = hashlib.sha256(source).hexdigest()
    device_name = torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else platform.processor() or "cpu"
    log = rt.logger.log
    log(f"run_id:{hp.run_id} preset:{hp.preset} world_size:{rt.world_size} grad_accum_steps:{rt.grad_accum_steps} "
        f"device:{rt.device.type} ({device_name})")
    log(f"code_sha256:{code_sha}")
    log(f"versions: {json.dumps(_versions(), sort_keys=True)}")
    log("Hyperparameters:")
    for k, v in sorted(hp.as_dict().items()):
        log(f"  {k}: {v}")
    log(source.decode("utf-8", "replace"), console=False)
    luts = build_byte_luts(load_tokenizer(hp.resolved_paths()[1], hp.vocab_size), hp.vocab_size)
    val = load_validation(hp, luts)
    log(f"val_tokens: {val.num_targets} val_bytes: {int(val.target_bytes.sum())} byte_source:{val.source}"
        + ("" if hp.val_max_tokens == 0 else f" (VAL_MAX_TOKENS={hp.val_max_tokens}: NOT the full validation set)"))
    log(f"attention_backend:{backend} autocast_bf16:{autocast_context(hp, rt.device)._enabled} "
        f"compile:{int(compile_enabled(hp, rt.device))}")
    train_files = [] if hp.eval_only else list_shards(hp.resolved_paths()[0], "train")
    split = check_split(hp, train_files, luts.bos_id) if train_files else None
    if split:
        log(f"train_shards: {len(train_files)}")
        enforce_split(split, hp, log)
    record = {"run_id": hp.run_id, "seed": hp.seed, "preset": hp.preset, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "config": hp.as_dict(), "env_overrides": env_overrides(hp), "code_sha256": code_sha,
              "code_bytes_raw": len(source), "commit": _git_commit(), "versions": _versions(),
              "device": device_name if rt.device.type == "cuda" else f"cpu ({device_name})",
              "world_size": rt.world_size, "stages": {}, "train_log": [], "val_log": [], "clip_table": [],
              "split_check": split and dataclasses.asdict(split)}
    return Run(hp, rt, backend, source, luts, val, train_files, record)


def save_torch(path: str, obj) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_atomic(path, buf.getvalue())


def train_stage(run: Run) -> Trained:
    """Train under the wall-clock budget and apply the EMA; REQUANT_FROM loads a saved pre-quantization model
    instead. The result is saved for REQUANT_FROM sweeps (SAVE_PREQUANT)."""
    hp, rt = run.hp, run.rt
    model = GPT(hp, run.luts.bos_id, run.backend).to(rt.device)
    run.log(f"model_params:{count_parameters(model)}")
    if hp.requant_from:
        saved = torch.load(hp.requant_from, map_location=rt.device)
        model.load_state_dict(saved["state"])
        model.looping = saved["looping"]
        run.log(f"requant_from:{hp.requant_from} (training skipped)")
        return Trained(model, TrainResult())
    result, ema = train(hp, rt, model, run.train_files, run.val, run.luts)
    if hp.ema_decay > 0:
        run.log(f"ema:applying EMA weights (decay {hp.ema_decay})")
        ema.apply_to(model)
    model.looping = result.looping_step is not None
    if hp.save_prequant and rt.is_main:
        save_torch(os.path.join(rt.run_dir, "prequant_model.pt"), {"state": model.state_dict(), "looping": model.looping})
    return Trained(model, result)


def quantize_stage(run: Run, trained: Trained) -> Packed:
    """Diagnostic eval of the trained model, Hessians (timed: they count in the training budget), GPTQ with the
    chosen clipping, the artifact and the shipped code written."""
    hp, rt, model = run.hp, run.rt, trained.model
    r = eval_val(model, run.val, hp, rt, "prequant")
    run.record["stages"]["prequant"] = r
    run.log(r.line().replace("prequant", "diagnostic pre-quantization post-ema", 1))
    t0 = time.perf_counter()
    saved_h = os.path.join(os.path.dirname(hp.requant_from), "hessians.pt") if hp.requant_from else ""
    deadline, reused = None, bool(saved_h) and os.path.isfile(saved_h)
    if reused:  # a sweep reuses the run's Hessians: no training data needed
        hessians = torch.load(saved_h, map_location=rt.device)
        run.log(f"GPTQ:reusing {len(hessians)} Hessians from {saved_h}")
    else:
        deadline = None if hp.requant_from else calibration_deadline(hp, trained.result, rt.device, t0)
        run.log(f"GPTQ:collecting Hessians from calibration data (training shards, {hp.gptq_calibration_batches} "
                f"batches x {hp.calibration_batch_tokens} tokens/rank"
                + (f", until {deadline.seconds:.1f}s from now)..." if deadline else ")..."))
        hessians = collect_hessians(model, calibration_loader(hp, rt, run.train_files), hp.gptq_calibration_batches,
                                    hp, rt, deadline)
    hessian_s = time.perf_counter() - t0
    batches = deadline.batches if deadline else hp.gptq_calibration_batches
    run.log(f"GPTQ:collected {len(hessians)} Hessians from {batches} calibration batches in {hessian_s:.1f}s")
    if deadline and deadline.forced:
        run.log(f"WARNING: GPTQ calibration: the training budget ran out after {batches - deadline.forced} batches, "
                f"under GPTQ_MIN_CALIBRATION_BATCHES={deadline.floor}; collected {deadline.floor} anyway, past "
                f"MAX_WALLCLOCK_SECONDS. To stay inside it: raise GPTQ_RESERVE_SECONDS, lower CALIBRATION_BATCH_TOKENS "
                f"or GPTQ_MIN_CALIBRATION_BATCHES, or run on a less loaded machine")
    if not reused and hp.save_prequant and rt.is_main:  # after the timer: writing reads no training data
        save_torch(os.path.join(rt.run_dir, "hessians.pt"), hessians)
    total = trained.result.train_time_ms / 1000 + hessian_s
    slack = hp.max_wallclock_seconds - total
    if hp.max_wallclock_seconds > 0 and not hp.requant_from:
        run.log(f"budget: train_time:{trained.result.train_time_ms / 1000:.1f}s hessian_time:{hessian_s:.1f}s sum:"
                f"{total:.1f}s / {hp.max_wallclock_seconds:.0f}s {'OK' if slack >= 0 else 'OVER'} slack:{slack:.2f}s "
                f"({slack / hp.max_wallclock_seconds:.2%})")
    else:
        run.log("budget: fixed-step mode (MAX_WALLCLOCK_SECONDS=0 or REQUANT_FROM): not budget-compliant")
    shipped, code_kind = shipped_code(run.source)
    run.log(f"Code size (uncompressed): {len(run.source)} bytes")
    run.log(f"Code size (shipped, {code_kind}): {len(shipped)} bytes")
    cfg = model_config_for_artifact(hp, run.luts.bos_id, model.looping)
    state = model.state_dict()
    if hp.compressor == "rans":  # only the weight coder's "code above" context gains from the order
        state, hessians = sort_hidden_units(state, hessians)
    blob, unfitted_bpb = quantize_and_pack(run, state, hessians, cfg, len(shipped), hp), 0.0
    over = [len(shipped) + len(blob) > ARTIFACT_LIMIT_BYTES]
    if rt.distributed:  # rank 0's packing is the one written: every rank follows its decision (evals are collective)
        dist.broadcast_object_list(over, src=0)
    if over[0] and hp.clip_mode != "budget":
        # Fit instead of failing: score what does not fit, then aim CLIP_MODE=budget just under the cap.
        unfitted = eval_val(model_from_artifact(blob, hp, rt.device, run.backend), run.val, hp, rt,
                            "quantized_over_limit")
        run.record["stages"]["quantized_over_limit"], unfitted_bpb = unfitted, unfitted.val_bpb
        run.log(unfitted.line())
        run.log(f"artifact_fit: {len(shipped) + len(blob)} bytes > {ARTIFACT_LIMIT_BYTES}: re-quantizing with "
                f"CLIP_MODE=budget aimed at TARGET_ARTIFACT_BYTES={hp.target_artifact_bytes}")
        blob = quantize_and_pack(run, state, hessians, cfg, len(shipped), dataclasses.replace(hp, clip_mode="budget"))
    path = os.path.join(rt.run_dir, "final_model.ptz")
    if rt.is_main:
        write_atomic(path, blob)
        write_atomic(os.path.join(rt.run_dir, "train_gpt_shipped.py"), shipped)
    if rt.distributed:
        dist.barrier()
    return Packed(path, len(shipped), hessian_s, unfitted_bpb, batches)


def quantize_and_pack(run: Run, state: dict[str, torch.Tensor], hessians: dict[str, torch.Tensor], cfg: dict,
                      code_bytes: int, hp: Hyperparameters) -> bytes:
    """GPTQ at the configured clipping (the clip table logged), then the artifact bytes."""
    t0, packed = time.perf_counter(), {}

    def bytes_of(e: dict[str, QEntry]) -> int:  # CLIP_MODE=budget packs candidates: keep the last one
        packed.clear()
        packed[id(e)] = e, pack_artifact(e, cfg, hp.compressor)
        return len(packed[id(e)][1])
    entries, table = quantize_state(state, hessians, hp, run.log, code_bytes, bytes_of)
    run.record["clip_table"] = table
    run.log("clip_table: name numel h_mean row_var sigma bits")
    for row in table:
        run.log(f"  {row['name']} {row['numel']} {row['h_mean']:.4e} {row['row_var']:.4e} {row['sigma']:.3f} "
                f"{row['bits']}")
    t1 = time.perf_counter()
    blob = packed[id(entries)][1] if id(entries) in packed else pack_artifact(entries, cfg, hp.compressor)
    run.log(f"quantize: {t1 - t0:.1f}s pack: {time.perf_counter() - t1:.1f}s compressor:{hp.compressor} "
            f"model_bytes:{len(blob)}")
    return blob


def evaluate_stage(run: Run, packed: Packed) -> Evaluated:
    """Every score from a model rebuilt from the artifact bytes alone: plain, sliding (EVAL_STRIDE), phased TTT
    (TTT_ENABLED). Two eval clocks, both logged: strict from before the artifact is read to the end; record (the
    record's timer) the final eval alone, after deserialization and, for TTT, its warm-up on synthetic tokens.
    EVAL_CLOCK picks the one EVAL_TIME_BUDGET and the compliance block judge."""
    hp, rt = run.hp, run.rt
    eval_t0 = time.perf_counter()
    with open(packed.path, "rb") as f:
        blob = f.read()
    artifact_bytes = packed.code_bytes + len(blob)
    run.log(f"artifact_bytes:{artifact_bytes} code_bytes:{packed.code_bytes} model_bytes:{len(blob)} "
            f"limit:{ARTIFACT_LIMIT_BYTES} bytes_left:{ARTIFACT_LIMIT_BYTES - artifact_bytes}")
    if artifact_bytes > ARTIFACT_LIMIT_BYTES:
        run.log(f"ERROR: ARTIFACT OVER THE 16,000,000-BYTE LIMIT by {artifact_bytes - ARTIFACT_LIMIT_BYTES} bytes; "
                f"kept at {packed.path} for inspection")
    model = model_from_artifact(blob, hp, rt.device, run.backend)
    run.log(f"artifact_load: {time.perf_counter() - eval_t0:.1f}s")
    keep = bool(hp.save_token_losses)
    evals = [lambda: eval_val(model, run.val, hp, rt, "quantized", keep)]
    if hp.eval_stride and hp.eval_stride < hp.eval_seq_len:
        evals.append(lambda: eval_sliding(model, run.val, hp, rt, "quantized_sliding", keep))
    if hp.ttt_enabled:
        phased = hp.phased_ttt_num_phases > 0 and hp.phased_ttt_prefix_docs > 0
        evals.append(lambda: eval_ttt(model, run.val, hp, rt, "quantized_ttt_phased" if phased else "quantized_ttt",
                                      phased, keep, eval_t0, rt.logger.log))
    results = []
    for evaluate in evals:
        results.append(evaluate())
        run.log(results[-1].line())
    if packed.unfitted_bpb:
        run.log(f"artifact_fit: the fitted artifact costs {results[0].val_bpb - packed.unfitted_bpb:+.5f} bpb on "
                f"the pre-TTT quantized eval ({packed.unfitted_bpb:.5f} -> {results[0].val_bpb:.5f})")
    if keep and rt.is_main:
        os.makedirs(hp.save_token_losses, exist_ok=True)
        for r in results:
            np.save(os.path.join(hp.save_token_losses, f"{r.stage}.npy"), r.token_losses.numpy())
    strict_s, record_s = time.perf_counter() - eval_t0, results[-1].time_ms / 1000
    eval_s = record_s if hp.eval_clock == "record" else strict_s
    warm = results[-1].info.get("warmup_s", 0.0)
    run.log(f"eval_clock: record {record_s:.1f}s (final eval only) strict {strict_s:.1f}s (artifact load, every "
            f"eval, TTT warm-up {warm:.1f}s); EVAL_CLOCK={hp.eval_clock} EVAL_TIME_BUDGET={hp.eval_time_budget:.0f}s")
    run.log(f"total_eval_time:{eval_s:.1f}s")
    return Evaluated(results, eval_s, len(blob), strict_s, record_s)


def finish_run(run: Run, trained: Trained, packed: Packed, evaluated: Evaluated) -> int:
    """Compliance block, final lines and the run record. Exit code 3 when the artifact is over the limit."""
    hp, rt, record, res = run.hp, run.rt, run.record, trained.result
    stages = record["stages"]
    stages.update({r.stage: r for r in evaluated.results})
    final, eval_s = evaluated.results[-1], evaluated.eval_s
    artifact_bytes = packed.code_bytes + evaluated.model_bytes
    over = artifact_bytes > ARTIFACT_LIMIT_BYTES
    train_plus_hessian = res.train_time_ms / 1000 + packed.hessian_s
    budget_ok = hp.max_wallclock_seconds > 0 and not hp.requant_from and not hp.eval_only and \
        train_plus_hessian <= hp.max_wallclock_seconds
    split = record["split_check"] or {}  # None fields: not checked (EVAL_ONLY reads no training data)
    compliance = {"train_plus_hessian_s": train_plus_hessian, "train_budget_s": hp.max_wallclock_seconds,
                  "train_budget_slack_s": hp.max_wallclock_seconds - train_plus_hessian, "budget_compliant": budget_ok,
                  "eval_time_s": eval_s, "eval_budget_s": hp.eval_time_budget,
                  "eval_clock": hp.eval_clock, "eval_time_record_s": evaluated.record_s,
                  "eval_time_strict_s": evaluated.strict_s,
                  "eval_within_budget": eval_s <= hp.eval_time_budget, "artifact_under_limit": not over,
                  "calibration_source": "training shards (fineweb_train_*), shuffled sequences",
                  "ttt_mode": final.stage if hp.ttt_enabled else "none",
                  "tokens_scored": final.tokens, "val_tokens": run.val.num_targets,
                  "full_validation": hp.val_max_tokens == 0, "val_docs_in_train": split.get("val_docs_in_train"),
                  "train_shards": split.get("train_shards"), "val_docs": split.get("val_docs"),
                  "canonical_split": split.get("canonical")}
    run.log("compliance: " + json.dumps(compliance, sort_keys=True))
    if eval_s > hp.eval_time_budget:
        run.log(f"ERROR: EVALUATION TOOK {eval_s:.0f}s > EVAL_TIME_BUDGET={hp.eval_time_budget:.0f}s")
    record.update({
        "train": {"steps": res.steps, "train_time_ms": res.train_time_ms, "step_avg_ms": res.step_avg_ms,
                  "tokens_per_s": res.tokens_per_s, "hessian_time_ms": packed.hessian_s * 1000,
                  "hessian_estimate_s": res.hessian_estimate_s, "hessian_batches": packed.hessian_batches,
                  "budget_s": hp.max_wallclock_seconds, "slack_s": hp.max_wallclock_seconds - train_plus_hessian,
                  "budget_compliant": budget_ok,
                  "stop_reason": res.stop_reason or ("eval_only" if hp.eval_only else "requant")},
        "stages": {k: {"val_loss": v.val_loss, "val_bpb": v.val_bpb, "eval_time_ms": v.time_ms, "tokens": v.tokens,
                       "bytes": v.bytes, **({"info": v.info} if v.info else {})} for k, v in stages.items()},
        "final": {"stage": final.stage, "val_loss": final.val_loss, "val_bpb": final.val_bpb},
        "artifact": {"path": packed.path, "artifact_bytes": artifact_bytes, "code_bytes": packed.code_bytes,
                     "model_bytes": evaluated.model_bytes, "limit": ARTIFACT_LIMIT_BYTES,
                     "bytes_left": ARTIFACT_LIMIT_BYTES - artifact_bytes, "under_limit": not over},
        "eval_time_s": eval_s, "compliance": compliance, "train_log": res.train_log, "val_log": res.val_log})
    if rt.is_main:
        write_atomic(os.path.join(rt.run_dir, "run_record.json"), json.dumps(record, indent=1, default=str).encode())
    run.log(f"final {final.stage} val_loss:{final.val_loss:.8f} val_bpb:{final.val_bpb:.8f}")
    run.log(f"run_record: {os.path.join(rt.run_dir, 'run_record.json')}")
    rt.logger.close()
    if rt.distributed:
        dist.barrier()
        dist.destroy_process_group()
    return 3 if over else 0


def main() -> int:
    """config -> runtime -> train -> quantize + pack -> evaluate -> record. EVAL_ONLY enters at the evaluation
    stage with ARTIFACT; REQUANT_FROM enters the train stage with a saved model instead of training."""
    hp = Hyperparameters.from_env()
    hp.validate(int(os.environ.get("WORLD_SIZE", 1)))
    rt = init_runtime(hp)
    backend, why = attention_backend_for_run(hp, rt.device)
    rt.logger.log(f"attention_backend_choice: {backend} ({why})")
    run = start_run(hp, rt, backend)
    if hp.eval_only:
        trained, packed = Trained(None, TrainResult()), Packed(hp.artifact, len(shipped_code(run.source)[0]), 0.0)
    else:
        trained = train_stage(run)
        packed = quantize_stage(run, trained)
        trained = trained._replace(model=None)  # free it: the evaluated model is rebuilt from the artifact
    return finish_run(run, trained, packed, evaluate_stage(run, packed))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
