#!/usr/bin/env python3
"""Print a table of run directories: run id, seed, steps, each eval stage's val_bpb, artifact bytes.

Arguments are run directories (ARTIFACT_DIR of train_gpt.py) or folders holding run
directories (e.g. `runs/`).  A directory without run_record.json but with a log is shown from the
log's final lines (marked `*`); a directory with neither is listed as missing.  With two or more
finished runs a mean ± std line (sample std) of the final val_loss / val_bpb follows.

  python scripts/summarize_runs.py runs/sweep_matrix_lr_*
  python scripts/summarize_runs.py runs/ --markdown
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import runlib  # noqa: E402


def collect(paths):
    """(records, problems): loaded records and 'dir: why' strings for unreadable ones."""
    recs, problems = [], []
    for p in paths:
        try:
            dirs = runlib.expand_run_dirs([p])
        except runlib.RunError as e:
            problems.append(str(e))
            continue
        if not dirs:
            problems.append(f"{p}: no runs")
        for d in dirs:
            try:
                recs.append(runlib.load_run(d))
            except runlib.RunError as e:
                problems.append(str(e))
    return recs, problems


def table_rows(recs, stages=None):
    stages = stages if stages is not None else runlib.stage_names(recs)
    headers = ["run_id", "seed", "steps"] + stages + ["final_loss", "final_bpb", "artifact_bytes", "eval_s"]
    rows = []
    for r in recs:
        fin = runlib.final_stage(r)
        rid = str(r.get("run_id") or Path(r["_dir"]).name) + ("*" if r.get("_from_log") else "")
        row = [rid, runlib.fmt(r.get("seed")), runlib.fmt(runlib.get(r, "train", "steps"))]
        row += [runlib.fmt(runlib.get(r, "stages", st, "val_bpb"), 6) for st in stages]
        row += [runlib.fmt(fin[1], 6) if fin else "-", runlib.fmt(fin[2], 6) if fin else "-",
                runlib.fmt(runlib.artifact_bytes(r)), runlib.fmt(runlib.eval_time_s(r), 1)]
        rows.append(row)
    return headers, rows


def summarize(paths, markdown: bool = False) -> str:
    recs, problems = collect(paths)
    out = []
    if recs:
        headers, rows = table_rows(recs)
        out.append(runlib.md_table(headers, rows) if markdown else runlib.text_table(headers, rows))
        finals = [runlib.final_stage(r) for r in recs]
        finals = [f for f in finals if f]
        if len(finals) >= 2:
            ml, sl = runlib.mean_std([f[1] for f in finals])
            mb, sb = runlib.mean_std([f[2] for f in finals])
            out.append(f"mean over {len(finals)} runs: val_loss {ml:.6f} ± {sl:.6f}  val_bpb {mb:.6f} ± {sb:.6f}"
                       " (sample std)")
        if any(r.get("_from_log") for r in recs):
            out.append("* no run_record.json: values parsed from the log")
    else:
        out.append("no runs found")
    for p in problems:
        out.append(f"missing: {p}")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", help="run directories or folders of run directories")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = ap.parse_args(argv)
    text = summarize(args.paths, args.markdown)
    print(text)
    return 0 if not text.startswith("no runs found") else 1


if __name__ == "__main__":
    sys.exit(main())
