"""CPU nets for the second wave of CUDA-path defects (issue 26): each failed on e2550ad and passes now. What only a
GPU can confirm is listed per net in docs/performance.md ("CUDA nets") and measured by scripts/gpu_check.py.

Helpers and the graph-recording `graphs` fixture come from test_cuda_nets.py."""
import json
import math
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from conftest import ROOT, T, cpu_runtime, randomize, tiny_hp
from test_cuda_nets import CPU, graphs, net_hp, rows_with_docs, synthetic_val  # noqa: F401  (graphs: a fixture)

from bench import throughput  # noqa: E402
from bench import memory_trace as M  # noqa: E402
from data.shard_tools import write_shard  # noqa: E402

FA = M.fa3_stand_in()


def fineweb_like_stream(n_tokens: int, mean_doc: float, seed: int) -> np.ndarray:
    """Tokens 2..1023 with a BOS (1) starting each document; document lengths geometric with mean `mean_doc`
    (FineWeb averages ~960 tokens per document, spec §7.4)."""
    rng = np.random.default_rng(seed)
    toks = rng.integers(2, 1024, n_tokens)
    toks[rng.random(n_tokens) < 1.0 / mean_doc] = 1
    toks[0] = 1
    return toks


# ---- 1. FA3 varlen: the segments launched are the real ones -------------------------------------------------

