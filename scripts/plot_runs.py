#!/usr/bin/env python3
"""Plots of one or several runs (PNG files in --out):

  train_loss_vs_step.png   training loss vs step, validation points overlaid
  train_loss_vs_time.png   training loss vs training time (minutes), validation points overlaid
  val_bpb_vs_step.png      validation bpb during training (when the runs logged any)
  stages_bpb.png           each eval stage's val_bpb (grouped bars, one group per stage)
  clip_sigma_<run>.png     the per-tensor clip sigma table (bars coloured by bit width)

  python scripts/plot_runs.py runs/a runs/b --out plots/

matplotlib is an optional extra (pip install matplotlib); without it this exits with status 2.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import runlib  # noqa: E402


def _label(rec):
    return str(rec.get("run_id") or Path(rec["_dir"]).name)


def _series(log, x, y):
    pts = [(p.get(x), p.get(y)) for p in log or [] if isinstance(p, dict)]
    pts = [(a, b) for a, b in pts if a is not None and b is not None]
    return [a for a, _ in pts], [b for _, b in pts]


def plot_loss(plt, recs, out: Path, xkey: str, xlabel: str, fname: str, scale: float = 1.0):
    fig, ax = plt.subplots(figsize=(9, 5))
    drawn = False
    for i, r in enumerate(recs):
        color = f"C{i % 10}"
        xs, ys = _series(r.get("train_log"), xkey, "train_loss")
        if xs:
            ax.plot([x * scale for x in xs], ys, color=color, lw=1.2, label=f"{_label(r)} train")
            drawn = True
        xs, ys = _series(r.get("val_log"), xkey, "val_loss")
        if xs:
            ax.plot([x * scale for x in xs], ys, "o", color=color, ms=5, label=f"{_label(r)} val")
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, out / fname)


def plot_val_bpb(plt, recs, out: Path):
    fig, ax = plt.subplots(figsize=(9, 5))
    drawn = False
    for i, r in enumerate(recs):
        xs, ys = _series(r.get("val_log"), "step", "val_bpb")
        if xs:
            ax.plot(xs, ys, "o-", color=f"C{i % 10}", ms=4, label=_label(r))
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel("val_bpb")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, out / "val_bpb_vs_step.png")


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_stages(plt, recs, out: Path):
    stages = runlib.stage_names(recs)
    if not stages:
        return None
    n = len(recs)
    width = 0.8 / max(n, 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(stages) + 0.4 * n), 5))
    vals_all = []
    for i, r in enumerate(recs):
        xs, ys = [], []
        for j, st in enumerate(stages):
            v = runlib.get(r, "stages", st, "val_bpb")
            if v is not None:
                xs.append(j - 0.4 + width * (i + 0.5))
                ys.append(float(v))
        vals_all += ys
        bars = ax.bar(xs, ys, width=width, color=f"C{i % 10}", label=_label(r))
        if n <= 4:
            for b, y in zip(bars, ys):
                ax.annotate(f"{y:.4f}", (b.get_x() + b.get_width() / 2, y), ha="center", va="bottom", fontsize=7,
                            rotation=90 if n > 2 else 0)
    if vals_all:   # zoom: differences between stages are in the third decimal
        lo, hi = min(vals_all), max(vals_all)
        pad = max((hi - lo) * 0.3, 0.002)
        ax.set_ylim(lo - pad, hi + pad * 1.5)
    ax.set_xticks(range(len(stages)))
    ax.set_xticklabels(stages, rotation=15)
    ax.set_ylabel("val_bpb (lower is better)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, out / "stages_bpb.png")


def plot_clip(plt, rec, out: Path):
    table = [row for row in rec.get("clip_table") or [] if isinstance(row, dict) and row.get("sigma") is not None]
    if not table:
        return None
    names = [str(row.get("name", "?")) for row in table]
    sig = [float(row["sigma"]) for row in table]
    bits = [row.get("bits") for row in table]
    bit_values = sorted({b for b in bits if b is not None})
    colors = {b: f"C{k % 10}" for k, b in enumerate(bit_values)}
    fig, ax = plt.subplots(figsize=(max(7, 0.28 * len(names) + 2), 5))
    ax.bar(range(len(names)), sig, color=[colors.get(b, "gray") for b in bits])
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=90, fontsize=6 if len(names) > 30 else 8)
    ax.set_ylabel("clip sigma")
    ax.set_title(f"{_label(rec)}: per-tensor clip sigma")
    for b in bit_values:
        ax.bar([], [], color=colors[b], label=f"{b} bits")
    if bit_values:
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", _label(rec))
    return _save(plt, fig, out / f"clip_sigma_{safe}.png")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", help="run directories or folders of run directories")
    ap.add_argument("--out", default="plots", help="output folder (default %(default)s)")
    args = ap.parse_args(argv)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        print(f"plot_runs: matplotlib is not importable ({e}); it is an optional extra: "
              f"{sys.executable} -m pip install matplotlib", file=sys.stderr)
        return 2
    recs = []
    for p in args.paths:
        try:
            for d in runlib.expand_run_dirs([p]):
                recs.append(runlib.load_run(d))
        except runlib.RunError as e:
            print(f"plot_runs: skipped: {e}", file=sys.stderr)
    if not recs:
        print("plot_runs: no runs to plot", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    made = [plot_loss(plt, recs, out, "step", "step", "train_loss_vs_step.png"),
            plot_loss(plt, recs, out, "train_time_ms", "training time (min)", "train_loss_vs_time.png",
                      scale=1 / 60000.0),
            plot_val_bpb(plt, recs, out),
            plot_stages(plt, recs, out)]
    made += [plot_clip(plt, r, out) for r in recs]
    made = [m for m in made if m is not None]
    for m in made:
        print(f"wrote {m}")
    if not made:
        print("plot_runs: the runs hold nothing to plot (no train_log, val_log, stages or clip_table)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
