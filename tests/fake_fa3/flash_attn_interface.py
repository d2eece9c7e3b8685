"""A stand-in for FlashAttention 3's `flash_attn_interface` (the Hopper wheel), so that train_gpt.py's flash3
code path runs on CPU: under torch.compile(fullgraph=True), under autocast, on meta tensors.

What it checks as the real kernel would refuse: q/k/v of one dtype, fp16 or bf16 (the CUDA autocast rms_norm
change of torch 2.12 made q/k fp32 while v stayed bf16: FA3 raises); 3-D [total_tokens, heads, head_dim],
matching totals, heads divisible by kv heads; cu_seqlens int32, 1-D, contiguous, starting at 0 and ending at
total_tokens, non-decreasing; integer max_seqlen no shorter than any segment. What it computes: causal
attention inside each segment, in fp32 from the same inputs (a reference, not a fast kernel).

Like the real interface it is a registered custom op (forward and backward each an op with a fake
implementation), so dynamo traces it without a graph break and meta tensors give the real kernel's memory:
it saves q, k, v, out and the fp32 log-sum-exp for backward, nothing of size T x T.
Use: put tests/fake_fa3 first on sys.path (tests/test_cuda_nets.py does)."""
from __future__ import annotations

import torch

CALLS = {"forward": 0, "backward": 0}
# Every flash_attn_varlen_func call (eager or while dynamo traces): the launch FA3 would make. `segments` is
# len(cu_seqlens) - 1; `tiles` is FA3's grid, ceil(max_seqlen / kBlockM) x heads x segments (each a CTA, empty
# segments included); `bwd_workspace_bytes` what its backward allocates beside dq/dk/dv (workspace_shapes).
LAUNCHES: list[dict] = []


def _round_up(x, m):
    return (x + m - 1) // m * m


def _head_dim_rounded(d: int) -> int:
    return next(r for r in (64, 96, 128, 192, 256) if d <= r)


def tile_sizes(head_dim: int) -> tuple[int, int]:
    """FA3's (kBlockM, kBlockN) of the causal sm90 backward (hopper/flash_api.cpp, mha_bwd)."""
    dr = _head_dim_rounded(head_dim)
    return (128 if dr <= 64 else 64), (128 if dr <= 128 else (96 if dr <= 192 else 80))


