import math

import pytest
import torch

from conftest import HANG_TIMEOUT_S, T, randomize, tiny_hp


def _correlated(n_rows=64, n_cols=96, n_samples=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n_cols, n_cols, generator=g) * 0.3 + torch.eye(n_cols)
    X = torch.randn(n_samples, n_cols, generator=g) @ mix
    X[:, :8] *= 6.0  # a few high-energy inputs
    W = torch.randn(n_rows, n_cols, generator=g) * 0.05
    return W, X.T @ X / n_samples


def test_gptq_beats_round_to_nearest():
    W, H = _correlated()
    for bits in (4, 6):
        s = T.sdclip_scales(W, 12.0, bits)
        rtn = T.rtn_quantize(W, s, bits).float() * s[:, None]
        gq = T.gptq_quantize(W, H, s, bits).float() * s[:, None]
        assert T.hessian_weighted_error(W, gq, H) < 0.8 * T.hessian_weighted_error(W, rtn, H)


def test_gptq_codes_in_range_and_dequant_exact():
    W, H = _correlated()
    s = T.sdclip_scales(W, 11.5, 6)
    q = T.gptq_quantize(W, H, s, 6)
    assert q.dtype == torch.int8 and q.abs().max() <= 31
    e = T.QEntry("gptq", tuple(W.shape), "float32", q=q, scale=s.half(), bits=6)
    assert torch.equal(T.dequantize_entry(e, 64), q.float() * s.half().float()[:, None])
    assert torch.equal(T.rtn_quantize(T.dequantize_entry(e, 64), s, 6), q)  # integers survive exactly


def test_dead_columns_are_zeroed():
    W, H = _correlated()
    H[5, :] = 0
    H[:, 5] = 0
    q = T.gptq_quantize(W, H, T.sdclip_scales(W, 12.0, 6), 6)
    assert q[:, 5].abs().sum() == 0


def _stats(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"name": f"blocks.{i}.{'mlp.fc' if i % 2 else 'attn.c_q'}.weight", "numel": int(1000 * (1 + i % 3)),
             "h_mean": float(torch.rand(1, generator=g)) * 10 ** (i % 4), "row_var": 1e-3 * (1 + i),
             "base_sigma": 11.5 if i % 2 else 13.0} for i in range(n)]


def test_adaptive_offset_hits_target_and_orders_by_sensitivity():
    hp = tiny_hp()
    st = _stats()
    sig, _ = T.adaptive_clip_sigmas(st, hp)
    w = torch.tensor([s["numel"] for s in st], dtype=torch.float64)
    target = float((w * torch.tensor([math.log(s["base_sigma"]) for s in st], dtype=torch.float64)).sum() / w.sum())
    got = float((w * torch.tensor([math.log(sig[s["name"]]) for s in st], dtype=torch.float64)).sum() / w.sum())
    assert abs(got - target) < 1e-6
    sens = {s["name"]: s["h_mean"] * s["row_var"] for s in st}
    names = sorted(sens, key=sens.get)
    vals = [sig[n] for n in names]
    assert all(a >= b - 1e-12 for a, b in zip(vals, vals[1:]))  # more sensitive -> smaller sigma
    assert vals[0] > vals[-1] and all(hp.adaptive_clip_min - 1e-9 <= v <= hp.adaptive_clip_max + 1e-9 for v in vals)


def test_lqer_reduces_error_of_touched_tensors():
    W, H = _correlated(128, 128)
    W = W + 0.2 * torch.randn(128, 4) @ torch.randn(4, 128)  # low-rank structure in the weights
    s = T.sdclip_scales(W, 6.0, 4)
    q = T.gptq_quantize(W, H, s, 4)
    base = q.float() * s[:, None]
    f = T.lqer_factors(W - base, 4, 64)
    assert f["lqA"].min() >= -2 and f["lqA"].max() <= 1 and f["lqB"].min() >= -8 and f["lqB"].max() <= 7
    assert (W - base - T.lqer_dequant(f, 64)).norm() < (W - base).norm()


def _quantized_tiny(clip="fixed", seed=0, **over):
    hp = tiny_hp(CLIP_MODE=clip, **over)
    m = randomize(T.GPT(hp, 1), seed=seed, scale=0.05)
    g = torch.Generator().manual_seed(seed)
    hess = {}
    for name, t in m.state_dict().items():
        if T.quant_kind(name, t, hp) == "gptq":
            X = torch.randn(512, t.shape[1], generator=g)
            hess[name] = X.T @ X / 512
    return hp, m, hess


