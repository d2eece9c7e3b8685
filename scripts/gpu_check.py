#!/usr/bin/env python3
"""Correctness checks of every accelerated path of train_gpt.py against its CPU reference.

    python scripts/gpu_check.py            # on a CUDA machine: CUDA paths vs the CPU fp32 reference
    python scripts/gpu_check.py --cpu      # no CUDA needed: the same checks of the CPU paths vs the reference
    python scripts/gpu_check.py --summarize DIR   # final pass/fail table of a scripts/gpu_check.sh run

Checks (random inputs, fixed seeds):
  attention_<backend>  every attention backend (CUDA: sdpa / flex / flash3 when installed, bf16 and fp32; CPU:
                       sdpa fp32) vs attention_reference (per-document loop, fp32 CPU) on rows with several documents
  model_fwd_bwd        a tiny GPT with every feature on (looping, XSA, parallel lanes, gates): CUDA bf16
                       autocast loss and grads vs fp32 CPU with the reference attention, and the same compiled by
                       maybe_compile (fullgraph); CPU: the sdpa model vs the reference (fp32, bf16, compiled)
  kernel_*             Triton fused softcapped CE and LeakyReLU^2 up-projection vs eager (CUDA only)
  flash3_stand_in_compiled, ttt_compiled (CUDA only)  train_gpt's FA3 path (fixed-length cu_seqlens) compiled
                       through the FA3 stand-in of tests/fake_fa3 when the real FA3 is absent; phased TTT with
                       its compiled LoRA forward (dynamic row width) vs eager
  orthogonalize        Newton-Schulz: CUDA (bf16, as in training) vs CPU fp32; CPU: fp32 vs a float64 copy
  quant_roundtrip      Hessians + GPTQ + pack_artifact / unpack_artifact from (CUDA) tensors: unpacked
                       entries identical, dequantized weights close, model_from_artifact on the device gives
                       the loss of the same artifact rebuilt on CPU; under the run's global TF32 setting
  gptq_tf32_independent, fa3_varlen_buckets, step_host_syncs   check_wave2: what only a GPU can confirm of the
                       CPU nets of tests/test_cuda_wave2.py (docs/performance.md)
The run's TF32 setting (on, as init_runtime sets it) holds throughout; checks against true fp32 references turn it
off for themselves (train_gpt.true_fp32). The attention backend a sota run would use, and why, is printed first
and kept in checks.json. checks.json is rewritten after every check: a killed run keeps what passed.
Each check prints one line; the exit status is the number of failed checks (0 = all pass).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

import train_gpt as T  # noqa: E402

CPU = torch.device("cpu")

TINY = dict(PRESET="cpu_smoke", NUM_LAYERS="4", MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="2",
            TRAIN_SEQ_LEN="128", EVAL_SEQ_LEN="128", TRAIN_BATCH_TOKENS="2048", LOOP_START="1", LOOP_END="2",
            NUM_LOOPS="1", PARALLEL_START_LAYER="3", XSA_LAST_N="4", ROPE_DIMS="8", GATE_WINDOW="8",
            QUANT_MIN_NUMEL="1024", LQER_ENABLED="1", COMPILE="0")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def tiny_hp(**over) -> T.Hyperparameters:
    return T.Hyperparameters.from_env({**TINY, **{k.upper(): str(v) for k, v in over.items()}})


def random_rows(B: int, Tn: int, vocab: int, bos: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows with documents of varied length (BOS at random places, some short docs)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (B, Tn + 1), generator=g)
    for b in range(B):
        for p in torch.randint(1, Tn, (3 + b,), generator=g).tolist():
            ids[b, p] = bos
    ids[0, 5] = bos  # a 1-2 token document
    ids[0, 6] = bos
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


class RandomBatches:
    """A calibration loader of random_rows batches (4 rows of TRAIN_SEQ_LEN), each from its own seed."""

    def __init__(self, hp, device: torch.device, bos: int, seed: int):
        self.hp, self.device, self.bos, self.seed = hp, device, bos, seed

    def next_batch(self):
        self.seed += 1
        x, y = random_rows(4, self.hp.train_seq_len, self.hp.vocab_size, self.bos, self.seed)
        return x.to(self.device), y.to(self.device)


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


# ---- checks ----------------------------------------------------------------------------------------

def check_attention(device: torch.device) -> list[dict]:
    out = []
    g = torch.Generator().manual_seed(1)
    B, Tn, H, Hkv, D = 2, 256, 8, 4, 64
    q, k, v = (torch.randn(B, Tn, h, D, generator=g) for h in (H, Hkv, Hkv))
    ids, _ = random_rows(B, Tn, 100, 1, 2)
    ref = T.attention_reference(q, k, v, T.prepare_attention("reference", ids, 1))
    if device.type == "cuda":
        names = ["sdpa", "flex"]
        try:
            import flash_attn_interface  # noqa: F401
            names.append("flash3")
        except ImportError:
            out.append(dict(name="attention_flash3", ok=None, detail="skipped: flash_attn_interface not importable"))
        dtypes = [torch.bfloat16, torch.float32]
    else:
        names, dtypes = ["sdpa"], [torch.float32]
    for name in names:
        for dt in dtypes:
            if name == "flash3" and dt == torch.float32:
                continue  # FA3 takes fp16/bf16 only
            label = f"attention_{name}_{str(dt).split('.')[-1]}"
            try:
                fn = T.ATTENTION_BACKENDS[name]
                y = fn(*(t.to(device, dt) for t in (q, k, v)), T.prepare_attention(name, ids.to(device), 1))
                err = rel_err(y.float(), ref)
                tol = 2e-2 if dt == torch.bfloat16 else (1e-3 if device.type == "cuda" else 1e-5)
                out.append(dict(name=label, ok=err < tol, detail=f"rel_err {err:.2e} (tol {tol:.0e})", value=err))
            except Exception as e:  # a backend that does not run is a failure, with its reason
                out.append(dict(name=label, ok=False, detail=f"{type(e).__name__}: {str(e)[:160]}"))
    return out


def check_kernels(device: torch.device) -> list[dict]:
    """Triton kernels (fused softcapped CE, fused LeakyReLU^2 up-projection) vs their eager references:
    values and gradients. CUDA only (the interpreter tests of tests/ cover them on CPU)."""
    names = ("kernel_softcap_ce", "kernel_leaky_relu_sq_up", "kernel_leaky_relu_sq_up_speed")
    if device.type != "cuda" or not getattr(T, "HAS_TRITON", False):
        why = "needs CUDA" if device.type != "cuda" else "triton not importable"
        return [dict(name=n, ok=None, detail=f"skipped: {why}") for n in names]
    out = []
    g = torch.Generator().manual_seed(6)
    z = (torch.randn(512, 1024, generator=g) * 20).to(device, torch.bfloat16)
    t = torch.randint(0, 1024, (512,), generator=g).to(device)
    for name, fn_ref, fn in (("kernel_softcap_ce", T.softcap_cross_entropy, T.softcap_cross_entropy_fused),):
        try:
            za, zb = z.clone().requires_grad_(), z.clone().requires_grad_()
            la, lb = fn_ref(za, t, 30.0), fn(zb, t, 30.0)
            la.backward()
            lb.backward()
            dl, dg = abs(float(la) - float(lb)) / abs(float(la)), rel_err(zb.grad.float(), za.grad.float())
            out.append(dict(name=name, ok=dl < 1e-3 and dg < 2e-2, value=dg,
                            detail=f"loss rel {dl:.1e} (tol 1e-3); grad rel_err {dg:.2e} (tol 2e-2)"))
        except Exception as e:
            out.append(dict(name=name, ok=False, detail=f"{type(e).__name__}: {str(e)[:200]}"))
    try:
        x = torch.randn(1024, 512, generator=g).to(device, torch.bfloat16)
        w = (torch.randn(2048, 512, generator=g) / 512 ** 0.5).to(device, torch.bfloat16)
        xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
        xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
        ya, yb = T.leaky_relu_sq_up(xa, wa, 0.5), T.leaky_relu_sq_up_fused(xb, wb, 0.5)
        gy = torch.randn(ya.shape, generator=g).to(device, torch.bfloat16)
        ya.backward(gy)
        yb.backward(gy)
        e = [rel_err(yb.float(), ya.float()), rel_err(xb.grad.float(), xa.grad.float()),
             rel_err(wb.grad.float(), wa.grad.float())]
        out.append(dict(name="kernel_leaky_relu_sq_up", ok=max(e) < 2e-2, value=max(e),
                        detail=f"out/dx/dw rel_err {e[0]:.1e}/{e[1]:.1e}/{e[2]:.1e} (tol 2e-2)"))
    except Exception as e:
        out.append(dict(name="kernel_leaky_relu_sq_up", ok=False, detail=f"{type(e).__name__}: {str(e)[:200]}"))
    out.append(_mlp_kernel_speed(device))
    return out


def _mlp_kernel_speed(device: torch.device) -> dict:
    """FUSED_MLP_ENABLED is off until the Triton kernel beats inductor's compiled eager up-projection: both,
    forward + backward in bf16 at the sota micro-batch (98,304 x 512 -> 2048), best of 10 after warm-up."""
    name = "kernel_leaky_relu_sq_up_speed"
    try:
        g = torch.Generator().manual_seed(7)
        x = torch.randn(98_304, 512, generator=g).to(device, torch.bfloat16).requires_grad_()
        w = (torch.randn(2048, 512, generator=g) / 512 ** 0.5).to(device, torch.bfloat16).requires_grad_()
        gy = torch.randn(98_304, 2048, generator=g).to(device, torch.bfloat16)
        eager = torch.compile(T.leaky_relu_sq_up, fullgraph=True)

        def best_ms(fn) -> float:
            times = []
            for i in range(13):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn(x, w, 0.5).backward(gy)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            return 1000 * min(times[3:])
        fused, compiled = best_ms(T.leaky_relu_sq_up_fused), best_ms(eager)
        return dict(name=name, ok=True, value=fused / compiled,
                    detail=f"fwd+bwd: Triton fused {fused:.2f} ms vs compiled eager {compiled:.2f} ms "
                           f"(ratio {fused / compiled:.2f}; FUSED_MLP_ENABLED=1 pays only below 1)")
    except Exception as e:
        return dict(name=name, ok=False, detail=f"{type(e).__name__}: {str(e)[:200]}")


def _loss_and_grads(model, ids, y, autocast_dtype=None, device_type="cpu", fwd=None):
    model.zero_grad(set_to_none=True)
    with torch.autocast(device_type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        loss = (model if fwd is None else fwd)(ids, y)  # not `fwd or model`: truthiness of a module calls len()
    loss.backward()
    grads = {n: p.grad.detach().float().cpu().clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads


def _compare(name, loss, grads, ref_loss, ref_grads, loss_tol, grad_tol) -> dict:
    dl = abs(loss - ref_loss) / max(abs(ref_loss), 1e-9)
    errs = {n: rel_err(grads[n], ref_grads[n]) for n in ref_grads if ref_grads[n].norm() > 0}
    worst = max(errs, key=errs.get)
    total = rel_err(torch.cat([grads[n].flatten() for n in errs]), torch.cat([ref_grads[n].flatten() for n in errs]))
    ok = dl < loss_tol and total < grad_tol and errs[worst] < 3 * grad_tol and set(grads) == set(ref_grads)
    return dict(name=name, ok=ok, value=total,
                detail=f"loss {loss:.5f} vs {ref_loss:.5f} (rel {dl:.1e}); grads rel_err all {total:.2e}, "
                       f"worst {errs[worst]:.2e} ({worst}) tol {grad_tol:.0e}")


def check_model(device: torch.device, compile_too: bool) -> list[dict]:
    out = []
    hp = tiny_hp()
    bos = 1
    ids, y = random_rows(2, hp.train_seq_len, hp.vocab_size, bos, 3)
    ref_model = randomize(T.GPT(hp, bos, "reference"))
    ref_model.looping = True
    ref_loss, ref_grads = _loss_and_grads(ref_model, ids, y)
    if device.type == "cuda":
        backend = T.choose_attention_backend(hp, device)
        m = copy.deepcopy(ref_model).to(device)
        m.attn_backend = backend
        loss, grads = _loss_and_grads(m, ids.to(device), y.to(device), torch.bfloat16, "cuda")
        out.append(_compare(f"model_fwd_bwd_cuda_bf16_{backend}", loss, grads, ref_loss, ref_grads, 2e-2, 6e-2))
        m32 = copy.deepcopy(ref_model).to(device)
        m32.attn_backend = "sdpa"
        loss, grads = _loss_and_grads(m32, ids.to(device), y.to(device), None, "cuda")
        out.append(_compare("model_fwd_bwd_cuda_fp32_sdpa", loss, grads, ref_loss, ref_grads, 1e-3, 1e-2))
        if compile_too:
            t0 = time.perf_counter()
            try:
                mc = copy.deepcopy(ref_model).to(device)
                mc.attn_backend = backend
                fwd = T.maybe_compile(mc, tiny_hp(COMPILE=1), device)
                loss, grads = _loss_and_grads(mc, ids.to(device), y.to(device), torch.bfloat16, "cuda", fwd)
                r = _compare(f"model_fwd_bwd_cuda_bf16_{backend}_compiled", loss, grads, ref_loss, ref_grads,
                             2e-2, 6e-2)
                r["detail"] += f"; compile+run {time.perf_counter() - t0:.0f}s"
                out.append(r)
            except Exception as e:
                out.append(dict(name="model_fwd_bwd_compiled", ok=False, detail=f"{type(e).__name__}: {str(e)[:200]}"))
    else:
        m = copy.deepcopy(ref_model)
        m.attn_backend = "sdpa"
        loss, grads = _loss_and_grads(m, ids, y)
        out.append(_compare("model_fwd_bwd_cpu_fp32_sdpa", loss, grads, ref_loss, ref_grads, 1e-5, 1e-4))
        loss, grads = _loss_and_grads(m, ids, y, torch.bfloat16, "cpu")
        out.append(_compare("model_fwd_bwd_cpu_bf16_sdpa", loss, grads, ref_loss, ref_grads, 2e-2, 6e-2))
        if compile_too:  # the compiled check's code runs on CPU too, so a Python slip in it fails here first;
            t0 = time.perf_counter()  # backend aot_eager: dynamo + autograd tracing (tests/ cover inductor)
            mc = copy.deepcopy(ref_model)
            mc.attn_backend = "sdpa"
            fwd = torch.compile(mc, fullgraph=True, backend="aot_eager")
            loss, grads = _loss_and_grads(mc, ids, y, None, "cpu", fwd)
            r = _compare("model_fwd_bwd_cpu_fp32_sdpa_aot_eager", loss, grads, ref_loss, ref_grads, 1e-4, 1e-3)
            r["detail"] += f"; compile+run {time.perf_counter() - t0:.0f}s"
            out.append(r)
    return out


def check_compiled_paths(device: torch.device) -> list[dict]:
    """CUDA: code paths compiled as a real run compiles them, at tiny shapes, against eager / the reference.
    flash3_stand_in_compiled: the FA3 path of train_gpt (fixed-length cu_seqlens from torch.nonzero_static, the
      device-side capacity assert, max_seqlen = row length) under inductor, through the FA3 stand-in of
      tests/fake_fa3 (a reference kernel with FA3's interface and checks) when the real FA3 is not installed;
    ttt_compiled: phased TTT with the compiled LoRA forward (dynamic row width) and global SGD vs the same eager.
    On CPU both are covered by tests/test_cuda_nets.py (graph counts, recompiles, an inductor pipeline run)."""
    names = ("flash3_stand_in_compiled", "ttt_compiled")
    if device.type != "cuda":
        return [dict(name=n, ok=None, detail="skipped: needs CUDA (tests/test_cuda_nets.py covers CPU)") for n in names]
    out = []
    hp = tiny_hp(COMPILE=1)
    bos = 1
    ids, y = random_rows(2, hp.train_seq_len, hp.vocab_size, bos, 3)
    ref_model = randomize(T.GPT(hp, bos, "reference"))
    ref_model.looping = True
    ref_loss, ref_grads = _loss_and_grads(ref_model, ids, y)
    t0 = time.perf_counter()
    try:
        import flash_attn_interface  # noqa: F401
        out.append(dict(name=names[0], ok=None, detail="skipped: the real FA3 is installed (attention_flash3 ran)"))
    except ImportError:
        try:
            from bench.memory_trace import fa3_stand_in
            sys.modules["flash_attn_interface"] = fa3_stand_in()
            m = copy.deepcopy(ref_model).to(device)
            m.attn_backend = "flash3"
            loss, grads = _loss_and_grads(m, ids.to(device), y.to(device), torch.bfloat16, "cuda",
                                          T.maybe_compile(m, hp, device))
            r = _compare(names[0], loss, grads, ref_loss, ref_grads, 2e-2, 6e-2)
            r["detail"] += f"; compile+run {time.perf_counter() - t0:.0f}s"
            out.append(r)
        except Exception as e:
            out.append(dict(name=names[0], ok=False, detail=f"{type(e).__name__}: {str(e)[:200]}"))
        finally:
            sys.modules.pop("flash_attn_interface", None)
    t0 = time.perf_counter()
    try:
        g = torch.Generator().manual_seed(9)
        toks = torch.randint(2, hp.vocab_size, (6000,), generator=g)
        toks[torch.randperm(5999, generator=g)[:30]] = bos
        toks[0] = bos
        val = T.ValidationData(toks, torch.ones(5999, dtype=torch.int32), "synthetic")
        rt = T.Runtime(0, 1, 0, device, False, 8, "", T.RunLogger([], enabled=False))
        bpb = {}
        for comp in ("1", "0"):
            # TTT_EVAL_SEQ_LEN 256: row widths of one and of several FlexAttention blocks (64 ... 256)
            hpt = tiny_hp(COMPILE=comp, PHASED_TTT_PREFIX_DOCS=6, PHASED_TTT_NUM_PHASES=2, TTT_BATCH_SIZE=4,
                          TTT_LORA_RANK=4, TTT_CHUNK_SIZE=32, TTT_EVAL_SEQ_LEN=256, GLOBAL_TTT_CHUNK_TOKENS=1024)
            m = copy.deepcopy(ref_model).to(device)
            m.attn_backend = T.choose_attention_backend(hpt, device)
            with counting_compiles() as graphs:
                bpb[comp] = T.eval_ttt(m, val, hpt, rt, "ttt", True).val_bpb
        d = abs(bpb["1"] - bpb["0"]) / bpb["0"]
        # score+train, score only (dynamic width), global SGD: FlexAttention used to compile the first two twice
        ok = d < 2e-2 and len(graphs) == 3
        out.append(dict(name=names[1], ok=ok, value=d, detail=f"{m.attn_backend}: val_bpb compiled {bpb['1']:.4f} vs "
                        f"eager {bpb['0']:.4f} (rel {d:.1e}, tol 2e-2); {len(graphs)} inductor graphs (3 expected: "
                        f"widths 64-256 share one per TTT graph); {time.perf_counter() - t0:.0f}s with compile"))
    except Exception as e:
        out.append(dict(name=names[1], ok=False, detail=f"{type(e).__name__}: {str(e)[:200]}"))
    return out


@contextlib.contextmanager
def counting_compiles():
    """torch.compile with its backend (inductor unless given) wrapped to record each graph dynamo hands it."""
    real, graphs = torch.compile, []

    def compile_counting(fn=None, **kw):
        inner = kw.pop("backend", "inductor")

        def backend(gm, example_inputs):
            graphs.append(gm)
            return torch._dynamo.lookup_backend(inner)(gm, example_inputs)
        return real(fn, **kw, backend=backend)
    torch.compile = compile_counting
    try:
        yield graphs
    finally:
        torch.compile = real


@functools.lru_cache(maxsize=None)
def attention_backend_report(device: torch.device) -> str:
    """Which attention backend train_gpt.py would run at the sota settings here, and why (FA3 importable? its
    varlen call traced with fullgraph=True?), with the FA3 module's origin."""
    hp = T.Hyperparameters.from_env({"PRESET": "sota"})
    try:
        backend, why = T.attention_backend_for_run(hp, device)
    except T.ConfigError as e:
        backend, why = "refused", str(e)
    try:
        import flash_attn_interface as fa
        origin = f"; flash_attn_interface from {getattr(fa, '__file__', '?')}"
    except ImportError:
        origin = "; no flash_attn_interface (docs/runpod_guide.md: FA3 install)"
    return f"{backend}: {why}{origin}"


def check_wave2(device: torch.device) -> list[dict]:
    """The CUDA-only halves of tests/test_cuda_wave2.py's nets (docs/performance.md, CUDA nets):
    gptq_tf32_independent  Hessian sums and GPTQ give identical results with the global TF32 flag on (as
                           init_runtime sets it) and off: true_fp32() holds inside them (both devices)
    fa3_varlen_buckets     real FA3 at the training row [98304 tokens, 8/4 heads of 64], ~100 documents: forward
                           + backward with varlen_cu_seqlens' bucket vs the old fixed capacity (6,145 segments):
                           time and peak memory; then one compiled graph for two bucket sizes (CUDA + FA3 only)
    step_host_syncs        torch.cuda.set_sync_debug_mode over a training step's forward, backward and
                           Optimizers.step on device-resident rows: synchronizing calls counted (CUDA only)"""
    out = [_gptq_tf32(device)]
    if device.type != "cuda":
        return out + [dict(name=n, ok=None, detail="skipped: needs CUDA (tests/test_cuda_wave2.py covers CPU)")
                      for n in ("fa3_varlen_buckets", "step_host_syncs")]
    return out + [_fa3_varlen_buckets(device), _step_host_syncs(device)]


def _gptq_tf32(device: torch.device) -> dict:
    name = "gptq_tf32_independent"
    try:
        hp = tiny_hp()
        model = randomize(T.GPT(hp, 1, "sdpa"), seed=5).to(device)
        model.looping = True
        rt = T.Runtime(0, 1, 0, device, False, 1, "", T.RunLogger([], enabled=False))

        res = {}
        prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        for tf32 in (True, False):
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
            H = T.collect_hessians(model, RandomBatches(hp, device, 1, 300), 2, hp, rt)["blocks.0.mlp.fc.weight"]
            W = model.state_dict()["blocks.0.mlp.fc.weight"].float()
            res[tf32] = H, T.gptq_quantize(W, H, T.sdclip_scales(W, 12.0, 6).to(device), 6)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev
        same = torch.equal(res[True][0], res[False][0]) and torch.equal(res[True][1], res[False][1])
        return dict(name=name, ok=same, detail=f"Hessian and GPTQ codes with TF32 on vs off identical: {same}"
                    + ("" if device.type == "cuda" else " (CPU: the flags do not apply)"))
    except Exception as e:
        return dict(name=name, ok=False, detail=f"{type(e).__name__}: {str(e)[:200]}")


def _fa3_varlen_buckets(device: torch.device) -> dict:
    name = "fa3_varlen_buckets"
    try:
        import flash_attn_interface as fa
    except ImportError:
        return dict(name=name, ok=None, detail="skipped: flash_attn_interface not importable (the stand-in cannot "
                    "run 98,304-token rows)")
    try:
        g = torch.Generator().manual_seed(11)
        row = 98_304
        ids = torch.randint(2, 8192, (1, row), generator=g)
        ids[torch.rand(1, row, generator=g) < 1 / 960] = 1
        cus = {"bucket": T.varlen_cu_seqlens(ids, 1, 2048), "fixed": None}
        seg = torch.cumsum(T.segment_starts(ids, 1, 2048).int(), -1)
        cus["fixed"] = T.cu_seqlens_from_segments(seg)
        q = torch.randn(row, 8, 64, generator=g).to(device, torch.bfloat16).requires_grad_()
        k, v = (torch.randn(row, 4, 64, generator=g).to(device, torch.bfloat16).requires_grad_() for _ in range(2))
        dout = torch.randn(row, 8, 64, generator=g).to(device, torch.bfloat16)

        def attend(cu):
            o = fa.flash_attn_varlen_func(q, k, v, cu, cu, 2048, 2048, causal=True)
            return o[0] if isinstance(o, tuple) else o
        res, outs = {}, {}
        for label, cu in cus.items():
            cu = cu.to(device)
            times = []
            for _ in range(4):
                q.grad = k.grad = v.grad = None
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                o = attend(cu)
                o.backward(dout)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            res[label] = (1000 * min(times[1:]), (torch.cuda.max_memory_allocated() - base) / 2 ** 20, cu.numel() - 1)
            outs[label] = (o.detach().float(), q.grad.float())
        same = rel_err(outs["bucket"][0], outs["fixed"][0]) < 1e-3 and rel_err(outs["bucket"][1], outs["fixed"][1]) < 1e-3
        # one compiled graph for two bucket sizes (cu_seqlens' length is a dynamic dimension)
        ids2 = ids.clone()
        ids2[0, torch.randperm(row, generator=g)[:300]] = 1
        with counting_compiles() as graphs:
            f = torch.compile(lambda q, k, v, cu: fa.flash_attn_varlen_func(q, k, v, cu, cu, 2048, 2048, causal=True),
                              fullgraph=True, dynamic=False)
            sizes = []
            for x in (ids, ids2):
                cu = T.varlen_cu_seqlens(x, 1, 2048).to(device)
                torch._dynamo.mark_dynamic(cu, 0)
                sizes.append(cu.numel() - 1)
                f(q, k, v, cu)
        (tb, mb, nb), (tf, mf, nf) = res["bucket"], res["fixed"]
        ok = same and tb <= 1.05 * tf and mb < mf and len(graphs) == 1 and sizes[0] != sizes[1]
        return dict(name=name, ok=ok, value=tb / tf,
                    detail=f"fwd+bwd {nb} segments {tb:.2f} ms, +{mb:,.0f} MiB vs fixed {nf}: {tf:.2f} ms, +{mf:,.0f} "
                           f"MiB; outputs equal: {same}; compiled graphs for buckets {sizes}: {len(graphs)} (1 expected)")
    except Exception as e:
        return dict(name=name, ok=False, detail=f"{type(e).__name__}: {str(e)[:200]}")


def _step_host_syncs(device: torch.device) -> dict:
    name = "step_host_syncs"
    try:
        import warnings
        hp = tiny_hp(GRAD_CLIP_NORM=0.3)
        model = randomize(T.GPT(hp, 1, "sdpa"), seed=6, scale=0.05).to(device)
        model.looping = True
        opt = T.Optimizers(model, hp, 1, 0)
        x, y = (t.to(device) for t in random_rows(2, hp.train_seq_len, hp.vocab_size, 1, 8))

        def step():
            with T.autocast_context(hp, device):
                loss = model(x, y)
            loss.backward()
            opt.set_schedule(1.0, 0.95)
            opt.step()
        step()  # one-off costs (allocator, lazy init) outside the measured step
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [str(w.message).splitlines()[0][:120] for w in caught if "synchroniz" in str(w.message)]
        return dict(name=name, ok=not syncs, value=len(syncs),
                    detail=f"{len(syncs)} synchronizing calls in forward + backward + Optimizers.step"
                           + (f"; first: {syncs[0]}" if syncs else ""))
    except Exception as e:
        return dict(name=name, ok=False, detail=f"{type(e).__name__}: {str(e)[:200]}")


def check_orthogonalize(device: torch.device) -> list[dict]:
    out = []
    g = torch.Generator().manual_seed(4)
    for coeffs in ("polar_express", "standard"):
        G = torch.randn(4, 128, 384, generator=g)
        G2 = torch.randn(3, 256, 64, generator=g)  # tall: the transposed path
        for label, M in (("wide", G), ("tall", G2)):
            ref = T.orthogonalize(M, 5, coeffs)  # CPU: fp32
            if device.type == "cuda":
                y = T.orthogonalize(M.to(device), 5, coeffs).float()
                err, tol, what = rel_err(y, ref), 0.1, "cuda bf16 vs cpu fp32 (bf16 emulated on CPU: 3-5e-2)"
            else:
                err, tol, what = rel_err(ref, T.orthogonalize(M, 5, coeffs, torch.float64).float()), 1e-4, "cpu fp32 vs float64"
                bf = rel_err(T.orthogonalize(M, 5, coeffs, torch.bfloat16).float(), ref)
                what += f"; bf16 emulated on cpu vs fp32 {bf:.1e}"
            out.append(dict(name=f"orthogonalize_{coeffs}_{label}", ok=err < tol, value=err,
                            detail=f"{what}: rel_err {err:.2e} (tol {tol:.0e})"))
    return out


def check_quant_roundtrip(device: torch.device) -> list[dict]:
    hp = tiny_hp(MATRIX_BITS=6, EMBED_BITS=7)
    bos = 1
    model = randomize(T.GPT(hp, bos, "sdpa"), seed=5).to(device)
    model.looping = True
    rt = T.Runtime(0, 1, 0, device, False, 1, "", T.RunLogger([], enabled=False))

    t0 = time.perf_counter()
    hess = T.collect_hessians(model, RandomBatches(hp, device, bos, 100), 2, hp, rt)
    entries, _table = T.quantize_state(model.state_dict(), hess, hp, log=lambda *a, **k: None)
    cfg = T.model_config_for_artifact(hp, bos, True)
    blob = T.pack_artifact(entries, cfg, hp.compressor)
    back, cfg2 = T.unpack_artifact(blob)
    same = cfg2 == json.loads(json.dumps(cfg)) and set(back) == set(entries)
    for n, e in entries.items():
        b = back[n]
        for f in ("q", "scale", "data"):
            x, z = getattr(e, f), getattr(b, f)
            if (x is None) != (z is None) or (x is not None and not torch.equal(x.cpu(), z.cpu())):
                same = False
        if (e.lqer is None) != (b.lqer is None):
            same = False
    deq = T.dequantize_state(back, cfg["lqer_asym_group"])
    sd = {k: v.float().cpu() for k, v in model.state_dict().items()}
    werr = max(rel_err(deq[n], sd[n]) for n in sd if sd[n].numel() >= 1024)
    ids, y = random_rows(2, hp.train_seq_len, hp.vocab_size, bos, 7)
    with torch.no_grad():
        ref_loss = float(T.model_from_artifact(blob, hp, CPU, "reference")(ids, y))
        dev_model = T.model_from_artifact(blob, hp, device, T.choose_attention_backend(hp, device))
        with T.autocast_context(hp, device):
            dev_loss = float(dev_model(ids.to(device), y.to(device)))
        orig_loss = float(model.to(device)(ids.to(device), y.to(device)))
    dl = abs(dev_loss - ref_loss) / abs(ref_loss)
    tol = 2e-2 if device.type == "cuda" else 1e-5
    ok = same and werr < 0.2 and dl < tol
    return [dict(name="quant_roundtrip", ok=ok, value=dl,
                 detail=f"unpack identical:{same}; worst dequant rel_err {werr:.3f} (<0.2; ~0.12 expected at 6 bits, 12.85 sigma clip); artifact {len(blob)} B; "
                        f"loss {device.type} {dev_loss:.4f} vs cpu {ref_loss:.4f} (rel {dl:.1e}, tol {tol:.0e}); "
                        f"unquantized {orig_loss:.4f}; {time.perf_counter() - t0:.1f}s")]


# ---- summary of a gpu_check.sh run ---------------------------------------------------------------

def mib(v) -> str:
    return "n/a (CPU)" if v is None else f"{v:,.0f} MiB"


def summarize(d: str) -> int:
    rows, bad = [], 0

    def add(stage, ok, detail):
        nonlocal bad
        status = "SKIP" if ok is None else ("PASS" if ok else "FAIL")
        bad += ok is False
        rows.append((stage, status, detail))
    env = os.path.join(d, "env.txt")
    if os.path.isfile(env):
        with open(env) as f:
            add("environment", True, " | ".join(line.strip() for line in f if line.strip())[:160])
    checks = os.path.join(d, "checks.json")
    if os.path.isfile(checks):
        with open(checks) as f:
            doc = json.load(f)
        if doc.get("attention_backend"):
            add("attention_backend", True, doc["attention_backend"])
        for r in doc["results"]:
            add(r["name"], r["ok"], r["detail"])
        if not doc.get("complete", True):
            add("checks", False, f"gpu_check.py was stopped during {doc.get('running')} (time limit or crash): the "
                "checks after it never ran; the ones above did")
    else:
        add("checks", False, "no checks.json (scripts/gpu_check.py did not finish)")
    tp = os.path.join(d, "throughput.json")
    if os.path.isfile(tp):
        with open(tp) as f:
            r = json.load(f)
        s = r["step"]
        add("throughput", True, f"{r['preset']} {s['tokens_per_step']} tok/step ({s['grad_accum']}x{s['micro_tokens']}): "
            f"{s['ms_per_step']:.1f} ms/step, {s['tokens_per_s']:,.0f} tok/s, MFU {100 * r['mfu']:.1f}% of measured "
            f"{r['mfu_peak_dtype']} peak {r['peak_bf16' if r['mfu_peak_dtype'] == 'bf16' else 'peak_fp32'] / 1e12:.1f} "
            f"TFLOP/s; fwd/bwd/opt {s['phase_ms']['forward']:.0f}/{s['phase_ms']['backward']:.0f}/"
            f"{s['phase_ms']['optimizer']:.0f} ms; mem {s['peak_mem_mib']:.0f} MiB; {s['attn_backend']}")
        comp = dict(s.get("compile_s", {}))
        for phase in ("eval", "ttt", "hessian"):
            if r.get(phase, {}).get("compiled"):
                comp[phase] = r[phase]["compile_s"]
        add("compile_seconds", bool(comp) or None, ", ".join(f"{k} {v:.0f}s" for k, v in comp.items()) or "not compiled")
        if "eval" in r:
            e = r["eval"]
            add("eval_throughput", True, f"{e['rows']} rows/forward: {e['tokens_per_s']:,.0f} tok/s, "
                f"peak {mib(e['peak_mem_mib'])}")
        if "ttt" in r:
            t = r["ttt"]
            add("ttt_throughput", True, f"score {t['score_only_tok_s']:,.0f}, score+train {t['score_tok_s']:,.0f}, "
                f"global SGD {t['sgd_tok_s']:,.0f} "
                f"tok/s, {t['rows_per_forward']} docs/forward, peak {mib(t['peak_mem_mib'])}")
        if "ttt_docs" in r:
            t = r["ttt_docs"]
            add("ttt_real_docs", True, f"{t['docs']} docs ({t['source']}, mean {t['mean_doc_len']:.0f} tokens): "
                f"{t['tokens_per_s']:,.0f} tok/s, {t['row_tokens_per_s']:,.0f} row tok/s (probe: "
                f"{r.get('ttt', {}).get('score_tok_s', 0):,.0f}), peak {mib(t['peak_mem_mib'])}")
        if "hessian" in r:
            h = r["hessian"]
            add("hessian_throughput", True, f"{h['batch_tokens']:,} tokens: {h['per_batch_s'] * 1000:,.0f} ms per "
                "calibration batch")
        for phase in ("eval", "ttt", "hessian"):
            if phase not in r:
                add(f"{phase}_throughput", False, "not measured (see throughput.log)")
        if "ttt_docs" not in r:
            add("ttt_real_docs", None, "not measured (phase ttt_docs not run or cut by the time limit)")
    else:
        add("throughput", False, "no throughput.json")
    rec_path = os.path.join(d, "e2e_record.json")
    if os.path.isfile(rec_path):
        with open(rec_path) as f:
            r = json.load(f)
        tr, art = r.get("train", {}), r.get("artifact", {})
        stages = ", ".join(f"{k} {v['val_bpb']:.4f}" for k, v in r.get("stages", {}).items())
        add("end_to_end", bool(art.get("under_limit")), f"{tr.get('steps')} steps {tr.get('step_avg_ms', 0):.0f} ms/step; "
            f"artifact {art.get('artifact_bytes')} B; val_bpb: {stages}; eval {r.get('eval_time_s', 0):.0f}s")
    else:
        add("end_to_end", False, "no e2e_record.json (see e2e.log)")
    w = max(len(a) for a, _, _ in rows)
    print(f"\n{'check'.ljust(w)}  result  detail")
    for a, s, dtl in rows:
        print(f"{a.ljust(w)}  {s:6s}  {dtl}")
    print(f"\n{sum(s == 'PASS' for _, s, _ in rows)} pass, {bad} fail, {sum(s == 'SKIP' for _, s, _ in rows)} skipped")
    return min(bad, 100)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true", help="run the CPU paths against the reference (no CUDA needed)")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled model check")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--summarize", default=None, metavar="DIR", help="print the final table of a gpu_check.sh run")
    a = ap.parse_args(argv)
    if a.summarize:
        return summarize(a.summarize)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    if not a.cpu and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu for the CPU mode", file=sys.stderr)
        return 2
    device = CPU if a.cpu else torch.device("cuda", 0)
    if device.type == "cuda":  # the flags of a real run (init_runtime); fp32 comparisons hold TF32 off themselves
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    print(f"attention backend (sota settings): {attention_backend_report(device)}", flush=True)
    results = []
    fp32 = {check_attention, check_model}  # compared against true fp32: TF32 off inside (T.true_fp32)
    for fn, args in ((check_attention, (device,)), (check_kernels, (device,)), (check_model, (device, not a.no_compile)),
                     (check_compiled_paths, (device,)), (check_orthogonalize, (device,)),
                     (check_quant_roundtrip, (device,)), (check_wave2, (device,))):
        write_checks(a.json, device, results, running=fn.__name__)  # a hang or a kill here keeps what passed
        t0 = time.perf_counter()
        try:
            with T.true_fp32() if fn in fp32 else contextlib.nullcontext():
                rs = fn(*args)
        except Exception as e:
            traceback.print_exc()
            rs = [dict(name=fn.__name__.replace("check_", ""), ok=False, detail=f"{type(e).__name__}: {str(e)[:200]}")]
        for r in rs:
            status = "SKIP" if r["ok"] is None else ("PASS" if r["ok"] else "FAIL")
            print(f"{status} {r['name']}: {r['detail']}", flush=True)
        print(f"     ({fn.__name__}: {time.perf_counter() - t0:.1f}s)", flush=True)
        results += rs
    failed = sum(r["ok"] is False for r in results)
    print(f"gpu_check.py ({device.type}): {sum(r['ok'] is True for r in results)} pass, {failed} fail, "
          f"{sum(r['ok'] is None for r in results)} skipped")
    write_checks(a.json, device, results)
    return min(failed, 100)


def write_checks(path: str | None, device: torch.device, results: list[dict], running: str | None = None) -> None:
    """checks.json rewritten atomically (temporary file, then os.replace) before every check and at the end:
    `running` names the check in progress, so a run killed by its time limit still reports what passed."""
    if not path:
        return
    doc = {"device": device.type, "torch": torch.__version__, "complete": running is None, "running": running,
           "attention_backend": attention_backend_report(device), "results": results}
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
