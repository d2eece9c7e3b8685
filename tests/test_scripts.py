"""Tests of the tools in scripts/: significance, log_run, make_submission, summarize_runs, plot_runs,
sweep.sh / run_seeds.sh.  CPU only, no network, synthetic run directories in tmp_path."""
from __future__ import annotations

import base64
import hashlib
import json
import lzma
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
sys.path.insert(0, str(SCRIPTS))

import log_run  # noqa: E402
import make_submission  # noqa: E402
import runlib  # noqa: E402
import significance as sig  # noqa: E402
import summarize_runs  # noqa: E402
from conftest import HANG_TIMEOUT_S  # noqa: E402

FAKE_CODE = b"# fake train_gpt.py for tests\nprint('hello')\n" + b"x = 1\n" * 50
STAGE_BPB = {"prequant": 1.0640, "quantized": 1.0725, "quantized_sliding": 1.0700, "quantized_ttt_phased": 1.0599}


def run_script(name, *args, env=None, cwd=ROOT):
    return subprocess.run([sys.executable, str(SCRIPTS / name), *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=HANG_TIMEOUT_S)


def make_code(tmp_path, content=FAKE_CODE) -> Path:
    p = tmp_path / "train_gpt.py"
    p.write_bytes(content)
    return p


def make_run(root: Path, run_id: str, seed: int, code: bytes = FAKE_CODE, final_bpb: float = 1.0599,
             artifact_bytes: int = 15_897_259, budget_ok: bool = True, full_val: bool = True,
             final_stage: str | None = "quantized_ttt_phased", log_final: bool = True,
             overrides: dict | None = None, wrapper: bool = False) -> Path:
    """A realistic run directory (run_record.json + log.txt) as train_gpt.py writes it."""
    d = root / run_id
    d.mkdir(parents=True, exist_ok=True)
    sha = hashlib.sha256(code).hexdigest()
    ratio = 2.31944212 / 1.05989454            # nats per bpb of the SOTA seed-42 run
    stages = {}
    for st, bpb in STAGE_BPB.items():
        b = final_bpb + (bpb - 1.0599)
        stages[st] = {"val_loss": round(b * ratio, 8), "val_bpb": round(b, 8), "eval_time_ms": 12345.0,
                      "tokens": 47_851_520, "bytes": 151_000_000}
    ov = {"SEED": str(seed), "RUN_ID": run_id, **(overrides or {})}
    code_bytes = 31_999
    if wrapper:
        wrapped = ("import lzma,base64\n_PG_SOURCE=lzma.decompress(base64.b85decode('"
                   + base64.b85encode(lzma.compress(code)).decode() + "'))\nexec(_PG_SOURCE)\n").encode()
        (d / "train_gpt_shipped.py").write_bytes(wrapped)
        code_bytes = len(wrapped)
    rec = {
        "run_id": run_id, "seed": seed, "preset": "sota", "date": "2026-05-01 12:00:00",
        "config": {"preset": "sota", "seed": seed, "run_id": run_id, "artifact_dir": str(d), "matrix_lr": 0.026,
                   "val_max_tokens": 0 if full_val else 65536},
        "env_overrides": ov, "code_sha256": sha, "code_bytes_raw": len(code), "commit": "abcdef1234567890",
        "versions": {"python": "3.11.7", "torch": "2.9.1+cu128", "numpy": "2.1.0", "cuda": "12.8"},
        "device": "NVIDIA H100 80GB HBM3", "world_size": 8,
        "train": {"steps": 4945, "train_time_ms": 591_000.0, "step_avg_ms": 119.5, "tokens_per_s": 6.6e6,
                  "hessian_time_ms": 4700.0, "budget_s": 600.0, "budget_compliant": budget_ok,
                  "stop_reason": "wallclock_cap"},
        "stages": stages,
        "artifact": {"path": str(d / "final_model.ptz"), "artifact_bytes": artifact_bytes, "code_bytes": code_bytes,
                     "model_bytes": artifact_bytes - code_bytes, "limit": 16_000_000,
                     "bytes_left": 16_000_000 - artifact_bytes, "under_limit": artifact_bytes <= 16_000_000},
        "eval_time_s": 508.8,
        "compliance": {"train_plus_hessian_s": 595.7, "train_budget_s": 600.0, "eval_time_s": 508.8,
                       "eval_budget_s": 600.0, "artifact_under_limit": artifact_bytes <= 16_000_000,
                       "calibration_source": "training shards", "ttt_mode": "quantized_ttt_phased",
                       "tokens_scored": 47_851_520 if full_val else 65536, "val_tokens": 47_851_520,
                       "full_validation": full_val},
        "train_log": [{"step": s, "train_loss": 6.0 - s / 1000, "train_time_ms": s * 119.5} for s in (1, 500, 1000)],
        "val_log": [{"step": 4945, "val_loss": 2.35, "val_bpb": 1.0756, "train_time_ms": 591_000.0}],
        "clip_table": [{"name": "blocks.0.mlp.fc", "numel": 1_048_576, "h_mean": 1e-3, "row_var": 2e-4,
                        "sigma": 11.5, "bits": 6},
                       {"name": "tok_emb", "numel": 4_194_304, "h_mean": 5e-4, "row_var": 1e-4, "sigma": 14.0,
                        "bits": 7}],
    }
    if final_stage:
        rec["final"] = {"stage": final_stage, "val_loss": stages[final_stage]["val_loss"],
                        "val_bpb": stages[final_stage]["val_bpb"]}
    (d / "run_record.json").write_text(json.dumps(rec, indent=1))
    lines = ["Hyperparameters:", "  matrix_lr: 0.026", f"code_sha256:{sha}", "print(f'{stage} val_loss:{x}')"]
    lines += ["1/20000 train_loss: 9.0000 train_time: 0.0m tok/s: 1000"]
    if log_final:
        for st, v in stages.items():
            lines.append(f"{st} val_loss:{v['val_loss']:.8f} val_bpb:{v['val_bpb']:.8f} eval_time:12345ms")
        lines.append(f"artifact_bytes:{artifact_bytes} code_bytes:{code_bytes} "
                     f"model_bytes:{artifact_bytes - code_bytes} limit:16000000 bytes_left:{16_000_000 - artifact_bytes}")
        lines.append("total_eval_time:508.8s")
        if final_stage:
            f = rec["final"]
            lines.append(f"final {final_stage} val_loss:{f['val_loss']:.8f} val_bpb:{f['val_bpb']:.8f}")
    (d / "log.txt").write_text("\n".join(lines) + "\n")
    return d


# ---- t distribution and Welch test ----------------------------------------------------------

def _t_pdf(x, nu):
    c = math.exp(math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2)) / math.sqrt(nu * math.pi)
    return c * (1 + x * x / nu) ** (-(nu + 1) / 2)


