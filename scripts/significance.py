#!/usr/bin/env python3
"""One-sided Welch t-test of per-seed results against a reference (lower is better).

The challenge rule (spec §11.7): a new record must improve on the current one by at least
0.005 nats of val_loss at p < 0.01.  We test
    H0: mean_new >= mean_ref - margin     against     H1: mean_new < mean_ref - margin
with Welch's t statistic and Welch–Satterthwaite degrees of freedom, once with the challenge
margin (0.005 nats, alpha 0.01) and once as a plain improvement test (margin 0, alpha 0.25).

The t distribution CDF is computed here (regularized incomplete beta by continued fraction);
no scipy needed.

Inputs (each side):  run directories (--runs / --new DIR), a submission.json (seed_results, else
its mean/std over its seeds), a run_record.json, plain numbers, `mean=M,std=S,n=N[,ddof=D]`
(std is the sample std, ddof=1, unless ddof=0 is given), or `sota` (the PR #1855 record's three
post-TTT val_loss values, spec §10).

Examples:
  python scripts/significance.py --runs runs/x_seed42 runs/x_seed0 runs/x_seed1234 --ref sota
  python scripts/significance.py --new 2.305 2.307 2.306 --ref submissions/old/submission.json
  python scripts/significance.py --new 2.305 2.307 2.306 --ref mean=2.3220,std=0.0020,n=3,ddof=0
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import runlib  # noqa: E402

CHALLENGE_MARGIN = 0.005   # nats
CHALLENGE_ALPHA = 0.01
PLAIN_ALPHA = 0.25
# Post-TTT val_loss (nats) and val_bpb of the PR #1855 record, seeds 42, 0, 1234 (spec §10).
SOTA_VAL_LOSS = [2.31944212, 2.32239991, 2.32423994]
SOTA_VAL_BPB = [1.05989454, 1.06124613, 1.06208695]


# ---- t distribution -----------------------------------------------------------------------

def _betacf(a: float, b: float, x: float, max_iter: int = 500, eps: float = 1e-15) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = 1.0
    d = 1.0 - qab * x / qap
    d = tiny if abs(d) < tiny else d
    d = 1.0 / d
    h = d
    for m in range(1, max_iter + 1):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))          # even step
        d = 1.0 + aa * d
        d = tiny if abs(d) < tiny else d
        c = 1.0 + aa / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))  # odd step
        d = 1.0 + aa * d
        d = tiny if abs(d) < tiny else d
        c = 1.0 + aa / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            return h
    return h  # converged to working precision for all arguments used here


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if a <= 0 or b <= 0:
        raise ValueError("betainc needs a, b > 0")
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, dof: float) -> float:
    """P(T <= t) for Student's t with `dof` > 0 degrees of freedom (dof = inf: the normal)."""
    if math.isnan(t) or math.isnan(dof):
        return float("nan")
    if dof <= 0:
        raise ValueError("dof must be > 0")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    if math.isinf(dof) or dof > 1e7:
        return 0.5 * math.erfc(-t / math.sqrt(2.0))
    x = dof / (dof + t * t)
    tail = 0.5 * betainc(dof / 2.0, 0.5, x)   # P(T > |t|)
    return 1.0 - tail if t > 0 else tail


def t_ppf(p: float, dof: float) -> float:
    """Inverse of t_cdf by bisection (for critical values in reports)."""
    if not 0.0 < p < 1.0:
        raise ValueError("p must be in (0, 1)")
    lo, hi = -1.0, 1.0
    while t_cdf(lo, dof) > p:
        lo *= 2.0
    while t_cdf(hi, dof) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, dof) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, abs(mid)):
            break
    return 0.5 * (lo + hi)


# ---- Welch test ---------------------------------------------------------------------------

