"""The CUDA planner (csrc/cuda_plan.h) as a table, on the CPU: for every dtype x size class x device
capability x TF32 switches x TUBEVIT_CUDA_PATH value, which kernels the forward, the weight gradient
and the input gradient run. The CUDA tests then check that the kernels the plan names are the ones
that run (test_cuda_runtime.py); this file needs no GPU."""
import itertools

import pytest

import tubevit_ext as tv
from conftest import set_switch

PAPER_N = 539  # tokens of the paper's tubes at 32 x 224 x 224
D = 768


def plan(dtype, batch, sm=9, tf32_conv=True, tf32_matmul=False, gemm_fits=True, n_tubes=4, override="auto",
         hopper=(False, False, False)):
    return tuple(tv._C._cuda_plan(dtype, batch, PAPER_N, D, n_tubes, sm, tf32_conv, tf32_matmul, gemm_fits,
                                  *hopper, override))


def expected(dtype, batch, sm, tf32_conv, tf32_matmul, gemm_fits, n_tubes, override, hopper):
    """The decision written out once more, independently of the C++ code's structure."""
    elems = batch * PAPER_N * D
    tc_ok = (dtype in ("float16", "bfloat16") or (dtype == "float32" and tf32_conv)) and n_tubes <= 16 and sm >= 8
    gemm_ok = gemm_fits and {"float16": True, "bfloat16": sm >= 8,
                             "float32": (not tf32_matmul) or tf32_conv, "float64": False}[dtype]

    def one(backward):
        if override == "naive":
            return "naive"
        if override == "tc":
            return "tc" if tc_ok else "naive"
        if dtype == "float32":
            big = elems >= (8 << 20) if backward else True
        else:
            big = elems >= ((12 << 20) if backward else (1 << 20))
        if (override == "gemm" or not tc_ok or big) and gemm_ok:
            return "gemm"
        return "tc" if tc_ok else "naive"

    fwd, bwd = one(False), one(True)
    out = [fwd, bwd, bwd]
    if override == "hopper":
        out = ["hopper" if h else k for h, k in zip(hopper, out)]
    return tuple(out)


DTYPES = ["float16", "bfloat16", "float32", "float64"]
BATCHES = [1, 2, 3, 16, 20, 21, 30, 31, 64]  # on both sides of every size threshold
OVERRIDES = ["auto", "gemm", "tc", "naive", "hopper"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("override", OVERRIDES)
def test_plan_table(dtype, override):
    for batch, sm, tf32_conv, tf32_matmul, gemm_fits, n_tubes, hopper in itertools.product(
            BATCHES, [7, 8, 9], [True, False], [True, False], [True, False], [4, 17],
            [(False, False, False), (True, True, True), (True, False, True)]):
        args = (dtype, batch, sm, tf32_conv, tf32_matmul, gemm_fits, n_tubes, override, hopper)
        got = plan(dtype, batch, sm, tf32_conv, tf32_matmul, gemm_fits, n_tubes, override, hopper)
        assert got == expected(*args), args


def test_plan_rows_that_the_measurements_chose():
    # the rows bench/DESIGN.md's H200 measurements fixed (paper tubes, d = 768, sm_90, PyTorch's defaults)
    assert plan("bfloat16", 1) == ("tc", "tc", "tc")           # B = 1: one launch per pass wins
    assert plan("bfloat16", 4) == ("gemm", "tc", "tc")         # forward: the GEMM path from B = 3
    assert plan("bfloat16", 32) == ("gemm", "gemm", "gemm")    # backward: the GEMM path from B = 31
    assert plan("float32", 1) == ("gemm", "tc", "tc")          # exact fp32 forward always; TF32 backward
    assert plan("float32", 32) == ("gemm", "gemm", "gemm")
    assert plan("float32", 1, tf32_conv=False) == ("gemm", "gemm", "gemm")  # no TF32 conv: exact kernels
    assert plan("float32", 1, tf32_conv=False, tf32_matmul=True) == ("naive",) * 3  # as Conv3d: exact
    assert plan("float64", 32) == ("naive",) * 3
    assert plan("bfloat16", 32, sm=7) == ("naive",) * 3          # no bf16 tensor cores, no bf16 cuBLAS path
    assert plan("float16", 32, sm=7) == ("gemm",) * 3
    assert plan("bfloat16", 32, gemm_fits=False) == ("tc",) * 3  # indices past 32 bits
    assert plan("bfloat16", 1, override="gemm") == ("gemm",) * 3
    assert plan("bfloat16", 32, override="tc") == ("tc",) * 3
    assert plan("bfloat16", 32, override="hopper", hopper=(True, True, False)) == ("hopper", "hopper", "gemm")
    assert plan("bfloat16", 32, hopper=(True, True, True)) == ("gemm",) * 3  # only when asked for


def test_plan_reads_the_switch_when_not_overridden(monkeypatch):
    set_switch(monkeypatch, "TUBEVIT_CUDA_PATH", "naive")
    assert plan("bfloat16", 32, override="") == ("naive",) * 3
    set_switch(monkeypatch, "TUBEVIT_CUDA_PATH", None)
    assert plan("bfloat16", 32, override="") == ("gemm",) * 3


def test_plan_refuses_unknown_names():
    with pytest.raises(ValueError, match="override must be one of auto, gemm, tc, naive, hopper; got 'fast'"):
        plan("bfloat16", 1, override="fast")
    with pytest.raises(ValueError, match="dtype must be float16, bfloat16, float32 or float64; got 'int8'"):
        plan("int8", 1)


def test_switch_refuses_unknown_values(monkeypatch):
    monkeypatch.setenv("TUBEVIT_CUDA_PATH", "mma")
    with pytest.raises(ValueError, match="TUBEVIT_CUDA_PATH must be one of auto, gemm, tc, naive, hopper; got 'mma'"):
        tv.reload_options()
    monkeypatch.setenv("TUBEVIT_CUDA_PATH", "auto")
    monkeypatch.setenv("TUBEVIT_CPU_PATCH_CACHE_MB", "-1")
    with pytest.raises(ValueError, match="TUBEVIT_CPU_PATCH_CACHE_MB must be an integer >= 0, got '-1'"):
        tv.reload_options()
    monkeypatch.setenv("TUBEVIT_CPU_PATCH_CACHE_MB", "12MB")
    with pytest.raises(ValueError, match="TUBEVIT_CPU_PATCH_CACHE_MB must be an integer >= 0, got '12MB'"):
        tv.reload_options()