def _t_cdf_numeric(t, nu, n=20000):
    """P(T <= t) = 0.5 + integral_0^t pdf (Simpson's rule): independent of the continued fraction."""
    if t == 0:
        return 0.5
    h = t / n
    s = _t_pdf(0, nu) + _t_pdf(t, nu)
    for i in range(1, n):
        s += (4 if i % 2 else 2) * _t_pdf(i * h, nu)
    return 0.5 + s * h / 3


@pytest.mark.parametrize("nu", [1, 2, 2.66, 3, 4.5, 10, 30, 200])
@pytest.mark.parametrize("t", [-6.0, -2.5, -0.7, 0.0, 0.3, 1.9, 4.0])
def test_t_cdf_matches_numerical_integration(t, nu):
    assert sig.t_cdf(t, nu) == pytest.approx(_t_cdf_numeric(t, nu), abs=1e-9)


def test_t_cdf_closed_forms_and_table():
    for t in (-10, -1, 0.5, 3):
        assert sig.t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)        # Cauchy
        assert sig.t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    # textbook critical values
    assert sig.t_cdf(2.228, 10) == pytest.approx(0.975, abs=1e-4)
    assert sig.t_cdf(6.965, 2) == pytest.approx(0.99, abs=1e-4)
    assert sig.t_cdf(4.604, 4) == pytest.approx(0.995, abs=1e-4)
    assert sig.t_ppf(0.975, 10) == pytest.approx(2.228, abs=1e-3)
    assert sig.t_cdf(1.96, float("inf")) == pytest.approx(0.975, abs=1e-4)
    assert sig.betainc(2.0, 3.0, 0.4) == pytest.approx(0.5248, abs=1e-12)   # 1 - sum_{k<2} C(4,k)...


