#!/usr/bin/env python3
"""Training-step throughput and MFU of a train_gpt.py preset on this machine (CPU or one CUDA GPU).

    python bench/throughput.py                      # PRESET=cpu_smoke, a few steps
    PRESET=sota python bench/throughput.py --steps 10 --json out.json
    NUM_LAYERS=4 TRAIN_BATCH_TOKENS=16384 python bench/throughput.py --preset sota --grad-accum 2

Measures, in the same run: (1) the matmul peak of this device (square GEMMs of a few sizes, best of
several, fp32 and bf16) and (2) the training step exactly as train_gpt.train() runs it (GRAD_ACCUM
micro-steps of forward under autocast_context + backward, then Optimizers.step() and the EMA update;
torch.compile via maybe_compile where train_gpt would use it). MFU = counted model FLOPs/s (bench/flops.py,
causal document-masked attention at the keys per query measured from the batch) / the measured peak of
the dtype the matmuls actually run in (bf16 under autocast, else fp32). Every hyperparameter comes from
the environment exactly as for train_gpt.py (PRESET + UPPER_CASE overrides).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

import train_gpt as T  # noqa: E402
from bench.common import cpu_name  # noqa: E402
from bench.flops import keys_per_query_from_ids, training_flops_per_token  # noqa: E402

SAMPLE_DATA = os.path.join(ROOT, "data", "datasets", "offline_sample_sp1024")
SAMPLE_TOKENIZER = os.path.join(ROOT, "data", "tokenizers", "offline_sample_1024_bpe.model")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def matmul_peak(device: torch.device, dtype: torch.dtype, sizes: list[int], reps: int,
                budget_s: float = 3.0) -> dict:
    """Best FLOP/s of C = A @ B over square sizes (2n^3 FLOPs each), best of `reps` timed runs per size
    (fewer if one size's budget runs out)."""
    best, per = 0.0, {}
    for n in sizes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        c = torch.empty(n, n, device=device, dtype=dtype)
        torch.mm(a, b, out=c)
        sync(device)
        t_best, t_start = float("inf"), time.perf_counter()
        for _ in range(reps):
            if device.type == "cuda":
                inner = max(1, int(2e12 // (2 * n ** 3)))  # ~ms of work per timed run on a GPU
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                for _ in range(inner):
                    torch.mm(a, b, out=c)
                e1.record()
                e1.synchronize()
                t = e0.elapsed_time(e1) / 1000 / inner
            else:
                t0 = time.perf_counter()
                torch.mm(a, b, out=c)
                t = time.perf_counter() - t0
            t_best = min(t_best, t)
            if time.perf_counter() - t_start > budget_s:
                break
        per[n] = 2 * n ** 3 / t_best
        best = max(best, per[n])
    return {"best": best, "per_size": per}


def bench_runtime(device: torch.device, grad_accum: int) -> "T.Runtime":
    return T.Runtime(0, 1, 0, device, False, grad_accum, "", T.RunLogger([], enabled=False))


def make_batches(hp, rt, count: int, data: str, doc_len: float, seed: int):
    """`count` host micro-batches (x, y) in the layout train_gpt's loader gives this runtime (micro_batch_shape:
    one flat packed row, or TRAIN_SEQ_LEN rows with TRAIN_LOADER=shuffled), and the BOS id. data: sample (the
    offline sample shards through make_train_loader), synthetic (random tokens, documents of geometric length
    with mean doc_len), auto (sample when present and VOCAB_SIZE >= 1024)."""
    data_path, tok_path = hp.resolved_paths()
    own = bool(T.list_shards(data_path, "train")) and os.path.isfile(tok_path) if os.path.isdir(data_path) else False
    have_sample = own or (os.path.isdir(SAMPLE_DATA) and os.path.isfile(SAMPLE_TOKENIZER) and hp.vocab_size >= 1024)
    if data == "auto":
        data = "sample" if have_sample else "synthetic"
    if data == "sample":
        if not have_sample:
            raise SystemExit("--data sample: no training shards (build them: python data/build_offline_sample.py)")
        path, tok = (data_path, tok_path) if own else (SAMPLE_DATA, SAMPLE_TOKENIZER)
        import sentencepiece as spm
        bos = spm.SentencePieceProcessor(model_file=tok).bos_id()
        loader = T.make_train_loader(hp, rt, T.list_shards(path, "train"))
        return [loader.next_host_batch() for _ in range(count)], bos, f"sample:{os.path.relpath(path, ROOT)}"
    rows, width = T.micro_batch_shape(hp, rt)
    g = torch.Generator().manual_seed(seed)
    bos, out = 1, []
    for _ in range(count):
        ids = torch.randint(2, hp.vocab_size, (rows * width + 1,), generator=g)
        starts = torch.rand(rows * width + 1, generator=g) < 1.0 / max(doc_len, 1.0)
        ids[starts] = bos
        out.append((ids[:-1].view(rows, width), ids[1:].view(rows, width)))
    return out, bos, f"synthetic(mean doc {doc_len:g})"


def bench_step(hp, device, steps: int, warmup: int, grad_accum: int, looping: bool, data: str,
               doc_len: float, profile: str | None = None) -> dict:
    micro_tokens = hp.train_batch_tokens // grad_accum
    if micro_tokens % hp.train_seq_len:
        raise SystemExit(f"TRAIN_BATCH_TOKENS/grad_accum = {micro_tokens} is not a multiple of "
                         f"TRAIN_SEQ_LEN={hp.train_seq_len}")
    rt = bench_runtime(device, grad_accum)
    host_batches, bos, source = make_batches(hp, rt, grad_accum, data, doc_len, hp.seed)
    backend = T.choose_attention_backend(hp, device)
    torch.manual_seed(hp.seed)
    model = T.GPT(hp, bos, backend).to(device)
    # the (piece length, layer schedule) pairs train_gpt's warm-up compiles, in its order; timed: the last stage's
    # piece with `looping` (the shape most steps run in)
    shapes = T.shapes_to_warm(hp)
    steady = (T.parse_seq_schedule(hp)[-1].length, looping)
    model.doc_piece_len, model.looping = steady
    model.train()
    opt = T.Optimizers(model, hp, 1, 0)
    ema = T.ModelEMA(model, hp.ema_decay)
    fwd = T.maybe_compile(model, hp, device)
    autocast = T.autocast_context(hp, device)
    bf16 = autocast._enabled
    compiled = fwd is not model
    cuda = device.type == "cuda"
    phases = ["forward", "backward", "optimizer", "ema"]

    def mark():
        if cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def elapsed(a, b) -> float:
        return a.elapsed_time(b) / 1000 if cuda else b - a

    def one_step(times: dict) -> float:
        sync(device)
        t0 = time.perf_counter()
        marks = []
        for xh, yh in host_batches:  # as train_gpt's train_step: cu_seqlens from the host rows, then the copy
            extras = T.attention_extras(model, xh, device)
            x, y = xh.to(device, non_blocking=True), yh.to(device, non_blocking=True)
            m0 = mark()
            with T.autocast_context(hp, device):
                loss = fwd(x, y, **extras)
            m1 = mark()
            (loss / grad_accum).backward()
            marks.append((m0, m1, mark()))
        o0 = mark()
        opt.set_schedule(1.0, hp.muon_momentum)
        opt.step()
        o1 = mark()
        ema.update(model)
        o2 = mark()
        sync(device)
        wall = time.perf_counter() - t0
        times["forward"] += sum(elapsed(a, b) for a, b, _ in marks)
        times["backward"] += sum(elapsed(b, c) for _, b, c in marks)
        times["optimizer"] += elapsed(o0, o1)
        times["ema"] += elapsed(o1, o2)
        return wall

    scratch = dict.fromkeys(phases, 0.0)
    t_warm = time.perf_counter()
    compile_s = {}  # first step of each warm-up shape: compile + one step (the steady step is subtracted below)
    if compiled:
        for piece, loop in shapes if steady in shapes else shapes + [steady]:
            model.doc_piece_len, model.looping = piece, loop
            compile_s[f"train_piece{piece}_looping_{int(loop)}"] = one_step(scratch)
        model.doc_piece_len, model.looping = steady
    for i in range(warmup):
        one_step(scratch)
    warm_s = time.perf_counter() - t_warm
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = dict.fromkeys(phases, 0.0)
    walls = []
    prof = None
    if profile:
        from torch.profiler import ProfilerActivity, profile as tprofile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        prof = tprofile(activities=acts, record_shapes=True)
        prof.__enter__()
    for _ in range(steps):
        walls.append(one_step(times))
    if prof is not None:
        prof.__exit__(None, None, None)
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=30)
        with open(profile, "w") as f:
            f.write(table + "\n")
        by_shape = prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=25)
        with open(profile, "a") as f:
            f.write("\n# grouped by input shape\n" + by_shape + "\n")
    keys = sum(keys_per_query_from_ids(x, bos, "causal") for x, _ in host_batches) / len(host_batches)
    flops = training_flops_per_token(hp, looping, keys=keys)
    tokens_step = micro_tokens * grad_accum
    mean_s = sum(walls) / len(walls)
    if cuda:
        mem_mib = torch.cuda.max_memory_allocated(device) / 2 ** 20
        mem_kind = "cuda max_memory_allocated"
    else:
        mem_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
        mem_kind = "process max RSS"
    phase_total = sum(times.values())
    compile_s = {k: max(v - min(walls), 0.0) for k, v in compile_s.items()}
    return model, {
        "data": source, "bos_id": bos, "attn_backend": backend, "compiled": compiled,
        "batch_shape": list(host_batches[0][0].shape), "doc_piece_len": steady[0],
        "warm_shapes": [list(sh) for sh in shapes],
        "matmul_dtype": "bf16" if bf16 else ("tf32/fp32" if cuda else "fp32"), "looping": looping,
        "grad_accum": grad_accum, "micro_tokens": micro_tokens, "tokens_per_step": tokens_step,
        "steps": steps, "warmup_steps": warmup, "warmup_s": warm_s,
        "ms_per_step": 1000 * mean_s, "ms_per_step_best": 1000 * min(walls),
        "tokens_per_s": tokens_step / mean_s,
        "keys_per_query": keys, "flops_per_token": flops["total"], "flops_per_step": flops["total"] * tokens_step,
        "muon_flops_per_step": flops["muon_per_step"],
        "achieved_flops": flops["total"] * tokens_step / mean_s,
        "phase_ms": {k: 1000 * v / steps for k, v in times.items()},
        "phase_frac": {k: v / phase_total if phase_total else 0.0 for k, v in times.items()},
        "peak_mem_mib": mem_mib, "peak_mem_kind": mem_kind,
        "params": T.count_parameters(model), "compile_s": compile_s,
    }


def peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def bench_eval(hp, device, model, bos: int, reps: int) -> dict:
    """The eval forward as eval_sliding runs it (eval mode, no grad, eval_rows_per_forward rows of EVAL_SEQ_LEN,
    compiled where train_gpt compiles): first call (compile) and steady tokens/s."""
    rows = T.eval_rows_per_forward(hp, hp.eval_seq_len)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, hp.vocab_size, (rows, hp.eval_seq_len + 1), generator=g)
    ids[torch.rand(ids.shape, generator=g) < 1 / 1024] = bos
    x, y = ids[:, :-1].to(device), ids[:, 1:].to(device)
    model.eval()
    extras = T.attention_extras(model, ids[:, :-1], device)  # as eval_sliding passes them
    fwd = T.maybe_compile(model, hp, device)
    reset_peak(device)
    walls = []
    with torch.no_grad():
        for _ in range(reps + 1):
            sync(device)
            t0 = time.perf_counter()
            with T.autocast_context(hp, device):
                fwd(x, y, reduction="none", **extras)
            sync(device)
            walls.append(time.perf_counter() - t0)
    model.train()
    steady = min(walls[1:]) if reps else walls[0]
    return {"rows": rows, "tokens_per_forward": x.numel(), "first_call_s": walls[0], "compiled": fwd is not model,
            "compile_s": max(walls[0] - steady, 0.0), "tokens_per_s": x.numel() / steady, "peak_mem_mib": peak_mib(device)}


