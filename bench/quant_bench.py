#!/usr/bin/env python3
"""Clip modes at equal artifact bytes, and compressors on the same quantized entries (issue 6).

    python bench/quant_bench.py                                  # train 120 s on the offline sample (CPU)
    python bench/quant_bench.py --prequant runs/<id>/prequant_model.pt --bits 6,4
    python bench/quant_bench.py --save-prequant /tmp/q.pt --json bench/results/quant.json
    python bench/quant_bench.py --smoke                          # tiny model, seconds (used by the tests)

One model (trained here under PRESET=cpu_smoke, or loaded from a prequant_model.pt that train_gpt.py wrote),
one set of Hessians, then for each MATRIX_BITS in --bits:
  * CLIP_MODE=fixed   -> its packed model bytes B (zstd);
  * CLIP_MODE=budget  with TARGET_ARTIFACT_BYTES = B (code bytes counted as 0, so the target is the model
                        bytes), i.e. the same bytes within the 0.5 % budget tolerance;
  * CLIP_MODE=adaptive, whose bytes are whatever its sigmas give: the table says how far from B it lands.
Each artifact is unpacked into a fresh model (model_from_artifact) and scored with eval_val on the same
validation slice; the gap is against the pre-quantization (post-EMA) val_bpb of the same model.
Then, for each compressor (zstd, lzma, raw) on the same fixed-mode entries: model bytes, pack and unpack
time, and the code-group bytes against their order-0 entropy bound (stream_report).
QUANT_MIN_NUMEL defaults to 4096 here so nearly every matrix goes through GPTQ. The CPU model is tiny
(~0.25M params vs ~36M on the GPU recipe): GPTQ and clipping matter less at 6 bits there, hence the lower
bit width as a harder setting.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import struct
import sys
import tempfile
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common as C  # noqa: E402
from bench.common import T  # noqa: E402
import torch  # noqa: E402

MODES = ("fixed", "adaptive", "budget")


def stream_report(entries: dict, config: dict, compressor: str) -> list[dict]:
    """Per code group: compressed bytes vs the order-0 entropy bound of its symbols."""
    blob = T.pack_artifact(entries, config, compressor)
    hz_len = struct.unpack("<HII", blob[4:14])[1]
    header = json.loads(zlib.decompress(blob[14: 14 + hz_len]))
    rows = []
    for sm in header["streams"]:
        if not sm["name"].startswith("codes."):
            continue
        g = sm["name"][len("codes."):]
        codes = torch.cat([e.q.reshape(-1) for n, e in entries.items() if e.kind == "gptq" and T._code_group(n) == g])
        rows.append({"group": g, "symbols": codes.numel(), "bytes": sm["len"], "entropy_bytes": T.order0_entropy_bytes(codes)})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prequant", default="", help="prequant_model.pt from train_gpt.py (skips training)")
    ap.add_argument("--save-prequant", default="", help="write the trained model here (for ttt_bench --prequant)")
    ap.add_argument("--seconds", type=float, default=120.0, help="timed training seconds when not --prequant")
    ap.add_argument("--bits", default="6,4", help="MATRIX_BITS values to compare (comma list)")
    ap.add_argument("--compressors", default="zstd,lzma,raw")
    ap.add_argument("--quant-min-numel", type=int, default=4096)
    C.add_common_args(ap)
    args, seconds = C.parse_common(ap, argv)
    hp = C.make_hp("cpu_smoke", C.CPU_SHAPE, C.SMOKE_SHAPE if args.smoke else {},
                   dict(QUANT_MIN_NUMEL=args.quant_min_numel, MAX_WALLCLOCK_SECONDS=seconds, ITERATIONS=0))
    rt = C.cpu_runtime(tempfile.mkdtemp(prefix="quant_bench_"), not args.verbose)
    info = C.machine_info()
    luts, val, files = C.load_data(hp)
    qlog: list[str] = []
    log = (lambda m: (qlog.append(m), print(m, flush=True))) if args.verbose else qlog.append

    t0 = time.perf_counter()
    if args.prequant:
        model = C.load_prequant(args.prequant, hp, luts.bos_id)
        source = {"prequant": args.prequant}
    else:
        model, res = C.train_model(hp, rt, luts, val, files)
        source = {"trained_s": res.train_time_ms / 1000, "steps": res.steps, "tokens_per_s": res.tokens_per_s}
        if args.save_prequant:
            C.save_prequant(model, args.save_prequant)
    source["params"] = T.count_parameters(model)
    print(f"model: {source} ({time.perf_counter() - t0:.0f}s)", flush=True)
    pre = T.eval_val(model, val, hp, rt, "prequant")
    t0 = time.perf_counter()
    hessians = T.collect_hessians(model, T.calibration_loader(hp, rt, files), hp.gptq_calibration_batches, hp, rt)
    hess_s = time.perf_counter() - t0
    cfg = T.model_config_for_artifact(hp, luts.bos_id, model.looping)
    state = model.state_dict()
    print(f"prequant val_bpb:{pre.val_bpb:.4f}; {len(hessians)} Hessians in {hess_s:.1f}s", flush=True)

    def quantize(h):
        t = time.perf_counter()
        entries, tbl = T.quantize_state(state, hessians, h, log, 0,
                                        lambda e: len(T.pack_artifact(e, cfg, "zstd")))
        return entries, tbl, time.perf_counter() - t

    def score(h, blob):
        m = T.model_from_artifact(blob, h, rt.device, "sdpa")
        return T.eval_val(m, val, h, rt, "quantized")

    clip_rows, comp_rows, fixed_entries = [], [], {}
    for bits in [int(b) for b in args.bits.split(",") if b.strip()]:
        hb = dataclasses.replace(hp, matrix_bits=bits)
        fixed_bytes = None
        for mode in MODES:
            hm = dataclasses.replace(hb, clip_mode=mode)
            if mode == "budget":
                hm = dataclasses.replace(hm, target_artifact_bytes=fixed_bytes)
            n_log = len(qlog)
            entries, tbl, q_s = quantize(hm)
            blob = T.pack_artifact(entries, cfg, "zstd")
            if mode == "fixed":
                fixed_bytes, fixed_entries[bits] = len(blob), entries
            r = score(hm, blob)
            diff = (len(blob) - fixed_bytes) / fixed_bytes
            sig = [row["sigma"] for row in tbl]
            row = {"bits": bits, "embed_bits": hm.embed_bits, "mode": mode, "model_bytes": len(blob),
                   "bytes_vs_fixed": diff, "same_bytes": abs(diff) <= 0.005, "val_bpb": r.val_bpb,
                   "gap": r.val_bpb - pre.val_bpb, "quant_s": q_s, "gptq_tensors": len(tbl),
                   "sigma_min": min(sig) if sig else None, "sigma_max": max(sig) if sig else None,
                   "budget_log": [m for m in qlog[n_log:] if m.startswith("clip:budget")]}
            clip_rows.append(row)
            print(f"bits:{bits} {mode}: bytes {len(blob)} ({diff:+.2%} vs fixed) val_bpb {r.val_bpb:.4f} "
                  f"gap {row['gap']:+.4f} ({q_s:.1f}s)", flush=True)

    for bits, entries in fixed_entries.items():
        for comp in [c for c in args.compressors.split(",") if c]:
            t = time.perf_counter()
            blob = T.pack_artifact(entries, cfg, comp)
            pack_s = time.perf_counter() - t
            t = time.perf_counter()
            T.unpack_artifact(blob)
            unpack_s = time.perf_counter() - t
            rep = stream_report(entries, cfg, comp)
            code_b = sum(g["bytes"] for g in rep)
            ent_b = sum(g["entropy_bytes"] for g in rep)
            comp_rows.append({"bits": bits, "compressor": comp, "model_bytes": len(blob), "pack_s": pack_s,
                              "unpack_s": unpack_s, "code_bytes": code_b, "entropy_bytes": ent_b,
                              "code_over_entropy": code_b / ent_b if ent_b else float("nan"),
                              "worst_group": max(rep, key=lambda g: g["bytes"] / max(g["entropy_bytes"], 1))["group"]
                              if rep else "", "groups": rep})

    print()
    print(f"quant_bench: {info['cpu']}, {info['torch_threads']} threads, model {source['params']:,} params, "
          f"QUANT_MIN_NUMEL={hp.quant_min_numel}, EMBED_BITS={hp.embed_bits}, LQER={int(hp.lqer_enabled)}, "
          f"val slice {pre.tokens} tokens, prequant val_bpb {pre.val_bpb:.4f}" + (" [SMOKE]" if args.smoke else ""))
    print(C.table(["matrix bits", "clip mode", "model bytes", "vs fixed", "same bytes (±0.5%)", "val_bpb",
                   "gap to prequant", "quant s"],
                  [[r["bits"], r["mode"], r["model_bytes"], f"{r['bytes_vs_fixed']:+.2%}",
                    "yes" if r["same_bytes"] else "NO", r["val_bpb"], f"{r['gap']:+.4f}", r["quant_s"]]
                   for r in clip_rows]))
    print()
    print(C.table(["matrix bits", "compressor", "model bytes", "pack s", "unpack s", "code-group bytes",
                   "order-0 entropy bytes", "code/entropy"],
                  [[r["bits"], r["compressor"], r["model_bytes"], r["pack_s"], r["unpack_s"], r["code_bytes"],
                    int(round(r["entropy_bytes"])), r["code_over_entropy"]] for r in comp_rows]))
    C.write_json(args.json, {"bench": "quant", "smoke": args.smoke, "machine": info, "model": source,
                             "prequant_val_bpb": pre.val_bpb, "val_tokens": pre.tokens, "hessian_s": hess_s,
                             "quant_min_numel": hp.quant_min_numel, "clip": clip_rows, "compressors": comp_rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
