#!/usr/bin/env python3
"""Peak GPU memory of one rank of train_gpt.py, estimated on CPU from fake tensors at the real shapes.

    python bench/memory_trace.py                          # PRESET=sota: train / eval / TTT phases
    python bench/memory_trace.py --preset sota --json out.json
    NUM_LAYERS=13 python bench/memory_trace.py --phase train

Three phases, per rank (their shapes do not depend on the world size):
  train  GPT(hp, "flash3") in train mode, looping on, one micro-batch of TRAIN_BATCH_TOKENS/8 tokens in rows of
         TRAIN_SEQ_LEN: loss = model(x, y); loss.backward(). Live beside it, as train() keeps them between steps:
         fp32 parameters, Muon momentum and the reduce-scattered gradient shards Muon keeps (sharded over
         MUON_WORLD_SIZE ranks), AdamW exp_avg / exp_avg_sq, the EMA shadow (fp32 copy of the floating state).
  eval   eval mode, no_grad: model(x, y, reduction="none") on eval_rows_per_forward() rows of EVAL_SEQ_LEN.
  ttt    eval mode, base parameters frozen, a BatchedLoRA of TTT_BATCH_SIZE slots (rounded up to a multiple of
         ttt_rows_per_forward()), the one [rank, fan_in] A per target that ttt_score_docs keeps (init_A), its AdamW
         state; one forward + backward per sub-batch of ttt_rows_per_forward() rows, LoRA gradients accumulating
         across sub-batches as in ttt_score_docs. The phase peak is the max over the sub-batches.

Method. Everything runs under torch's FakeTensorMode: tensors carry shape, dtype and device but no data, so the
36M-parameter model at the record's shapes runs in seconds on CPU. A TorchDispatchMode above it sees every op's
outputs (below autograd, so the backward pass and the tensors autograd saves are seen too) and tracks live
tensor storage: +nbytes when an op returns a storage it has not seen, -nbytes when the storage is freed (weakref
on the storage object, which torch keeps alive exactly as long as the storage). The peak is the maximum of that
sum; the breakdown at the peak comes from replaying the allocation log up to it. All persistent state is created
as fake tensors inside the tracked region (by train_gpt's own Optimizers / Muon / ModelEMA / BatchedLoRA code
where possible), so nothing is added analytically.

Attention: while tracing, tests/fake_fa3/flash_attn_interface.py stands in as `flash_attn_interface` (a real FA3
wheel, where installed, is put back afterwards), a stand-in registered as a torch.library custom op with fake
implementations: on fake (and meta) tensors it dispatches to the fake kernel
(its CALLS counter stays 0) and autograd saves what FA3 saves (q, k, v, out, fp32 LSE; nothing T x T). Its
backward returns FA3's workspace at FA3's shapes (softmax_d, dq_accum and, with GQA, the zero-filled dk/dv
accumulators, all sized by tokens + 128 x segments), so the transient peak of each attention backward is in the
trace. The train and eval phases pass cu_seqlens of trace_segments() segments (fake tokens hold no BOS), the
bucket train_gpt.varlen_cu_seqlens gives rows with one document per TRACE_DOC_TOKENS tokens.

bf16 autocast. CUDA fake tensors cannot run autograd on a CPU-only torch build (AccumulateGrad asks for the CUDA
device guard, which is not linked) and torch.autocast("cuda") disables itself without CUDA, so the trace runs on
fake *CPU* tensors under torch.autocast("cpu", bfloat16) with the CPU autocast policy replaced by CUDA's: for
every aten op that has an AutocastCUDA kernel in this torch build, a Python kernel on the AutocastCPU key applies
CUDA's policy (bf16 for matmul-like ops with autocast's per-region cache of fp32 leaf-weight casts, fp32 for
rms_norm / pow / exp / ..., fp32 output dtype for sum / softmax / cumsum / vector norms, widest-type promotion),
and every CPU-only autocast op falls through as on CUDA. Casts happen above autograd, as in real autocast, so
backward saves the bf16 (or fp32) casts that CUDA autocast saves. forward_hidden's explicit embedding cast sees
autocast enabled. tests/test_memory_trace.py checks op by op that the emulation gives the dtypes the real
AutocastCUDA kernels give (probed on CUDA fake tensors without autograd).

CUDA-only kernels: train_gpt's Triton softcapped cross-entropy (and the fused LeakyReLU^2 MLP when enabled) run on
CUDA wherever gradients flow; here use_fused_kernels is made to answer as on an H100 with Triton, and the two
autograd Functions are replaced by stand-ins that allocate and save exactly what the Triton versions do (CE: the
bf16 logits, targets, fp32 LSE; MLP: x, w, pre-activation). No-grad eval runs the eager reference CE, as on CUDA.

What the estimate is. An eager trace of storage bytes that tensors occupy. Over-estimates: the record runs
torch.compile (inductor fuses elementwise chains, e.g. rms_norm, rotary, XSA, the reference CE in eval, and its
partitioner recomputes cheap ops instead of saving them), so a compiled step needs less than this trace: the
trace is an upper bound in that respect. Under-estimates: the CUDA context (~0.5 GiB, outside torch's
allocator), the caching allocator's rounding and fragmentation (reserved > allocated), cuBLAS / FA3 / NCCL
workspaces, Muon's optimizer-step temporaries (taken after backward, when activations are gone) and compile
workspaces are not counted. The budget check keeps a 10% margin for those.

Where eager bytes go (sota train, listed by the CLI per phase): the MLP's [tokens, 4d] hidden (pre-activation,
LeakyReLU output, its square: 3 x 6.4 GiB over 17 layer applications at 48 x 2048; the square is a * a, since
CUDA autocast runs aten::pow, i.e. .square(), in fp32, which cost another 12.75 GiB before this trace found it);
rms_norm saves fp32 casts of its inputs; XSA's normalize / sum run in fp32. Backward runs outside autocast, as
train_gpt runs it.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import sys
import time
import warnings
import weakref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE_FA3_PATH = os.path.join(ROOT, "tests", "fake_fa3", "flash_attn_interface.py")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.utils import _pytree as pytree  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from bench.common import T, env_fields, machine_info, table, write_json  # noqa: E402

GIB = 2 ** 30
# H100 SXM5 80 GB (the record's GPU): 80 GB of HBM3 per NVIDIA's datasheet; nvidia-smi reports 81,559 MiB, i.e.
# ~79.6 GiB, before the CUDA context. The budget is the nominal 80 GiB; callers keep a margin below it.
H100_BUDGET_BYTES = 80 * GIB
# Share of the budget a traced peak may use: the rest covers what the trace does not see (docstring).
SAFE_FRACTION = 0.9
# train_gpt's grad accumulation makes the per-rank micro-batch TRAIN_BATCH_TOKENS / 8 whatever the world size
# (Runtime.grad_accum_steps = 8 // WORLD_SIZE).
MICRO_BATCH_DIVISOR = 8
# Muon keeps only this rank's share of momentum and gradient shards: the record runs on 8 GPUs.
MUON_WORLD_SIZE = 8
BOS_ID = 1
ORIGIN_MIN_BYTES = 1 << 20     # storages from this size on remember the op that made them (top_at_peak)
PHASES = ("train", "eval", "ttt")
CATEGORIES = ("parameters", "gradients", "optimizer", "ema", "lora", "inputs", "activations")
EMULATED_KEY = "AutocastCPU"   # the autocast key of the fake device the trace runs on
LOWER = torch.bfloat16         # CUDA autocast dtype in train_gpt.autocast_context

# ---------------------------------------------------------------------------------------------------------
# CUDA autocast policy (aten/src/ATen/autocast_mode.{h,cpp}: AT_FORALL_LOWER_PRECISION_FP, AT_FORALL_FP32,
# AT_FORALL_FP32_SET_OPT_DTYPE, AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE, AT_FORALL_PROMOTE, the banned BCE).
# Names are "op" (default overload) or "op.overload". cuda_autocast_ops() must be covered exactly.
# ---------------------------------------------------------------------------------------------------------
CUDA_LOWER_PRECISION = frozenset("""
    _convolution _convolution.deprecated conv1d conv2d conv3d conv_tbc conv_transpose1d conv_transpose2d.input
    conv_transpose3d.input convolution cudnn_convolution cudnn_convolution_transpose prelu addmm addmv addr matmul
    einsum mm mv linalg_vecdot linear addbmm baddbmm bmm chain_matmul linalg_multi_dot _thnn_fused_lstm_cell
    _thnn_fused_gru_cell lstm_cell gru_cell rnn_tanh_cell rnn_relu_cell _scaled_dot_product_flash_attention
    scaled_dot_product_attention""".split())
CUDA_FP32 = frozenset("""
    acos asin cosh erfinv exp expm1 log log10 log2 log1p reciprocal rsqrt sinh tan pow.Tensor_Scalar
    pow.Tensor_Tensor pow.Scalar softplus layer_norm native_layer_norm group_norm frobenius_norm.dim nuclear_norm
    nuclear_norm.dim cosine_similarity poisson_nll_loss cosine_embedding_loss nll_loss nll_loss2d
    hinge_embedding_loss kl_div l1_loss smooth_l1_loss huber_loss mse_loss margin_ranking_loss
    multilabel_margin_loss soft_margin_loss triplet_margin_loss multi_margin_loss binary_cross_entropy_with_logits
    dist pdist cdist renorm logsumexp rms_norm upsample_nearest1d _upsample_nearest_exact1d upsample_nearest2d
    _upsample_nearest_exact2d upsample_nearest3d _upsample_nearest_exact3d upsample_linear1d upsample_bilinear2d
    _upsample_bilinear2d_aa upsample_trilinear3d upsample_bicubic2d _upsample_bicubic2d_aa""".split())
CUDA_FP32_SET_OPT_DTYPE = frozenset("""
    prod prod.dim_int prod.dim_Dimname softmax.int softmax.Dimname log_softmax.int log_softmax.Dimname cumprod
    cumprod.dimname cumsum cumsum.dimname linalg_vector_norm linalg_matrix_norm linalg_matrix_norm.str_ord sum
    sum.dim_IntList sum.dim_DimnameList""".split())
CUDA_FP32_APPEND_DTYPE = {"norm.Scalar": "norm.ScalarOpt_dtype", "norm.ScalarOpt_dim": "norm.ScalarOpt_dim_dtype",
                          "norm.names_ScalarOpt_dim": "norm.names_ScalarOpt_dim_dtype"}
CUDA_PROMOTE = frozenset("addcdiv addcmul atan2 bilinear cross dot grid_sampler index_put tensordot scatter_add "
                         "vdot".split())
CUDA_BANNED = frozenset({"binary_cross_entropy"})


def _autocast_ops(key: str) -> set[str]:
    """aten ops ("op" or "op.overload") with a kernel on this autocast dispatch key in this torch build."""
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return {n[len("aten::"):] for n in torch._C._dispatch_get_all_op_names()
            if n.startswith("aten::") and has(n, key)}


def cuda_autocast_ops() -> set[str]:
    return _autocast_ops("AutocastCUDA")


def cuda_policy(name: str) -> str:
    for policy, names in (("lower_precision_fp", CUDA_LOWER_PRECISION), ("fp32", CUDA_FP32),
                          ("fp32_set_opt_dtype", CUDA_FP32_SET_OPT_DTYPE),
                          ("fp32_append_dtype", CUDA_FP32_APPEND_DTYPE), ("promote", CUDA_PROMOTE),
                          ("banned", CUDA_BANNED)):
        if name in names:
            return policy
    raise KeyError(f"aten::{name} has an AutocastCUDA kernel of unknown policy: add it to bench/memory_trace.py")


def _overload(name: str):
    op, _, overload = name.partition(".")
    return getattr(getattr(torch.ops.aten, op), overload or "default")


class _CastCache:
    """autocast's cache of bf16 casts of fp32 leaf weights (at::autocast::cached_cast): a weight used by several
    matmuls in one autocast region (tied embedding, looped layers) is cast once; the casts live until the region
    ends (and as long as autograd saved them)."""

    def __init__(self):
        self.casts: dict[int, tuple] = {}
        self.calls: dict[str, int] = {}  # aten op -> calls through an emulated CUDA policy kernel

    def cast(self, to: torch.dtype, t):
        if not (isinstance(t, torch.Tensor) and _eligible(t)) or t.dtype == to:
            return t
        if to == LOWER and t.dtype == torch.float32 and t.requires_grad and t.is_leaf and not t._is_view():
            hit = self.casts.get(id(t))
            if hit is not None and hit[0]() is t:
                return hit[1]
            out = t.to(to)
            self.casts[id(t)] = (weakref.ref(t), out)
            return out
        return t.to(to)


def _eligible(t: torch.Tensor) -> bool:
    """at::autocast::is_eligible for the emulated device: a floating (not double) tensor on it."""
    return t.device.type == "cpu" and t.is_floating_point() and t.dtype != torch.float64


def _kernel(name: str, policy: str, cache: _CastCache):
    """A Python AutocastCPU kernel applying CUDA's `policy` to aten::`name` (the WrapFunction_ of that policy)."""
    op = _overload(name)
    no_autocast = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, EMULATED_KEY))

    def count():
        cache.calls[name] = cache.calls.get(name, 0) + 1

    def cast_all(to, args, kwargs):
        return pytree.tree_map_only(torch.Tensor, lambda t: cache.cast(to, t), (args, kwargs))

    if policy in ("lower_precision_fp", "fp32"):
        to = LOWER if policy == "lower_precision_fp" else torch.float32

        def kernel(_keyset, *args, **kwargs):
            count()
            with torch._C._ExcludeDispatchKeyGuard(no_autocast):
                a, kw = cast_all(to, args, kwargs)
                return op(*a, **kw)
    elif policy == "fp32_set_opt_dtype":
        names = [a.name for a in op._schema.arguments]
        at = names.index("dtype")

        def kernel(_keyset, *args, **kwargs):
            count()
            with torch._C._ExcludeDispatchKeyGuard(no_autocast):
                if _eligible(args[0]):  # an explicit dtype wins, else the output becomes fp32
                    if at < len(args):
                        if args[at] is None:
                            args = args[:at] + (torch.float32,) + args[at + 1:]
                    elif kwargs.get("dtype") is None:
                        kwargs = {**kwargs, "dtype": torch.float32}
                return op(*args, **kwargs)
    elif policy == "fp32_append_dtype":
        target = _overload(CUDA_FP32_APPEND_DTYPE[name])
        schema = op._schema.arguments

        def kernel(_keyset, *args, **kwargs):
            count()
            with torch._C._ExcludeDispatchKeyGuard(no_autocast):
                full = list(args) + [kwargs[a.name] if a.name in kwargs else a.default_value
                                     for a in schema[len(args):]]
                out_type = torch.float32 if _eligible(args[0]) else args[0].dtype
                return target(*full, dtype=out_type)
    elif policy == "promote":
        def kernel(_keyset, *args, **kwargs):
            count()
            with torch._C._ExcludeDispatchKeyGuard(no_autocast):
                to = LOWER
                for t in pytree.tree_leaves((args, kwargs)):
                    if isinstance(t, torch.Tensor) and _eligible(t):
                        if t.dtype == torch.float32 or to == torch.float32:
                            to = torch.float32
                        elif t.dtype != LOWER:
                            raise RuntimeError("Unexpected floating ScalarType in at::autocast::prioritize")
                a, kw = cast_all(to, args, kwargs)
                return op(*a, **kw)
    else:
        def kernel(_keyset, *args, **kwargs):
            raise RuntimeError(f"aten::{name} is unsafe to autocast (banned under CUDA autocast)")
    return kernel


