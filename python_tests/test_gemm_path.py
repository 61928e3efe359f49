"""The CUDA backend's GEMM path (csrc/kernels/gemm_path.h: our gather, the vendor GEMM, the position
embedding fused into the placement) run on the CPU as tubevit::tube_tokens_gemm_path{,_dw}: the
gather functor's index arithmetic (any input strides, every tube shape) and the orchestration's
views, GEMM operands and token offsets, checked against the fp64 Conv3d reference without a GPU.
On a GPU the same code runs by default behind tubevit::tube_tokens (the CUDA tests cover it)."""
import pytest
import torch
from hypothesis import given, settings

import tubevit_ext as tv
from conftest import (FP32_BLAS_REL, TILE_CASES as CASES, UNIT_ROUNDOFF, check_rounded, make_params, make_x, oracle,
                      tile_inputs as fuzz_inputs, tile_problems as _tc_problems)

from tubevit_ext.testing import ops
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def check_close(got, want, dtype, name):
    check_rounded(got, want, dtype, name, FP32_BLAS_REL)


def oracle_forward(x, ws, bs, pe, tubes):
    """fp64 reference on the dtype-rounded operands (what the GEMM multiplies)."""
    return oracle(x, ws, bs, tubes, pe)


def oracle_weight_grads(x, ws, gout, tubes):
    return oracle(x, ws, None, tubes, gout=gout)[2]


def problem(case, dtype, seed, layout="contiguous", B=2):
    """One of test_tc_emulation's fixed cases: tubes, size, d, x (B, C, T, H, W) in `layout`,
    weights, biases, the position embedding and an output gradient, all in `dtype`."""
    tubes, size, C, d = CASES[case]
    g = torch.Generator().manual_seed(seed)
    x = make_x(B, C, size, dtype, layout, g)
    ws, bs = make_params(tubes, C, d, dtype)
    gout = torch.randn(B, tv.num_tokens(tubes, size), d, generator=g, dtype=torch.float64).to(dtype)
    return tubes, size, d, x, ws, bs, tv.sincos_pos_embed(tubes, size, d, dtype=dtype), gout


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last_3d", "noncontiguous"])
def test_forward(case, dtype, layout):
    tubes, size, d, x, ws, bs, pe, _ = problem(case, dtype, 11, layout)
    flat = tv.flatten_tubes(tubes)
    for bias, pos in [(bs, pe), ([], None), (bs, None), ([], pe)]:
        got = ops.tube_tokens_gemm_path(x, ws, bias, flat, pos)
        want = oracle_forward(x, ws, bias, pos, tubes)
        assert got.dtype == dtype and got.shape == want.shape and got.is_contiguous()
        check_close(got, want, dtype, f"{case} out (bias={bool(bias)}, pe={pos is not None})")


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last_3d"])
def test_weight_gradient(case, dtype, layout):
    tubes, size, d, x, ws, _, _, gout = problem(case, dtype, 12, layout, B=3)
    got = ops.tube_tokens_gemm_path_dw(gout, x, ws, tv.flatten_tubes(tubes))
    want = oracle_weight_grads(x, ws, gout, tubes)
    assert len(got) == len(tubes)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == dtype and a.shape == b.shape and a.is_contiguous()
        check_close(a, b, dtype, f"{case} dW[{i}]")


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_input_gradient_by_gather(case, dtype):
    # dP in fp32, then every voxel sums its covering tokens' entries over all tubes in fp32 and
    # rounds once: within twice the unit roundoff per tube of the largest value (the bound of
    # PyTorch's autograd, which rounds once per convolution's input gradient)
    tubes, size, d, x, ws, _, _, gout = problem(case, dtype, 17)
    got = ops.tube_tokens_gemm_path_dx(gout, x, ws, tv.flatten_tubes(tubes))
    want = oracle(x, ws, None, tubes, gout=gout)[1]
    x64 = x.double().requires_grad_()
    assert got.dtype == dtype and got.shape == x.shape and got.is_contiguous()
    err = (got.double() - want).abs().max().item()
    rel = FP32_BLAS_REL if dtype == torch.float32 else UNIT_ROUNDOFF[dtype]
    tol = 2 * len(tubes) * rel * want.abs().max().item() + 1e-5
    assert err <= tol, f"{case} dx: max error {err:.3g} > {tol:.3g}"
    # voxels no window covers get exactly zero
    covered = torch.autograd.grad(tv.reference.tube_tokens(x64, [torch.ones_like(w, dtype=torch.float64)
                                                                 for w in ws], None, tubes),
                                  x64, torch.ones(gout.shape, dtype=torch.float64))[0] != 0
    assert torch.equal(got[~covered], torch.zeros_like(got[~covered]))