def test_fa3_training_row_launches_the_real_segments(tmp_path, monkeypatch, fake_fa3):
    """The training step's row [1, 98304] (TRAIN_BATCH_TOKENS / 8 per micro-step, packed, pieces of 2048) with
    ~100 FineWeb-like documents: every FA3 call gets the real segments, padded to a multiple of 64, within 2x
    of the document count. Before, cu_seqlens had the fixed capacity 6,145: FA3 launches tiles for each segment
    (~786k in the backward instead of ~16k) and its backward workspace grows by 128 tokens per segment."""
    monkeypatch.setattr(fake_fa3, "LAUNCHES", [])
    # count launches only: the stand-in's dense reference would need [heads, 98304, 98304] scores
    monkeypatch.setattr(fake_fa3, "_reference", lambda q, k, v, cu, m: (
        torch.zeros_like(q), q.new_zeros((q.size(1), q.size(0)), dtype=torch.float32)))
    monkeypatch.setattr(fake_fa3, "_reference_grads", lambda do, q, k, v, cu, m: (
        torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)))
    row = 98_304
    write_shard(str(tmp_path / "fineweb_train_000000.bin"), fineweb_like_stream(row + 1, 960.0, 0))
    hp = net_hp(ATTN_BACKEND="flash3", COMPILE="0", AUTOCAST_BF16="1", TRAIN_SEQ_LEN="2048", EVAL_SEQ_LEN="2048",
                TTT_EVAL_SEQ_LEN="2048", TRAIN_BATCH_TOKENS=str(row), DATA_PATH=str(tmp_path))
    rt = T.Runtime(0, 1, 0, CPU, False, 1, str(tmp_path), T.RunLogger([], False))  # one micro-step: [1, 98304]
    model = T.GPT(hp, 1, "flash3")
    model.train()
    model.looping, model.doc_piece_len = True, 2048
    step = T.make_train_step(hp, rt, model, T.Optimizers(model, hp, 1, 0))
    step(T.make_train_loader(hp, rt, T.list_shards(str(tmp_path), "train")), 0, 0.0)
    x = torch.from_numpy(T.load_shard(T.list_shards(str(tmp_path), "train")[0])[:row].astype(np.int64))[None]
    docs = int((x == 1).sum()) + (int(x[0, 0]) != 1)
    segments = int(T.segment_starts(x, 1, 2048).sum())  # documents + their cuts every 2048 tokens
    assert 60 < docs < 160 and docs <= segments
    launches = fake_fa3.LAUNCHES
    assert len(launches) == 3  # one per layer application
    heads, m = hp.num_heads, fake_fa3.tile_sizes(hp.model_dim // hp.num_heads)[0]
    for la in launches:
        assert segments <= la["segments"] <= 2 * docs, (la, docs)
        assert la["max_seqlen"] == 2048
        assert la["tiles"] <= 2 * math.ceil(2048 / m) * heads * docs
    # the record's shapes (8 / 4 heads of 64): the backward workspace at the old capacity and now
    old_ws = fake_fa3.workspace_bytes(row, T.cu_seqlens_capacity(1, row), 8, 4, 64, 2048)
    new_ws = fake_fa3.workspace_bytes(row, launches[0]["segments"], 8, 4, 64, 2048)
    assert old_ws > 3.3 * 2 ** 30 and new_ws < 0.6 * 2 ** 30


def test_memory_trace_counts_the_fa3_backward_workspace():
    """bench/memory_trace.py saw no FA3 backward workspace (~3.4 GiB per call at the old capacity): the stand-in's
    backward now returns it at FA3's shapes, so the trace holds it for the duration of the backward."""
    with M.traced() as tr:
        q = torch.empty(98_304, 8, 64, dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.empty(98_304, 4, 64, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        cu = torch.empty(T.cu_seqlens_capacity(1, 98_304) + 1, dtype=torch.int32)
        out = FA.flash_attn_varlen_func(q, k, v, cu, cu, 2048, 2048, causal=True)[0]
        before = tr.current
        out.backward(torch.empty_like(out))
        grads = sum(t.numel() * 2 for t in (q, k, v))
        ws = FA.workspace_bytes(98_304, cu.numel() - 1, 8, 4, 64, 2048)
        assert tr.peak - before >= ws + grads
    assert M.trace_segments(48, 2048) == 448  # the bucket the train / eval phases trace with


# ---- 2. the throughput stage compiles the e2e run's graphs ------------------------------------------------------

def graph_signature(gm) -> tuple:
    shapes = tuple(tuple(str(d) for d in n.meta["example_value"].shape) for n in gm.graph.nodes
                   if n.op == "placeholder" and isinstance(n.meta.get("example_value"), torch.Tensor))
    return shapes, gm.code


def test_throughput_compiles_the_graphs_the_run_compiles(sample, graphs, tmp_path):
    """bench/throughput.py (gpu_check.sh stage d) warmed [48, 2048] rows without piece cuts while train_gpt's
    warm-up (stage e) compiles one packed row with doc_piece_len: e2e compiled cold. Both now take the layout
    from micro_batch_shape and the shapes from shapes_to_warm: the same dynamo graphs, input shapes and code."""
    graphs.backend = "eager"
    hp = net_hp(**sample, COMPILE="1", WARMUP_STEPS="1", TRAIN_BATCH_TOKENS="512")  # 2 x [1, 256], pieces of 128
    rt = T.Runtime(0, 1, 0, CPU, False, 2, str(tmp_path), T.RunLogger([], False))
    torch.manual_seed(0)
    model = T.GPT(hp, 1, "sdpa")
    opt = T.Optimizers(model, hp, 1, 0)
    T.warm_up(hp, rt, model, opt, T.make_train_step(hp, rt, model, opt), T.list_shards(hp.data_path, "train"))
    run = {graph_signature(gm) for gm in graphs}
    assert len(run) == len(T.shapes_to_warm(hp)) == 2  # looping off, on
    graphs.clear()
    throughput.bench_step(hp, CPU, steps=1, warmup=0, grad_accum=2, looping=True, data="synthetic", doc_len=100.0)
    assert {graph_signature(gm) for gm in graphs} == run


def test_gpu_check_sh_bounds_every_wait():
    """The e2e stage waited on the sample build with no limit, and its limit (E2E_SECONDS + 90 s) could not hold the
    cold compiles measured on an H200 (~190 s for the two training graphs): every background job is now under
    `timeout`, each stage limit is derived from the measured compile seconds and clipped to what is left of
    the script's budget."""
    src = open(os.path.join(ROOT, "scripts", "gpu_check.sh")).read()
    runs = [line for line in src.splitlines() if re.search(r"\$PY |nvidia-smi ", line) and "echo " not in line
            and ("command -v" not in line or "nvidia-smi >>" in line)]
    assert len(runs) >= 8 and all("timeout" in line for line in runs), [r for r in runs if "timeout" not in r]
    build = next(line for line in runs if "build_offline_sample" in line)
    assert build.rstrip().endswith("&")  # the job (e) waits for is the one under timeout
    assert int(re.search(r"TRAIN_COMPILE_S=(\d+)", src).group(1)) >= 190  # the H200 measurement
    assert re.search(r"LIMIT_E2E=\$\(\( \$\{E2E_SECONDS:-60\} \+ TRAIN_C", src) and "stage_limit $LIMIT_E2E" in src


# ---- 3. eval and TTT graphs are static, in the real order: test_cuda_nets.py::test_eval_and_ttt_compile_once ----


# ---- 4. FlexAttention's TTT graphs: as many as FA3's -------------------------------------------------------------

def test_flex_ttt_row_widths_compile_once(graphs, fake_fa3):
    """create_block_mask inside the compiled TTT forward sized its block tensors by ceil(T/128): a width of one
    block specialized (T <= 128) and each TTT graph compiled twice (5 graphs where FA3 has 3). The causal mask
    of one-document rows now has the static size of the model's longest row (causal_block_mask). Forward only:
    FlexAttention has no CPU backward."""
    graphs.backend = "eager"
    hp = net_hp(COMPILE="1", TTT_EVAL_SEQ_LEN="512", EVAL_SEQ_LEN="512")
    counts = {}
    for backend in ("flash3", "flex"):
        model = randomize(T.GPT(hp, 1, backend), scale=0.05).eval()
        model.looping = True
        lora = T.BatchedLoRA(2, 4, 8.0, model.lora_shapes(hp), CPU)
        fwd = T.maybe_compile(model, hp, CPU)
        n0 = len(graphs)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=backend == "flash3"):
            for width in (64, 128, 192, 320, 512):
                x, y = rows_with_docs(0, width, rows=2, width=width)
                T.mark_row_width_dynamic(x, y)
                out = fwd(x, y, lora=lora.weights(0, 2), reduction="none", rows_are_docs=True)
                if backend == "flex" and width in (64, 320):  # the mask is causal within each row
                    ref = T.GPT(hp, 1, "reference").eval()
                    ref.load_state_dict(model.state_dict())
                    ref.looping = True
                    assert torch.allclose(out, ref(x, y, lora=lora.weights(0, 2), reduction="none",
                                                   rows_are_docs=True), atol=1e-4)
        counts[backend] = len(graphs) - n0
    assert counts == {"flash3": 1, "flex": 1}
    bm = T.causal_block_mask(300, 512, CPU)
    assert bm.to_dense()[0, 0].tolist() == [[int(j <= i) for j in range(5)] for i in range(5)]


# ---- 5. TTT: no forward on a sub-batch of padding ----------------------------------------------------------------

def test_ttt_runs_no_forward_on_padding(monkeypatch, tmp_path):
    """Compiled TTT pads each batch to whole sub-batches of ttt_rows_per_forward() rows; late chunks of a batch
    (only its longest documents left) were forwarded as sub-batches of pure padding in the scoring pass (the
    skip applied only to grad steps g >= 1): in the toy run 47 of 76 forwards. Now none, and every token is
    still scored exactly once."""
    calls = []
    real_forward = T.GPT.forward

    def counting(self, ids, *a, **k):
        calls.append(bool(ids.abs().sum()))  # padding rows are all token 0; real rows never are
        return real_forward(self, ids, *a, **k)
    monkeypatch.setattr(T.GPT, "forward", counting)
    monkeypatch.setattr(T, "maybe_compile", lambda fn, hp, device: lambda *a, **k: fn(*a, **k))  # padded path
    hp = net_hp(TTT_BATCH_SIZE="8", VAL_BATCH_TOKENS="2048", PHASED_TTT_PREFIX_DOCS="0", TTT_GRAD_STEPS="2")
    assert T.ttt_rows_per_forward(hp) == 2
    val = synthetic_val(2500, 20, 3)
    model = randomize(T.GPT(hp, 1, "sdpa"), scale=0.05)
    model.looping = True
    res = T.eval_ttt(model, val, hp, cpu_runtime(tmp_path), "ttt", False, True, None, lambda *a, **k: None)
    assert res.tokens == val.num_targets  # keep_losses: ScoreBoard raises unless each token is scored once
    # measure_ttt_throughput's probe runs whole sub-batches; the pass after it must too
    assert calls and all(calls), f"{calls.count(False)} of {len(calls)} forwards were pure padding"


# ---- 6. GPTQ in true fp32 under the run's global TF32 --------------------------------------------------------------

class FlagSpy(TorchFunctionMode):
    """(caller function, op, TF32 flag) of every torch call made directly from train_gpt's Hessian hook or GPTQ."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        caller = sys._getframe(1).f_code
        if caller.co_filename.endswith("train_gpt.py") and caller.co_name in ("hook", "gptq_quantize") and \
                getattr(func, "__name__", "") != "__get__":  # attribute reads (.device, .T) compute nothing
            self.seen.append((caller.co_name, getattr(func, "__name__", str(func)),
                              torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def global_tf32():
    """TF32 on, as init_runtime sets it on CUDA (the flags exist on CPU builds too), restored afterwards."""
    mm, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    prev = mm.allow_tf32, cudnn.allow_tf32
    mm.allow_tf32 = cudnn.allow_tf32 = True
    yield
    mm.allow_tf32, cudnn.allow_tf32 = prev


def test_hessians_and_gptq_run_true_fp32_under_global_tf32(global_tf32):
    """init_runtime turns TF32 on for training; Hessian sums and GPTQ's Cholesky, inverse and error propagation
    then ran in TF32 in the real run while scripts/gpu_check.py turned TF32 off: the check validated another
    numeric path. true_fp32() now holds TF32 off inside them, whatever the global flags, and restores them."""
    hp = net_hp()
    model = randomize(T.GPT(hp, 1, "sdpa"), scale=0.05)

    class Batches:
        def next_batch(self):
            return rows_with_docs(4, 1)
    spy = FlagSpy()
    with spy:
        H = T.collect_hessians(model, Batches(), 2, hp, cpu_runtime(""))
        W = model.state_dict()["blocks.0.mlp.fc.weight"]
        name = "blocks.0.mlp.fc.weight"
        T.gptq_quantize(W, H[name], T.sdclip_scales(W, 12.0, 6), 6)
    assert {c for c, *_ in spy.seen} == {"hook", "gptq_quantize"}
    assert any(op in ("cholesky", "cholesky_inverse") for _, op, *_ in spy.seen)
    bad = [s for s in spy.seen if s[2] or s[3]]
    assert not bad, f"{len(bad)} of {len(spy.seen)} calls ran with TF32 allowed, e.g. {bad[:3]}"
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32  # restored


# ---- 7. gpu_check.py keeps what passed when it is killed -------------------------------------------------------

def test_gpu_check_killed_mid_run_keeps_earlier_results(tmp_path):
    """checks.json was written only at exit: a stage that hung or hit its limit lost every earlier result. It is
    now rewritten atomically before every check, naming the check in progress; --summarize reports the stop."""
    out = tmp_path / "checks.json"
    code = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {os.path.join(ROOT, 'scripts')!r})
        import gpu_check
        def check_orthogonalize(device):
            os._exit(137)  # killed by its time limit here
        gpu_check.check_orthogonalize = check_orthogonalize
        gpu_check.main(["--cpu", "--no-compile", "--json", {str(out)!r}])
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert p.returncode == 137, p.stdout[-2000:] + p.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["complete"] is False and doc["running"] == "check_orthogonalize"
    names = [r["name"] for r in doc["results"]]
    assert "attention_sdpa_float32" in names and "model_fwd_bwd_cpu_fp32_sdpa" in names
    assert all(r["ok"] is not False for r in doc["results"])
    assert not list(tmp_path.glob("checks.json.tmp*"))
    summary = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_check.py"), "--summarize",
                              str(tmp_path)], capture_output=True, text=True, timeout=120).stdout
    assert "PASS    rel_err" in summary and "stopped during check_orthogonalize" in summary


# ---- 8. an FA3 that does not trace is refused (or replaced) before training ----------------------------------------

PLAIN_FA3 = '''
"""An FA3 wheel without torch.library registration: flash_attn_varlen_func is a plain autograd.Function whose
kernels dynamo cannot trace (torch._dynamo.disable stands in for the C extension call)."""
import sys
import torch
sys.path.insert(0, {root!r})
from bench.memory_trace import fa3_stand_in  # noqa: E402  (its reference kernels, loaded once per process)
_ref = fa3_stand_in()


@torch._dynamo.disable
def _kernel_fwd(q, k, v, cu, m):
    return _ref._reference(q, k, v, cu, m)


@torch._dynamo.disable
def _kernel_bwd(do, q, k, v, cu, m):
    return _ref._reference_grads(do, q, k, v, cu, m)


class _Varlen(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu, m):
        out, lse = _kernel_fwd(q, k, v, cu, m)
        ctx.save_for_backward(q, k, v, cu)
        ctx.m = m
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, cu = ctx.saved_tensors
        return (*_kernel_bwd(dout, q, k, v, cu, ctx.m), None, None)


def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None, causal=False, **kw):
    return _Varlen.apply(q, k, v, cu_q, max_q)
'''


def plain_fa3(tmp_path):
    d = tmp_path / "plain_fa3"
    d.mkdir(exist_ok=True)
    (d / "flash_attn_interface.py").write_text(PLAIN_FA3.format(root=ROOT))
    return d


def test_fa3_without_library_ops_never_reaches_training(tmp_path, monkeypatch, fake_fa3, sample):
    """An older FA3 wheel calls its C extension from a plain autograd.Function: fullgraph=True breaks at the first
    compiled step, after data loading and the Hessian probe. attention_backend_for_run now traces FA3's varlen
    call first: the registered stand-in passes; the plain one falls back to flex under ATTN_BACKEND=auto and is
    refused with a clear message under ATTN_BACKEND=flash3, before any data is read."""
    flash3 = tiny_hp(ATTN_BACKEND="flash3", COMPILE="1")
    assert T.fa3_fullgraph_problem(CPU) is None
    assert T.attention_backend_for_run(flash3, CPU)[0] == "flash3"
    real_probe = T.fa3_fullgraph_problem
    monkeypatch.setattr(T, "fa3_fullgraph_problem", lambda device: real_probe(CPU))  # the probe runs on CPU here
    assert T.attention_backend_for_run(tiny_hp(ATTN_BACKEND="auto", COMPILE="1"), torch.device("cuda"))[0] == "flash3"

    import importlib.util
    spec = importlib.util.spec_from_file_location("plain_fa3", plain_fa3(tmp_path) / "flash_attn_interface.py")
    plain = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plain)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", plain)
    assert "does not compile with fullgraph=True" in real_probe(CPU)
    backend, why = T.attention_backend_for_run(tiny_hp(ATTN_BACKEND="auto", COMPILE="1"), torch.device("cuda"))
    assert backend == "flex" and "does not compile" in why
    with pytest.raises(T.ConfigError, match="ATTN_BACKEND=flash3 with torch.compile.*torch.library"):
        T.attention_backend_for_run(flash3, CPU)
    assert T.attention_backend_for_run(tiny_hp(ATTN_BACKEND="flash3", COMPILE="0"), CPU)[0] == "flash3"  # eager

    from conftest import TINY
    env = dict(os.environ)
    env.update(TINY, **sample, ATTN_BACKEND="flash3", COMPILE="1", PYTHONPATH=str(plain_fa3(tmp_path)),
               RUN_ID="plain_fa3", ARTIFACT_DIR=str(tmp_path / "run"), OMP_NUM_THREADS="2")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train_gpt.py")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "config error: ATTN_BACKEND=flash3 with torch.compile" in p.stderr, p.stderr[-2000:]
    assert "val_tokens" not in p.stdout and "warmup" not in p.stdout  # refused before data and training


# ---- 9. the supported torch range: stated once, and a script for its oldest version ---------------------------------

def test_torch_range_is_stated_and_its_oldest_version_has_a_script():
    """CPU CI runs torch 2.13, the H200 image had 2.11: the compile nets must also pass on the oldest supported
    torch. README and requirements.txt state one range; scripts/old_torch_nets.sh installs its lower end in a
    separate venv and runs the compile nets there."""
    req = open(os.path.join(ROOT, "requirements.txt")).read()
    lo, hi = re.search(r"supported: torch (\d+\.\d+) to (\d+\.\d+)", req).groups()
    assert re.search(rf"^torch>={re.escape(lo)}$", req, re.M)
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert f"torch {lo} to {hi}" in readme
    script = open(os.path.join(ROOT, "scripts", "old_torch_nets.sh")).read()
    assert re.search(rf"OLD_TORCH:-{re.escape(lo)}\.\d+", script) and 'torch==$VERSION' in script
    assert "test_cuda_nets.py" in script and "test_cuda_wave2.py" in script
    assert subprocess.run(["bash", "-n", os.path.join(ROOT, "scripts", "old_torch_nets.sh")]).returncode == 0
    major, minor = (int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    assert tuple(int(v) for v in lo.split(".")) <= (major, minor) <= tuple(int(v) for v in hi.split("."))


# ---- 10. no host sync inside the training step; TTT throughput on real documents -----------------------------------

@pytest.fixture
def scalar_reads(monkeypatch):
    """Calls of Tensor.item / __float__ / __int__ / __bool__ / tolist from code outside torch (on CUDA each is a
    host-device sync: torch.cuda.set_sync_debug_mode's view, on CPU)."""
    torch_dir = os.path.dirname(torch.__file__)
    seen = []
    for name in ("item", "__float__", "__int__", "__bool__", "tolist", "__index__"):
        real = getattr(torch.Tensor, name)

        def spy(self, *a, _real=real, _name=name, **k):
            caller = sys._getframe(1).f_code.co_filename
            if not caller.startswith(torch_dir):
                seen.append((_name, caller, sys._getframe(1).f_lineno))
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, spy)
    return seen


def test_training_step_reads_no_device_scalar(scalar_reads):
    """Optimizers.step read the gradient norm with float(sq.sqrt()) every step: a sync between backward and the
    update. The clip factor is now computed on the device; a step (micro-batches, clip, Muon, AdamW) reads no
    scalar back. The loop's logging steps still read the loss, by design."""
    hp = net_hp(GRAD_CLIP_NORM="0.3", ATTN_BACKEND="sdpa")
    rt = T.Runtime(0, 1, 0, CPU, False, 2, "", T.RunLogger([], False))
    model = randomize(T.GPT(hp, 1, "sdpa"), scale=0.05)
    model.train()
    model.looping, model.doc_piece_len = True, 64

    class Rows:
        def __init__(self):
            self.i = 0

        def next_host_batch(self):
            self.i += 1
            return rows_with_docs(6, self.i, rows=1, width=256)
        next_batch = next_host_batch  # CPU rows either way
    step = T.make_train_step(hp, rt, model, T.Optimizers(model, hp, 1, 0))
    before = [p.detach().clone() for p in model.parameters()]
    loader = Rows()
    scalar_reads.clear()
    for s in range(3):
        step(loader, s, s / 10)
    assert not scalar_reads, scalar_reads[:5]
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))  # it trained


