#!/usr/bin/env python3
"""Coders for the quantized weights, side by side on the same codes (issue 14).

    python bench/compress_bench.py runs/<id>/final_model.ptz [more artifacts] [--json out.json]
    python bench/compress_bench.py --sota-timing          # encode/decode seconds at the sota shapes, one core
    python bench/compress_bench.py --smoke                 # tiny synthetic codes, seconds (used by the tests)

For each artifact (any compressor: its GPTQ codes are unpacked first), one table of bytes and seconds for the
codes (all int6/int7 GPTQ tensors): order-0 entropy per tensor, zstd-22 and lzma-9e and brotli-11 on the
transposed codes (the container's layout before the weight coder), `lrzip -z -L 9` (ZPAQ) on the frontier's
layout (rows greedily sorted by L1 distance, transposed, one stream; the uint16 permutations it must store are
counted apart and in the total), and the weight coder (train_gpt.rans_encode) with each context-model choice,
plus the MLP hidden units shuffled back into a random order (what the hidden-unit sort buys). Then bits per
code by tensor role under the default coder (exact: the sum of -log2 of every coded symbol's frequency), and
the remainder streams (scales, LQER factors, fp16 tensors) under each general-purpose coder. brotli and lrzip
are optional (bench only): their rows say "not installed" when missing.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import T  # noqa: E402

try:
    import brotli
except ImportError:  # optional, bench only
    brotli = None

CONTEXT_CHOICES = {  # label -> CoderSpec overrides
    "adaptive order-0 (no contexts)": dict(class_range=0, prev_clip=0, copy_percent=0),
    "code above only": dict(class_range=0, copy_percent=0),
    "row/column size classes only": dict(prev_clip=0, copy_percent=0),
    "classes + code above, no difference rows": dict(copy_percent=0),
    "classes + code above + difference rows (default)": {},
    "classes + code above, no back-off": dict(size_prior=0, detail_prior=0),
    "classes + code above +-3": dict(prev_clip=3),
}


def coded_tensors(entries: dict[str, T.QEntry], shuffle_mlp: bool = False, seed: int = 0) -> list[T.CodedTensor]:
    """The GPTQ codes as the weight coder reads them; shuffle_mlp permutes each MLP's hidden units at random
    (fc rows and proj columns together), undoing sort_hidden_units."""
    rng = np.random.default_rng(seed)
    views = {n: T.coder_view(n, e.q).numpy().astype(np.int64) for n, e in entries.items() if e.kind == "gptq"}
    if shuffle_mlp:
        for n in [n for n in views if ".mlp.fc." in n]:
            perm = rng.permutation(len(views[n]))
            views[n] = views[n][perm]
            p = n.replace(".mlp.fc.", ".mlp.proj.")
            if p in views:
                views[p] = views[p][perm]
    return [T.CodedTensor(T._code_group(n), 1 << entries[n].bits, views[n]) for n in sorted(views)]


def l1_row_order(q: np.ndarray) -> np.ndarray:
    """The frontier's row order (spec §A7.2) on integer codes: train_gpt's greedy L1 walk."""
    return np.array(T.nearest_neighbour_order(torch.from_numpy(q.astype(np.float32))))


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def general_coders() -> dict:
    coders = {"zstd-22": T.COMPRESSORS["zstd"], "lzma-9e": T.COMPRESSORS["lzma"]}
    if brotli is not None:
        coders["brotli-11"] = (lambda b: brotli.compress(b, quality=11), brotli.decompress)
    return coders


def lrzip_bytes(raw: bytes) -> tuple[int, float, float] | None:
    if shutil.which("lrzip") is None:
        return None
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "codes")
        with open(p, "wb") as f:
            f.write(raw)
        t0 = time.perf_counter()
        subprocess.run(["lrzip", "-z", "-L", "9", "-q", "-f", p], check=True, capture_output=True)
        t1 = time.perf_counter()
        size = os.path.getsize(p + ".lrz")
        subprocess.run(["lrzip", "-d", "-q", "-f", "-o", p + ".out", p + ".lrz"], check=True, capture_output=True)
        return size, t1 - t0, time.perf_counter() - t1


def _walk_attributed(tensors, spec, lanes, bits):
    """walk_codes over all tensors, charging each coded row to the role of the tensor it belongs to."""
    rows_left = []
    for t in tensors:
        r, c = t.codes.shape
        chunks = -(-(r + c) // lanes)
        rows_left.extend([("classes", t.role)] * chunks + [(t.role, t.role)] * r)
    it = iter(rows_left)

    def cost(model, ctx, sym):
        key, _ = next(it)
        freq, _ = model.tables()
        bits[key] = bits.get(key, 0.0) + float(-np.log2(freq[ctx, sym] / (1 << T.RANS_PREC)).sum())
        return sym
    T.walk_codes(tensors, spec, lanes, cost, True)


def bench_artifact(path: str, skip_lrzip: bool) -> dict:
    with open(path, "rb") as f:
        entries, _ = T.unpack_artifact(f.read())
    names = sorted(n for n, e in entries.items() if e.kind == "gptq")
    n_codes = sum(entries[n].q.numel() for n in names)
    rows = []

    def add(label, nbytes, enc_s=None, dec_s=None, note=""):
        rows.append({"coder": label, "bytes": int(nbytes), "bits_per_code": 8 * nbytes / n_codes,
                     "encode_s": enc_s, "decode_s": dec_s, "note": note})
    add("order-0 entropy per tensor (bound, not a coder)",
        sum(T.order0_entropy_bytes(entries[n].q) for n in names))
    transposed = b"".join(entries[n].q.T.contiguous().numpy().tobytes() for n in names)
    for label, (enc, dec) in general_coders().items():
        comp, te = timed(enc, transposed)
        _, td = timed(dec, comp)
        add(f"{label} (transposed codes)", len(comp), te, td)
    if brotli is None:
        add("brotli-11", 0, note="not installed")
    if not skip_lrzip:
        for sort in (False, True):
            t0 = time.perf_counter()
            perms, parts = 0, []
            for n in names:
                q = entries[n].q.numpy()
                if sort:
                    q = q[l1_row_order(q)]
                    perms += 2 * len(q)
                parts.append(np.ascontiguousarray(q.T).tobytes())
            sort_s = time.perf_counter() - t0
            got = lrzip_bytes(b"".join(parts))
            label = "lrzip -z -L 9" + (" after the L1 row sort" if sort else "") + " (transposed codes)"
            if got is None:
                add(label, 0, note="lrzip not installed")
                continue
            size, te, td = got
            if sort:
                add(label + ", permutations not counted", size, te + sort_s, td,
                    f"row sort {sort_s:.1f}s; permutations {perms} B raw uint16")
                add(label + ", with its uint16 permutations", size + perms, te + sort_s, td)
            else:
                add(label, size, te, td)
    tensors = coded_tensors(entries)
    shapes = [t._replace(codes=np.broadcast_to(np.int64(0), t.codes.shape)) for t in tensors]
    for label, over in CONTEXT_CHOICES.items():
        spec = T.CoderSpec(**over)
        blob, te = timed(T.rans_encode, tensors, spec)
        decoded, td = timed(T.rans_decode, blob, shapes, spec)
        assert all(np.array_equal(a.codes, t.codes) for a, t in zip(decoded, tensors)), label
        add(f"weight coder: {label}", len(blob), te, td)
    shuffled = coded_tensors(entries, shuffle_mlp=True)
    blob, te = timed(T.rans_encode, shuffled, T.CoderSpec())
    add("weight coder: default, MLP hidden units in random order", len(blob), te)
    remainder = {}
    packed = T.pack_artifact(entries, {}, "raw")
    hlen = struct.unpack("<HII", packed[4:14])[1]
    header = json.loads(zlib.decompress(packed[14: 14 + hlen]))
    pos = 14 + hlen
    for sm in header["streams"]:
        raw = packed[pos: pos + sm["len"]]
        pos += sm["len"]
        if sm["name"].startswith("codes."):
            continue
        remainder[sm["name"]] = {"raw": len(raw), **{label: len(enc(raw)) for label, (enc, _) in general_coders().items()}}
    return {"artifact": path, "codes": n_codes, "tensors": len(names), "rows": rows,
            "role_bits": _role_bits(tensors, T.CoderSpec()), "remainder": remainder}


def _role_bits(tensors, spec):
    bits: dict[str, float] = {}
    _walk_attributed(tensors, spec, max(t.codes.shape[1] for t in tensors), bits)
    n: dict[str, int] = {}
    for t in tensors:
        n[t.role] = n.get(t.role, 0) + t.codes.size
    out = {r: bits[r] / n[r] for r in n}
    out["classes (bytes)"] = bits.get("classes", 0.0) / 8
    return out


SOTA_SHAPES = (("attn.c_q", 512, 512), ("attn.c_k", 256, 512), ("attn.c_v", 256, 512), ("attn.proj", 512, 512),
               ("mlp.fc", 2048, 512), ("mlp.proj", 2048, 512))  # coder view: hidden units on the step axis


def sota_timing(layers: int = 11, seed: int = 0) -> dict:
    """Encode/decode seconds for the sota preset's 35,913,728 codes (11 layers + the 8192 x 512 int7 embedding) and
    their row steps, synthetic codes of realistic spread, on one CPU core."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)

    def codes(r, c, bits, width):
        qmax = 2 ** (bits - 1) - 1
        w = width * np.exp(rng.normal(0, 0.3, c))
        return np.clip(np.round(rng.standard_normal((r, c)) * w), -qmax, qmax).astype(np.int64)
    def steps(n):  # row-step indices around their median, spread as on the CPU model (~2.7 bits a row)
        return np.clip(np.round(rng.normal(0, 1.6, n)), 1 - T.STEP_HALF_RANGE, T.STEP_HALF_RANGE - 1).astype(np.int64)
    tensors = [T.CodedTensor(role, 64, codes(r, c, 6, 2.6), steps(r))
               for _ in range(layers) for role, r, c in SOTA_SHAPES]
    tensors.append(T.CodedTensor("tok_emb", 128, codes(8192, 512, 7, 5.0), steps(8192)))
    spec = T.CoderSpec()
    blob, te = timed(T.rans_encode, tensors, spec)
    shapes = [t._replace(codes=np.broadcast_to(np.int64(0), t.codes.shape), steps=np.zeros(len(t.steps), np.int64))
              for t in tensors]
    decoded, td = timed(T.rans_decode, blob, shapes, spec)
    assert all(np.array_equal(a.codes, t.codes) and np.array_equal(a.steps, t.steps) for a, t in zip(decoded, tensors))
    return {"codes": sum(t.codes.size for t in tensors), "bytes": len(blob), "encode_s": te, "decode_s": td,
            "cpu": os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None}


