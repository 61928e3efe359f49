"""The tensor-core kernels' tile code, run on the CPU (tubevit::tube_tokens_tc_emulated{,_dw,_dx},
see csrc/kernels/tc_tiles.h and csrc/testing/tc_emulation.cpp): block/thread/warp index arithmetic, strides,
leading dimensions and boundary masks of the forward, weight- and input-gradient kernels, checked against
the fp64 reference without a GPU. Shapes are chosen so that every tile axis has several tiles and
a partial last one (tokens > 64, d > 64, K > 32 / 64, batch > 1)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tubevit_ext as tv
from conftest import (FP32_TC_REL, TILE_CASES as CASES, check_rounded, make_params, make_x, round_to_tf32 as tf32,
                      tile_inputs as fuzz_inputs, tile_problems as _tc_problems)

from tubevit_ext.testing import ops
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def as_mma_input(t, dtype):
    """What the tensor cores multiply: the dtype-rounded value (fp32: TF32), in fp64."""
    t = t.to(dtype)
    return (tf32(t) if dtype == torch.float32 else t).double()


def check_close(got, want, dtype, name):
    check_rounded(got, want, dtype, name, FP32_TC_REL)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last_3d", "noncontiguous"])
def test_forward_tiles(case, dtype, layout):
    tubes, size, C, d = CASES[case]
    g = torch.Generator().manual_seed(1)
    x = make_x(2, C, size, dtype, layout, g)
    ws, bs = make_params(tubes, C, d, dtype)
    pe = tv.sincos_pos_embed(tubes, size, d, dtype=dtype)
    flat = tv.flatten_tubes(tubes)
    for bias, pos in [(bs, pe), ([], None)]:
        got = ops.tube_tokens_tc_emulated(x, ws, bias, flat, pos)
        want = tv.reference.tube_tokens(as_mma_input(x, dtype), [as_mma_input(w, dtype) for w in ws],
                                        [b.double() for b in bias] or None, tubes,
                                        None if pos is None else pos.double())
        assert got.dtype == dtype and got.shape == want.shape
        check_close(got, want, dtype, f"{case} out (bias={bool(bias)})")


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last_3d"])
def test_weight_gradient_tiles(case, dtype, layout):
    tubes, size, C, d = CASES[case]
    g = torch.Generator().manual_seed(2)
    x = make_x(3, C, size, dtype, layout, g)
    ws, _ = make_params(tubes, C, d, dtype)
    gout = torch.randn(3, tv.num_tokens(tubes, size), d, generator=g, dtype=torch.float64).to(dtype)
    got = ops.tube_tokens_tc_emulated_dw(gout, x, ws, tv.flatten_tubes(tubes))
    x64 = as_mma_input(x, dtype)
    w64 = [w.double().requires_grad_() for w in ws]
    out = tv.reference.tube_tokens(x64, w64, None, tubes)
    want = torch.autograd.grad(out, w64, as_mma_input(gout, dtype))
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == dtype and a.shape == b.shape
        check_close(a, b, dtype, f"{case} dW[{i}]")


def _dx_oracle(gout, x, ws, tubes, dtype):
    x64 = x.double().requires_grad_()
    out = tv.reference.tube_tokens(x64, [as_mma_input(w, dtype) for w in ws], None, tubes)
    return torch.autograd.grad(out, x64, as_mma_input(gout, dtype))[0]


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_input_gradient_tiles(case, dtype):
    tubes, size, C, d = CASES[case]
    g = torch.Generator().manual_seed(3)
    x = make_x(2, C, size, dtype, "contiguous", g)
    ws, _ = make_params(tubes, C, d, dtype)
    gout = torch.randn(2, tv.num_tokens(tubes, size), d, generator=g, dtype=torch.float64).to(dtype)
    got = ops.tube_tokens_tc_emulated_dx(gout, x, ws, tv.flatten_tubes(tubes))
    assert got.dtype == dtype and got.shape == x.shape and got.is_contiguous()
    check_close(got, _dx_oracle(gout, x, ws, tubes, dtype), dtype, f"{case} dx")


def test_emulation_detects_a_wrong_result():
    # the comparison is sharp enough: a one-element change of the input is seen
    tubes, size, C, d = CASES["one_tube"]
    x = torch.randn(1, C, *size, dtype=torch.bfloat16)
    ws, bs = make_params(tubes, C, d, torch.bfloat16)
    got = ops.tube_tokens_tc_emulated(x, ws, bs, tv.flatten_tubes(tubes), None)
    x2 = x.clone()
    x2[0, 1, 3, 5, 7] += 4
    want = tv.reference.tube_tokens(x2.double(), [w.double() for w in ws], [b.double() for b in bs], tubes)
    with pytest.raises(AssertionError):
        check_close(got, want, torch.bfloat16, "perturbed")


def test_more_tubes_than_the_kernels_take():
    tubes = [tv.Tube((1, 1, 1), (1, 1, 1))] * 17
    x = torch.randn(1, 1, 2, 2, 2, dtype=torch.float16)
    ws = [torch.randn(4, 1, 1, 1, 1, dtype=torch.float16) for _ in tubes]
    with pytest.raises(ValueError, match="at most 16 tubes, got 17"):
        ops.tube_tokens_tc_emulated(x, ws, [], tv.flatten_tubes(tubes), None)


def test_batch_zero_and_float64_rejected():
    tubes, size, C, d = CASES["one_tube"]
    ws, _ = make_params(tubes, C, d, torch.float16)
    x = torch.randn(0, C, *size, dtype=torch.float16)
    assert ops.tube_tokens_tc_emulated(x, ws, [], tv.flatten_tubes(tubes), None).shape == (0, 450, d)
    dws = ops.tube_tokens_tc_emulated_dw(torch.zeros(0, 450, d, dtype=torch.float16), x, ws, tv.flatten_tubes(tubes))
    assert all(torch.equal(w, torch.zeros_like(w)) for w in dws)  # empty reduction
    w64, _ = make_params(tubes, C, d, torch.float64)
    x64 = torch.randn(1, C, *size, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="tube_tokens_tc_emulated"):  # no fp64 tensor cores
        ops.tube_tokens_tc_emulated(x64, w64, [], tv.flatten_tubes(tubes), None)


@settings(max_examples=60, deadline=None)
@given(_tc_problems())
def test_fuzz_forward_and_weight_gradient(prob):
    # single partial tiles, K < 32, d < 64, n < 64, widths 1: the edges the fixed cases skip
    tubes, dtype = prob["tubes"], prob["dtype"]
    x, ws, bs, pe, flat, gout = fuzz_inputs(prob)
    out = ops.tube_tokens_tc_emulated(x, ws, bs, flat, pe)
    want = tv.reference.tube_tokens(as_mma_input(x, dtype), [as_mma_input(w, dtype) for w in ws],
                                    [b.double() for b in bs] or None, tubes, None if pe is None else pe.double())
    check_close(out, want, dtype, "out")
    dws = ops.tube_tokens_tc_emulated_dw(gout, x, ws, flat)
    w64 = [w.double().requires_grad_() for w in ws]
    ref = torch.autograd.grad(tv.reference.tube_tokens(as_mma_input(x, dtype), w64, None, tubes), w64,
                              as_mma_input(gout, dtype))
    for i, (a, b) in enumerate(zip(dws, ref)):
        check_close(a, b, dtype, f"dW[{i}]")
    dx = ops.tube_tokens_tc_emulated_dx(gout, x, ws, flat)
    check_close(dx, _dx_oracle(gout, x, ws, tubes, dtype), dtype, "dx")