def test_welch_textbook_example():
    # Welch's t-test example 1 (Wikipedia): t = -2.46, dof = 25.0, two-sided p = 0.021.
    a = [27.5, 21.0, 19.0, 23.6, 17.0, 17.9, 16.9, 20.1, 21.9, 22.6, 23.1, 19.6, 19.0, 21.7, 21.4]
    b = [27.1, 22.0, 20.8, 23.4, 23.4, 23.5, 25.8, 22.0, 24.8, 20.2, 21.9, 22.1, 22.9, 20.5, 24.4]
    t, dof, p = sig.welch_one_sided(a, b)
    assert t == pytest.approx(-2.46, abs=0.005)
    assert dof == pytest.approx(25.0, abs=0.05)
    assert 2 * p == pytest.approx(0.021, abs=0.0005)
    # a margin shifts the null: H0 mean_a >= mean_b - margin
    t2, dof2, p2 = sig.welch_one_sided(a, b, margin=0.5)
    assert dof2 == pytest.approx(dof) and t2 > t and p2 > p


def test_welch_independent_formula():
    a, b = [2.300, 2.303, 2.301], [2.31944212, 2.32239991, 2.32423994]
    ma, mb = sum(a) / 3, sum(b) / 3
    va = sum((x - ma) ** 2 for x in a) / 2
    vb = sum((x - mb) ** 2 for x in b) / 2
    se = math.sqrt(va / 3 + vb / 3)
    dof = (va / 3 + vb / 3) ** 2 / ((va / 3) ** 2 / 2 + (vb / 3) ** 2 / 2)
    t = (ma - mb + 0.005) / se
    got = sig.welch_one_sided(a, b, margin=0.005)
    assert got[0] == pytest.approx(t) and got[1] == pytest.approx(dof)
    assert got[2] == pytest.approx(_t_cdf_numeric(t, dof), abs=1e-8)


def test_welch_edge_cases():
    t, dof, p = sig.welch_one_sided([1.0, 1.2, 1.1], [2.0])      # fixed reference value: one-sample test
    assert dof == pytest.approx(2.0) and p < 0.05
    assert sig.welch_one_sided([1.0, 1.0], [2.0, 2.0])[2] == 0.0
    assert sig.welch_one_sided([3.0, 3.0], [2.0, 2.0])[2] == 1.0
    with pytest.raises(ValueError):
        sig.welch_one_sided([1.0], [2.0])


def test_record_std_convention():
    # The PR #1855 record reports 0.00090 bpb / 0.00198 nats over 3 seeds: the population std.
    assert runlib.mean_std(sig.SOTA_VAL_BPB, ddof=0)[1] == pytest.approx(0.00090, abs=5e-6)
    assert runlib.mean_std(sig.SOTA_VAL_LOSS, ddof=0)[1] == pytest.approx(0.00198, abs=5e-6)


# ---- significance CLI ------------------------------------------------------------------------

