"""Every Triton kernel of train_gpt.py compiled ahead of time for an H100/H200 (sm_90) on this CPU, with the
argument types torch.compile passes it: inductor hands Python floats to user Triton kernels as fp64 scalars
(that made _softcap_ce_fwd_kernel fail to compile on the first H200 run, and the others do their math in fp64).
The PTX may take an fp64 parameter and convert it once; no other fp64 instruction is allowed. ptxas ships in the
triton wheel, so this needs no GPU."""
import re

import pytest

from conftest import T

pytestmark = pytest.mark.skipif(not T.HAS_TRITON, reason="triton not installed (pip install -r requirements-dev.txt)")

# Argument types as inductor's launcher passes them: pointers by tensor dtype ({x} = the activation dtype),
# ints as i32 (i64 for strides of large tensors), floats as fp64; constexprs by value.
SIGNATURES = {
    "_softcap_ce_fwd_kernel": ({"z_ptr": "*{x}", "z_stride": "i64", "t_ptr": "*i64", "loss_ptr": "*fp32",
                                "lse_ptr": "*fp32", "V": "i32", "cap": "fp64"}, {"HAS_CAP": True, "BLOCK": 1024}),
    "_softcap_ce_bwd_kernel": ({"z_ptr": "*{x}", "z_stride": "i64", "t_ptr": "*i64", "lse_ptr": "*fp32",
                                "g_ptr": "*fp32", "dz_ptr": "*{x}", "dz_stride": "i64", "V": "i32", "cap": "fp64"},
                               {"HAS_CAP": True, "BLOCK": 1024}),
    "_leaky_sq_up_kernel": ({"x_ptr": "*{x}", "w_ptr": "*{x}", "pre_ptr": "*{x}", "act_ptr": "*{x}", "M": "i32",
                             "N": "i32", "K": "i32", "sxm": "i32", "sxk": "i32", "swn": "i32", "swk": "i32",
                             "som": "i32", "son": "i32", "slope": "fp64"},
                            {"BM": 128, "BN": 128, "BK": 64, "UPCAST": False}),
}
F64_ALLOWED = re.compile(r"^\s*(\.param \.f64 |cvt\.\w+\.f32\.f64\b)")  # the fp64 parameter and its one conversion


def triton_kernels():
    import triton
    return {n: v for n, v in vars(T).items() if isinstance(v, triton.runtime.jit.JITFunction)}


def test_every_kernel_has_a_signature():
    assert set(triton_kernels()) == set(SIGNATURES), "a new Triton kernel needs its sm_90 AOT check here"


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_kernel_compiles_for_sm90_without_fp64_math(name, dtype):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn = triton_kernels()[name]
    types, constexprs = SIGNATURES[name]
    sig = {k: v.format(x=dtype) for k, v in types.items()}
    assert [p.name for p in fn.params if not p.is_constexpr] == list(sig), "signature table out of date"
    sig.update({k: "constexpr" for k in constexprs})
    kernel = triton.compile(ASTSource(fn, signature=sig, constexprs=constexprs), target=GPUTarget("cuda", 90, 32))
    ptx = kernel.asm["ptx"]
    assert ".target sm_90" in ptx
    f64 = [line.strip() for line in ptx.splitlines() if "f64" in line and not F64_ALLOWED.match(line)]
    assert not f64, f"{name}: {len(f64)} fp64 instructions, e.g. {f64[:3]}"