def test_quantize_state_routes_and_round_trips():
    hp, m, hess = _quantized_tiny()
    entries, table = T.quantize_state(m.state_dict(), hess, hp, log=lambda *_: None)
    kinds = {n: e.kind for n, e in entries.items()}
    assert kinds["blocks.0.attn.attn_gate_w"] == "int8_row" and kinds["blocks.0.attn_scale"] == "fp16"
    assert kinds["blocks.0.mlp.fc.weight"] == "gptq" and entries["tok_emb.weight"].bits == hp.embed_bits
    assert sum(e.lqer is not None for e in entries.values()) == hp.lqer_top_k
    assert {r["name"] for r in table} == {n for n, k in kinds.items() if k == "gptq"}
    deq = T.dequantize_state(entries, hp.lqer_asym_group)
    for k, v in m.state_dict().items():
        assert deq[k].shape == v.shape and (deq[k] - v).abs().max() < 0.05


@pytest.mark.parametrize("compressor", sorted(T.COMPRESSORS) + ["rans"])
def test_container_round_trip_bit_exact(compressor):
    hp, m, hess = _quantized_tiny()
    entries, _ = T.quantize_state(m.state_dict(), hess, hp, log=lambda *_: None)
    cfg = T.model_config_for_artifact(hp, 1, True)
    blob = T.pack_artifact(entries, cfg, compressor)
    assert blob == T.pack_artifact(entries, cfg, compressor)  # deterministic
    back, cfg2 = T.unpack_artifact(blob)
    assert cfg2 == cfg and set(back) == set(entries)
    for n, e in entries.items():
        b = back[n]
        for attr in ("q", "scale", "data"):
            x, y = getattr(e, attr), getattr(b, attr)
            assert (x is None and y is None) or (x.dtype == y.dtype and torch.equal(x, y)), (n, attr)
        assert (e.lqer is None) == (b.lqer is None)
        if e.lqer:
            assert all(torch.equal(e.lqer[k], b.lqer[k]) for k in e.lqer)
    model = T.model_from_artifact(blob, hp, torch.device("cpu"), "sdpa")
    deq = T.dequantize_state(entries, hp.lqer_asym_group)
    assert all(torch.equal(model.state_dict()[k], deq[k]) for k in deq) and model.looping


def test_row_steps_lie_on_the_stored_grid():
    """sdclip_scales rounds k*std/R to the nearest point of a 2^(1/SCALE_GRID_STEPS) grid (half a step away at most, as
    fp16), and the container stores grid indices: far fewer bytes than fp16 steps, read back to the bit."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(4096, 64, generator=g) * torch.exp(torch.randn(4096, 1, generator=g) * 0.4) * 0.02
    s = T.sdclip_scales(W, 12.85, 6)
    exact = 12.85 * W.std(dim=1) / 31
    assert (s / exact).log2().abs().max() <= 0.5 / T.SCALE_GRID_STEPS + 1e-3
    e = torch.round(torch.log2(s) * T.SCALE_GRID_STEPS)
    assert torch.equal(T.grid_scales(e, T.SCALE_GRID_STEPS).float(), s)
    q = T.rtn_quantize(W, s, 6)
    on_grid = T.QEntry("gptq", tuple(W.shape), "float32", q=q, scale=s.half(), bits=6)
    off_grid = T.QEntry("gptq", tuple(W.shape), "float32", q=q, scale=exact.half(), bits=6)  # e.g. older code
    zero_row = s.half().clone()
    zero_row[0] = 0  # on the grid everywhere else, but log2(0) has no index: the whole tensor stays fp16
    with_zero = T.QEntry("gptq", tuple(W.shape), "float32", q=q, scale=zero_row, bits=6)
    wide_s = T.grid_scales(e + torch.round(torch.randn(4096, generator=g) * 20), T.SCALE_GRID_STEPS)
    wide = T.QEntry("gptq", tuple(W.shape), "float32", q=q, scale=wide_s, bits=6)  # beyond STEP_HALF_RANGE
    import json, struct, zlib
    sizes, where = {}, {}
    for label, entry in (("grid", on_grid), ("fp16", off_grid), ("zero", with_zero), ("wide", wide)):
        for compressor in ("zstd", "rans"):
            blob = T.pack_artifact({"blocks.0.mlp.fc.weight": entry}, {}, compressor)
            back = T.unpack_artifact(blob)[0]["blocks.0.mlp.fc.weight"]
            assert back.scale.dtype == torch.float16 and torch.equal(back.scale, entry.scale), label
            assert torch.equal(back.q, q)
            hlen = struct.unpack("<HII", blob[4:14])[1]
            rec = json.loads(zlib.decompress(blob[14: 14 + hlen]))["tensors"][0]
            where[label, compressor] = "coder" if "step_median" in rec else \
                [k for k in ("scale_e", "scale") if k in rec["parts"]][0]
            sizes[label, compressor] = len(blob)
    assert where == {("grid", "zstd"): "scale_e", ("grid", "rans"): "coder", ("fp16", "zstd"): "scale",
                     ("fp16", "rans"): "scale", ("zero", "zstd"): "scale", ("zero", "rans"): "scale",
                     ("wide", "zstd"): "scale_e", ("wide", "rans"): "scale_e"}
    # 4,096 steps: ~10 bits each as fp16 after lzma, ~3-4 as grid indices, fewer still in the weight coder
    assert sizes["fp16", "rans"] - sizes["grid", "zstd"] > 4096 * 4 / 8, sizes
    assert sizes["grid", "rans"] < sizes["wide", "rans"] - 4096 * 2 / 8, sizes


def test_grid_resolution_travels_in_the_header(monkeypatch):
    """An artifact written with another grid resolution reads back to the bit: the loader takes the resolution
    from the header, not from its own constant."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(512, 64, generator=g) * torch.exp(torch.randn(512, 1, generator=g) * 0.4) * 0.02
    other = T.SCALE_GRID_STEPS * 2
    monkeypatch.setattr(T, "SCALE_GRID_STEPS", other)
    monkeypatch.setattr(T, "SCALE_GRID_RANGE", (-24 * other, 15 * other))
    s = T.sdclip_scales(W, 12.85, 6)
    entry = T.QEntry("gptq", tuple(W.shape), "float32", q=T.rtn_quantize(W, s, 6), scale=s.half(), bits=6)
    blob = T.pack_artifact({"blocks.0.mlp.fc.weight": entry}, {}, "rans")
    monkeypatch.undo()
    back = T.unpack_artifact(blob)[0]["blocks.0.mlp.fc.weight"]
    assert torch.equal(back.scale, entry.scale)
    odd = torch.round(torch.log2(s) * other) % 2 == 1  # points of the finer grid that the coarser one lacks
    assert odd.any()