def welch_from_stats(mean_a, var_a, n_a, mean_b, var_b, n_b, margin: float = 0.0):
    """One-sided Welch test of H0: mean_a >= mean_b - margin from summary statistics.

    var_* are sample variances (ddof=1).  A side with n = 1 contributes no variance and no
    degrees of freedom (a fixed reference value).  Returns (t, dof, p) with p = P(T <= t)."""
    if n_a < 1 or n_b < 1:
        raise ValueError("each side needs at least one value")
    if n_a < 2 and n_b < 2:
        raise ValueError("need at least two values on one side to estimate a variance")
    sa = var_a / n_a if n_a >= 2 else 0.0
    sb = var_b / n_b if n_b >= 2 else 0.0
    se2 = sa + sb
    diff = mean_a - (mean_b - margin)
    denom = (sa * sa / (n_a - 1) if n_a >= 2 else 0.0) + (sb * sb / (n_b - 1) if n_b >= 2 else 0.0)
    if se2 <= 0.0:   # no spread at all: the sign decides
        dof = float((n_a - 1 if n_a >= 2 else 0) + (n_b - 1 if n_b >= 2 else 0))
        if diff < 0:
            return float("-inf"), dof, 0.0
        if diff > 0:
            return float("inf"), dof, 1.0
        return float("nan"), dof, float("nan")
    dof = se2 * se2 / denom
    t = diff / math.sqrt(se2)
    return t, dof, t_cdf(t, dof)


def sample_stats(values):
    vals = [float(v) for v in values]
    n = len(vals)
    if n == 0:
        raise ValueError("no values")
    m = sum(vals) / n
    var = sum((v - m) ** 2 for v in vals) / (n - 1) if n >= 2 else 0.0
    return m, var, n


def welch_one_sided(a, b, margin: float = 0.0):
    """One-sided Welch t-test that sample `a` is lower than sample `b` by more than `margin`.

    H0: mean(a) >= mean(b) - margin;  H1: mean(a) < mean(b) - margin.
    Returns (t, dof, p); reject H0 when p < alpha.  A one-element `b` is a fixed reference."""
    ma, va, na = sample_stats(a)
    mb, vb, nb = sample_stats(b)
    return welch_from_stats(ma, va, na, mb, vb, nb, margin)


# ---- inputs -------------------------------------------------------------------------------

class Sample:
    """One side of the test: raw values, or summary statistics (mean, sample variance, n)."""

    def __init__(self, label, values=None, mean=None, var=None, n=None, seeds=None):
        self.label = label
        self.values = values
        self.seeds = seeds
        if values is not None:
            self.mean, self.var, self.n = sample_stats(values)
        else:
            self.mean, self.var, self.n = float(mean), float(var), int(n)

    @property
    def std(self):
        return math.sqrt(self.var)


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _from_submission(path: Path, data: dict, metric: str) -> Sample:
    sr = data.get("seed_results") or {}
    vals, seeds = [], []
    for seed, r in sr.items():
        if isinstance(r, dict) and r.get(metric) is not None:
            vals.append(float(r[metric]))
            seeds.append(seed)
    if vals:
        return Sample(str(path), values=vals, seeds=seeds)
    if data.get(metric) is None:
        raise ValueError(f"{path}: no {metric} in seed_results or at top level")
    n = len(data.get("seeds") or []) or 1
    std = data.get(f"{metric}_std")
    if n >= 2 and std is not None:
        # Records report the population std (ddof=0), e.g. PR #1855: 0.00198 nats over 3 seeds.
        var = float(std) ** 2 * n / (n - 1)
    else:
        var = 0.0
        n = 1 if std is None else n
    return Sample(str(path), mean=data[metric], var=var, n=n)


def _from_runs(dirs, metric: str, stage=None) -> Sample:
    vals, seeds = [], []
    for d in runlib.expand_run_dirs(dirs):
        rec = runlib.load_run(d)
        if stage:
            v = runlib.get(rec, "stages", stage, metric)
            if v is None:
                raise ValueError(f"{d}: no stage {stage!r} with {metric}")
        else:
            fin = runlib.final_stage(rec)
            if fin is None:
                raise ValueError(f"{d}: no final result (did the run finish?)")
            v = fin[1] if metric == "val_loss" else fin[2]
        vals.append(float(v))
        seeds.append(rec.get("seed", Path(d).name))
    if not vals:
        raise ValueError(f"no runs found in {dirs}")
    return Sample(" ".join(str(d) for d in dirs) if len(dirs) <= 1 else f"{len(vals)} runs", values=vals,
                  seeds=seeds)