def bench_ttt(hp, device, model) -> dict:
    """measure_ttt_throughput exactly as eval_ttt runs it before phased TTT: its untimed first pass compiles the
    TTT graphs (LoRA score+train with a dynamic row width, score-only, global SGD), its timed pass gives rates."""
    rt = T.Runtime(0, 1, 0, device, False, 8, "", T.RunLogger([], enabled=False))
    model.eval()
    reset_peak(device)
    t0 = time.perf_counter()
    r = T.measure_ttt_throughput(model, hp, rt)
    return {"score_only_tok_s": r.score_only_tok_s, "score_tok_s": r.score_tok_s, "sgd_tok_s": r.sgd_tok_s,
            "compile_s": r.warmup_s,
            "compiled": T.compile_enabled(hp, device),
            "total_s": time.perf_counter() - t0, "rows_per_forward": T.ttt_rows_per_forward(hp),
            "peak_mem_mib": peak_mib(device)}


def val_documents(hp, bos: int, max_tokens: int, doc_len: float, seed: int = 3) -> tuple[torch.Tensor, str]:
    """Validation tokens for the TTT pass: the first max_tokens of the val shard (DATA_PATH, else the offline
    sample), cut after the last whole document; without a val shard, documents of geometric length doc_len."""
    data_path, _ = hp.resolved_paths()
    for path in (data_path, SAMPLE_DATA):
        files = T.list_shards(path, "val") if os.path.isdir(path) else []
        if files and (path == data_path or hp.vocab_size >= 1024):
            toks = torch.from_numpy(T.load_shard(files[0])[: max_tokens + 1].astype("int64"))
            starts = (toks == bos).nonzero().flatten()
            if starts.numel() >= 2:
                toks = toks[: int(starts[-1]) + 1]  # the last document ends with the next one's BOS
            return toks, f"val shard {os.path.relpath(files[0], ROOT)}"
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(2, hp.vocab_size, (max_tokens + 1,), generator=g)
    toks[torch.rand(max_tokens + 1, generator=g) < 1.0 / max(doc_len, 1.0)] = bos
    toks[0] = toks[-1] = bos
    return toks, f"synthetic (geometric lengths, mean {doc_len:g})"


