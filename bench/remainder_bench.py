#!/usr/bin/env python3
"""How precisely must the artifact's remainder be stored? Two questions on one saved model (issue 14).

    python bench/remainder_bench.py runs/<id>/prequant_model.pt [--grids 32,16,8,4] [--json out.json]
    python bench/remainder_bench.py runs/<id>/prequant_model.pt --mantissa 7,6,5 [--val-tokens 65536]
    python bench/remainder_bench.py --smoke        # a tiny random model, seconds (used by the tests)

--mantissa: each group of passthrough tensors (resid_mix, skip_weights, ...) rounded to that many mantissa bits
(train_gpt.round_mantissa), alone and all together, in the unquantized model; val_bpb on the first
--val-tokens of the validation set against the unrounded model. Needs the run's data (DATA_PATH).

--grids (the default part): the grid of GPTQ row steps.

The model's run directory must hold its `hessians.pt` and `run_record.json` (a run with SAVE_PREQUANT=1). For
each grid resolution (steps per octave) the model is quantized as the run would (hidden-unit sort, GPTQ, LQER,
weight coder) and the table gives the step indices' bytes as a stream of their own, the model bytes (where the
weight coder carries them) and the summed Hessian-weighted error
tr(dW H dW^T) of every GPTQ tensor relative to tr(W H W^T): the quantity GPTQ minimises, a far less noisy
judge of a few-permille change than a validation score. Each grid is also quantized with every clip sigma
moved up and down by half a step of the finest grid: those rows give the exchange rate between bytes and error
that the clip offers, against which a grid's saving of bytes and its cost in error are weighed.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import T, cpu_runtime, env_fields, load_data, table, write_json  # noqa: E402

SIGMA_FIELDS = ("embed_clip_sigmas", "mlp_clip_sigmas", "attn_clip_sigmas", "matrix_clip_sigmas")


def quantize_with_grid(state, hessians, hp, steps: int) -> tuple[dict, bytes]:
    """Entries and artifact with row steps on a 2^(1/steps) grid (the module constant, restored after)."""
    saved = T.SCALE_GRID_STEPS, T.SCALE_GRID_RANGE
    T.SCALE_GRID_STEPS, T.SCALE_GRID_RANGE = steps, (-24 * steps, 15 * steps)
    try:
        entries, _ = T.quantize_state(state, hessians, hp, log=lambda *_: None)
        return entries, T.pack_artifact(entries, {}, "rans")
    finally:
        T.SCALE_GRID_STEPS, T.SCALE_GRID_RANGE = saved


def relative_error(state, hessians, entries, hp) -> float:
    deq = T.dequantize_state(entries, hp.lqer_asym_group)
    num = den = 0.0
    for name, e in entries.items():
        if e.kind == "gptq":
            W, H = state[name].float(), hessians[name]
            num += T.hessian_weighted_error(W, deq[name], H)
            den += T.hessian_weighted_error(W, torch.zeros_like(W), H)
    return num / den


def index_bytes(entries: dict, steps: int) -> int:
    """The row-step grid indices as a separate stream would take them (int16, byte-shuffled, better of
    zstd/lzma); in the artifact the weight coder carries them, ~20 % smaller (its bytes are in the model bytes)."""
    idx = torch.cat([torch.round(torch.log2(e.scale.float()) * steps).short() for _, e in sorted(entries.items())
                     if e.kind == "gptq"])
    raw = T._byte_shuffle(idx.numpy().tobytes(), 2)
    return min(len(T.COMPRESSORS[c][0](raw)) for c in ("zstd", "lzma"))


def sweep(state, hessians, hp, grids: list[int]) -> list[dict]:
    state, hessians = T.sort_hidden_units({k: v.float() for k, v in state.items()}, hessians)
    half_step = 2 ** (1 / (2 * max(grids)))
    rows = []
    for steps in grids:
        for label, f in (("as set", 1.0), ("sigmas +half step", half_step), ("sigmas -half step", 1 / half_step)):
            hp_f = dataclasses.replace(hp, **{k: getattr(hp, k) * f for k in SIGMA_FIELDS})
            entries, blob = quantize_with_grid(state, hessians, hp_f, steps)
            rows.append({"steps_per_octave": steps, "clip": label, "model_bytes": len(blob),
                         "index_bytes": index_bytes(entries, steps),
                         "rel_error": relative_error(state, hessians, entries, hp_f)})
    return rows


def report(rows: list[dict], n_rows: int) -> str:
    ref = rows[0]
    out = [[r["steps_per_octave"], r["clip"], r["model_bytes"], r["model_bytes"] - ref["model_bytes"],
            r["index_bytes"], f"{8 * r['index_bytes'] / n_rows:.2f}", f"{r['rel_error']:.6e}",
            f"{100 * (r['rel_error'] / ref['rel_error'] - 1):+.3f}"] for r in rows]
    return table(["steps/octave", "clip", "model bytes", "vs first", "index bytes (lzma)", "bits/row",
                  "rel. H-weighted error", "vs first %"], out)


def mantissa_sweep(state: dict, looping: bool, hp: T.Hyperparameters, bits: list[int], val_tokens: int) -> list[dict]:
    """val_bpb with each passthrough group rounded to each mantissa width (all groups: "all")."""
    hp = dataclasses.replace(hp, val_max_tokens=val_tokens)
    luts, val, _ = load_data(hp)
    rt = cpu_runtime(tempfile.mkdtemp(prefix="remainder_bench_"))
    model = T.GPT(hp, luts.bos_id, "sdpa")
    model.load_state_dict(state)
    model.looping = looping
    base = {k: v.clone() for k, v in model.state_dict().items()}
    groups: dict[str, list[str]] = {}
    for name, t in base.items():
        if T.quant_kind(name, t, hp) == "fp16":
            groups.setdefault(re.sub(r"\d+", "N", name), []).append(name)
    groups["all"] = [n for names in list(groups.values()) for n in names]

    def bpb(state) -> float:
        model.load_state_dict(state)
        return T.eval_val(model, val, hp, rt, "remainder").val_bpb
    ref, rows = bpb(base), []
    for m in bits:
        for group, names in groups.items():
            rounded = {k: T.round_mantissa(v, m).float() if k in names else v for k, v in base.items()}
            rows.append({"mantissa_bits": m, "group": group, "values": sum(base[n].numel() for n in names),
                         "val_bpb": bpb(rounded), "ref_val_bpb": ref})
    model.load_state_dict(base)
    return rows


def mantissa_report(rows: list[dict]) -> str:
    return table(["mantissa bits", "group", "values", "val_bpb", "vs unrounded"],
                 [[r["mantissa_bits"], r["group"], r["values"], f"{r['val_bpb']:.5f}",
                   f"{r['val_bpb'] - r['ref_val_bpb']:+.5f}"] for r in rows])


def load_run(prequant: str) -> tuple[dict, dict, T.Hyperparameters, bool]:
    run_dir = os.path.dirname(os.path.abspath(prequant))
    with open(os.path.join(run_dir, "run_record.json")) as f:
        config = json.load(f)["config"]
    hp = dataclasses.replace(T.Hyperparameters.from_env({"PRESET": config["preset"]}),
                             **{k: v for k, v in config.items() if k in T.Hyperparameters.__dataclass_fields__})
    saved = torch.load(prequant, map_location="cpu")
    hessians = torch.load(os.path.join(run_dir, "hessians.pt"), map_location="cpu")
    return saved["state"], hessians, hp, bool(saved["looping"])


def smoke_model() -> tuple[dict, dict, T.Hyperparameters, bool]:
    hp = T.Hyperparameters.from_env({"PRESET": "cpu_smoke", "NUM_LAYERS": "2", "MODEL_DIM": "64", "NUM_HEADS": "2",
                                     "NUM_KV_HEADS": "1", "XSA_LAST_N": "0", "NUM_LOOPS": "0",
                                     "PARALLEL_START_LAYER": "0", "QUANT_MIN_NUMEL": "1024", **env_fields()})
    torch.manual_seed(0)
    state = T.GPT(hp, 1, "sdpa").state_dict()
    g = torch.Generator().manual_seed(1)
    hessians = {}
    for name, t in state.items():
        if T.quant_kind(name, t, hp) == "gptq":
            X = torch.randn(4 * t.shape[1], t.shape[1], generator=g)
            hessians[name] = X.T @ X / len(X)
            state[name] = torch.randn(t.shape, generator=g) * 0.05
        elif T.quant_kind(name, t, hp) == "fp16":  # off their exact initial values (ones, zeros)
            state[name] = t + torch.randn(t.shape, generator=g) * 0.1
    return state, hessians, hp, False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("prequant", nargs="?", help="prequant_model.pt of a run with SAVE_PREQUANT=1")
    ap.add_argument("--grids", default="32,16,8,4", help="steps per octave, the reference first")
    ap.add_argument("--mantissa", default="", help="mantissa widths for the passthrough part (comma list)")
    ap.add_argument("--val-tokens", type=int, default=65536, help="validation tokens of the passthrough part")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not args.smoke and not args.prequant:
        ap.error("give a prequant_model.pt or --smoke")
    state, hessians, hp, looping = smoke_model() if args.smoke else load_run(args.prequant)
    if args.mantissa:
        rows = mantissa_sweep(state, looping, hp, [int(m) for m in args.mantissa.split(",")],
                              min(args.val_tokens, 4096) if args.smoke else args.val_tokens)
        print(mantissa_report(rows))
        write_json(args.json, {"prequant": args.prequant, "val_tokens": args.val_tokens, "rows": rows})
        return 0
    grids = [int(g) for g in args.grids.split(",")]
    rows = sweep(state, hessians, hp, grids)
    n_rows = sum(t.shape[0] for n, t in state.items() if n in hessians and T.quant_kind(n, t, hp) == "gptq")
    print(report(rows, n_rows))
    write_json(args.json, {"prequant": args.prequant, "gptq_rows": n_rows, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
