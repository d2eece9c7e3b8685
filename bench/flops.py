"""Training FLOPs per token of the train_gpt.py model, counted from its architecture.

Model FLOPs only (what the math needs), not hardware FLOPs: a multiply-add is 2 FLOPs, training is
forward + backward = 3x forward for every matmul (backward = grad wrt input + grad wrt weight), and
FlashAttention's backward recomputation of the scores is NOT counted (the usual MFU convention).

Per token, per layer application (d = MODEL_DIM, kv = NUM_KV_HEADS*head_dim, h = int(MLP_MULT*d),
H = NUM_HEADS, D = head_dim, W = GATE_WINDOW, k = keys per query):
    linear    2*(d*d + 2*d*kv + d*d + 2*d*h)      c_q, c_k, c_v, proj, mlp.fc, mlp.proj
    attention 2*H*D*k (q.k^T) + 2*H*D*k (p.v)     = 4*d*k
    gates     2*W*H                               sparse attention gate (if enabled)
once per token:
    head      2*d*V                               output projection (tied or not)
    smear     2*W                                 SmearGate (if enabled)
With depth recurrence (`looping`), the layer applications are those of `layer_schedule`.

Keys per query `k` by convention (`attention=`):
    causal     the work a document-masked causal kernel (FlashAttention varlen) needs: a document of
               n tokens has n(n+1)/2 (query, key) pairs, so k = (n+1)/2 with n = min(mean_doc_len, T)
               (n = T when mean_doc_len is None: the row is one document). This is what MFU uses.
    dense_doc  n keys per query: the full n x n square per document, what `attention_reference`
               (a per-document loop of plain matmuls) computes and what FlopCounterMode counts for it.
    dense_row  T keys per query: the full T x T square per row, what SDPA with a boolean mask computes,
               and what FlopCounterMode's SDPA formula counts on CUDA (it ignores masks and causality).
"""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

CONVENTIONS = ("causal", "dense_doc", "dense_row")


def keys_per_query(T: int, mean_doc_len: float | None, attention: str = "causal") -> float:
    """Mean number of keys each query attends to in a row of T tokens of documents of mean length m."""
    if attention not in CONVENTIONS:
        raise ValueError(f"attention={attention!r}: one of {CONVENTIONS}")
    if attention == "dense_row":
        return float(T)
    n = float(T) if mean_doc_len is None else min(float(mean_doc_len), float(T))
    return (n + 1.0) / 2.0 if attention == "causal" else n


def keys_per_query_from_ids(ids, bos_id: int, attention: str = "causal") -> float:
    """Exact mean keys per query of a batch of rows [B, T]: documents start at each BOS and at column 0
    (the segmentation train_gpt.prepare_attention gives the attention mask)."""
    import torch
    B, T = ids.shape
    if attention == "dense_row":
        return float(T)
    seg = torch.cumsum((ids == bos_id).to(torch.int64), dim=-1)
    total = 0.0
    for b in range(B):
        n = torch.unique_consecutive(seg[b], return_counts=True)[1].double()
        total += float((n * (n + 1) / 2).sum() if attention == "causal" else (n * n).sum())
    return total / (B * T)


def layer_applications(hp, looping: bool) -> int:
    from train_gpt import layer_schedule
    enc, dec = layer_schedule(hp.num_layers, looping, hp.num_loops, hp.loop_start, hp.loop_end)
    return len(enc) + len(dec)


