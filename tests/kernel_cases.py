"""Triton kernels vs their eager references; run under TRITON_INTERPRET=1 by tests/test_kernels.py.
Usage: TRITON_INTERPRET=1 python tests/kernel_cases.py {ce|mlp}"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import train_gpt as T  # noqa: E402


def close(a, b, tol, what):
    a, b = a.detach().float(), b.detach().float()
    err = float((a - b).abs().max() / (b.abs().max() + 1e-12))
    assert err < tol, f"{what}: relative error {err:.2e} >= {tol}"


def check_ce():
    g = torch.Generator().manual_seed(0)
    for (N, V), cap, dtype in [((7, 1000), 30.0, torch.float32), ((5, 1537), 30.0, torch.bfloat16),
                               ((3, 64), 0.0, torch.float32), ((4, 2049), 5.0, torch.float32)]:
        z = (torch.randn(N, V, generator=g) * 20).to(dtype)
        t = torch.randint(0, V, (N,), generator=g)
        for red in ("mean", "sum", "none"):
            z1 = z.clone().requires_grad_(True)
            z2 = z.clone().requires_grad_(True)
            a = T.softcap_cross_entropy_fused(z1, t, cap, red)
            b = T.softcap_cross_entropy(z2, t, cap, red)
            close(a, b, 1e-5, f"ce loss {N}x{V} cap={cap} {dtype} {red}")
            w = torch.randn(a.shape, generator=g) if red == "none" else torch.tensor(1.3)
            (a * w).sum().backward()
            (b * w).sum().backward()
            close(z1.grad, z2.grad, 2e-2 if dtype == torch.bfloat16 else 1e-4, f"ce grad {N}x{V} {dtype} {red}")
    print("ce ok")


def check_mlp():
    g = torch.Generator().manual_seed(1)
    for (M, K, N), slope, dtype in [((37, 48, 70), 0.5, torch.float32), ((64, 64, 96), 0.0, torch.float32),
                                    ((33, 40, 50), 0.5, torch.bfloat16)]:
        x = torch.randn(M, K, generator=g).to(dtype)
        w = (torch.randn(N, K, generator=g) * 0.2).to(dtype)
        x1, w1 = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        x2, w2 = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        a = T.leaky_relu_sq_up_fused(x1, w1, slope)
        b = T.leaky_relu_sq_up(x2, w2, slope)
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
        close(a, b, tol, f"mlp act {M}x{K}x{N} {dtype}")
        gout = torch.randn(a.shape, generator=g).to(dtype)
        a.backward(gout)
        b.backward(gout)
        close(x1.grad, x2.grad, 3 * tol, f"mlp dx {dtype}")
        close(w1.grad, w2.grad, 3 * tol, f"mlp dw {dtype}")
    print("mlp ok")


if __name__ == "__main__":
    {"ce": check_ce, "mlp": check_mlp}[sys.argv[1]]()