def test_matches_the_cpu_backend_in_fp32():
    # the same GEMM on the same gathered rows: the CPU backend (tube_tokens_cpu.cpp, MKL) and the
    # GEMM path's orchestration agree to fp32 accumulation-order noise
    tubes, size, d, x, ws, bs, pe, _ = problem("paper", torch.float32, 13)
    flat = tv.flatten_tubes(tubes)
    a = ops.tube_tokens_gemm_path(x, ws, bs, flat, pe)
    b = torch.ops.tubevit.tube_tokens(x, ws, bs, flat, pe)
    assert (a - b).abs().max().item() <= 1e-5 * b.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_misaligned_bias_and_pos_embed(dtype):
    # the placement pass reads bias and PE V channels at a time only where every pointer is
    # aligned to V elements: views that start one element in must take the narrower path
    tubes, size, d, x, ws, bs, pe, _ = problem("d72", dtype, 15)

    def shifted(t):
        buf = torch.empty(t.numel() + 1, dtype=t.dtype)
        view = buf[1:].view(t.shape)
        view.copy_(t)
        return view

    flat = tv.flatten_tubes(tubes)
    want = oracle_forward(x, ws, bs, pe, tubes)
    got = ops.tube_tokens_gemm_path(x, ws, [shifted(b) for b in bs], flat, shifted(pe))
    check_close(got, want, dtype, "misaligned")
    assert torch.equal(got, ops.tube_tokens_gemm_path(x, ws, bs, flat, pe))


def test_a_wrong_gather_is_detected():
    # the checks can fail: a weight that differs in a single tap changes the result
    tubes, size, d, x, ws, bs, _, _ = problem("mixed", torch.float32, 14)
    got = ops.tube_tokens_gemm_path(x, ws, bs, tv.flatten_tubes(tubes), None)
    ws_bad = [w.clone() for w in ws]
    ws_bad[2][:, 0, -1, 0, -1] += 1.0
    want = oracle_forward(x, ws_bad, bs, None, tubes)
    with pytest.raises(AssertionError):
        check_close(got, want, torch.float32, "planted")


def test_empty_batch_and_argument_checks():
    tubes, size, C, d = CASES["mixed"]
    ws, bs = make_params(tubes, C, d)
    flat = tv.flatten_tubes(tubes)
    x0 = torch.randn(0, C, *size)
    assert ops.tube_tokens_gemm_path(x0, ws, bs, flat, None).shape == (0, tv.num_tokens(tubes, size), d)
    dws = ops.tube_tokens_gemm_path_dw(torch.randn(0, tv.num_tokens(tubes, size), d), x0, ws, flat)
    assert all(torch.equal(w, torch.zeros_like(w)) for w in dws)  # an empty sum
    with pytest.raises(ValueError, match="weights must hold one tensor per tube"):
        ops.tube_tokens_gemm_path(torch.randn(1, C, *size), ws[:2], [], flat, None)


@settings(max_examples=60, deadline=None)
@given(_tc_problems())
def test_fuzz(prob):
    tubes, dtype = prob["tubes"], prob["dtype"]
    x, ws, bs, pe, flat, gout = fuzz_inputs(prob)
    check_close(ops.tube_tokens_gemm_path(x, ws, bs, flat, pe), oracle_forward(x, ws, bs, pe, tubes), dtype, "out")
    want = oracle_weight_grads(x, ws, gout, tubes)
    for i, (a, b) in enumerate(zip(ops.tube_tokens_gemm_path_dw(gout, x, ws, flat), want)):
        check_close(a, b, dtype, f"dW[{i}]")
