#!/usr/bin/env python3
"""Evaluation modes on the same quantized model and validation slice: plain, sliding window, per-document
TTT and phased TTT, with the eval time and eval tokens/s of each (issue 7).

    python bench/ttt_bench.py                                  # train 120 s on the offline sample (CPU)
    python bench/ttt_bench.py --prequant /tmp/q.pt             # reuse a model (e.g. quant_bench --save-prequant)
    python bench/ttt_bench.py --artifact runs/<id>/final_model.ptz
    python bench/ttt_bench.py --smoke                          # tiny model, seconds (used by the tests)

The model is quantized once (CLIP_MODE of the preset, cpu_smoke = fixed) and every mode starts from a
fresh copy rebuilt from the same artifact bytes (TTT changes weights). Settings are PRESET=cpu_smoke's
(EVAL_STRIDE=128, TTT LoRA rank 8, chunk 64, PHASED_TTT_PREFIX_DOCS=16 over 2 phases, EVAL_TIME_BUDGET=180 s
per mode) unless overridden by UPPER_CASE env vars; VAL_MAX_TOKENS via --val-tokens (default 32768).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common as C  # noqa: E402
from bench.common import T  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prequant", default="", help="prequant_model.pt (skips training)")
    ap.add_argument("--artifact", default="", help="a final_model.ptz (skips training and quantization)")
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--val-tokens", type=int, default=32768)
    C.add_common_args(ap)
    args, seconds = C.parse_common(ap, argv)
    over = dict(MAX_WALLCLOCK_SECONDS=seconds, ITERATIONS=0)
    if args.smoke:  # per-document TTT is sequential over chunks: keep the smoke slice short
        over.update(VAL_MAX_TOKENS=1024, TTT_CHUNK_SIZE=64, PHASED_TTT_NUM_PHASES=1)
    else:
        over["VAL_MAX_TOKENS"] = args.val_tokens
    hp = C.make_hp("cpu_smoke", C.CPU_SHAPE, C.SMOKE_SHAPE if args.smoke else {}, over)
    rt = C.cpu_runtime(tempfile.mkdtemp(prefix="ttt_bench_"), not args.verbose)
    info = C.machine_info()
    luts, val, files = C.load_data(hp)
    log = print if args.verbose else (lambda m: None)

    source: dict = {}
    if args.artifact:
        with open(args.artifact, "rb") as f:
            blob = f.read()
        source["artifact"] = args.artifact
    else:
        if args.prequant:
            model = C.load_prequant(args.prequant, hp, luts.bos_id)
            source["prequant"] = args.prequant
        else:
            model, res = C.train_model(hp, rt, luts, val, files)
            source.update(trained_s=res.train_time_ms / 1000, steps=res.steps)
        hessians = T.collect_hessians(model, T.calibration_loader(hp, rt, files), hp.gptq_calibration_batches,
                                      hp, rt)
        cfg = T.model_config_for_artifact(hp, luts.bos_id, model.looping)
        entries, _ = T.quantize_state(model.state_dict(), hessians, hp, log, 0,
                                      lambda e: len(T.pack_artifact(e, cfg, hp.compressor)))
        blob = T.pack_artifact(entries, cfg, hp.compressor)
        source.update(clip_mode=hp.clip_mode, matrix_bits=hp.matrix_bits)
    source["model_bytes"] = len(blob)
    print(f"model: {source}", flush=True)

    modes = [("plain", lambda m: T.eval_val(m, val, hp, rt, "plain")),
             (f"sliding (stride {hp.eval_stride})", lambda m: T.eval_sliding(m, val, hp, rt, "sliding")),
             ("per-document TTT (phased off)", lambda m: T.eval_ttt(m, val, hp, rt, "ttt", False, log=log)),
             (f"phased TTT ({hp.phased_ttt_num_phases} phases, {hp.phased_ttt_prefix_docs} prefix docs)",
              lambda m: T.eval_ttt(m, val, hp, rt, "ttt_phased", True, log=log))]
    rows = []
    for name, fn in modes:
        model = T.model_from_artifact(blob, hp, rt.device, "sdpa")
        t0 = time.perf_counter()
        r = fn(model)
        wall = time.perf_counter() - t0
        rows.append({"mode": name, "val_bpb": r.val_bpb, "val_loss": r.val_loss, "tokens": r.tokens,
                     "bytes": r.bytes, "eval_s": wall, "tokens_per_s": r.tokens / max(wall, 1e-9),
                     "info": r.info})
        print(f"{name}: val_bpb {r.val_bpb:.4f} in {wall:.1f}s {r.info or ''}", flush=True)
    base = rows[0]
    for r in rows:
        r["delta_vs_plain"] = r["val_bpb"] - base["val_bpb"]
        r["time_vs_plain"] = r["eval_s"] / max(base["eval_s"], 1e-9)
    print()
    print(f"ttt_bench: {info['cpu']}, {info['torch_threads']} threads, quantized model ({source.get('model_bytes'):,} "
          f"model bytes), val slice {base['tokens']} tokens, EVAL_SEQ_LEN={hp.eval_seq_len}"
          + (" [SMOKE]" if args.smoke else ""))
    print(C.table(["eval mode", "val_bpb", "Δ vs plain", "eval s", "x plain time", "eval tok/s", "scored tokens"],
                  [[r["mode"], r["val_bpb"], f"{r['delta_vs_plain']:+.4f}", r["eval_s"], r["time_vs_plain"],
                    r["tokens_per_s"], r["tokens"]] for r in rows]))
    C.write_json(args.json, {"bench": "ttt", "smoke": args.smoke, "machine": info, "model": source,
                             "settings": {k: getattr(hp, k) for k in (
                                 "eval_seq_len", "eval_stride", "val_max_tokens", "ttt_lora_rank", "ttt_lora_lr",
                                 "ttt_chunk_size", "ttt_eval_seq_len", "ttt_batch_size", "ttt_grad_steps",
                                 "phased_ttt_prefix_docs", "phased_ttt_num_phases", "global_ttt_lr",
                                 "eval_time_budget")},
                             "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
