#!/usr/bin/env python3
"""Append one row per finished run to runs.md (the results log), from its run_record.json.

  python scripts/log_run.py runs/<RUN_ID> --learned "matrix_lr 0.03 is worse than 0.026"

Columns: date, run id, commit, device (world size x device), preset and env overrides, seed,
steps, every eval stage's val_bpb, artifact bytes, eval time, what was learned.  The same run id
is never added twice.  runs.md is created with its header table when missing.  Only finished runs
(a run_record.json with a final result) are logged.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import runlib  # noqa: E402

COLUMNS = ["date", "run id", "commit", "device", "preset + overrides", "seed", "steps"] + runlib.STAGES + \
    ["artifact bytes", "eval s", "learned"]
RUN_ID_COL = COLUMNS.index("run id")
TITLE = """# Runs

One row per finished run, appended by `scripts/log_run.py <run dir> --learned "..."` from the run's
`run_record.json`. val_bpb per eval stage (lower is better); `-` = stage not run. Never edit numbers by hand.

"""


class LogError(Exception):
    pass


def _split_row(line: str):
    line = line.strip()
    if not (line.startswith("|") and line.endswith("|")):
        return None
    body = line[1:-1]
    cells, cur, i = [], "", 0
    while i < len(body):
        ch = body[i]
        if ch == "\\" and i + 1 < len(body) and body[i + 1] == "|":
            cur += "|"
            i += 2
            continue
        if ch == "|":
            cells.append(cur.strip())
            cur = ""
        else:
            cur += ch
        i += 1
    cells.append(cur.strip())
    return cells


def logged_run_ids(text: str) -> set:
    """Run ids already in runs.md: the 'run id' column of every table whose header names it."""
    ids, col = set(), None
    for line in text.splitlines():
        cells = _split_row(line)
        if cells is None:
            col = None
            continue
        if col is None:
            low = [c.lower() for c in cells]
            col = low.index("run id") if "run id" in low else (low.index("run_id") if "run_id" in low else -1)
            continue
        if col >= 0 and col < len(cells) and not set(cells[col]) <= set("-: "):
            ids.add(cells[col].strip("` "))
    return ids


def make_row(rec: dict, learned: str = "") -> list:
    ov = runlib.overrides(rec)
    preset = str(rec.get("preset") or runlib.get(rec, "config", "preset") or "?")
    cfg = preset + ("" if not ov else " " + " ".join(f"{k}={v}" for k, v in ov.items()))
    commit = rec.get("commit")
    commit = commit[:10] if isinstance(commit, str) and commit else "-"
    row = [str(rec.get("date") or "-"), str(rec.get("run_id")), commit, runlib.hardware(rec), cfg,
           runlib.fmt(rec.get("seed")), runlib.fmt(runlib.get(rec, "train", "steps"))]
    row += [runlib.fmt(runlib.get(rec, "stages", st, "val_bpb"), 5) for st in runlib.STAGES]
    row += [runlib.fmt(runlib.artifact_bytes(rec)), runlib.fmt(runlib.eval_time_s(rec), 1), learned or ""]
    return row


def append_run(run_dir, runs_md, learned: str = "") -> str:
    """Append the run's row to runs_md; returns the row text. Raises LogError on refusal."""
    try:
        rec = runlib.load_run(run_dir)
    except runlib.RunError as e:
        raise LogError(str(e)) from None
    if rec.get("_from_log"):
        raise LogError(f"{run_dir}: no {runlib.RECORD_NAME} (the run did not finish); not logged")
    if not rec.get("run_id"):
        raise LogError(f"{run_dir}: run record has no run_id")
    if runlib.final_stage(rec) is None:
        raise LogError(f"{run_dir}: run record has no final result (the run did not finish); not logged")
    runs_md = Path(runs_md)
    text = runs_md.read_text() if runs_md.exists() else ""
    rid = str(rec["run_id"])
    if rid in logged_run_ids(text):
        raise LogError(f"run id {rid!r} is already in {runs_md}; not added again")
    row = "| " + " | ".join(runlib.md_cell(c) for c in make_row(rec, learned)) + " |"
    header = runlib.md_table(COLUMNS, [])
    if not text:
        new_text = TITLE + header + "\n" + row + "\n"
    else:
        lines = text.rstrip("\n").split("\n")
        # Our table must be the last block of the file; otherwise start a new table at the end.
        last = lines[-1] if lines else ""
        cells = _split_row(last)
        has_our_header = header.split("\n")[0] in text
        if cells is not None and has_our_header and len(cells) == len(COLUMNS):
            new_text = text.rstrip("\n") + "\n" + row + "\n"
        else:
            new_text = text.rstrip("\n") + "\n\n" + header + "\n" + row + "\n"
    runlib.atomic_write_text(runs_md, new_text)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", nargs="+", help="run directories (ARTIFACT_DIR) of finished runs")
    ap.add_argument("--learned", default="", help="free text: what this run taught us")
    ap.add_argument("--runs-md", default=str(runlib.repo_root() / "runs.md"), help="default: %(default)s")
    args = ap.parse_args(argv)
    rc = 0
    for d in args.run_dirs:
        try:
            row = append_run(d, args.runs_md, args.learned)
            print(f"added to {args.runs_md}: {row}")
        except LogError as e:
            print(f"log_run: refused: {e}", file=sys.stderr)
            rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