def test_significance_cli_verdicts(tmp_path):
    r = run_script("significance.py", "--new", "2.305", "2.307", "2.306", "--ref", "sota")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1].startswith("verdict: RECORD")
    r = run_script("significance.py", "--new", "2.315", "2.320", "2.318", "--ref", "sota")
    assert r.stdout.strip().splitlines()[-1].startswith("verdict: NOT A RECORD")
    assert "plain improvement" in r.stdout
    r = run_script("significance.py", "--new", "2.325", "2.320", "2.318", "--ref",
                   "mean=2.32202732,std=0.00198,n=3,ddof=0")
    assert r.stdout.strip().splitlines()[-1].startswith("verdict: NO SIGNIFICANT IMPROVEMENT")
    r = run_script("significance.py", "--new", "abc", "--ref", "sota")
    assert r.returncode == 2 and "cannot read" in r.stderr


def test_significance_from_runs_and_submission(tmp_path):
    runs = [make_run(tmp_path / "runs", f"s{s}", s, final_bpb=b) for s, b in ((42, 1.050), (0, 1.0505), (7, 1.0502))]
    r = run_script("significance.py", "--runs", *runs, "--ref", "sota", "--json")
    res = json.loads(r.stdout)
    assert res["new"]["n"] == 3 and res["record"] is True
    vals = [runlib.load_run(d)["final"]["val_loss"] for d in runs]
    assert res["new"]["values"] == pytest.approx(vals)
    sub = {"seeds": [1, 2, 3], "val_loss": 2.322, "val_loss_std": 0.00198,
           "seed_results": {"1": {"val_loss": 2.3194}, "2": {"val_loss": 2.3224}, "3": {"val_loss": 2.3242}}}
    (tmp_path / "submission.json").write_text(json.dumps(sub))
    s = sig.parse_sample([str(tmp_path / "submission.json")])
    assert s.n == 3 and s.values == [2.3194, 2.3224, 2.3242]
    del sub["seed_results"]
    (tmp_path / "submission.json").write_text(json.dumps(sub))
    s = sig.parse_sample([str(tmp_path / "submission.json")])
    assert s.n == 3 and s.std == pytest.approx(0.00198 * math.sqrt(1.5))
    # a folder of runs is expanded
    assert sig.parse_sample([str(tmp_path / "runs")]).n == 3


# ---- log_run ----------------------------------------------------------------------------------

def test_log_run_appends_and_refuses_duplicates(tmp_path):
    md = tmp_path / "runs.md"
    a = make_run(tmp_path, "run_a", 42, overrides={"MATRIX_LR": "0.03"})
    b = make_run(tmp_path, "run_b", 0)
    r = run_script("log_run.py", a, "--runs-md", md, "--learned", "lr 0.03 | worse")
    assert r.returncode == 0, r.stderr
    text = md.read_text()
    assert text.startswith("# Runs") and "| date | run id |" in text
    assert "run_a" in text and "MATRIX_LR=0.03" in text and "RUN_ID=" not in text and "lr 0.03 \\| worse" in text
    assert "1.05990" in text and "15897259" in text and "8xNVIDIA H100" in text
    r = run_script("log_run.py", a, "--runs-md", md)
    assert r.returncode == 1 and "already in" in r.stderr
    assert md.read_text() == text
    assert log_run.append_run(b, md, "second")
    rows = [line for line in md.read_text().splitlines() if line.startswith("| 2026")]
    assert len(rows) == 2 and len(log_run._split_row(rows[0])) == len(log_run.COLUMNS)
    assert log_run.logged_run_ids(md.read_text()) == {"run_a", "run_b"}
    with pytest.raises(log_run.LogError, match="already"):
        log_run.append_run(b, md)


def test_log_run_refuses_unfinished(tmp_path):
    d = make_run(tmp_path, "unfinished", 1)
    (d / "run_record.json").unlink()
    with pytest.raises(log_run.LogError, match="did not finish"):
        log_run.append_run(d, tmp_path / "runs.md")
    assert not (tmp_path / "runs.md").exists()


# ---- make_submission --------------------------------------------------------------------------

def _two_runs(tmp_path, **kw):
    return [make_run(tmp_path / "runs", "r42", 42, final_bpb=1.0599, **kw),
            make_run(tmp_path / "runs", "r0", 0, final_bpb=1.0612, artifact_bytes=15_900_947, **kw)]


