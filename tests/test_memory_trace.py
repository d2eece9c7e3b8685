"""bench/memory_trace.py: the sota phases fit one H100 with a 10% margin, and the tracer measures what it claims
(exact bytes of a known allocation, activations linear in the batch, CUDA autocast dtypes, FA3 stand-in on fake
and meta tensors)."""
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from conftest import ROOT

sys.path.insert(0, ROOT)
import bench.memory_trace as M  # noqa: E402

T = M.T
FA = M.fa3_stand_in()
LIMIT_BYTES = M.SAFE_FRACTION * M.H100_BUDGET_BYTES  # 72 GiB: 80 GiB less 10%


@pytest.fixture(scope="module")
def sota():
    return M.make_hp("sota")


@pytest.fixture(scope="module")
def sota_results(sota):
    calls = dict(FA.CALLS)
    res = {phase: M.trace_phase(sota, phase) for phase in M.PHASES}
    assert FA.CALLS == calls, "the FA3 stand-in ran its CPU reference kernel: fake tensors missed the fake kernel"
    return res


def test_sota_shapes(sota):
    enc, dec = T.layer_schedule(sota.num_layers, True, sota.num_loops, sota.loop_start, sota.loop_end)
    shape = (sota.num_layers, sota.model_dim, sota.num_heads, sota.num_kv_heads, sota.vocab_size)
    assert shape == (11, 512, 8, 4, 8192)
    assert len(enc) + len(dec) == 17
    assert M.train_rows(sota) == 48 and T.eval_rows_per_forward(sota, sota.eval_seq_len) == 32
    assert T.ttt_rows_per_forward(sota) == 32 and M.ttt_slots(sota) == 64


@pytest.mark.parametrize("phase", M.PHASES)
def test_sota_phase_fits_h100(sota_results, sota, phase):
    r = sota_results[phase]
    forwards = M.ttt_slots(sota) // r["rows"] if phase == "ttt" else 1
    top = ", ".join(f"{t['origin']} x{t['count']}: {t['bytes'] / M.GIB:.1f} GiB"
                    for t in r["top_activations_at_peak"][:4])
    assert r["peak_bytes"] < LIMIT_BYTES, f"{phase}: traced peak {r['peak_gib']:.1f} GiB > 72 GiB; largest: {top}"
    # every layer application went through the FA3 stand-in's fake kernel
    assert r["fa3_fake_calls"] == 17 * forwards


def test_sota_breakdown(sota_results, sota):
    with FakeTensorMode():
        n_params = sum(p.numel() for p in T.GPT(sota, 1, "flash3").parameters())
    train, ttt = sota_results["train"], sota_results["ttt"]
    assert train["breakdown_at_peak"]["parameters"] >= 4 * n_params  # fp32 weights (+ rotary buffers)
    assert train["breakdown_at_peak"]["ema"] >= 4 * n_params
    assert train["breakdown_at_peak"]["activations"] > 0.9 * train["peak_bytes"]
    at_peak, n_lora = ttt["breakdown_at_peak"], 2 * (1 + 5 * 17)  # A and B per target: head + 5 per layer slot
    assert at_peak["optimizer"] == 2 * at_peak["gradients"] + 4 * n_lora  # exp_avg, exp_avg_sq, fp32 step scalars
    assert ttt["sub_batch_peaks_gib"][1] >= ttt["sub_batch_peaks_gib"][0]  # the second sub-batch adds to the grads


def test_known_allocation_counted_exactly():
    with M.traced() as tr:
        assert tr.current == tr.peak == 0
        t = torch.empty(1000, 1000)
        assert tr.current == 4_000_000
        v = t[:10].view(-1)  # a view: same storage, nothing new
        t.mul_(2)  # in place: nothing new
        assert tr.current == 4_000_000
        tr.tag([t], "inputs")
        assert tr.breakdown_now()["inputs"] == 4_000_000
        u = torch.empty(10, dtype=torch.bfloat16)
        del t
        assert tr.current == 4_000_020  # the view keeps the storage
        del v
        assert tr.current == 20
        del u
        assert tr.current == 0 and tr.peak == 4_000_020
        assert tr.breakdown_at_peak()["inputs"] == 4_000_000 and tr.breakdown_at_peak()["activations"] == 20


