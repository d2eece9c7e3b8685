#!/usr/bin/env python3
"""sota vs baseline at the same wall-clock training budget, same shape, same tokenizer and data (issue 4).

    python bench/arch_bench.py                       # 120 s of training each on the offline sample (CPU)
    python bench/arch_bench.py --seconds 60 --json bench/results/arch.json
    python bench/arch_bench.py --smoke               # a few seconds, tiny model (used by the tests)

Both arms run in this one process, one after the other: sota shrunk to CPU size = PRESET=cpu_smoke (that
preset IS sota's features at the small shape, with its small-model LR / EMA / loop-layer settings) and PRESET=baseline shrunk to the same NUM_LAYERS /
MODEL_DIM / heads / seq / batch / vocab / data, keeping every baseline feature (relu^2 MLP x2, no XSA,
no loops, no parallel lanes, no gates, no EMA, standard Muon, its learning rates). Each arm trains for
--seconds of timed training (train()'s wall-clock rule; GPTQ_CALIBRATION_BATCHES=0 and
GPTQ_RESERVE_SECONDS=0 so no time is reserved for Hessians) and is evaluated post-EMA, pre-quantization
with eval_val on the same validation slice (VAL_MAX_TOKENS, default 32768). UPPER_CASE env vars that are
Hyperparameters fields override both arms.
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


def run_arm(name: str, preset: str, shape: dict, seconds: float, quiet: bool, clock: str = "wall") -> dict:
    hp = C.make_hp(preset, C.CPU_SHAPE, shape, dict(MAX_WALLCLOCK_SECONDS=seconds, ITERATIONS=0,
                                                    GPTQ_CALIBRATION_BATCHES=0, GPTQ_RESERVE_SECONDS=0,
                                                    VAL_LOSS_EVERY=0))
    rt = C.cpu_runtime(tempfile.mkdtemp(prefix=f"arch_{name}_"), quiet)
    luts, val, files = C.load_data(hp)
    load0, t0, c0 = os.getloadavg()[0], time.perf_counter(), time.process_time()
    model, res = C.train_model(hp, rt, luts, val, files, clock)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    load1 = os.getloadavg()[0]
    r = T.eval_val(model, val, hp, rt, "prequant")
    row = {"arm": name, "preset": preset, "params": T.count_parameters(model), "steps": res.steps,
           "train_time_s": res.train_time_ms / 1000, "wall_s_incl_warmup": wall, "tokens_per_s": res.tokens_per_s,
           "train_tokens": res.steps * hp.train_batch_tokens, "stop_reason": res.stop_reason,
           "looping_step": res.looping_step, "ema_decay": hp.ema_decay,
           "val_loss": r.val_loss, "val_bpb": r.val_bpb, "val_tokens": r.tokens, "val_bytes": r.bytes,
           "eval_time_s": r.time_ms / 1000,
           # contention diagnostics (shared machine): CPU seconds this process got per wall second per thread,
           # and the 1-minute load average before / after the arm
           "cpu_util": cpu / max(wall, 1e-9) / max(C.torch.get_num_threads(), 1), "loadavg": [load0, load1]}
    print(f"[{name}] steps:{res.steps} train:{res.train_time_ms / 1000:.1f}s tok/s:{res.tokens_per_s:.0f} "
          f"val_bpb:{r.val_bpb:.4f}", flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=120.0, help="timed training seconds per arm")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="budget clock: wall (the challenge rule) or cpu (CPU seconds per thread this process "
                         "got: equal compute for both arms on a machine shared with other jobs)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="tiny model, a few seconds each (for tests)")
    ap.add_argument("--json", default="")
    ap.add_argument("--verbose", action="store_true", help="show train_gpt's training log")
    args = ap.parse_args(argv)
    C.set_threads(args.threads)
    shape = dict(C.SMOKE_SHAPE) if args.smoke else {}
    seconds = min(args.seconds, 3.0) if args.smoke else args.seconds
    info = C.machine_info()
    rows = [run_arm("sota (PRESET=cpu_smoke)", "cpu_smoke", shape, seconds, not args.verbose, args.clock),
            run_arm("baseline (same shape)", "baseline", shape, seconds, not args.verbose)]
    s, b = rows
    ratio = {"val_bpb": s["val_bpb"] / b["val_bpb"], "tokens_per_s": s["tokens_per_s"] / b["tokens_per_s"],
             "steps": s["steps"] / max(b["steps"], 1)}
    print()
    print(f"arch_bench: {seconds:.0f} s timed training per arm ({args.clock} clock), {info['cpu']}, {info['torch_threads']} threads, "
          f"val slice {s['val_tokens']} tokens" + (" [SMOKE]" if args.smoke else ""))
    print(C.table(["arm", "params", "steps", "train s", "tok/s", "val_bpb (post-EMA, pre-quant)", "cpu util",
                   "load avg (before/after)"],
                  [[r["arm"], r["params"], r["steps"], r["train_time_s"], r["tokens_per_s"], r["val_bpb"],
                    f"{r['cpu_util']:.0%}", f"{r['loadavg'][0]:.1f}/{r['loadavg'][1]:.1f}"] for r in rows] +
                  [["ratio sota/baseline", s["params"] / b["params"], ratio["steps"], "", ratio["tokens_per_s"],
                    ratio["val_bpb"], "", ""]]))
    C.write_json(args.json, {"bench": "arch", "smoke": args.smoke, "seconds": seconds, "clock": args.clock, "machine": info,
                             "rows": rows, "ratio_sota_over_baseline": ratio})
    return 0


if __name__ == "__main__":
    sys.exit(main())