def test_clip_on_the_device_matches_the_host_rule():
    """The device-side clip factor equals the old host rule: clip / (norm + 1e-6) above the threshold, 1 below."""
    for clip in (0.05, 100.0):
        hp = net_hp(GRAD_CLIP_NORM=str(clip))
        torch.manual_seed(0)
        m = randomize(T.GPT(hp, 1, "sdpa"), scale=0.05)
        opt = T.Optimizers(m, hp, 1, 0)
        x, y = rows_with_docs(3, 0, rows=2)
        m(x, y).backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        norm = torch.cat([g.float().reshape(-1) for g in grads.values()]).norm()
        emb_grad = m.tok_emb.weight.grad
        scale = clip / (float(norm) + 1e-6) if float(norm) > clip else 1.0
        expect = grads["tok_emb.weight"] * scale
        n = opt.step()
        assert isinstance(n, torch.Tensor) and float(n) == pytest.approx(float(norm), rel=1e-4)
        assert torch.allclose(emb_grad, expect, rtol=1e-4, atol=1e-9)  # AdamW's grads, clipped in place


def test_throughput_times_ttt_on_real_document_lengths(sample, monkeypatch):
    """measure_ttt_throughput times 4-chunk documents (193 tokens at the sota chunk); bench/throughput.py's
    ttt_docs phase runs the TTT pass over the val shard's documents, their real length distribution."""
    hp = net_hp(**sample, TTT_BATCH_SIZE="8")
    tokens, source = throughput.val_documents(hp, 1, 40_000, 500.0)
    shard = T.load_shard(T.list_shards(hp.data_path, "val")[0])
    assert source.startswith("val shard") and torch.equal(tokens, torch.from_numpy(shard[: tokens.numel()].astype(np.int64)))
    assert tokens[0] == 1 and tokens[-1] == 1 and len(T.find_docs(tokens, 1)) >= 3  # whole documents only
    # the timed pass itself on a short slice (the sample's documents run to thousands of tokens)
    short = torch.cat([tokens[:1], torch.randint(2, 1024, (700,)), torch.tensor([1]), torch.randint(2, 1024, (90,)),
                       torch.tensor([1])])
    monkeypatch.setattr(throughput, "val_documents", lambda *a, **k: (short, "val shard (slice)"))
    model = randomize(T.GPT(hp, 1, "sdpa"), scale=0.05)
    model.looping = True
    r = throughput.bench_ttt_docs(hp, CPU, model, 1, 40_000, 500.0)
    lengths = [L for _, L in T.find_docs(short, 1)]
    assert r["docs"] == len(lengths) >= 2 and r["max_doc_len"] == max(lengths) > 700
    assert r["mean_doc_len"] == pytest.approx(sum(lengths) / len(lengths))
    assert r["row_tokens_per_s"] > 0 and r["tokens"] == short.numel() - 1