def test_activations_scale_with_rows(sota):
    """Doubling the micro-batch rows doubles what a forward + backward adds on top of the persistent state."""
    small, big = (M.trace_train(sota, rows=r) for r in (2, 4))
    grow_small = small["peak_bytes"] - small["persistent_bytes"]
    grow_big = big["peak_bytes"] - big["persistent_bytes"]
    assert grow_small > 2 * 2048 * 17 * sota.model_dim * 2  # at least one bf16 residual per layer application
    assert grow_big / grow_small == pytest.approx(2.0, rel=0.03)
    assert big["persistent_bytes"] - small["persistent_bytes"] == 2 * 2 * 2048 * 8  # two more rows of x and y (int64)


# Functional calls covering every CUDA-autocast op the sota traces route through a policy kernel (checked below),
# plus the fallthrough ops whose dtype follows type promotion.
PROBES = {
    "linear": lambda d: F.linear(_t(d, 4, 8), _t(d, 6, 8)),
    "linear_bf16_in": lambda d: F.linear(_t(d, 4, 8, bf=True), _t(d, 6, 8)),
    "matmul": lambda d: _t(d, 4, 8, bf=True) @ _t(d, 6, 8).T,
    "bmm": lambda d: torch.bmm(_t(d, 2, 4, 8), _t(d, 2, 8, 3, bf=True)),
    "rms_norm": lambda d: F.rms_norm(_t(d, 4, 8, bf=True), (8,)),
    "sum": lambda d: _t(d, 4, 8, bf=True).sum(),
    "sum_dim": lambda d: _t(d, 4, 8, bf=True).sum(-1, keepdim=True),
    "sum_bool": lambda d: (_t(d, 4, 8) > 0).sum(),
    "cumsum": lambda d: torch.cumsum(_t(d, 4, 8, bf=True), -1),
    "cumsum_int": lambda d: torch.cumsum(torch.zeros(4, 8, dtype=torch.int32, device=d), -1),
    "normalize": lambda d: F.normalize(_t(d, 4, 8, bf=True), dim=-1),
    "square": lambda d: F.leaky_relu(_t(d, 4, 8, bf=True), 0.5).square(),
    "cross_entropy": lambda d: F.cross_entropy(_t(d, 4, 8, bf=True), torch.zeros(4, dtype=torch.long, device=d)),
    "cross_entropy_fp32": lambda d: F.cross_entropy(_t(d, 4, 8), torch.zeros(4, dtype=torch.long, device=d)),
    "softmax": lambda d: torch.softmax(_t(d, 4, 8, bf=True), -1),
    "cat_mixed": lambda d: torch.cat([_t(d, 4, 8, bf=True), _t(d, 4, 8)]),
    "mul_mixed": lambda d: _t(d, 4, 8, bf=True) * _t(d, 4, 8),
    "sigmoid": lambda d: torch.sigmoid(_t(d, 4, 8, bf=True)),
    "tanh": lambda d: torch.tanh(_t(d, 4, 8)),
    "lerp": lambda d: torch.lerp(_t(d, 4, 8, bf=True), _t(d, 4, 8, bf=True), _t(d, 4, 8, bf=True)),
    "embedding": lambda d: F.embedding(torch.zeros(4, dtype=torch.long, device=d), _t(d, 10, 8)),
    "mean": lambda d: _t(d, 4, 8, bf=True).mean(-1),
}


def _t(device, *shape, bf=False):
    return torch.empty(*shape, device=device, dtype=torch.bfloat16 if bf else torch.float32)


