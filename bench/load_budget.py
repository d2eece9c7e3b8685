#!/usr/bin/env python3
"""Both time budgets under CPU load: train_gpt.py run beside N busy processes this script starts and stops.

    python bench/load_budget.py                                  # 0, 1, 2 competitors x 60 s, 120 s, cpu_smoke
    python bench/load_budget.py --competitors 2 --budgets 120 --json out.json
    python bench/load_budget.py --competitors 1 --budgets 15 KEY=VALUE ...   # any train_gpt.py setting

Each run: the competitors (one pure-Python busy loop each, one core's worth of demand) start, train_gpt.py runs
with PRESET (default cpu_smoke), MAX_WALLCLOCK_SECONDS=<budget> and EVAL_TIME_BUDGET (the preset's unless
given), then the competitors are stopped. Everything stays in this process's session, so the scheduler shares
the CPU between the trainer and its competitors as between any processes of one login (a new session would
get its own autogroup and a fair share of its own). Reported per run, from its run_record.json and log:
training + Hessians against the budget, the slack, steps and calibration batches, eval time against
EVAL_TIME_BUDGET, the TTT decisions (phases kept, batches cut to fewer grad steps or score-only), whether
every validation token was scored, any OVER / ERROR / WARNING line, and the 1-minute load average before and
after (other jobs on a shared machine show up there).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUSY_LOOP = "while True: pass"  # one runnable thread: the competitor a data loader or a neighbour's job is
# Wall-clock allowance per run beyond its two budgets: interpreter start, warm-up, Hessian probe, GPTQ and packing
# (~40 s for cpu_smoke on 2 quiet cores), times a slowdown of a few x under load.
RUN_OVERHEAD_S = 400


def start_competitors(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", BUSY_LOOP], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL) for _ in range(n)]


def stop_competitors(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def flagged_lines(log_text: str) -> list[str]:
    """The log lines a reader must not miss: over a budget, errors, warnings."""
    return [ln.strip() for ln in log_text.splitlines()
            if " OVER" in ln or "ERROR" in ln or "WARNING" in ln]


def run_once(competitors: int, budget: float, env: dict | None = None, out_dir: str | None = None,
             timeout_s: float | None = None) -> dict:
    """One train_gpt.py run beside `competitors` busy loops; returns the report row (see the module doc)."""
    env = {"PRESET": "cpu_smoke", **(env or {}), "MAX_WALLCLOCK_SECONDS": str(budget)}
    out_dir = out_dir or tempfile.mkdtemp(prefix="load_budget_")
    run_id = f"load{competitors}_{budget:g}s_{int(time.time())}"
    run_env = {**os.environ, **env, "RUN_ID": run_id, "ARTIFACT_DIR": os.path.join(out_dir, run_id)}
    eval_budget = float(env.get("EVAL_TIME_BUDGET", 0)) or None
    procs = start_competitors(competitors)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, os.path.join(ROOT, "train_gpt.py")], cwd=ROOT, env=run_env,
                           capture_output=True, text=True,
                           timeout=timeout_s or 2 * (budget + (eval_budget or 180)) + RUN_OVERHEAD_S)
    finally:
        load_after = os.getloadavg()[0]
        stop_competitors(procs)
    wall_s = time.perf_counter() - t0
    rec_path = os.path.join(out_dir, run_id, "run_record.json")
    if p.returncode != 0 or not os.path.isfile(rec_path):
        raise RuntimeError(f"train_gpt.py exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    with open(rec_path) as f:
        rec = json.load(f)
    comp, train = rec["compliance"], rec["train"]
    ttt = next((v.get("info", {}) for k, v in rec["stages"].items() if k.startswith("quantized_ttt")), {})
    cuts = ttt.get("cuts", {})
    return {
        "competitors": competitors, "budget_s": budget, "load_before": load_before, "load_after": load_after,
        "steps": train["steps"], "train_s": train["train_time_ms"] / 1000,
        "hessian_s": train["hessian_time_ms"] / 1000,
        "hessian_batches": train["hessian_batches"], "planned_batches": rec["config"]["gptq_calibration_batches"],
        "train_plus_hessian_s": comp["train_plus_hessian_s"], "slack_s": train["slack_s"],
        "train_budget_ok": comp["budget_compliant"], "eval_s": comp["eval_time_s"], "eval_budget_s": comp["eval_budget_s"],
        "eval_budget_ok": comp["eval_within_budget"], "all_tokens_scored": comp["tokens_scored"] == comp["val_tokens"],
        "ttt_phases": ttt.get("phases"), "ttt_phases_planned": rec["config"]["phased_ttt_num_phases"],
        "ttt_grad_steps": cuts.get("grad_steps"), "ttt_batches": cuts.get("batches"),
        "ttt_fewer_grad_steps": cuts.get("fewer_grad_steps"), "ttt_score_only": cuts.get("score_only"),
        "final_stage": rec["final"]["stage"], "final_val_bpb": rec["final"]["val_bpb"], "commit": rec.get("commit"),
        "wall_s": wall_s, "flagged": flagged_lines(p.stdout + p.stderr), "run_dir": os.path.join(out_dir, run_id)}


def table(rows: list[dict]) -> str:
    head = ("| competitors | load 1 min (before/after) | steps | train + Hessians / budget (slack) | calibration "
            "batches | eval / budget | TTT: phases, batches cut (fewer steps / score-only) | flagged lines |\n"
            "|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['competitors']} | {r['load_before']:.1f} / {r['load_after']:.1f} | {r['steps']} | "
            f"{r['train_s']:.1f} + {r['hessian_s']:.1f} = {r['train_plus_hessian_s']:.1f} / {r['budget_s']:g} s "
            f"{'OK' if r['train_budget_ok'] else 'OVER'} ({r['slack_s']:.2f} s) | {r['hessian_batches']} of "
            f"{r['planned_batches']} | {r['eval_s']:.1f} / {r['eval_budget_s']:g} s "
            f"{'OK' if r['eval_budget_ok'] else 'OVER'} | {r['ttt_phases']}/{r['ttt_phases_planned']}, "
            f"{r['ttt_fewer_grad_steps']} / {r['ttt_score_only']} of {r['ttt_batches']} | {len(r['flagged'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--competitors", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--budgets", type=float, nargs="+", default=[60.0, 120.0], help="MAX_WALLCLOCK_SECONDS")
    ap.add_argument("--json", default="", help="write the rows here")
    ap.add_argument("settings", nargs="*", help="KEY=VALUE train_gpt.py settings (PRESET=cpu_smoke by default)")
    args = ap.parse_args(argv)
    env = dict(s.split("=", 1) for s in args.settings)
    rows = []
    for budget in args.budgets:
        for n in args.competitors:
            rows.append(run_once(n, budget, env))
            r = rows[-1]
            print(f"competitors:{n} budget:{budget:g}s train+hessians:{r['train_plus_hessian_s']:.1f}s "
                  f"slack:{r['slack_s']:.2f}s eval:{r['eval_s']:.1f}/{r['eval_budget_s']:g}s "
                  f"load:{r['load_before']:.1f}/{r['load_after']:.1f}", flush=True)
            for line in r["flagged"]:
                print(f"  {line}", flush=True)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if all(r["train_budget_ok"] and r["eval_budget_ok"] and r["all_tokens_scored"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