def test_passthrough_tensors_keep_fewer_mantissa_bits():
    """Passthrough tensors (but the residual mixes and tiny tensors) are rounded to PASSTHROUGH_MANTISSA_BITS
    (nearest, never to inf) and stored without the zero bits: fewer bytes than fp16, read back to the bit; fp16 data
    that was not rounded is stored whole."""
    import json, struct, zlib
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 4096, generator=g) * torch.exp(torch.randn(2, 1, generator=g))
    hp = T.Hyperparameters.from_env({"PRESET": "cpu_smoke"})
    entry = T.direct_entry("skip_weights", t, hp)
    assert entry.kind == "fp16"
    assert torch.equal(T.direct_entry("blocks.0.resid_mix", t, hp).data, t.half())  # too sensitive: kept whole
    small = t[0, : T.PASSTHROUGH_ROUND_MIN_NUMEL - 1]  # e.g. q gains, lambdas: nothing to save, kept whole
    assert torch.equal(T.direct_entry("blocks.0.attn.q_gain", small, hp).data, small.half())
    normal = t.abs() > 2 ** -14  # fp16 normals: at most half a unit of the kept last bit (+ fp16's own rounding)
    err = (entry.data.float() - t).abs() / t.abs()
    assert err[normal].max() <= 2.0 ** -(T.PASSTHROUGH_MANTISSA_BITS + 1) + 2.0 ** -11
    assert err[normal].max() > 2.0 ** -(T.PASSTHROUGH_MANTISSA_BITS + 2), "rounded, not left at 10 bits"
    assert torch.equal(T.round_mantissa(torch.tensor([65504.0, -65504.0])).abs(), torch.tensor([65280.0] * 2).half())
    whole = T.QEntry("fp16", tuple(t.shape), "float32", data=t.half())
    sizes = {}
    for label, e in (("rounded", entry), ("whole", whole)):
        blob = T.pack_artifact({"skip_weights": e}, {}, "rans")
        back = T.unpack_artifact(blob)[0]["skip_weights"]
        assert back.data.dtype == torch.float16 and torch.equal(back.data.view(torch.int16), e.data.view(torch.int16))
        hlen = struct.unpack("<HII", blob[4:14])[1]
        parts = json.loads(zlib.decompress(blob[14: 14 + hlen]))["tensors"][0]["parts"]
        assert ("data_r" in parts) == (label == "rounded") and ("data" in parts) == (label == "whole"), label
        sizes[label] = len(blob)
    # 8,192 values: the 3 dropped bits are incompressible noise, so at least ~2.5 bits a value are saved
    assert sizes["whole"] - sizes["rounded"] > 8192 * 2.5 / 8, sizes


