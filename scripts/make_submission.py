#!/usr/bin/env python3
"""Package finished runs (one per seed) as a challenge record folder.

  python scripts/make_submission.py runs/x_seed42 runs/x_seed0 runs/x_seed1234 \\
      --name my_record --author "Jane Doe" --github-id jdoe --blurb "what is new"

Creates submissions/<date>_<name>/ with
  train_gpt.py          the exact code of the runs (--code, default the repo-root train_gpt.py;
                        refused when its sha256 differs from any run's recorded code_sha256)
  train_gpt_shipped.py  the runs' self-extracting wrapper of it (the counted code), when present;
                        with --ship-wrapper it becomes train_gpt.py and the source train_gpt_source.py
  train_seed<seed>.log  each run's log
  submission.json       the challenge schema (spec §8.5)
  requirements.txt      copy of the repo's requirements.txt, when there is one
  README.md             per-seed results, mean ± std, config vs the preset, compliance block

A run over 16,000,000 bytes, not budget-compliant (training+Hessians or eval over 600 s), without
its final lines or final stage, or not scored on the full validation set is refused with the
reason; --non-record packages such runs anyway, labelled non-record in README and
submission.json.  The folder is built in a temporary directory and renamed into place.
"""
from __future__ import annotations

import argparse
import base64
import datetime as _dt
import json
import lzma
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import runlib  # noqa: E402

# The record this would be compared against (PR #1855, spec §10): mean post-TTT bpb / nats.
LEADERBOARD_BPB = 1.06107587
LEADERBOARD_NATS = 2.32202732
VALUE_TOL = 5e-8   # log lines carry 8 decimals


class SubmissionError(Exception):
    pass