@contextlib.contextmanager
def cuda_autocast_on_cpu():
    """torch.autocast("cpu", bfloat16) behaving as torch.autocast("cuda", bfloat16) does: the AutocastCPU key
    gets CUDA's kernel set (see the module docstring). Registrations are undone on exit."""
    cuda_ops = cuda_autocast_ops()
    missing = sorted(n for n in cuda_ops if not any(
        n in s for s in (CUDA_LOWER_PRECISION, CUDA_FP32, CUDA_FP32_SET_OPT_DTYPE, CUDA_FP32_APPEND_DTYPE,
                         CUDA_PROMOTE, CUDA_BANNED)))
    if missing:
        raise KeyError(f"AutocastCUDA ops of unknown policy in torch {torch.__version__}: {missing}")
    cache = _CastCache()
    lib = torch.library.Library("aten", "IMPL")
    try:
        with warnings.catch_warnings():  # overriding the C++ AutocastCPU kernels is the point
            warnings.filterwarnings("ignore", message="(?s).*Overriding a previously registered kernel")
            for name in sorted(cuda_ops):
                lib.impl(name, _kernel(name, cuda_policy(name), cache), EMULATED_KEY, with_keyset=True)
            for name in sorted(_autocast_ops(EMULATED_KEY) - cuda_ops):  # CPU-only policies: none on CUDA
                lib.impl(name, torch.library.fallthrough_kernel, EMULATED_KEY)
        with torch.autocast("cpu", dtype=LOWER):
            yield cache
    finally:
        cache.casts.clear()  # autocast drops its cast cache when the outermost region exits
        lib._destroy()