@pytest.mark.parametrize("compressor", ["zstd", "rans"])
def test_corruption_and_truncation_are_detected(compressor):
    hp, m, hess = _quantized_tiny()
    entries, _ = T.quantize_state(m.state_dict(), hess, hp, log=lambda *_: None)
    blob = T.pack_artifact(entries, T.model_config_for_artifact(hp, 1, False), compressor)
    for bad in (blob[:-1], blob[: len(blob) // 2], blob[:10], b"XXXX" + blob[4:], blob + b"\0"):
        with pytest.raises(T.ArtifactError):
            T.unpack_artifact(bad)
    for pos in (20, len(blob) // 2, len(blob) - 3):
        flipped = bytearray(blob)
        flipped[pos] ^= 0x10
        with pytest.raises(T.ArtifactError):
            T.unpack_artifact(bytes(flipped))


def test_weight_coder_stream_of_another_coder_version_is_an_artifact_error():
    """Bytes intact (every CRC passes) but decoded under another context model, as when the coder changed
    between writing and reading: a clear ArtifactError, never an IndexError from inside the decoder."""
    import json, struct, zlib
    hp, m, hess = _quantized_tiny()
    entries, _ = T.quantize_state(m.state_dict(), hess, hp, log=lambda *_: None)
    blob = T.pack_artifact(entries, T.model_config_for_artifact(hp, 1, False), "rans")
    version, hlen, _ = struct.unpack("<HII", blob[4:14])
    header = json.loads(zlib.decompress(blob[14: 14 + hlen]))
    for change in ({"class_range": 1}, {"prev_clip": 0}, {"refresh": 3}, {"halve_at": 64}):
        h = dict(header, coder={**header["coder"], **change})
        hz = zlib.compress(json.dumps(h, sort_keys=True, separators=(",", ":")).encode(), 9)
        other = blob[:4] + struct.pack("<HII", version, len(hz), zlib.crc32(hz)) + hz + blob[14 + hlen:]
        with pytest.raises(T.ArtifactError):
            T.unpack_artifact(other)


def test_budget_mode_lands_just_under_target():
    hp, m, hess = _quantized_tiny("budget", MATRIX_BITS="6")
    cfg = T.model_config_for_artifact(hp, 1, False)
    size = lambda e: len(T.pack_artifact(e, cfg, "zstd"))
    fixed, _ = T.quantize_state(m.state_dict(), hess, tiny_hp(CLIP_MODE="fixed"), log=lambda *_: None)
    ref = size(fixed)
    for target in (int(ref * 0.93), int(ref * 1.05)):
        hp_t = tiny_hp(CLIP_MODE="budget", TARGET_ARTIFACT_BYTES=str(target))
        entries, _ = T.quantize_state(m.state_dict(), hess, hp_t, log=lambda *_: None, code_bytes=0,
                                      model_bytes_of=size)
        got = size(entries)
        assert target * 0.995 <= got <= target, (target, got)


def test_stream_report_against_entropy_bound():
    hp, m, hess = _quantized_tiny()
    entries, _ = T.quantize_state(m.state_dict(), hess, hp, log=lambda *_: None)
    from bench.quant_bench import stream_report
    rows = stream_report(entries, T.model_config_for_artifact(hp, 1, False), "zstd")
    assert rows and all(r["bytes"] > 0 and r["entropy_bytes"] > 0 for r in rows)


def test_code_wrapper_is_self_extracting(tmp_path):
    src = b"import sys\nprint('hello', __name__)\n" + b"# padding " * 500 + b"\n"
    wrapped, kind = T.shipped_code(src)
    assert kind == "lzma_wrapper" and len(wrapped) < len(src)
    p = tmp_path / "w.py"
    p.write_bytes(wrapped)
    import subprocess, sys
    out = subprocess.run([sys.executable, str(p)], capture_output=True, text=True).stdout
    assert out.strip() == "hello __main__"


def test_latin1_literal_reads_back_every_byte_sequence(tmp_path):
    """The wrapper's literal survives Python's tokenizer for every byte and for the sequences that need care:
    quotes that would close it, NUL before an octal digit, CR (turned into LF if left raw), backslashes."""
    import random, subprocess, sys
    rng = random.Random(0)
    cases = [bytes(range(256)), b"'", b"''", b"'''", b"x''''y'", b"\x00\x31\x00\x38\x00", b"\r\n\r",
             b"\\", b"\\'", b"\\\n", bytes(rng.randrange(256) for _ in range(4000))]
    for i, data in enumerate(cases):
        p = tmp_path / f"lit{i}.py"
        p.write_bytes(("#coding:latin1\nimport sys\nsys.stdout.buffer.write(" + T.latin1_literal(data) +
                       ".encode('l1'))\n").encode("latin-1"))
        assert subprocess.run([sys.executable, str(p)], capture_output=True).stdout == data, data[:16]
    quoted = T.latin1_literal(bytes(range(1, 256)) * 4)
    assert len(quoted) < 4 * 255 + 6 + 4 * 3, "only CR, backslash and doubled quotes may be escaped"


def test_shipped_train_gpt_wrapper_runs(tmp_path):
    import os, subprocess, sys
    wrapped, kind = T.shipped_code(T.code_source())
    assert kind == "lzma_wrapper" and len(wrapped) < len(T.code_source()) / 2
    p = tmp_path / "train_gpt.py"
    p.write_bytes(wrapped)
    r = subprocess.run([sys.executable, str(p)], env={**os.environ, "NUM_HEADS": "7"}, capture_output=True,
                       text=True, cwd=tmp_path, timeout=HANG_TIMEOUT_S)
    assert r.returncode == 2 and "must be divisible by NUM_HEADS=7" in r.stderr, r.stderr[-2000:]


def test_minified_source_renames_only_what_nothing_can_look_up():
    """Module-level functions and constants get short names; what a string, an attribute, a keyword, a class
    body or a Triton kernel could mean keeps its name; minifying the minified text changes nothing (a run of
    the shipped file counts the bytes it ships)."""
    src = b"""
import triton
LIMIT_BYTES = 10
SHOWN_NAME = 1
BLOCK = 4
class Record(NamedTuple):
    total_size: int
class BadInput(ValueError):
    pass
def helper_function(value, scale=LIMIT_BYTES):
    intermediate = value * scale + SHOWN_NAME
    return intermediate
@triton.jit
def kernel(x, n: tl.constexpr):
    return x + BLOCK
def main():
    counted = helper_function(3, scale=2)
    print(f"SHOWN_NAME={SHOWN_NAME}", counted, Record(5).total_size)
"""
    out = T.minify_source(src).decode()
    for gone in ("LIMIT_BYTES", "helper_function", "intermediate", "counted", "def main"):
        assert gone not in out, gone
    for kept in ("SHOWN_NAME=", "class Record", "total_size", "class BadInput", "BLOCK=4", "n:tl.constexpr",
                 "scale="):
        assert kept in out, kept
    assert T.minify_source(out.encode()).decode() == out
    real = T.minify_source(T.code_source())
    assert T.minify_source(real) == real and b"def minify_source" not in real


class _FakeLoader:
    def __init__(self, seed=0):
        self.g = torch.Generator().manual_seed(seed)

    def next_batch(self):
        ids = torch.randint(2, 1024, (2, 64), generator=self.g)
        ids[:, 0] = 1
        return ids, ids


def test_collect_hessians_covers_every_quantized_matrix(tmp_path):
    from conftest import cpu_runtime
    hp = tiny_hp()
    m = randomize(T.GPT(hp, 1), scale=0.05)
    m.looping = True
    H = T.collect_hessians(m, _FakeLoader(), 2, hp, cpu_runtime(tmp_path))
    sd = m.state_dict()
    needed = {n for n, t in sd.items() if t.ndim == 2 and not T.is_control_tensor(n)}
    assert needed <= set(H)
    for n in needed:
        assert H[n].shape == (sd[n].shape[1],) * 2 and torch.diag(H[n]).min() > 0, n
    assert H["blocks.0.attn.c_q.weight"] is H["blocks.0.attn.c_v.weight"]  # one input, collected once
    # the MLP up-projection's Hessian is X^T X of the MLP input
    captured = []
    hook = m.blocks[1].mlp.register_forward_hook(lambda mod, inp, out: captured.append(inp[0].reshape(-1, 64)))
    with torch.no_grad():
        ids, _ = _FakeLoader(1).next_batch()
        m.forward_hidden(ids)
    hook.remove()
    X = torch.cat(captured)
    H1 = T.collect_hessians(m, _FakeLoader(1), 1, hp, cpu_runtime(tmp_path))
    assert torch.allclose(H1["blocks.1.mlp.fc.weight"], X.T @ X, rtol=1e-4, atol=1e-4)