def bench_ttt_docs(hp, device, model, bos: int, max_tokens: int, doc_len: float) -> dict:
    """TTT scoring + LoRA training (TTT_GRAD_STEPS, no deadline) over real validation documents: their length
    distribution, not the probe's 4-chunk documents (193 tokens at the sota chunk of 48). Row tokens/s beside the
    probe's score+train rate (bench_ttt) tell how well the probe predicts the real pass. Runs after bench_ttt,
    whose warm-up compiled the graphs."""
    toks, source = val_documents(hp, bos, max_tokens, doc_len)
    val = T.ValidationData(toks, torch.ones(toks.numel() - 1, dtype=torch.int32), source)
    docs = T.find_docs(toks, bos)
    rt = T.Runtime(0, 1, 0, device, False, 8, "", T.RunLogger([], enabled=False))
    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.eval()
    reset_peak(device)
    sync(device)
    t0 = time.perf_counter()
    T.ttt_score_docs(model, val, docs, list(range(len(docs))), hp, rt, T.ScoreBoard(val, device, False),
                     hp.ttt_grad_steps)
    sync(device)
    wall = time.perf_counter() - t0
    model.load_state_dict(snapshot)
    lengths = sorted(L for _, L in docs)
    row_tokens = sum(T.ttt_row_tokens(L, T.ttt_chunk_for(hp, L), hp.ttt_eval_seq_len) for L in lengths)
    return {"source": source, "docs": len(docs), "tokens": toks.numel() - 1, "mean_doc_len": sum(lengths) / len(docs),
            "median_doc_len": lengths[len(lengths) // 2], "max_doc_len": lengths[-1], "seconds": wall,
            "row_tokens_per_s": row_tokens / wall, "tokens_per_s": (toks.numel() - 1) / wall,
            "peak_mem_mib": peak_mib(device)}


def bench_hessian(hp, device, model, bos: int) -> dict:
    """collect_hessians on one calibration batch (CALIBRATION_BATCH_TOKENS in TRAIN_SEQ_LEN rows), twice: the
    first call also compiles the attention kernel it uses outside the training graph."""
    rows = max(1, hp.calibration_batch_tokens // hp.train_seq_len)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(2, hp.vocab_size, (rows, hp.train_seq_len + 1), generator=g)

    class OneBatch:
        def next_batch(self):
            return ids[:, :-1].to(device), ids[:, 1:].to(device)
    rt = T.Runtime(0, 1, 0, device, False, 8, "", T.RunLogger([], enabled=False))
    walls = []
    for _ in range(2):
        sync(device)
        t0 = time.perf_counter()
        T.collect_hessians(model, OneBatch(), 1, hp, rt)
        sync(device)
        walls.append(time.perf_counter() - t0)
    return {"batch_tokens": rows * hp.train_seq_len, "first_call_s": walls[0], "per_batch_s": walls[1],
            "compile_s": max(walls[0] - walls[1], 0.0), "compiled": model.attn_backend == "flex"}


def mib(v) -> str:
    return "n/a (CPU)" if v is None else f"{v:,.0f} MiB"


def hp_seq(e: dict) -> int:
    return e["tokens_per_forward"] // e["rows"]


def render(res: dict) -> str:
    s = res["step"]
    rows = [
        ("device", f"{res['device']} ({res['device_type']}, {res['threads']} threads)"),
        ("preset / overrides", f"{res['preset']} {res['overrides'] or ''}".strip()),
        ("torch", res["torch"]),
        ("load avg 1 min (start, end)", f"{res['loadavg_1min'][0]:.1f}, {res['loadavg_1min'][1]:.1f} on {res['cpus']} CPUs"),
        ("matmul peak fp32", f"{res['peak_fp32'] / 1e9:,.1f} GFLOP/s"),
        ("matmul peak bf16", f"{res['peak_bf16'] / 1e9:,.1f} GFLOP/s" if res["peak_bf16"] else "not measured"),
        ("model params", f"{s['params']:,}"),
        ("data", s["data"]),
        ("attention / compile / matmul dtype", f"{s['attn_backend']} / {int(s['compiled'])} / {s['matmul_dtype']}"),
        ("looping (depth recurrence)", str(int(s["looping"]))),
        ("tokens/step", f"{s['tokens_per_step']:,} = {s['grad_accum']} x {s['micro_tokens']:,}"),
        ("steps timed (warm-up)", f"{s['steps']} ({s['warmup_steps']}, {s['warmup_s']:.1f}s)"),
        ("ms/step mean (best)", f"{s['ms_per_step']:,.1f} ({s['ms_per_step_best']:,.1f})"),
        ("tokens/s", f"{s['tokens_per_s']:,.0f}"),
        ("keys/query (causal, measured)", f"{s['keys_per_query']:.1f}"),
        ("model FLOPs/token (train)", f"{s['flops_per_token'] / 1e6:,.2f} M"),
        ("model FLOPs/step", f"{s['flops_per_step'] / 1e12:,.4f} T (+ Muon NS {s['muon_flops_per_step'] / 1e12:.4f} T)"),
        ("achieved", f"{s['achieved_flops'] / 1e9:,.1f} GFLOP/s"),
        (f"MFU (vs {res['mfu_peak_dtype']} peak)", f"{100 * res['mfu']:.1f}% (best step: {100 * res['mfu_best']:.1f}%)"),
    ]
    for k in ("forward", "backward", "optimizer", "ema"):
        rows.append((f"  {k}", f"{s['phase_ms'][k]:,.1f} ms ({100 * s['phase_frac'][k]:.0f}%)"))
    rows.append(("peak memory", f"{s['peak_mem_mib']:,.0f} MiB ({s['peak_mem_kind']})"))
    for k, v in s["compile_s"].items():
        rows.append((f"compile {k}", f"{v:.1f} s"))
    if "eval" in res:
        e = res["eval"]
        rows += [("eval forward", f"{e['rows']} x {hp_seq(e)} tokens: {e['tokens_per_s']:,.0f} tok/s, compile "
                  f"{e['compile_s']:.1f} s, peak {mib(e['peak_mem_mib'])}")]
    if "ttt" in res:
        t = res["ttt"]
        rows += [("TTT", f"score {t['score_only_tok_s']:,.0f} tok/s, score+train {t['score_tok_s']:,.0f} tok/s, "
                  f"global SGD {t['sgd_tok_s']:,.0f} tok/s, "
                  f"compile {t['compile_s']:.1f} s, peak {mib(t['peak_mem_mib'])}")]
    if "ttt_docs" in res:
        d = res["ttt_docs"]
        rows += [("TTT on real documents", f"{d['docs']} docs of {d['source']} (mean {d['mean_doc_len']:.0f}, median "
                  f"{d['median_doc_len']}, max {d['max_doc_len']} tokens): {d['tokens_per_s']:,.0f} tok/s, "
                  f"{d['row_tokens_per_s']:,.0f} row tok/s vs the probe's {res.get('ttt', {}).get('score_tok_s', 0):,.0f}")]
    if "hessian" in res:
        h = res["hessian"]
        rows += [("Hessian batch", f"{h['batch_tokens']:,} tokens: {h['per_batch_s'] * 1000:,.0f} ms, compile "
                  f"{h['compile_s']:.1f} s")]
    w = max(len(a) for a, _ in rows)
    lines = [f"| {'metric'.ljust(w)} | value |", f"|{'-' * (w + 2)}|-------|"]
    lines += [f"| {a.ljust(w)} | {b} |" for a, b in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="training-step throughput and MFU of a train_gpt.py preset")
    ap.add_argument("--preset", default=os.environ.get("PRESET", "cpu_smoke"))
    ap.add_argument("--steps", type=int, default=3, help="timed steps")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1 CPU, 3 CUDA)")
    ap.add_argument("--grad-accum", type=int, default=int(os.environ.get("BENCH_GRAD_ACCUM", 8)),
                    help="micro-steps per step (train_gpt on 1 process: 8; env BENCH_GRAD_ACCUM)")
    ap.add_argument("--looping", choices=["auto", "0", "1"], default="auto",
                    help="depth recurrence on (auto: on when NUM_LOOPS > 0, the phase most steps run in)")
    ap.add_argument("--data", choices=["auto", "sample", "synthetic"], default="auto")
    ap.add_argument("--doc-len", type=float, default=1024.0, help="mean document length of synthetic data")
    ap.add_argument("--peak-sizes", default=None, help="comma-separated GEMM sizes (default by device)")
    ap.add_argument("--peak-reps", type=int, default=5)
    ap.add_argument("--no-bf16-peak", action="store_true", help="skip the bf16 GEMM peak (slow on some CPUs)")
    ap.add_argument("--profile", default=None, help="write a torch.profiler table of the timed steps here")
    ap.add_argument("--json", default=None, help="write the results as JSON here")
    ap.add_argument("--phases", default="train", help="comma list of train (always), eval, ttt, ttt_docs, hessian: "
                    "each is timed on the trained-shape model, first call (compile) and steady state; ttt_docs: TTT "
                    "over real validation documents (after ttt)")
    ap.add_argument("--ttt-val-tokens", type=int, default=65536, help="validation tokens of the ttt_docs pass")
    a = ap.parse_args(argv)

    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    env = {**os.environ, "PRESET": a.preset}
    hp = T.Hyperparameters.from_env(env)
    hp.validate(1, check_files=False)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    sizes = [int(s) for s in a.peak_sizes.split(",")] if a.peak_sizes else \
        ([2048, 4096, 8192] if device.type == "cuda" else [256, 512, 1024])
    peak32 = matmul_peak(device, torch.float32, sizes, a.peak_reps)
    peak16 = None if a.no_bf16_peak else matmul_peak(device, torch.bfloat16, sizes, a.peak_reps)
    looping = (hp.num_loops > 0) if a.looping == "auto" else a.looping == "1"
    warmup = a.warmup if a.warmup is not None else (3 if device.type == "cuda" else 1)
    phases = {p.strip() for p in a.phases.split(",") if p.strip()}
    if phases - {"train", "eval", "ttt", "ttt_docs", "hessian"}:
        raise SystemExit(f"--phases {a.phases!r}: choose from train, eval, ttt, ttt_docs, hessian")
    model, step = bench_step(hp, device, a.steps, warmup, a.grad_accum, looping, a.data, a.doc_len, a.profile)
    use16 = step["matmul_dtype"] == "bf16"
    peak = (peak16["best"] if use16 and peak16 else peak32["best"])

    def result(extra: dict) -> dict:
        return {
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": device_name(device), "device_type": device.type,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "preset": a.preset,
            "overrides": " ".join(f"{k}={v}" for k, v in sorted(T.env_overrides(hp, env).items())),
            "peak_fp32": peak32["best"], "peak_fp32_per_size": peak32["per_size"],
            "peak_bf16": peak16["best"] if peak16 else 0.0,
            "peak_bf16_per_size": peak16["per_size"] if peak16 else {},
            "loadavg_1min": [load0, os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")],
            "cpus": os.cpu_count(),
            "mfu_peak_dtype": "bf16" if use16 else "fp32", "mfu": step["achieved_flops"] / peak,
            "mfu_best": step["flops_per_step"] / (step["ms_per_step_best"] / 1000) / peak, "step": step, **extra,
        }

    def save(res: dict) -> None:
        if a.json:
            with open(a.json, "w") as f:
                json.dump(res, f, indent=1, default=str)
    extra = {}
    runs = [("hessian", lambda: bench_hessian(hp, device, model, step["bos_id"])),  # first: the train-mode model
            ("eval", lambda: bench_eval(hp, device, model, step["bos_id"], max(a.steps, 1))),
            ("ttt", lambda: bench_ttt(hp, device, model)),
            ("ttt_docs", lambda: bench_ttt_docs(hp, device, model, step["bos_id"], a.ttt_val_tokens, a.doc_len))]
    for name, run in runs:
        if name in phases and not (name.startswith("ttt") and hp.ttt_lora_rank <= 0):
            save(result(extra))  # what is measured so far survives a timeout in the next phase
            extra[name] = run()
    res = result(extra)
    print(render(res), flush=True)
    save(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