def test_make_submission_two_seeds(tmp_path):
    code = make_code(tmp_path)
    runs = _two_runs(tmp_path, overrides={"MATRIX_LR": "0.03"})
    out = tmp_path / "subs"
    (tmp_path / "requirements.txt").write_text("torch\nnumpy\n")
    r = run_script("make_submission.py", *runs, "--name", "my record", "--author", "A B", "--github-id", "ab",
                   "--blurb", "test blurb", "--code", code, "--out-root", out, "--requirements",
                   tmp_path / "requirements.txt")
    assert r.returncode == 0, r.stderr
    folder = out / "2026-05-01_my_record"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "requirements.txt", "submission.json",
                                                       "train_gpt.py", "train_seed0.log", "train_seed42.log"]
    assert (folder / "train_gpt.py").read_bytes() == FAKE_CODE
    assert (folder / "train_seed42.log").read_text() == (runs[0] / "log.txt").read_text()
    sub = json.loads((folder / "submission.json").read_text())
    for key in ("author", "github_id", "name", "blurb", "date", "track", "val_loss", "val_bpb", "val_loss_std",
                "val_bpb_std", "seeds", "seed_results", "artifact_bytes_mean", "artifact_bytes_max", "bytes_total",
                "bytes_code", "hardware", "pytorch_version", "compliance"):
        assert key in sub, key
    assert sub["track"] == "10min_16mb" and sub["non_record"] is False and sub["date"] == "2026-05-01"
    assert sub["seeds"] == [42, 0]
    assert sub["val_bpb"] == pytest.approx((1.0599 + 1.0612) / 2)
    assert sub["val_bpb_std"] == pytest.approx(0.00065)                  # population std
    assert sub["artifact_bytes_max"] == 15_900_947 and sub["bytes_total"] == 15_900_947
    assert sub["bytes_code"] == 31_999 and sub["hardware"] == "8xNVIDIA H100 80GB HBM3"
    assert sub["seed_results"]["42"]["val_bpb"] == pytest.approx(1.0599)
    assert sub["seed_results"]["0"]["steps"] == 4945
    assert sub["compliance"]["train_under_600s"] and sub["compliance"]["full_validation"]
    assert sub["compliance"]["three_seeds"] is False and sub["compliance"]["score_first_ttt"] is True
    readme = (folder / "README.md").read_text()
    assert "| `MATRIX_LR` | 0.03 |" in readme and "SEED=42" in readme and "non-record" not in readme.lower()
    assert "1.05990000" in readme and "## Compliance" in readme
    assert not [p for p in out.iterdir() if p.name.startswith(".")]     # no temp dir left behind
    # same name again: refused unless --force
    r = run_script("make_submission.py", *runs, "--name", "my record", "--code", code, "--out-root", out)
    assert r.returncode == 1 and "exists" in r.stderr
    r = run_script("make_submission.py", *runs, "--name", "my record", "--code", code, "--out-root", out, "--force")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["2026-05-01_my_record"]


def test_make_submission_ships_wrapper(tmp_path):
    code = make_code(tmp_path)
    runs = _two_runs(tmp_path, wrapper=True)
    folder = make_submission.build(runs, "w", code=code, out_root=tmp_path / "subs", author="x")
    assert (folder / "train_gpt.py").read_bytes() == FAKE_CODE
    assert make_submission.unwrap((folder / "train_gpt_shipped.py").read_bytes()) == FAKE_CODE
    folder = make_submission.build(runs, "w2", code=code, out_root=tmp_path / "subs", author="x", ship_wrapper=True)
    assert (folder / "train_gpt_source.py").read_bytes() == FAKE_CODE
    assert make_submission.unwrap((folder / "train_gpt.py").read_bytes()) == FAKE_CODE


