"""The comparison benches (bench/arch_bench.py, quant_bench.py, ttt_bench.py) run end to end in --smoke mode
(tiny model, ~3 s of training, small validation slice), print their table and write their JSON."""
import json
import os
import subprocess
import sys

import pytest

from conftest import HANG_TIMEOUT_S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_bench(script, tmp_path, sample, *extra):
    out = tmp_path / f"{script}.json"
    env = {**os.environ, "DATA_PATH": sample["DATA_PATH"], "TOKENIZER_PATH": sample["TOKENIZER_PATH"]}
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", f"{script}.py"), "--smoke", "--json", str(out),
                        *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout, json.loads(out.read_text())


def test_arch_bench_smoke(tmp_path, sample):
    out, rec = run_bench("arch_bench", tmp_path, sample, "--seconds", "2")
    assert "ratio sota/baseline" in out and "| arm" in out
    assert [r["preset"] for r in rec["rows"]] == ["cpu_smoke", "baseline"]
    assert all(r["steps"] >= 1 and r["val_bpb"] > 0 for r in rec["rows"])
    assert rec["ratio_sota_over_baseline"]["val_bpb"] > 0


def test_quant_bench_smoke(tmp_path, sample):
    pre = tmp_path / "pre.pt"
    out, rec = run_bench("quant_bench", tmp_path, sample, "--bits", "6", "--compressors", "zstd,raw",
                         "--quant-min-numel", "1024", "--save-prequant", str(pre))
    assert "| clip mode" in out.replace("| matrix bits | clip mode", "| clip mode") and "code/entropy" in out
    assert [r["mode"] for r in rec["clip"]] == ["fixed", "adaptive", "budget"]
    fixed, budget = rec["clip"][0], rec["clip"][2]
    assert budget["model_bytes"] <= fixed["model_bytes"]  # budget lands at or just under the fixed bytes
    assert {r["compressor"] for r in rec["compressors"]} == {"zstd", "raw"}
    assert pre.is_file()


@pytest.mark.parametrize("reuse", [False])
def test_ttt_bench_smoke(tmp_path, sample, reuse):
    out, rec = run_bench("ttt_bench", tmp_path, sample)
    assert "| eval mode" in out
    modes = [r["mode"] for r in rec["rows"]]
    assert modes[0] == "plain" and modes[1].startswith("sliding") and "phased" in modes[3]
    assert len({r["tokens"] for r in rec["rows"]}) == 1  # every mode scores the same slice


def test_compress_bench_smoke(tmp_path, sample):
    out, rec = run_bench("compress_bench", tmp_path, sample, "--skip-lrzip")
    rows = {r["coder"]: r["bytes"] for r in rec[0]["rows"]}
    assert "| weight coder: classes + code above + difference rows (default) |" in out
    coder = [b for k, b in rows.items() if k.startswith("weight coder")]
    assert len(coder) == 8 and all(b > 0 for b in coder)  # every variant round-tripped (asserted in the bench)
    assert rows["zstd-22 (transposed codes)"] > 0 and rec[0]["role_bits"]["mlp.fc"] > 0


def test_remainder_bench_grid_smoke(tmp_path, sample):
    """A coarser grid takes fewer index bytes; the clip rows move the error both ways (the exchange rate)."""
    out, rec = run_bench("remainder_bench", tmp_path, sample, "--grids", "32,8")
    rows = {(r["steps_per_octave"], r["clip"]): r for r in rec["rows"]}
    assert "| steps/octave" in out and len(rows) == 6
    assert rows[8, "as set"]["index_bytes"] < rows[32, "as set"]["index_bytes"]
    assert rows[32, "sigmas +half step"]["rel_error"] > rows[32, "as set"]["rel_error"] > \
        rows[32, "sigmas -half step"]["rel_error"]
    assert abs(rows[8, "as set"]["rel_error"] / rows[32, "as set"]["rel_error"] - 1) < 0.01  # same quantizer


def test_remainder_bench_mantissa_smoke(tmp_path, sample):
    """Each passthrough group and all of them rounded; fewer bits move the score at least as far for 'all'."""
    out, rec = run_bench("remainder_bench", tmp_path, sample, "--mantissa", "7,2")
    rows = {(r["mantissa_bits"], r["group"]): r for r in rec["rows"]}
    assert "| mantissa bits" in out and (7, "all") in rows and (2, "blocks.N.resid_mix") in rows
    assert rows[7, "all"]["values"] == sum(r["values"] for (m, g), r in rows.items() if m == 7 and g != "all")
    assert abs(rows[2, "all"]["val_bpb"] - rows[2, "all"]["ref_val_bpb"]) > 0  # 2 bits: the model did change


def test_frontier_bench_smoke(tmp_path, sample):
    out, rec = run_bench("frontier_bench", tmp_path, sample, "--part", "quant")
    assert "| quantization arm" in out
    arms = rec["quant"]
    assert arms[0]["arm"].startswith("baseline") and arms[-1]["arm"].startswith("frontier") and len(arms) == 3
    target = arms[0]["target"]
    assert all(r["model_bytes"] <= target * 1.01 and r["val_bpb"] > 0 for r in arms)  # fitted to equal bytes


def test_code_bytes_smoke(tmp_path, sample):
    """Every section of train_gpt.py is found and costs bytes; the sizes are those the run ships; the CM estimate
    of the first 4 KB lands near LZMA's size for it (a model that mispredicts would cost far more)."""
    out, rec = run_bench("code_bytes", tmp_path, sample)
    from conftest import T
    src = open(os.path.join(ROOT, "train_gpt.py"), "rb").read()
    assert rec["shipped"] == len(T.shipped_code(src)[0]) and rec["minified"] == len(T.minify_source(src))
    sections = [r["section"] for r in rec["sections"]]
    assert sections[:3] == ["Header", "Config", "Runtime"] and sections[-1] == "Main"
    assert all(r["bytes"] > 0 for r in rec["sections"][1:]) and rec["long_strings"]["count"] > 50
    cm = rec["cm"]
    assert cm["input"] == 4096 and 0.5 * cm["lzma"] < cm["ideal_bytes"] < cm["lzma"] * 1.2
