"""Shared helpers for the tools in scripts/: reading run directories written by train_gpt.py.

A run directory (ARTIFACT_DIR, default runs/<RUN_ID>/) holds `run_record.json` and `log.txt`.
Every reader here tolerates missing optional keys: a record is a plain dict and the accessors
return None (or an empty container) for what is not there.  When a directory has a log but no
record (a run killed before the record was written), `load_run` builds a partial record from
the log's final lines so the summary tools still show what is known.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path

ARTIFACT_LIMIT_BYTES = 16_000_000   # challenge cap, decimal bytes
TRAIN_BUDGET_S = 600.0              # 10 minutes of training (incl. Hessian collection) on 8xH100
EVAL_BUDGET_S = 600.0               # 10 minutes of evaluation
STAGES = ["prequant", "quantized", "quantized_sliding", "quantized_ttt", "quantized_ttt_phased"]
RECORD_NAME = "run_record.json"
LOG_NAMES = ["log.txt"]
# Env vars that name a run rather than configure it; they differ per seed by design.
IDENTITY_VARS = {"SEED", "RUN_ID", "ARTIFACT_DIR", "SAVE_TOKEN_LOSSES"}

# `<stage> val_loss:X val_bpb:Y eval_time:Nms`, and the closing `final <stage> val_loss:X val_bpb:Y`.
_FINAL_RE = re.compile(r"^(?P<final>final )?(?P<stage>[A-Za-z][A-Za-z0-9_]*) val_loss:(?P<loss>[-+0-9.eE]+)"
                       r" val_bpb:(?P<bpb>[-+0-9.eE]+)(?: eval_time:(?P<ms>[0-9.]+)ms)?(?:\s.*)?$")
_ARTIFACT_RE = re.compile(r"^artifact_bytes:(?P<a>\d+) code_bytes:(?P<c>\d+) model_bytes:(?P<m>\d+)(?:\s.*)?$")
_SHA_RE = re.compile(r"^code_sha256:\s*(?P<sha>[0-9a-fA-F]{64})\s*$")
_TOTAL_EVAL_RE = re.compile(r"^total_eval_time:(?P<s>[0-9.]+)s\s*$")


class RunError(Exception):
    """A run directory that cannot be read at all."""


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def find_log(run_dir) -> Path | None:
    d = Path(run_dir)
    for name in LOG_NAMES:
        if (d / name).is_file():
            return d / name
    return None


def parse_log(text: str) -> dict:
    """The machine-readable lines of a train_gpt.py log.

    Returns {"stages": {stage: {val_loss, val_bpb, eval_time_ms}}, "stage_order": [...], "final": the
    `final <stage> ...` line (else the last stage line) or None,
    "artifact": {...} or None, "code_sha256": str or None, "total_eval_time_s": float or None}.
    The last occurrence of a line wins (the logger appends: a reused run dir holds several runs).
    """
    stages: dict = {}
    order: list = []
    final = None
    artifact = None
    sha = None
    total_eval = None
    for line in text.splitlines():
        line = line.strip()
        m = _FINAL_RE.match(line)
        if m:
            st = m["stage"]
            try:
                entry = {"val_loss": float(m["loss"]), "val_bpb": float(m["bpb"])}
                if m["ms"] is not None:
                    entry["eval_time_ms"] = float(m["ms"])
            except ValueError:
                continue
            if m["final"]:
                final = {"stage": st, **entry}
                if st in stages:   # the closing line repeats a stage line: keep its eval time
                    continue
            stages[st] = entry
            if st in order:
                order.remove(st)
            order.append(st)
            continue
        m = _ARTIFACT_RE.match(line)
        if m:
            artifact = {"artifact_bytes": int(m["a"]), "code_bytes": int(m["c"]), "model_bytes": int(m["m"])}
            continue
        m = _SHA_RE.match(line)
        if m:
            sha = m["sha"].lower()
            continue
        m = _TOTAL_EVAL_RE.match(line)
        if m:
            total_eval = float(m["s"])
    if final is None and order:
        final = {"stage": order[-1], **stages[order[-1]]}
    return {"stages": stages, "stage_order": order, "final": final, "artifact": artifact, "code_sha256": sha,
            "total_eval_time_s": total_eval}


def load_run(path) -> dict:
    """Read a run directory (or a run_record.json path). Adds `_dir`, `_log` and `_from_log` keys."""
    p = Path(path)
    if p.is_file() and p.suffix == ".json":
        rec_path, run_dir = p, p.parent
    else:
        run_dir, rec_path = p, p / RECORD_NAME
    if not run_dir.is_dir():
        raise RunError(f"{path}: not a run directory")
    log = find_log(run_dir)
    if rec_path.is_file():
        try:
            rec = json.loads(rec_path.read_text())
        except json.JSONDecodeError as e:
            raise RunError(f"{rec_path}: not valid JSON ({e})") from None
        if not isinstance(rec, dict):
            raise RunError(f"{rec_path}: expected a JSON object")
        rec["_from_log"] = False
    elif log is not None:
        parsed = parse_log(log.read_text(errors="replace"))
        if not parsed["stages"] and parsed["artifact"] is None and parsed["final"] is None:
            raise RunError(f"{run_dir}: no {RECORD_NAME} and no final lines in {log.name}")
        rec = {"run_id": run_dir.name, "stages": parsed["stages"], "_from_log": True}
        if parsed["final"]:
            rec["final"] = {k: parsed["final"][k] for k in ("stage", "val_loss", "val_bpb")}
        if parsed["artifact"]:
            rec["artifact"] = dict(parsed["artifact"])
        if parsed["code_sha256"]:
            rec["code_sha256"] = parsed["code_sha256"]
        if parsed["total_eval_time_s"] is not None:
            rec["eval_time_s"] = parsed["total_eval_time_s"]
    else:
        raise RunError(f"{run_dir}: no {RECORD_NAME} and no log")
    rec["_dir"] = str(run_dir)
    rec["_log"] = str(log) if log else None
    return rec


def expand_run_dirs(paths) -> list:
    """Run directories from arguments: a run dir itself, or a folder whose children are run dirs."""
    out = []
    for p in paths:
        p = Path(p)
        if p.is_file() and p.name == RECORD_NAME:
            out.append(p.parent)
        elif (p / RECORD_NAME).is_file() or find_log(p) is not None:
            out.append(p)
        elif p.is_dir():
            kids = sorted(c for c in p.iterdir() if c.is_dir() and ((c / RECORD_NAME).is_file() or find_log(c)))
            out.extend(kids)
        else:
            raise RunError(f"{p}: no such run directory")
    return out


# ---- accessors (all tolerate missing keys) ------------------------------------------------

def get(rec: dict, *keys, default=None):
    cur = rec
    for k in keys:
        if not isinstance(cur, dict) or k not in cur or cur[k] is None:
            return default
        cur = cur[k]
    return cur


def stage_names(records) -> list:
    """Union of stage names over records, canonical ones first in pipeline order."""
    seen = []
    for rec in records:
        for st in (get(rec, "stages", default={}) or {}):
            if st not in seen:
                seen.append(st)
    canon = [s for s in STAGES if s in seen]
    return canon + [s for s in seen if s not in STAGES]


def final_stage(rec: dict):
    """(stage, val_loss, val_bpb) of the run's final result, or None.

    Uses `final` when present; else the last canonical stage present in `stages`."""
    fin = get(rec, "final")
    if isinstance(fin, dict) and fin.get("val_loss") is not None and fin.get("val_bpb") is not None:
        return fin.get("stage"), float(fin["val_loss"]), float(fin["val_bpb"])
    stages = get(rec, "stages", default={}) or {}
    for st in reversed(stage_names([rec])):
        s = stages.get(st) or {}
        if s.get("val_loss") is not None and s.get("val_bpb") is not None:
            return st, float(s["val_loss"]), float(s["val_bpb"])
    return None


def artifact_bytes(rec: dict):
    v = get(rec, "artifact", "artifact_bytes")
    return int(v) if v is not None else None


def eval_time_s(rec: dict):
    v = get(rec, "eval_time_s")
    if v is None:
        v = get(rec, "compliance", "eval_time_s")
    return float(v) if v is not None else None


def hardware(rec: dict) -> str:
    dev = get(rec, "device", default="?")
    ws = get(rec, "world_size")
    return f"{ws}x{dev}" if ws else str(dev)


def overrides(rec: dict, skip=IDENTITY_VARS) -> dict:
    ov = get(rec, "env_overrides", default={}) or {}
    return {k: str(v) for k, v in sorted(ov.items()) if k not in skip}


def mean_std(values, ddof: int = 1):
    """(mean, std) of a list; std is 0.0 for one value (or when n <= ddof)."""
    vals = [float(v) for v in values]
    if not vals:
        return None, None
    m = sum(vals) / len(vals)
    if len(vals) <= ddof:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - ddof))


def fmt(v, nd: int = 4, missing: str = "-") -> str:
    if v is None:
        return missing
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.{nd}f}"
    return str(v)


def text_table(headers, rows, align_right=None) -> str:
    """Fixed-width text table (two spaces between columns)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    right = align_right if align_right is not None else [False] + [True] * (len(headers) - 1)
    lines = []
    for j, r in enumerate(cells):
        parts = [c.rjust(w) if right[i] else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(parts).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def md_cell(v) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ").strip()


def md_table(headers, rows) -> str:
    out = ["| " + " | ".join(md_cell(h) for h in headers) + " |",
           "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(md_cell(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def atomic_write_text(path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