# ---------------------------------------------------------------------------------------------------------
# CUDA-only Triton kernels: stand-ins with the same saved tensors and outputs.
# ---------------------------------------------------------------------------------------------------------

class _SoftcapCEMemory(torch.autograd.Function):
    """Memory of train_gpt._SoftcapCE: loss and LSE fp32 [N]; saves z, targets, LSE; backward allocates dz."""

    @staticmethod
    def forward(ctx, z, t, cap):
        loss = torch.empty(z.size(0), dtype=torch.float32, device=z.device)
        lse = torch.empty(z.size(0), dtype=torch.float32, device=z.device)
        ctx.save_for_backward(z, t, lse)
        return loss

    @staticmethod
    def backward(ctx, g):
        z, _t, _lse = ctx.saved_tensors
        g.float().contiguous()  # the kernel reads g as contiguous fp32
        return torch.empty_like(z), None, None


class _LeakyReluSqUpMemory(torch.autograd.Function):
    """Memory of train_gpt._LeakyReluSqUp's forward (pre and act [M, N] in x's dtype; saves x, w, pre); its
    backward is train_gpt's own (plain torch ops)."""

    @staticmethod
    def forward(ctx, x, w, slope):
        pre = torch.empty(x.size(0), w.size(0), dtype=x.dtype, device=x.device)
        act = torch.empty_like(pre)
        ctx.save_for_backward(x, w, pre)
        ctx.slope = slope
        return act

    backward = staticmethod(T._LeakyReluSqUp.backward)  # bound now: T._LeakyReluSqUp is this class while patched