def parse_sample(specs, metric: str = "val_loss", stage=None, label="") -> Sample:
    """A Sample from CLI tokens: numbers | run dirs | one .json | 'mean=..,std=..,n=..' | 'sota'."""
    specs = list(specs)
    if not specs:
        raise ValueError("empty sample")
    if len(specs) == 1 and specs[0].lower() in ("sota", "sota_1855", "pr1855"):
        vals = SOTA_VAL_LOSS if metric == "val_loss" else SOTA_VAL_BPB
        return Sample("PR #1855 record (spec §10)", values=list(vals), seeds=[42, 0, 1234])
    if len(specs) == 1 and "mean=" in specs[0]:
        kv = dict(part.split("=", 1) for part in specs[0].replace(" ", "").split(",") if part)
        try:
            mean, std, n = float(kv["mean"]), float(kv.get("std", 0.0)), int(kv.get("n", 1))
        except KeyError as e:
            raise ValueError(f"{specs[0]!r}: missing {e}") from None
        ddof = int(kv.get("ddof", 1))
        var = std * std * n / (n - ddof) if n > ddof else 0.0
        return Sample(label or specs[0], mean=mean, var=var, n=n)
    if all(_is_number(s) for s in specs):
        return Sample(label or "values", values=[float(s) for s in specs])
    if len(specs) == 1 and specs[0].endswith(".json") and Path(specs[0]).is_file():
        p = Path(specs[0])
        data = json.loads(p.read_text())
        if "seed_results" in data or "track" in data or "seeds" in data:
            return _from_submission(p, data, metric)
        return _from_runs([p.parent], metric, stage)   # a run_record.json
    if all(Path(s).exists() for s in specs):
        return _from_runs(specs, metric, stage)
    bad = [s for s in specs if not _is_number(s) and not Path(s).exists()]
    raise ValueError(f"cannot read {bad}: not a number, run directory, JSON file, 'mean=..,std=..,n=..' or 'sota'")


# ---- report -------------------------------------------------------------------------------

def analyse(new: Sample, ref: Sample, margin: float = CHALLENGE_MARGIN, alpha: float = CHALLENGE_ALPHA,
            plain_alpha: float = PLAIN_ALPHA) -> dict:
    t1, d1, p1 = welch_from_stats(new.mean, new.var, new.n, ref.mean, ref.var, ref.n, margin)
    t0, d0, p0 = welch_from_stats(new.mean, new.var, new.n, ref.mean, ref.var, ref.n, 0.0)
    record = bool(p1 < alpha)
    improved = bool(p0 < plain_alpha)
    delta = new.mean - ref.mean
    if record:
        verdict = (f"RECORD: mean improves by {-delta:.5f} (>= {margin} required) at p={p1:.4g} < {alpha}")
    elif improved:
        verdict = (f"NOT A RECORD (challenge test p={p1:.4g} >= {alpha}); plain improvement of {-delta:.5f} "
                   f"at p={p0:.4g} < {plain_alpha}")
    else:
        verdict = (f"NO SIGNIFICANT IMPROVEMENT: delta {delta:+.5f}, challenge p={p1:.4g}, plain p={p0:.4g} "
                   f">= {plain_alpha}")
    return {"new": {"mean": new.mean, "std": new.std, "n": new.n, "values": new.values},
            "ref": {"mean": ref.mean, "std": ref.std, "n": ref.n, "values": ref.values},
            "delta": delta,
            "challenge": {"margin": margin, "alpha": alpha, "t": t1, "dof": d1, "p": p1, "pass": record},
            "plain": {"margin": 0.0, "alpha": plain_alpha, "t": t0, "dof": d0, "p": p0, "pass": improved},
            "record": record, "improved": improved, "verdict": verdict}