def muon_flops_per_step(hp) -> float:
    """Newton-Schulz FLOPs of one optimizer step (all block matrices, one process): per iteration on an
    r x c matrix (r <= c): A = X X^T (2r^2c), A@A (2r^3), (bA + cA^2) X (2r^2c)."""
    d = hp.model_dim
    kv = hp.num_kv_heads * (d // hp.num_heads)
    h = int(hp.mlp_mult * d)
    shapes = [(d, d), (kv, d), (kv, d), (d, d), (h, d), (d, h)]
    per = 0.0
    for a, b in shapes:
        r, c = min(a, b), max(a, b)
        per += 4 * r * r * c + 2 * r ** 3
    return per * hp.muon_backend_steps * hp.num_layers


def training_flops_per_token(hp, looping: bool, mean_doc_len: float | None = None, *,
                             attention: str = "causal", keys: float | None = None,
                             seq_len: int | None = None) -> dict:
    """Training (forward + backward) FLOPs per token of `GPT(hp)`, broken down.

    looping: depth recurrence on (model.looping). mean_doc_len: mean document length in tokens (None =
    each row is one document). attention: the keys-per-query convention (module docstring). keys:
    override the keys per query (e.g. measured from a batch with keys_per_query_from_ids). seq_len:
    row length (default TRAIN_SEQ_LEN). Returns FLOPs per token: linear, attention, gates, head, smear,
    forward, total (= 3 x forward) and context (layer applications, keys per query, per-step numbers).
    """
    d, H, V = hp.model_dim, hp.num_heads, hp.vocab_size
    D = d // H
    kv = hp.num_kv_heads * D
    h = int(hp.mlp_mult * d)
    T = seq_len or hp.train_seq_len
    k = keys if keys is not None else keys_per_query(T, mean_doc_len, attention)
    apps = layer_applications(hp, looping)
    fwd = {
        "linear": apps * 2.0 * (d * d + 2 * d * kv + d * d + 2 * d * h),
        "attention": apps * 4.0 * H * D * k,
        "gates": apps * 2.0 * hp.gate_window * H if hp.sparse_attn_gate_enabled else 0.0,
        "head": 2.0 * d * V,
        "smear": 2.0 * hp.gate_window if hp.smear_gate_enabled else 0.0,
    }
    out = {name: 3.0 * v for name, v in fwd.items()}
    out["forward"] = sum(fwd.values())
    out["total"] = 3.0 * out["forward"]
    out["matmul_params"] = hp.num_layers * (2 * d * d + 2 * d * kv + 2 * d * h) + d * V
    out["layer_applications"] = apps
    out["keys_per_query"] = k
    out["attention_convention"] = attention
    out["seq_len"] = T
    out["tokens_per_step"] = hp.train_batch_tokens
    out["total_per_step"] = out["total"] * hp.train_batch_tokens
    out["muon_per_step"] = muon_flops_per_step(hp)
    return out


def schedule_average(hp, mean_doc_len: float | None = None, attention: str = "causal") -> float:
    """Training FLOPs per token averaged over a run: looping off before ENABLE_LOOPING_AT of training
    progress, on after (progress is wall-clock time, so this is a time average)."""
    off = training_flops_per_token(hp, False, mean_doc_len, attention=attention)["total"]
    if hp.num_loops <= 0:
        return off
    on = training_flops_per_token(hp, True, mean_doc_len, attention=attention)["total"]
    f = hp.enable_looping_at
    return f * off + (1 - f) * on


def _main() -> None:
    import argparse
    from train_gpt import Hyperparameters
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default=os.environ.get("PRESET", "sota"))
    ap.add_argument("--mean-doc-len", type=float, default=None)
    ap.add_argument("--attention", default="causal", choices=CONVENTIONS)
    a = ap.parse_args()
    hp = Hyperparameters.from_env({**os.environ, "PRESET": a.preset})
    for looping in ([False, True] if hp.num_loops > 0 else [False]):
        r = training_flops_per_token(hp, looping, a.mean_doc_len, attention=a.attention)
        print(f"preset={a.preset} looping={int(looping)} layer_apps={r['layer_applications']} "
              f"keys/query={r['keys_per_query']:.1f}")
        for key in ("linear", "attention", "gates", "head", "smear", "total"):
            print(f"  {key:10s} {r[key] / 1e6:12.3f} MFLOP/token  ({100 * r[key] / r['total']:5.1f}%)")
        print(f"  per step   {r['total_per_step'] / 1e12:12.3f} TFLOP  ({r['tokens_per_step']} tokens) "
              f"+ Muon NS {r['muon_per_step'] / 1e12:.4f} TFLOP")
    print(f"  6N check: 6 x matmul params = {6 * r['matmul_params'] / 1e6:.3f} MFLOP/token (no attention, no loops)")


if __name__ == "__main__":
    _main()