def workspace_shapes(total: int, segments: int, heads: int, kv_heads: int, head_dim: int, max_seqlen: int) -> list:
    """(shape, dtype) of what FA3's varlen backward allocates beside dq, dk, dv (mha_bwd): softmax_d and
    softmax_lse_log2 [H, total_q_padded_rounded] fp32, dq_accum [H, total_q_padded_rounded * D_rounded] fp32,
    with GQA zero-filled dk_accum / dv_accum [H_kv, total_k_padded_rounded, D_rounded] fp32, dq_semaphore
    int32. The padded totals grow by kBlock tokens per segment: empty segments cost memory, not only tiles."""
    m, n = tile_sizes(head_dim)
    dr = _head_dim_rounded(head_dim)
    tq, tk = _round_up(total + segments * m, m), _round_up(total + segments * n, n)
    out = [((heads, tq), torch.float32), ((heads, tq), torch.float32), ((heads, tq * dr), torch.float32),
           (((max_seqlen + m - 1) // m, segments, heads), torch.int32)]
    if kv_heads != heads:
        out += [((kv_heads, tk, dr), torch.float32)] * 2
    return out


def workspace_bytes(*args) -> int:
    return sum(torch.Size(shape).numel() * (4 if dt in (torch.float32, torch.int32) else 2)
               for shape, dt in workspace_shapes(*args))


def _check(q, k, v, cu, max_seqlen):
    assert q.dtype == k.dtype == v.dtype, f"FA3: q/k/v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})"
    assert q.dtype in (torch.float16, torch.bfloat16), f"FA3 takes fp16/bf16, got {q.dtype}"
    assert q.dim() == k.dim() == v.dim() == 3, "FA3 varlen takes [total_tokens, heads, head_dim]"
    assert q.size(0) == k.size(0) == v.size(0) and k.shape == v.shape and q.size(2) == k.size(2)
    assert q.size(1) % k.size(1) == 0, "query heads must be a multiple of kv heads"
    assert cu.dtype == torch.int32 and cu.dim() == 1 and cu.is_contiguous(), "cu_seqlens must be int32, 1-D"
    assert isinstance(max_seqlen, int) and max_seqlen > 0, "max_seqlen must be a Python int"


def _probs(q, k, cu, max_seqlen):
    """fp32 softmax probabilities [heads, total, total] of causal attention inside each segment of cu."""
    total = q.size(0)
    assert int(cu[0]) == 0 and int(cu[-1]) == total, "cu_seqlens must run from 0 to total_tokens"
    lens = cu[1:] - cu[:-1]
    assert bool((lens >= 0).all()) and int(lens.max()) <= max_seqlen, "segment longer than max_seqlen"
    pos = torch.arange(total, device=q.device)
    seg = torch.bucketize(pos, cu[1:].long(), right=True)
    mask = (seg[:, None] == seg[None, :]) & (pos[:, None] >= pos[None, :])
    kf = k.float().repeat_interleave(q.size(1) // k.size(1), 1).transpose(0, 1)
    s = (q.float().transpose(0, 1) @ kf.transpose(1, 2)) * q.size(-1) ** -0.5
    return torch.softmax(s.masked_fill(~mask, float("-inf")), -1), torch.logsumexp(s.masked_fill(~mask, float("-inf")), -1)


def _heads(t, rep):
    return t.float().repeat_interleave(rep, 1).transpose(0, 1)  # [heads, total, dim]


def _reference(q, k, v, cu, max_seqlen):
    """(out in q's dtype, lse [heads, total] fp32)."""
    p, lse = _probs(q, k, cu, max_seqlen)
    out = (p @ _heads(v, q.size(1) // v.size(1))).transpose(0, 1)
    return out.to(q.dtype).contiguous(), lse


def _reference_grads(dout, q, k, v, cu, max_seqlen):
    """Attention backward in fp32: dV = P^T dO, dS = P (dO V^T - rowsum(dO O)), dQ = dS K s, dK = dS^T Q s;
    kv-head grads summed over the query heads that share them."""
    rep, scale = q.size(1) // k.size(1), q.size(-1) ** -0.5
    p, _ = _probs(q, k, cu, max_seqlen)
    vh, kh, qh, do = _heads(v, rep), _heads(k, rep), q.float().transpose(0, 1), dout.float().transpose(0, 1)
    o = p @ vh
    ds = p * (do @ vh.transpose(1, 2) - (do * o).sum(-1, keepdim=True))
    dq = (ds @ kh) * scale
    dk = (ds.transpose(1, 2) @ qh) * scale
    dv = p.transpose(1, 2) @ do

    def kv(t):  # [heads, total, dim] -> [total, kv_heads, dim], summing each group of `rep` query heads
        return t.view(k.size(1), rep, *t.shape[1:]).sum(1).transpose(0, 1)
    return (dq.transpose(0, 1).to(q.dtype).contiguous(), kv(dk).to(k.dtype).contiguous(),
            kv(dv).to(v.dtype).contiguous())


@torch.library.custom_op("fake_fa3::varlen_fwd", mutates_args=())
def _varlen_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor,
                max_seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
    CALLS["forward"] += 1
    return _reference(q, k, v, cu, max_seqlen)


@_varlen_fwd.register_fake
def _(q, k, v, cu, max_seqlen):  # contiguous outputs, as the real implementation (and FA3) returns them
    return q.new_empty(q.shape), q.new_empty((q.size(1), q.size(0)), dtype=torch.float32)


def _workspace(q, k, cu, max_seqlen, empty):
    return [empty(shape, dtype) for shape, dtype in
            workspace_shapes(q.size(0), cu.size(0) - 1, q.size(1), k.size(1), q.size(2), max_seqlen)]


@torch.library.custom_op("fake_fa3::varlen_bwd", mutates_args=())
def _varlen_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor,
                max_seqlen: int) -> list[torch.Tensor]:
    """dq, dk, dv, then FA3's backward workspace (returned, as mha_bwd returns it: the memory trace sees it
    allocated and freed at the real shapes)."""
    CALLS["backward"] += 1
    return [*_reference_grads(dout, q, k, v, cu, max_seqlen),
            *_workspace(q, k, cu, max_seqlen, lambda s, dt: torch.zeros(s, dtype=dt, device=q.device))]


@_varlen_bwd.register_fake
def _(dout, q, k, v, cu, max_seqlen):
    return [q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            *_workspace(q, k, cu, max_seqlen, lambda s, dt: q.new_empty(s, dtype=dt))]


def _setup(ctx, inputs, output):
    q, k, v, cu, max_seqlen = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu)  # what FA3 keeps: no T x T tensor
    ctx.max_seqlen = max_seqlen


def _backward(ctx, dout, dlse):
    q, k, v, _out, _lse, cu = ctx.saved_tensors
    dq, dk, dv, *_workspace_freed_here = _varlen_bwd(dout.contiguous(), q, k, v, cu, ctx.max_seqlen)
    return dq, dk, dv, None, None


_varlen_fwd.register_autograd(_backward, setup_context=_setup)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None,
                           causal=False, **unused):
    """The subset of FA3's flash_attn_varlen_func that train_gpt.py uses: self-attention (the same cu_seqlens
    and max_seqlen for q and k), causal, default scale. Returns (out, softmax_lse) as FA3 does."""
    assert causal and softmax_scale is None, "train_gpt.py calls FA3 causal with the default scale"
    assert cu_seqlens_q is cu_seqlens_k and max_seqlen_q == max_seqlen_k, "self-attention: same boundaries"
    _check(q, k, v, cu_seqlens_q, max_seqlen_q)
    segments = cu_seqlens_q.size(0) - 1
    if not torch.compiler.is_compiling():  # eager calls only: a traced call has a symbolic segment count
        LAUNCHES.append({"segments": segments, "max_seqlen": max_seqlen_q, "heads": q.size(1),
                         "tiles": -(-max_seqlen_q // tile_sizes(q.size(2))[0]) * q.size(1) * segments,
                         "bwd_workspace_bytes": workspace_bytes(q.size(0), segments, q.size(1), k.size(1), q.size(2),
                                                                max_seqlen_q)})
    return _varlen_fwd(q, k, v, cu_seqlens_q, max_seqlen_q)