def _slug(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", name.strip()).strip("._")
    if not s:
        raise SubmissionError(f"--name {name!r} has no usable characters")
    return s


def _git_user() -> str:
    try:
        import subprocess
        out = subprocess.run(["git", "config", "user.name"], capture_output=True, text=True, timeout=5,
                             cwd=runlib.repo_root())
        return out.stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def check_run(rec: dict, code_sha: str):
    """(fatal, reasons): fatal problems stop packaging always; reasons stop it unless --non-record."""
    d = rec["_dir"]
    fatal, reasons = [], []
    if rec.get("_from_log"):
        fatal.append(f"{d}: no {runlib.RECORD_NAME} (the run did not finish)")
        return fatal, reasons
    # code identity
    sha = rec.get("code_sha256")
    log_text = Path(rec["_log"]).read_text(errors="replace") if rec.get("_log") else ""
    parsed = runlib.parse_log(log_text)
    if not sha:
        sha = parsed["code_sha256"]
    if not sha:
        fatal.append(f"{d}: no code_sha256 in the run record or log; cannot prove which code produced it")
    elif sha.lower() != code_sha:
        fatal.append(f"{d}: code sha256 {sha[:12]}… differs from the code to ship ({code_sha[:12]}…): "
                     "the run was not produced by this train_gpt.py")
    if rec.get("seed") is None:
        fatal.append(f"{d}: run record has no seed")
    # final result
    fin = runlib.final_stage(rec)
    if fin is None:
        fatal.append(f"{d}: no eval stage with val_loss/val_bpb in the run record")
    else:
        if not isinstance(rec.get("final"), dict) or rec["final"].get("val_bpb") is None:
            reasons.append(f"{d}: run record has no final result (used stage {fin[0]!r})")
        elif fin[0] and fin[0] not in (rec.get("stages") or {}):
            reasons.append(f"{d}: final stage {fin[0]!r} is not among the recorded stages")
        if not log_text:
            reasons.append(f"{d}: no log.txt")
        else:
            st = parsed["stages"].get(fin[0])
            if st is None:
                reasons.append(f"{d}: log has no final line '{fin[0]} val_loss:... val_bpb:... eval_time:...ms'")
            elif abs(st["val_loss"] - fin[1]) > VALUE_TOL or abs(st["val_bpb"] - fin[2]) > VALUE_TOL:
                reasons.append(f"{d}: log final line ({st['val_loss']:.8f}, {st['val_bpb']:.8f}) disagrees with "
                               f"the run record ({fin[1]:.8f}, {fin[2]:.8f})")
            if parsed["artifact"] is None:
                reasons.append(f"{d}: log has no final 'artifact_bytes:... code_bytes:... model_bytes:...' line")
    # size
    ab = runlib.artifact_bytes(rec)
    if ab is None:
        reasons.append(f"{d}: no artifact size in the run record")
    elif ab > runlib.ARTIFACT_LIMIT_BYTES:
        reasons.append(f"{d}: artifact is {ab:,} bytes > limit {runlib.ARTIFACT_LIMIT_BYTES:,}")
    elif runlib.get(rec, "artifact", "under_limit") is False:
        reasons.append(f"{d}: run record says the artifact is not under the limit")
    # time budgets
    if runlib.get(rec, "train", "budget_compliant") is not True:
        why = runlib.get(rec, "train", "stop_reason", default="?")
        reasons.append(f"{d}: training not budget-compliant (train.budget_compliant="
                       f"{runlib.get(rec, 'train', 'budget_compliant')}, stop_reason={why})")
    tph = runlib.get(rec, "compliance", "train_plus_hessian_s")
    if tph is not None and float(tph) > runlib.TRAIN_BUDGET_S:
        reasons.append(f"{d}: training + Hessians took {float(tph):.1f} s > {runlib.TRAIN_BUDGET_S:.0f} s")
    et = runlib.eval_time_s(rec)
    if et is not None and et > runlib.EVAL_BUDGET_S:
        reasons.append(f"{d}: evaluation took {et:.1f} s > {runlib.EVAL_BUDGET_S:.0f} s")
    # the data: train_gpt.py's split check (validation documents found in the training shards; canonical export)
    leak = runlib.get(rec, "compliance", "val_docs_in_train")
    if leak:
        reasons.append(f"{d}: {leak} validation documents are in the training shards (split_check in the log)")
    if runlib.get(rec, "compliance", "canonical_split") is False:
        reasons.append(f"{d}: not the canonical data split (train shards / validation documents / tokens differ; "
                       "split_check in the log)")
    # full validation
    fv = runlib.get(rec, "compliance", "full_validation")
    scored, total = runlib.get(rec, "compliance", "tokens_scored"), runlib.get(rec, "compliance", "val_tokens")
    if fv is not True:
        vmt = runlib.get(rec, "config", "val_max_tokens")
        if vmt:
            extra = f" (VAL_MAX_TOKENS={vmt}; {scored} tokens scored)"
        elif scored is not None and total is not None:
            extra = f" ({scored} of {total} tokens scored)"
        else:
            extra = f" (compliance.full_validation={fv})"
        reasons.append(f"{d}: not scored on the full validation set{extra}")
    elif scored is not None and total is not None and int(scored) < int(total):
        reasons.append(f"{d}: only {scored} of {total} validation tokens scored")
    return fatal, reasons


WRAPPER_NAME = "train_gpt_shipped.py"   # written by train_gpt.py into the run dir: the counted code
SOURCE_NAME = "train_gpt_source.py"


def unwrap(wrapper: bytes):
    """The source inside a train_gpt.py lzma+base85 wrapper, or None if it is not one."""
    m = re.search(rb"b85decode\('([^']*)'\)", wrapper)
    if not m:
        return None
    try:
        return lzma.decompress(base64.b85decode(m.group(1)))
    except (ValueError, lzma.LZMAError):
        return None


def expected_wrapper(code_bytes: bytes):
    """The self-extracting (minified) wrapper that this exact code builds of itself, or None."""
    import importlib.util
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "train_gpt_check.py"
        path.write_bytes(code_bytes)
        try:
            spec = importlib.util.spec_from_file_location("train_gpt_check", path)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
            spec.loader.exec_module(mod)
            return mod.shipped_code(code_bytes)[0]
        except Exception:
            return None
        finally:
            sys.modules.pop("train_gpt_check", None)


def shipped_wrapper(recs, code_bytes: bytes):
    """(wrapper bytes or None, problem or None) from the runs' train_gpt_shipped.py files.

    All runs that have one must hold the same bytes, it must unwrap to the shipped source (or be
    that source) and its size must be the recorded code_bytes."""
    found = {}
    for r in recs:
        p = Path(r["_dir"]) / WRAPPER_NAME
        if p.is_file():
            found[r["_dir"]] = p.read_bytes()
    if not found:
        return None, None
    blobs = set(found.values())
    if len(blobs) > 1:
        return None, f"the runs' {WRAPPER_NAME} files differ"
    blob = blobs.pop()
    if blob != code_bytes and unwrap(blob) != code_bytes and blob != expected_wrapper(code_bytes):
        return None, f"{WRAPPER_NAME} in the run dirs does not unwrap to the code being shipped"
    for r in recs:
        cb = runlib.get(r, "artifact", "code_bytes")
        if r["_dir"] in found and cb is not None and int(cb) != len(blob):
            return None, f"{r['_dir']}: {WRAPPER_NAME} is {len(blob)} bytes but the record counts {cb} code bytes"
    return blob, None


def _config_key(rec):
    cfg = dict(rec.get("config") or {})
    for k in ("seed", "run_id", "artifact_dir", "save_token_losses"):  # identity / output locations only
        cfg.pop(k, None)
    return json.dumps(cfg, sort_keys=True, default=str)


def build(run_dirs, name, author=None, github_id=None, blurb="", date=None, code=None, out_root=None,
          non_record=False, requirements=None, force=False, technique_summary=None, ship_wrapper=False) -> Path:
    """Create the submission folder; returns its path. Raises SubmissionError with every reason."""
    root = runlib.repo_root()
    code = Path(code) if code else root / "train_gpt.py"
    out_root = Path(out_root) if out_root else root / "submissions"
    requirements = Path(requirements) if requirements else root / "requirements.txt"
    if not run_dirs:
        raise SubmissionError("no run directories given")
    if not code.is_file():
        raise SubmissionError(f"--code {code}: no such file")
    code_bytes = code.read_bytes()
    code_sha = runlib.sha256_file(code)
    recs, fatal, reasons = [], [], []
    for d in run_dirs:
        try:
            recs.append(runlib.load_run(d))
        except runlib.RunError as e:
            fatal.append(str(e))
    for rec in recs:
        f, r = check_run(rec, code_sha)
        fatal += f
        reasons += r
    seeds = [rec.get("seed") for rec in recs]
    dup = sorted({s for s in seeds if s is not None and seeds.count(s) > 1}, key=str)
    if dup:
        fatal.append(f"the same seed appears more than once: {dup}")
    if len({_config_key(r) for r in recs if r.get("config") is not None}) > 1:
        reasons.append("the runs' configs differ beyond seed / run_id / artifact_dir (not one submission)")
    wrapper, wrapper_problem = shipped_wrapper(recs, code_bytes)
    if wrapper_problem:
        fatal.append(wrapper_problem)
    if ship_wrapper and wrapper is None:
        fatal.append("--ship-wrapper: the run directories hold no " + WRAPPER_NAME)
    if fatal:
        raise SubmissionError("cannot package:\n  " + "\n  ".join(fatal + reasons))
    if reasons and not non_record:
        raise SubmissionError("not a record submission:\n  " + "\n  ".join(reasons)
                              + "\n(use --non-record to package these runs labelled non-record)")
    if date is None:
        dates = sorted(str(r.get("date"))[:10] for r in recs if r.get("date"))
        date = dates[-1] if dates else _dt.date.today().isoformat()
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", date):
        raise SubmissionError(f"--date {date!r}: expected YYYY-MM-DD")
    folder = out_root / f"{date}_{_slug(name)}"
    if folder.exists() and not force:
        raise SubmissionError(f"{folder} exists (use --force to replace it)")

    sub = submission_json(recs, name=name, author=author or _git_user(), github_id=github_id or "", blurb=blurb,
                          date=date, code_sha=code_sha, non_record=non_record, reasons=reasons,
                          technique_summary=technique_summary)
    out_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp_{folder.name}_", dir=out_root))
    try:
        if ship_wrapper:
            (tmp / "train_gpt.py").write_bytes(wrapper)
            (tmp / SOURCE_NAME).write_bytes(code_bytes)
        else:
            (tmp / "train_gpt.py").write_bytes(code_bytes)
            if wrapper is not None:
                (tmp / WRAPPER_NAME).write_bytes(wrapper)
        logs = {}
        for rec in recs:
            if rec.get("_log"):
                dst = f"train_seed{rec['seed']}.log"
                shutil.copyfile(rec["_log"], tmp / dst)
                logs[rec["seed"]] = dst
        (tmp / "submission.json").write_text(json.dumps(sub, indent=2) + "\n")
        if requirements.is_file():
            shutil.copyfile(requirements, tmp / "requirements.txt")
        files = {"wrapper": wrapper is not None, "ship_wrapper": ship_wrapper,
                 "requirements": requirements.is_file()}
        (tmp / "README.md").write_text(readme(recs, sub, logs, reasons, files))
        if runlib.sha256_file(tmp / (SOURCE_NAME if ship_wrapper else "train_gpt.py")) != code_sha:
            raise SubmissionError("copied source does not match its sha256")
        os.chmod(tmp, 0o755)
        if folder.exists():
            old = out_root / f".old_{folder.name}_{os.getpid()}"
            os.rename(folder, old)
            os.rename(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def submission_json(recs, *, name, author, github_id, blurb, date, code_sha, non_record, reasons,
                    technique_summary=None) -> dict:
    finals = [runlib.final_stage(r) for r in recs]
    losses = [f[1] for f in finals]
    bpbs = [f[2] for f in finals]
    # Records report the population std over seeds (ddof=0; PR #1855: 0.00090 bpb over 3 seeds).
    ml, sl = runlib.mean_std(losses, ddof=0)
    mb, sb = runlib.mean_std(bpbs, ddof=0)
    sizes = [runlib.artifact_bytes(r) for r in recs]
    seed_results = {}
    for r, f in zip(recs, finals):
        sr = {"val_loss": f[1], "val_bpb": f[2], "artifact_bytes": runlib.artifact_bytes(r),
              "steps": runlib.get(r, "train", "steps"), "step_avg_ms": runlib.get(r, "train", "step_avg_ms"),
              "eval_time_s": runlib.eval_time_s(r), "final_stage": f[0]}
        pre = runlib.get(r, "stages", "prequant", "val_bpb")
        post = runlib.get(r, "stages", "quantized", "val_bpb")
        if pre is not None:
            sr["pre_quant_val_bpb"] = pre
        if post is not None:
            sr["post_quant_val_bpb"] = post
        seed_results[str(r["seed"])] = sr
    steps = [runlib.get(r, "train", "steps") for r in recs]
    steps = [s for s in steps if s is not None]
    savg = [runlib.get(r, "train", "step_avg_ms") for r in recs]
    savg = [s for s in savg if s is not None]
    versions = recs[0].get("versions") or {}
    hw = sorted({runlib.hardware(r) for r in recs})
    ttt_modes = sorted({str(runlib.get(r, "compliance", "ttt_mode")) for r in recs
                        if runlib.get(r, "compliance", "ttt_mode") is not None})
    tph = [runlib.get(r, "compliance", "train_plus_hessian_s") for r in recs]
    ets = [runlib.eval_time_s(r) for r in recs]

    def all_true(vals):
        return bool(vals) and all(v is True for v in vals)

    compliance = {
        "train_under_600s": all(runlib.get(r, "train", "budget_compliant") is True for r in recs)
        and all(t is None or float(t) <= runlib.TRAIN_BUDGET_S for t in tph),
        "artifact_under_16mb": all(s is not None and s <= runlib.ARTIFACT_LIMIT_BYTES for s in sizes),
        "eval_under_600s": all(e is not None and e <= runlib.EVAL_BUDGET_S for e in ets),
        "full_validation": all_true([runlib.get(r, "compliance", "full_validation") for r in recs]),
        # train_gpt.py implements TTT only score-first (design.md contract); ttt_mode is "none" or the TTT stage.
        "score_first_ttt": bool(ttt_modes) and all(m in ("none", "off") or "ttt" in m or "score" in m
                                                   for m in ttt_modes),
        "ttt_mode": ttt_modes[0] if len(ttt_modes) == 1 else ttt_modes,
        "calibration_source": sorted({str(runlib.get(r, "compliance", "calibration_source"))
                                      for r in recs if runlib.get(r, "compliance", "calibration_source")}),
        "no_val_data_during_training": all(runlib.get(r, "compliance", "val_docs_in_train") == 0 for r in recs),
        "val_docs_in_train_max": max((runlib.get(r, "compliance", "val_docs_in_train") or 0 for r in recs), default=0),
        "canonical_split": all_true([runlib.get(r, "compliance", "canonical_split") for r in recs]),
        "train_shards": sorted({runlib.get(r, "compliance", "train_shards") for r in recs} - {None}),
        "three_seeds": len(recs) >= 3,
        "train_plus_hessian_s_max": max((float(t) for t in tph if t is not None), default=None),
        "eval_time_s_max": max((e for e in ets if e is not None), default=None),
        "code_sha256": code_sha,
    }
    sub = {
        "author": author, "github_id": github_id, "name": name, "blurb": blurb, "date": date,
        "track": "non_record_16mb" if non_record else "10min_16mb",
        "non_record": bool(non_record),
        "val_loss": ml, "val_bpb": mb, "val_loss_std": sl, "val_bpb_std": sb,
        "seeds": [r["seed"] for r in recs],
        "seed_results": seed_results,
        "comparison_baseline_bpb": LEADERBOARD_BPB,
        "delta_vs_leaderboard_bpb": mb - LEADERBOARD_BPB,
        "delta_vs_leaderboard_nats": ml - LEADERBOARD_NATS,
        "artifact_bytes_mean": sum(sizes) / len(sizes),
        "artifact_bytes_max": max(sizes),
        "bytes_total": max(sizes),
        "bytes_code": max(int(runlib.get(r, "artifact", "code_bytes", default=0)) for r in recs),
        "train_steps_mean": sum(steps) / len(steps) if steps else None,
        "step_avg_ms_mean": sum(savg) / len(savg) if savg else None,
        "hardware": hw[0] if len(hw) == 1 else hw,
        "pytorch_version": versions.get("torch"),
        "cuda_version": versions.get("cuda"),
        "flash_attn_version": versions.get("flash_attn") or versions.get("flash_attn_3"),
        "preset": recs[0].get("preset"),
        "technique_summary": technique_summary or blurb,
        "compliance": compliance,
    }
    if non_record:
        sub["non_record_reasons"] = list(reasons)
    return sub


def _overrides_union(recs):
    """{var: [values in seed order, deduplicated]} over all runs, identity vars excluded."""
    out = {}
    for r in recs:
        for k, v in runlib.overrides(r).items():
            out.setdefault(k, [])
            if v not in out[k]:
                out[k].append(v)
    for k in out:   # a var set in some runs only: the others ran the preset value
        if any(k not in runlib.overrides(r) for r in recs):
            out[k].append("(preset default in some runs)")
    return dict(sorted(out.items()))


def readme(recs, sub, logs, reasons, files) -> str:
    L = []
    title = sub["name"] + (" (non-record)" if sub["non_record"] else "")
    L += [f"# {title}", ""]
    if sub["non_record"]:
        L += ["**Non-record submission**: these runs do not meet the record rules:", ""]
        L += [f"- {r}" for r in reasons] + [""]
    if sub["blurb"]:
        L += [sub["blurb"], ""]
    L += [f"**val_bpb {sub['val_bpb']:.8f} ± {sub['val_bpb_std']:.8f}** · val_loss {sub['val_loss']:.8f} ± "
          f"{sub['val_loss_std']:.8f} nats (mean ± population std over {len(recs)} seed"
          f"{'s' if len(recs) != 1 else ''}) · artifact ≤ {sub['artifact_bytes_max']:,} bytes · "
          f"hardware {sub['hardware']}", ""]
    L += [f"Delta vs the leaderboard record ({LEADERBOARD_BPB} bpb): {sub['delta_vs_leaderboard_bpb']:+.5f} bpb / "
          f"{sub['delta_vs_leaderboard_nats']:+.5f} nats.", ""]
    # per-seed table
    stages = runlib.stage_names(recs)
    headers = ["seed", "steps", "step_avg_ms", "train_time_s"] + stages + ["val_loss", "val_bpb",
                                                                           "artifact_bytes", "eval_time_s"]
    rows = []
    for r in recs:
        fin = runlib.final_stage(r)
        ttm = runlib.get(r, "train", "train_time_ms")
        rows.append([r["seed"], runlib.fmt(runlib.get(r, "train", "steps")),
                     runlib.fmt(runlib.get(r, "train", "step_avg_ms"), 2),
                     runlib.fmt(ttm / 1000.0 if ttm is not None else None, 1)]
                    + [runlib.fmt(runlib.get(r, "stages", st, "val_bpb"), 8) for st in stages]
                    + [f"{fin[1]:.8f}", f"{fin[2]:.8f}", runlib.fmt(runlib.artifact_bytes(r)),
                       runlib.fmt(runlib.eval_time_s(r), 1)])
    L += ["## Results", "", f"Final stage: `{runlib.final_stage(recs[0])[0]}`; val_bpb per eval stage.", "",
          runlib.md_table(headers, rows), "",
          f"Mean: val_loss {sub['val_loss']:.8f} ± {sub['val_loss_std']:.8f}, "
          f"val_bpb {sub['val_bpb']:.8f} ± {sub['val_bpb_std']:.8f} (population std, as in the records).", ""]
    if len(recs) >= 2:
        try:
            import significance as sig
            res = sig.analyse(sig.Sample("this", values=[runlib.final_stage(r)[1] for r in recs]),
                              sig.Sample("PR #1855", values=sig.SOTA_VAL_LOSS))
            L += [f"Significance vs the PR #1855 record (one-sided Welch, val_loss): challenge test "
                  f"(≥ {res['challenge']['margin']} nats) p = {res['challenge']['p']:.4g}; plain improvement "
                  f"p = {res['plain']['p']:.4g}. Verdict: {res['verdict']}", ""]
        except Exception as e:  # informative only
            L += [f"(significance not computed: {e})", ""]
    # config
    ov = _overrides_union(recs)
    L += ["## Configuration", "", f"Preset `{sub['preset']}` of `train_gpt.py`"
          + (" with these env overrides (union over seeds):" if ov else " with no env overrides."), ""]
    if ov:
        L += [runlib.md_table(["env var", "value"], [[f"`{k}`", ", ".join(v)] for k, v in ov.items()]), ""]
    ws = runlib.get(recs[0], "world_size", default=8)
    env = " ".join([f"PRESET={sub['preset']}"] + [f"{k}={v[0]}" for k, v in ov.items() if len(v) == 1])
    L += ["Reproduce (one line per seed):", "", "```bash"]
    for r in recs:
        L.append(f"{env} SEED={r['seed']} torchrun --standalone --nproc_per_node={ws} train_gpt.py")
    L += ["```", ""]
    # compliance
    c = sub["compliance"]

    def mark(v):
        return "yes" if v is True else ("no" if v is False else str(v))
    L += ["## Compliance", "",
          f"- training + Hessian collection ≤ 600 s: {mark(c['train_under_600s'])} "
          f"(max {runlib.fmt(c['train_plus_hessian_s_max'], 1)} s)",
          f"- artifact ≤ 16,000,000 bytes: {mark(c['artifact_under_16mb'])} (max {sub['artifact_bytes_max']:,}; "
          f"code {sub['bytes_code']:,} bytes)",
          f"- evaluation ≤ 600 s: {mark(c['eval_under_600s'])} (max {runlib.fmt(c['eval_time_s_max'], 1)} s)",
          f"- full validation set scored: {mark(c['full_validation'])}",
          f"- validation documents in the training shards: {c['val_docs_in_train_max']} (none found: "
          f"{mark(c['no_val_data_during_training'])}); canonical split: {mark(c['canonical_split'])} "
          f"(train shards {', '.join(map(str, c['train_shards'])) or '?'})",
          f"- TTT mode: {c['ttt_mode']} (score-first: {mark(c['score_first_ttt'])})",
          f"- GPTQ calibration source: {', '.join(c['calibration_source']) or '?'}",
          f"- three seeds: {mark(c['three_seeds'])} ({', '.join(str(s) for s in sub['seeds'])})",
          f"- code sha256: `{c['code_sha256']}` (shipped `train_gpt.py`, same as in every run record)", ""]
    # files
    L += ["## Files", ""]
    if files["ship_wrapper"]:
        L += [f"- `train_gpt.py`: the counted code ({sub['bytes_code']:,} bytes), a self-extracting lzma+base85 "
              f"wrapper of `{SOURCE_NAME}`",
              f"- `{SOURCE_NAME}`: the readable source that produced these runs (sha256 above)"]
    else:
        L.append("- `train_gpt.py`: the code that produced these runs (sha256 above)")
        if files["wrapper"]:
            L.append(f"- `{WRAPPER_NAME}`: the self-extracting lzma+base85 wrapper of `train_gpt.py` whose "
                     f"{sub['bytes_code']:,} bytes are the counted code size")
    L += [*[f"- `{logs[s]}`: log of seed {s}" for s in sub["seeds"] if s in logs],
          "- `submission.json`: results in the challenge schema"]
    if files["requirements"]:
        L.append("- `requirements.txt`: Python dependencies")
    versions = recs[0].get("versions") or {}
    if versions:
        L += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items()))]
    L.append("")
    return "\n".join(L)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", nargs="+", help="one finished run directory per seed")
    ap.add_argument("--name", required=True, help="submission name (folder: <date>_<name>)")
    ap.add_argument("--author", default=None, help="default: git config user.name")
    ap.add_argument("--github-id", default="")
    ap.add_argument("--blurb", default="")
    ap.add_argument("--technique-summary", default=None, help="default: the blurb")
    ap.add_argument("--date", default=None, help="YYYY-MM-DD; default: date of the latest run")
    ap.add_argument("--code", default=None, help="code to ship; default: repo-root train_gpt.py")
    ap.add_argument("--out-root", default=None, help="default: <repo>/submissions")
    ap.add_argument("--requirements", default=None, help="default: <repo>/requirements.txt (copied if present)")
    ap.add_argument("--non-record", action="store_true",
                    help="package runs that break a record rule, labelled non-record")
    ap.add_argument("--force", action="store_true", help="replace an existing folder of the same name")
    ap.add_argument("--ship-wrapper", action="store_true",
                    help=f"ship the runs' {WRAPPER_NAME} (the counted code) as train_gpt.py and the readable "
                         f"source as {SOURCE_NAME}")
    args = ap.parse_args(argv)
    try:
        folder = build(args.run_dirs, args.name, author=args.author, github_id=args.github_id, blurb=args.blurb,
                       date=args.date, code=args.code, out_root=args.out_root, non_record=args.non_record,
                       requirements=args.requirements, force=args.force, technique_summary=args.technique_summary,
                       ship_wrapper=args.ship_wrapper)
    except SubmissionError as e:
        print(f"make_submission: refused: {e}", file=sys.stderr)
        return 1
    sub = json.loads((folder / "submission.json").read_text())
    print(f"wrote {folder}{' (non-record)' if sub['non_record'] else ''}: val_bpb {sub['val_bpb']:.8f} ± "
          f"{sub['val_bpb_std']:.8f} over seeds {sub['seeds']}, artifact max {sub['artifact_bytes_max']:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