def _fused_as_on_h100(x: torch.Tensor, enabled: bool) -> bool:
    # train_gpt.use_fused_kernels on an H100: Triton present, x on CUDA; only the flag and grad mode remain.
    return enabled and torch.is_grad_enabled()


@contextlib.contextmanager
def _patched(module, **attrs):
    old = {k: getattr(module, k) for k in attrs}
    try:
        for k, v in attrs.items():
            setattr(module, k, v)
        yield
    finally:
        for k, v in old.items():
            setattr(module, k, v)


def cuda_kernels_as_on_h100():
    return _patched(T, use_fused_kernels=_fused_as_on_h100, _SoftcapCE=_SoftcapCEMemory,
                    _LeakyReluSqUp=_LeakyReluSqUpMemory)


# ---------------------------------------------------------------------------------------------------------
# Storage tracking.
# ---------------------------------------------------------------------------------------------------------

class MemoryTracker(TorchDispatchMode):
    """Live tensor-storage bytes as ops run. Each storage is counted once, when an op first returns a tensor on it
    (views and in-place results share it), and released when torch frees it. Push it above the FakeTensorMode.
    tag(tensors, category) names storages for the breakdown; untagged ones are 'activations'."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[int, int, weakref.ref]] = {}  # id(storage) -> (alloc id, bytes, weakref)
        self.log: list[tuple[int, int]] = []                      # (alloc id, +bytes / -bytes) in order
        self.tags: dict[int, str] = {}
        self.origin: dict[int, str] = {}                           # alloc id -> "op dtype[shape]" (big ones)
        self.ops: dict[str, int] = {}
        self.current = self.peak = self.window_peak = 0
        self.peak_at = 0                                           # len(log) when the peak was reached
        self._next_id = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        self.ops[name] = self.ops.get(name, 0) + 1
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._see(t, name)
        return out

    def _see(self, t: torch.Tensor, origin: str = "") -> int:
        st = t.untyped_storage()
        key = id(st)
        hit = self.live.get(key)
        if hit is not None:
            return hit[0]
        aid, nbytes = self._next_id, st.nbytes()
        self._next_id += 1
        self.live[key] = (aid, nbytes, weakref.ref(st, lambda _ref, key=key: self._freed(key)))
        if nbytes >= ORIGIN_MIN_BYTES:
            self.origin[aid] = f"{origin or 'untracked'} {str(t.dtype).replace('torch.', '')}{list(t.shape)}"
        self.log.append((aid, nbytes))
        self.current += nbytes
        if self.current > self.peak:
            self.peak, self.peak_at = self.current, len(self.log)
        self.window_peak = max(self.window_peak, self.current)
        return aid

    def _freed(self, key: int) -> None:
        aid, nbytes, _ = self.live.pop(key)
        self.log.append((aid, -nbytes))
        self.current -= nbytes

    def tag(self, tensors, category: str) -> int:
        """Tag the storages of `tensors` (registering any not seen yet); returns their total bytes."""
        total, seen = 0, set()
        for t in tensors:
            if t is None:
                continue
            aid = self._see(t)
            if aid not in seen:
                seen.add(aid)
                total += t.untyped_storage().nbytes()
                self.tags[aid] = category
        return total

    def reset_window(self) -> None:
        """Start a new window for window_peak (the peak of one sub-step); `peak` stays the overall one."""
        self.window_peak = self.current

    def live_at_peak(self) -> dict[int, int]:
        """alloc id -> bytes of every storage live at the peak (replay of the log up to it)."""
        live: dict[int, int] = {}
        for aid, delta in self.log[: self.peak_at]:
            if delta >= 0:
                live[aid] = delta
            else:
                live.pop(aid, None)
        return live

    def breakdown_at_peak(self) -> dict[str, int]:
        out = dict.fromkeys(CATEGORIES, 0)
        for aid, nbytes in self.live_at_peak().items():
            cat = self.tags.get(aid, "activations")
            out[cat] = out.get(cat, 0) + nbytes
        return out

    def top_at_peak(self, n: int = 10) -> list[tuple[str, int, int]]:
        """The activations live at the peak grouped by the op that made them and its output dtype/shape:
        (origin, count, bytes), largest first."""
        groups: dict[str, list[int]] = {}
        for aid, nbytes in self.live_at_peak().items():
            if aid in self.tags:
                continue
            g = groups.setdefault(self.origin.get(aid, f"< {ORIGIN_MIN_BYTES >> 20} MiB each"), [0, 0])
            g[0] += 1
            g[1] += nbytes
        return sorted(((k, c, b) for k, (c, b) in groups.items()), key=lambda r: -r[2])[:n]

    def breakdown_now(self) -> dict[str, int]:
        out = dict.fromkeys(CATEGORIES, 0)
        for aid, nbytes, _ in self.live.values():
            cat = self.tags.get(aid, "activations")
            out[cat] = out.get(cat, 0) + nbytes
        return out


_FA3 = "flash_attn_interface"  # the module attention_flash3 imports at call time
_stand_in = None


def _is_stand_in(mod) -> bool:
    return mod is not None and os.path.abspath(getattr(mod, "__file__", "") or "") == FAKE_FA3_PATH


def fa3_stand_in():
    """tests/fake_fa3's flash_attn_interface, loaded once (its custom ops register on load)."""
    global _stand_in
    if _is_stand_in(sys.modules.get(_FA3)):  # already imported via sys.path (as tests/test_cuda_nets.py does)
        _stand_in = sys.modules[_FA3]
    if _stand_in is None:
        spec = importlib.util.spec_from_file_location(_FA3, FAKE_FA3_PATH)
        _stand_in = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_stand_in)
    return _stand_in