def report(res: dict, new: Sample, ref: Sample, metric: str) -> str:
    def vals(s):
        return " ".join(f"{v:.6f}" for v in s.values) if s.values is not None else "(summary statistics)"
    lines = [f"metric: {metric} (lower is better; std = sample std, ddof=1)",
             runlib.text_table(["sample", "n", "mean", "std", "values"],
                               [["new: " + new.label, new.n, f"{new.mean:.6f}", f"{new.std:.6f}", vals(new)],
                                ["ref: " + ref.label, ref.n, f"{ref.mean:.6f}", f"{ref.std:.6f}", vals(ref)]],
                               align_right=[False, True, True, True, False]),
             f"delta (new - ref): {res['delta']:+.6f}",
             ""]
    rows = []
    for key, name in (("challenge", "challenge: new < ref - margin"), ("plain", "plain: new < ref")):
        r = res[key]
        rows.append([name, f"{r['margin']:g}", f"{r['t']:.3f}", f"{r['dof']:.2f}", f"{r['p']:.4g}",
                     f"{r['alpha']:g}", "PASS" if r["pass"] else "fail"])
    lines.append(runlib.text_table(["one-sided Welch test", "margin", "t", "dof", "p", "alpha", "result"], rows))
    lines.append("")
    lines.append("verdict: " + res["verdict"])
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", metavar="DIR", help="run directories of the new result (one per seed)")
    ap.add_argument("--new", nargs="+", metavar="X", help="new result: numbers, run dirs, submission.json, mean=..")
    ap.add_argument("--ref", nargs="+", metavar="X", default=None,
                    help="reference: numbers, submission.json, run dirs, 'mean=M,std=S,n=N[,ddof=0]' or 'sota'")
    ap.add_argument("--ref-mean", type=float)
    ap.add_argument("--ref-std", type=float, default=0.0)
    ap.add_argument("--ref-n", type=int, default=1)
    ap.add_argument("--metric", default="val_loss", choices=["val_loss", "val_bpb"],
                    help="the challenge rule is on val_loss (nats); default %(default)s")
    ap.add_argument("--stage", default=None, help="stage to read from run dirs (default: the run's final stage)")
    ap.add_argument("--margin", type=float, default=CHALLENGE_MARGIN)
    ap.add_argument("--alpha", type=float, default=CHALLENGE_ALPHA)
    ap.add_argument("--plain-alpha", type=float, default=PLAIN_ALPHA)
    ap.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    args = ap.parse_args(argv)
    try:
        new_specs = (args.runs or []) + (args.new or [])
        if not new_specs:
            ap.error("give the new result with --runs or --new")
        if args.runs and args.new:
            ap.error("use either --runs or --new")
        new = parse_sample(new_specs, args.metric, args.stage, label="new")
        if args.ref_mean is not None:
            ref = Sample(f"mean={args.ref_mean}", mean=args.ref_mean, var=args.ref_std ** 2, n=args.ref_n)
        elif args.ref:
            ref = parse_sample(args.ref, args.metric, args.stage, label="ref")
        else:
            ap.error("give the reference with --ref (numbers, submission.json, mean=..,std=..,n=.., sota) "
                     "or --ref-mean/--ref-std/--ref-n")
        if args.metric != "val_loss" and args.margin == CHALLENGE_MARGIN:
            print(f"note: the challenge margin {CHALLENGE_MARGIN} is in nats of val_loss; applied to {args.metric} "
                  "as given", file=sys.stderr)
        res = analyse(new, ref, args.margin, args.alpha, args.plain_alpha)
    except (ValueError, runlib.RunError, json.JSONDecodeError) as e:
        print(f"significance: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(report(res, new, ref, args.metric))
    return 0


if __name__ == "__main__":
    sys.exit(main())