def table(res: dict) -> str:
    lines = [f"### {res['artifact']} ({res['codes']:,} codes in {res['tensors']} tensors)", "",
             "| coder | bytes | bits/code | encode s | decode s | note |", "|---|---|---|---|---|---|"]
    fmt = lambda v: "" if v is None else f"{v:.1f}"
    for r in res["rows"]:
        lines.append(f"| {r['coder']} | {r['bytes']:,} | {r['bits_per_code']:.4f} | {fmt(r['encode_s'])} | "
                     f"{fmt(r['decode_s'])} | {r['note']} |")
    lines += ["", "bits per code by role (default weight coder): " +
              ", ".join(f"{k} {v:.3f}" if "bytes" not in k else f"{k} {v:,.0f}" for k, v in res["role_bits"].items()),
              "", "remainder streams (bytes): " + "; ".join(f"{k}: " + ", ".join(f"{c} {b:,}" for c, b in v.items())
                                                          for k, v in res["remainder"].items())]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("artifacts", nargs="*")
    ap.add_argument("--json", default="")
    ap.add_argument("--skip-lrzip", action="store_true")
    ap.add_argument("--sota-timing", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="synthetic tiny artifact (tests)")
    args = ap.parse_args(argv)
    results = []
    paths = list(args.artifacts)
    if args.smoke:
        paths.append(_smoke_artifact())
    for p in paths:
        res = bench_artifact(p, args.skip_lrzip)
        results.append(res)
        print(table(res), flush=True)
    if args.sota_timing:
        t = sota_timing()
        results.append({"sota_timing": t})
        print(f"sota shapes, one core: {t['codes']:,} codes -> {t['bytes']:,} B; encode {t['encode_s']:.1f}s, "
              f"decode {t['decode_s']:.1f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return 0


def _smoke_artifact() -> str:
    rng = np.random.default_rng(0)
    entries = {}
    for i in range(2):
        for name, (r, c) in (("mlp.fc", (64, 32)), ("mlp.proj", (32, 64)), ("attn.c_q", (32, 32))):
            q = np.clip(np.round(rng.standard_normal((r, c)) * 2.5), -31, 31).astype(np.int8)
            entries[f"blocks.{i}.{name}.weight"] = T.QEntry("gptq", (r, c), "float32", q=torch.from_numpy(q),
                                                           scale=torch.ones(r).half(), bits=6)
    path = os.path.join(tempfile.mkdtemp(prefix="compress_bench_"), "smoke.ptz")
    with open(path, "wb") as f:
        f.write(T.pack_artifact(entries, {}, "zstd"))
    return path


if __name__ == "__main__":
    sys.exit(main())