@contextlib.contextmanager
def _fa3_stand_in_installed():
    """The stand-in as `flash_attn_interface` while tracing: a real FA3 wheel cannot run on fake tensors. Where a
    real wheel is importable it comes back afterwards; elsewhere the stand-in stays (importing the file a second
    time would register its custom ops twice)."""
    stand_in, prev = fa3_stand_in(), sys.modules.get(_FA3)
    spec = importlib.util.find_spec(_FA3) if prev is None else None
    real_elsewhere = prev is not None or (spec is not None and os.path.abspath(spec.origin or "") != FAKE_FA3_PATH)
    sys.modules[_FA3] = stand_in
    try:
        yield stand_in
    finally:
        if prev is not None:
            sys.modules[_FA3] = prev
        elif real_elsewhere:
            sys.modules.pop(_FA3, None)


@contextlib.contextmanager
def traced():
    """Fake CPU tensors, the storage tracker above them, the FA3 stand-in, train_gpt's CUDA-only kernels as on an
    H100. Yields the tracker; autocast is entered separately (cuda_autocast_on_cpu) around the forward passes."""
    tracker = MemoryTracker()
    with _fa3_stand_in_installed(), FakeTensorMode(), tracker, cuda_kernels_as_on_h100():
        yield tracker


# ---------------------------------------------------------------------------------------------------------
# Phases.
# ---------------------------------------------------------------------------------------------------------