@pytest.mark.parametrize("case,match", [
    ("sha", "differs from the code to ship"),
    ("size", "16,000,000"),
    ("budget", "not budget-compliant"),
    ("final", "no final result"),
    ("final_line", "log has no final line"),
    ("partial_val", "full validation"),
])
def test_make_submission_refusals(tmp_path, case, match):
    code = make_code(tmp_path)
    kw = {"sha": {"code": b"other code"}, "size": {"artifact_bytes": 16_000_001}, "budget": {"budget_ok": False},
          "final": {"final_stage": None}, "final_line": {"log_final": False},
          "partial_val": {"full_val": False}}[case]
    runs = [make_run(tmp_path / "runs", "ok", 42), make_run(tmp_path / "runs", "bad", 0, **kw)]
    out = tmp_path / "subs"
    r = run_script("make_submission.py", *runs, "--name", "n", "--code", code, "--out-root", out)
    assert r.returncode == 1
    assert "refused" in r.stderr and match in r.stderr
    assert not out.exists() or not list(out.iterdir())
    # --non-record packages rule breakers, but never code that did not produce the runs
    r = run_script("make_submission.py", *runs, "--name", "n", "--code", code, "--out-root", out, "--non-record")
    if case == "sha":
        assert r.returncode == 1 and "cannot package" in r.stderr
        return
    assert r.returncode == 0, r.stderr
    folder = out / "2026-05-01_n"
    sub = json.loads((folder / "submission.json").read_text())
    assert sub["non_record"] is True and sub["track"] == "non_record_16mb"
    assert any(match in reason for reason in sub["non_record_reasons"])
    assert "Non-record submission" in (folder / "README.md").read_text()


def test_make_submission_other_fatal_cases(tmp_path):
    code = make_code(tmp_path)
    runs = [make_run(tmp_path / "runs", "a", 42), make_run(tmp_path / "runs", "b", 42)]
    with pytest.raises(make_submission.SubmissionError, match="same seed"):
        make_submission.build(runs, "n", code=code, out_root=tmp_path / "subs", non_record=True)
    with pytest.raises(make_submission.SubmissionError, match="not a run directory"):
        make_submission.build([tmp_path / "nope"], "n", code=code, out_root=tmp_path / "subs")


# ---- summarize_runs ---------------------------------------------------------------------------

def test_summarize_runs(tmp_path):
    runs = _two_runs(tmp_path)
    partial = tmp_path / "runs" / "killed"
    partial.mkdir()
    (partial / "log.txt").write_text("quantized val_loss:2.40000000 val_bpb:1.10000000 eval_time:100ms\n")
    r = run_script("summarize_runs.py", tmp_path / "runs")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["run_id", "seed", "steps", "prequant"]
    assert "quantized_ttt_phased" in lines[0] and "artifact_bytes" in lines[0]
    row = next(line for line in lines if line.startswith("r42"))
    assert "4945" in row and "1.059900" in row and "15897259" in row
    assert "killed*" in out and "1.100000" in out
    assert "mean over 3 runs" in out
    md = summarize_runs.summarize([runs[0]], markdown=True)
    assert md.startswith("| run_id | seed |")
    r = run_script("summarize_runs.py", tmp_path / "missing")
    assert r.returncode == 1 and "missing" in r.stdout


def test_parse_log_real_format():
    text = "\n".join([
        "code_sha256:" + "ab" * 32,
        "  f'{self.stage} val_loss:{self.val_loss:.8f}'",
        "100/400 val_loss: 3.1000 val_bpb: 1.9000",
        "quantized val_loss:2.50000000 val_bpb:1.50000000 eval_time:1200ms",
        "quantized_ttt_phased val_loss:2.40000000 val_bpb:1.40000000 eval_time:5000ms",
        "artifact_bytes:1500000 code_bytes:30000 model_bytes:1470000 limit:16000000 bytes_left:14500000",
        "total_eval_time:7.5s",
        "final quantized_ttt_phased val_loss:2.40000000 val_bpb:1.40000000",
    ])
    p = runlib.parse_log(text)
    assert p["code_sha256"] == "ab" * 32
    assert p["stage_order"] == ["quantized", "quantized_ttt_phased"]
    assert p["stages"]["quantized_ttt_phased"]["eval_time_ms"] == 5000
    assert p["final"]["stage"] == "quantized_ttt_phased" and p["final"]["val_bpb"] == 1.4
    assert p["artifact"] == {"artifact_bytes": 1500000, "code_bytes": 30000, "model_bytes": 1470000}
    assert p["total_eval_time_s"] == 7.5