def _probe_real_cuda() -> dict:
    """Output dtypes under the real AutocastCUDA kernels: CUDA fake tensors, no autograd (a CPU-only build cannot
    run autograd on CUDA tensors), autocast switched on below torch.autocast (which refuses without CUDA)."""
    out = {}
    with FakeTensorMode(), torch.no_grad():
        prev = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
        torch.set_autocast_enabled("cuda", True)
        torch.set_autocast_dtype("cuda", torch.bfloat16)
        torch.autocast_increment_nesting()
        try:
            for name, fn in PROBES.items():
                out[name] = fn("cuda").dtype
        finally:
            torch.autocast_decrement_nesting()
            torch.clear_autocast_cache()
            torch.set_autocast_enabled("cuda", prev[0])
            torch.set_autocast_dtype("cuda", prev[1])
    return out


def test_autocast_emulation_matches_cuda_policy(sota):
    real = _probe_real_cuda()
    assert real["linear"] == torch.bfloat16 and real["rms_norm"] == torch.float32  # the probe itself is live
    with FakeTensorMode():
        with M.cuda_autocast_on_cpu():
            emulated = {name: fn("cpu").dtype for name, fn in PROBES.items()}
        plain_cpu_autocast = torch.autocast("cpu", dtype=torch.bfloat16)
        with plain_cpu_autocast:  # registrations are undone: CPU's own policy (square stays bf16) is back
            assert PROBES["square"]("cpu").dtype == torch.bfloat16
    assert emulated == real
    # the probes cover every policy op the sota model reaches
    with M.traced():
        model = T.GPT(sota, 1, "flash3")
        model.looping = True
        x = torch.randint(0, sota.vocab_size, (1, 256))
        with M.cuda_autocast_on_cpu() as ac:
            loss = model(x, x)
        loss.backward()  # outside autocast, as train_gpt runs it
    covered = {"linear", "matmul", "bmm", "rms_norm", "sum", "sum.dim_IntList", "cumsum", "linalg_vector_norm",
               "pow.Tensor_Scalar", "log_softmax.int", "nll_loss"}
    assert set(ac.calls) <= covered, f"probe these ops too: {set(ac.calls) - covered}"


def test_policy_table_covers_this_torch():
    ops = M.cuda_autocast_ops()
    assert {"linear", "rms_norm", "pow.Tensor_Scalar", "sum"} <= ops
    for name in ops:
        M.cuda_policy(name)  # raises on an op of unknown policy


def test_fa3_stand_in_and_cu_seqlens_on_meta():
    calls = dict(FA.CALLS)
    sys.modules.setdefault("flash_attn_interface", FA)  # attention_flash3 imports it by name
    ids = torch.randint(0, 100, (2, 64)).to("meta")
    doc = T.prepare_attention("flash3", ids, 1)  # nonzero_static + _assert_async on meta
    assert doc.prepared.device.type == "meta" and doc.prepared.shape == (T.cu_seqlens_capacity(2, 64) + 1,)
    q = torch.empty(2, 64, 4, 16, device="meta", dtype=torch.bfloat16, requires_grad=True)
    k = torch.empty(2, 64, 2, 16, device="meta", dtype=torch.bfloat16, requires_grad=True)
    v = torch.empty(2, 64, 2, 16, device="meta", dtype=torch.bfloat16, requires_grad=True)
    out = T.attention_flash3(q, k, v, doc)
    assert out.shape == q.shape and out.device.type == "meta"
    out.sum().backward()
    assert k.grad.shape == k.shape
    assert FA.CALLS == calls  # fake kernels only


def test_cli_prints_table(capsys):
    env = {"TRAIN_BATCH_TOKENS": "131072", "VAL_BATCH_TOKENS": "131072", "TTT_BATCH_SIZE": "8"}  # 8 rows each
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        assert M.main(["--preset", "sota"]) == 0
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    out = capsys.readouterr().out
    assert "| train" in out and "| eval" in out and "| ttt" in out and out.count("8 x 2048 = 16,384") == 3