def _model(hp, tracker: MemoryTracker, training: bool) -> "T.GPT":
    model = T.GPT(hp, BOS_ID, attn_backend="flash3")
    model.train(training)
    model.looping = True  # as trained from ENABLE_LOOPING_AT on and as saved: the most layer applications
    tracker.tag(list(model.parameters()) + list(model.buffers()), "parameters")
    return model


def _tokens(hp, rows: int, seq: int, tracker: MemoryTracker):
    x = torch.randint(0, hp.vocab_size, (rows, seq))
    y = torch.randint(0, hp.vocab_size, (rows, seq))
    tracker.tag([x, y], "inputs")
    return x, y


# Fake tokens have no BOS to count: the trace gives FA3 the cu_seqlens that train_gpt.varlen_cu_seqlens makes for
# rows with one document per this many tokens (FineWeb averages ~960; a batch 4x as fragmented as that).
TRACE_DOC_TOKENS = 256


def trace_segments(rows: int, seq: int) -> int:
    """Segments of the traced batch's cu_seqlens: row starts + documents, padded as varlen_cu_seqlens pads."""
    n = rows + rows * seq // TRACE_DOC_TOKENS
    return -(-n // T.FA3_CU_MULTIPLE) * T.FA3_CU_MULTIPLE


def _cu_seqlens(rows: int, seq: int, tracker: MemoryTracker) -> dict:
    cu = torch.full((trace_segments(rows, seq) + 1,), rows * seq, dtype=torch.int32)
    tracker.tag([cu], "inputs")
    return {"cu_seqlens": cu}


def _train_state(model, hp, tracker: MemoryTracker, world_size: int) -> tuple:
    """What train() keeps alive between steps, built by train_gpt's own classes: Muon momentum and gradient shards
    (this rank's share), AdamW moments, the EMA shadow. Gradients are not kept: zero_grad(set_to_none=True).
    Returns (Optimizers, ModelEMA or None): hold them for the phase."""
    opt = T.Optimizers(model, hp, world_size, 0)
    muon = opt.muon
    for gi, group in enumerate(muon.groups):
        shard = (muon._padded(len(group)) // muon.world,) + tuple(group[0].shape)
        muon._shards.append(torch.zeros(shard))       # reduce_grads' shard, kept until the next step
        muon.state[gi] = torch.zeros(shard)           # momentum
    tracker.tag(muon._shards + [s for s in muon.state if s is not None], "optimizer")
    for group in opt.adam.param_groups:
        for p in group["params"]:
            st = opt.adam.state[p]
            st["step"] = torch.zeros((), dtype=torch.float32)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            tracker.tag(list(st.values()), "optimizer")
    ema = T.ModelEMA(model, hp.ema_decay) if hp.ema_decay > 0 else None
    if ema is not None:
        tracker.tag(list(ema.shadow.values()), "ema")
    return opt, ema


def train_rows(hp) -> int:
    return hp.train_batch_tokens // MICRO_BATCH_DIVISOR // hp.train_seq_len


def _result(phase, hp, tracker, rows, seq, t0, persistent, extra=None) -> dict:
    return {"phase": phase, "rows": rows, "seq_len": seq, "tokens_per_forward": rows * seq,
            "peak_bytes": tracker.peak, "peak_gib": tracker.peak / GIB, "persistent_bytes": persistent,
            "breakdown_at_peak": tracker.breakdown_at_peak(), "budget_bytes": H100_BUDGET_BYTES,
            "margin_gib": (H100_BUDGET_BYTES - tracker.peak) / GIB, "ops": sum(tracker.ops.values()),
            "fa3_fake_calls": tracker.ops.get("fake_fa3.varlen_fwd.default", 0), "seconds": time.perf_counter() - t0,
            "fa3_segments": trace_segments(rows, seq) if phase != "ttt" else rows,
            "top_activations_at_peak": [{"origin": o, "count": c, "bytes": b} for o, c, b in tracker.top_at_peak()],
            **(extra or {})}


def trace_train(hp, rows: int | None = None, world_size: int = MUON_WORLD_SIZE) -> dict:
    t0 = time.perf_counter()
    rows = rows or train_rows(hp)
    with traced() as tr:
        model = _model(hp, tr, training=True)
        state = _train_state(model, hp, tr, world_size)  # held: it is live during the step
        x, y = _tokens(hp, rows, hp.train_seq_len, tr)
        persistent = tr.current
        with cuda_autocast_on_cpu():
            loss = model(x, y, **_cu_seqlens(rows, hp.train_seq_len, tr))
        loss.backward()
        tr.tag([p.grad for p in model.parameters()], "gradients")
        del state
        return _result("train", hp, tr, rows, hp.train_seq_len, t0, persistent)


def trace_eval(hp, rows: int | None = None) -> dict:
    t0 = time.perf_counter()
    seq = hp.eval_seq_len
    rows = rows or T.eval_rows_per_forward(hp, seq)
    with traced() as tr:
        model = _model(hp, tr, training=False)
        x, y = _tokens(hp, rows, seq, tr)
        persistent = tr.current
        with torch.no_grad(), cuda_autocast_on_cpu():
            model(x, y, reduction="none", **_cu_seqlens(rows, seq, tr)).float()
        return _result("eval", hp, tr, rows, seq, t0, persistent)


def ttt_slots(hp) -> int:
    rows = T.ttt_rows_per_forward(hp)
    return -(-hp.ttt_batch_size // rows) * rows


def trace_ttt(hp, rows: int | None = None, slots: int | None = None) -> dict:
    """ttt_score_docs' first training chunk at full row width: sub-batches of `rows` documents, each a forward
    with its slice of the adapters and a backward (the gradients add up across sub-batches before the step)."""
    t0 = time.perf_counter()
    seq = hp.ttt_eval_seq_len
    rows = rows or T.ttt_rows_per_forward(hp)
    slots = slots or ttt_slots(hp)
    if hp.ttt_lora_rank <= 0:
        raise ValueError("TTT_LORA_RANK=0: no adapters to train")
    with traced() as tr:
        model = _model(hp, tr, training=False)
        for p in model.parameters():
            p.requires_grad_(False)
        lora = T.BatchedLoRA(slots, hp.ttt_lora_rank, hp.ttt_lora_alpha, model.lora_shapes(hp), "cpu")
        init_a = {n: lora.A[n][0].detach().clone() for n in lora.names}  # ttt_score_docs keeps one A per target
        tr.tag(list(lora.parameters()) + list(init_a.values()), "lora")
        opt = torch.optim.AdamW(lora.parameters(), lr=hp.ttt_lora_lr, betas=(hp.ttt_beta1, hp.ttt_beta2), eps=1e-10,
                                weight_decay=hp.ttt_weight_decay)
        for p in lora.parameters():  # the state of AdamW after its first step (exp_avg, exp_avg_sq, step)
            opt.state[p] = {"step": torch.zeros((), dtype=torch.float32), "exp_avg": torch.zeros_like(p),
                            "exp_avg_sq": torch.zeros_like(p)}
            tr.tag(list(opt.state[p].values()), "optimizer")
        persistent = tr.current
        peaks = []
        for lo in range(0, slots, rows):
            x, y = _tokens(hp, rows, seq, tr)
            tr.reset_window()
            with cuda_autocast_on_cpu():
                nll = model(x, y, lora=lora.weights(lo, lo + rows), reduction="none", rows_are_docs=True).float()
            nll.mean(-1).sum().backward()
            del nll, x, y
            peaks.append(tr.window_peak)
        tr.tag([p.grad for p in lora.parameters()], "gradients")
        return _result("ttt", hp, tr, rows, seq, t0, persistent,
                       {"slots": slots, "sub_batch_peaks_gib": [p / GIB for p in peaks]})


TRACES = {"train": trace_train, "eval": trace_eval, "ttt": trace_ttt}


def trace_phase(hp, phase: str, **kw) -> dict:
    return TRACES[phase](hp, **kw)


def make_hp(preset: str, overrides: dict | None = None) -> "T.Hyperparameters":
    """PRESET + UPPER_CASE overrides as train_gpt.py reads them; UPPER_CASE fields in the environment win.
    Validated without looking for data files (the trace reads none)."""
    env = {"PRESET": preset, **{k: str(v) for k, v in (overrides or {}).items()}, **env_fields()}
    hp = T.Hyperparameters.from_env(env)
    hp.validate(1, check_files=False)
    return hp


def render(results: list[dict]) -> str:
    gib = lambda b: f"{b / GIB:.2f}"  # noqa: E731
    rows = []
    for r in results:
        parts = ", ".join(f"{k} {gib(v)}" for k, v in r["breakdown_at_peak"].items() if v >= GIB / 200)
        rows.append([r["phase"], f"{r['rows']} x {r['seq_len']} = {r['tokens_per_forward']:,}", gib(r["peak_bytes"]),
                     parts, gib(r["budget_bytes"]), gib(r["budget_bytes"] - r["peak_bytes"]),
                     "ok" if r["peak_bytes"] <= SAFE_FRACTION * r["budget_bytes"] else "OVER"])
    return table(["phase", "tokens per forward", "peak GiB", "breakdown at peak (GiB)", "budget GiB (H100)",
                  "margin GiB", f"<= {SAFE_FRACTION:.0%}"], rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default=os.environ.get("PRESET", "sota"))
    ap.add_argument("--phase", choices=PHASES + ("all",), default="all")
    ap.add_argument("--world-size", type=int, default=MUON_WORLD_SIZE, help="ranks Muon's state is sharded over")
    ap.add_argument("--top", type=int, default=6, help="activation groups listed per phase")
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    hp = make_hp(a.preset)
    phases = PHASES if a.phase == "all" else (a.phase,)
    results = [trace_train(hp, world_size=a.world_size) if p == "train" else trace_phase(hp, p) for p in phases]
    enc, dec = T.layer_schedule(hp.num_layers, hp.num_loops > 0, hp.num_loops, hp.loop_start, hp.loop_end)
    print(f"PRESET={hp.preset}: {hp.num_layers} layers x {hp.model_dim}, {hp.num_heads}/{hp.num_kv_heads} heads, "
          f"vocab {hp.vocab_size}, {len(enc) + len(dec)} layer applications; fake tensors, CUDA bf16 autocast "
          f"policy, FA3 stand-in, eager (no torch.compile)")
    print(render(results), flush=True)
    for r in results:
        print(f"\n{r['phase']}: largest activations live at the peak (op that made them, output dtype[shape])")
        for t in r["top_activations_at_peak"][: a.top]:
            print(f"  {t['bytes'] / GIB:6.2f} GiB  {t['count']:3d} x {t['origin']}")
    write_json(a.json, {"machine": machine_info(), "preset": hp.preset, "hp": hp.as_dict(), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