# ---- plot_runs --------------------------------------------------------------------------------

def test_plot_runs(tmp_path):
    pytest.importorskip("matplotlib")
    runs = _two_runs(tmp_path)
    out = tmp_path / "plots"
    r = run_script("plot_runs.py", *runs, "--out", out)
    assert r.returncode == 0, r.stderr
    names = {p.name for p in out.iterdir()}
    assert {"train_loss_vs_step.png", "train_loss_vs_time.png", "stages_bpb.png"} <= names
    assert any(n.startswith("clip_sigma") for n in names)
    assert all((out / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names)


def test_plot_runs_without_matplotlib(tmp_path):
    # A stub that makes `import matplotlib` fail: the script must exit 2 with an install hint.
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "matplotlib.py").write_text("raise ImportError('no matplotlib here')\n")
    runs = _two_runs(tmp_path)
    r = run_script("plot_runs.py", *runs, "--out", tmp_path / "plots",
                   env={"PYTHONPATH": str(stub)})
    assert r.returncode == 2 and "pip install matplotlib" in r.stderr


# ---- shell loops ------------------------------------------------------------------------------

def _fake_trainer(tmp_path) -> Path:
    """Stands in for torchrun + train_gpt.py: writes a run record into $ARTIFACT_DIR."""
    p = tmp_path / "fake_train.py"
    p.write_text(f"""
import os, sys
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from pathlib import Path
import test_scripts as t
d = Path(os.environ["ARTIFACT_DIR"])
seed = int(os.environ.get("SEED", "1337"))
lr = float(os.environ.get("MATRIX_LR", "0.026"))
extra = {{"MATRIX_LR": os.environ["MATRIX_LR"]}} if "MATRIX_LR" in os.environ else {{}}
extra["PASS_THROUGH"] = os.environ.get("PASS_THROUGH", "")
t.make_run(d.parent, d.name, seed, final_bpb=1.06 + lr, overrides=extra)
print("fake run", d.name, os.environ["RUN_ID"])
""")
    return p


@pytest.mark.skipif(sys.platform == "win32", reason="bash scripts")
def test_sweep_and_seed_scripts(tmp_path):
    fake = _fake_trainer(tmp_path)
    env = {"TRAIN_CMD": f"{sys.executable} {fake}", "RUNS_ROOT": str(tmp_path / "runs"), "PYTHON": sys.executable,
           "PASS_THROUGH": "yes"}
    r = subprocess.run(["bash", str(SCRIPTS / "sweep.sh")], capture_output=True, text=True, timeout=HANG_TIMEOUT_S,
                       env={**os.environ, **env, "SWEEP_VAR": "MATRIX_LR", "SWEEP_VALUES": "0.02 0.03"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "sweep_matrix_lr_0.02" in r.stdout and "sweep_matrix_lr_0.03" in r.stdout
    assert "1.080000" in r.stdout and "1.090000" in r.stdout
    rec = json.loads((tmp_path / "runs" / "sweep_matrix_lr_0.03" / "run_record.json").read_text())
    assert rec["env_overrides"]["PASS_THROUGH"] == "yes" and rec["run_id"] == "sweep_matrix_lr_0.03"
    r = subprocess.run(["bash", str(SCRIPTS / "run_seeds.sh")], capture_output=True, text=True, timeout=HANG_TIMEOUT_S,
                       env={**os.environ, **env, "NAME": "exp", "SEEDS": "42 0"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "runs" / "exp_seed42" / "run_record.json").exists()
    assert "make_submission.py" in r.stdout and "significance.py" in r.stdout
    assert "mean over 2 runs" in r.stdout
