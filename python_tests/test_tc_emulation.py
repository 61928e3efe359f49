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
from conftest import FP32_TC_REL, check_rounded, make_params

from tubevit_ext.testing import ops
DTYPES = [torch.float16, torch.bfloat16, torch.float32]

CASES = {
    # many tokens (M tiles), K = 54 (two K steps, partial), d = 70 (two channel tiles, partial)
    "one_tube": ([tv.Tube((2, 3, 3), (1, 2, 2), (0, 1, 0))], (6, 20, 22), 3, 70),
    # four tubes, K from 12 to 240, overlapping windows, offsets
    "mixed": ([tv.Tube((4, 4, 5), (2, 3, 3), (1, 0, 2)), tv.Tube((1, 2, 2), (1, 2, 2)),
               tv.Tube((3, 1, 4), (2, 1, 3), (0, 2, 1)), tv.Tube((2, 5, 2), (3, 4, 2), (1, 1, 0))],
              (9, 17, 19), 3, 130),
    # widths/offsets that allow 8-, 4- (and for fp32 4-) element accesses in the gather and
    # the weight tile (kw 8/4/12/16, W = 48, K = 1536/768/1728/768)
    "paper": (tv.PAPER_TUBES, (33, 64, 48), 3, 20),
    # kw = 6 on W = 36: 2-element gather accesses (16-bit types), K = 2*2*6*2 = 48
    "vec2": ([tv.Tube((2, 2, 6), (2, 3, 6), (0, 1, 0))], (5, 11, 36), 2, 33),
    # H > 32 and W > 64: the dX gather's (32 x 64)-voxel tiles, with partial last tiles on both
    # axes and windows that straddle tile borders (kw = 5 with stride 3)
    # d = 72: every grad-row access of dW's token-major A tile is 8 (16-bit) or 4 (fp32) channels
    # wide, with a partial second channel tile (TUBEVIT_TC_DW_VEC = 1 builds)
    "d72": ([tv.Tube((2, 4, 4), (2, 4, 4), (0, 0, 0))], (6, 16, 24), 3, 72),
    "wide": ([tv.Tube((2, 3, 5), (1, 2, 3), (0, 1, 2)), tv.Tube((1, 4, 4), (2, 4, 4), (1, 0, 1))],
             (3, 37, 70), 2, 20),
}


def tf32(t):
    """Round fp32 to TF32 as the kernels' __float_to_tf32 does (nearest, ties away from zero)."""
    bits = t.float().contiguous().view(torch.int32)
    out = ((bits + 0x1000) & ~0x1FFF).view(torch.float32)
    return torch.where(torch.isfinite(t), out, t.float())


def as_mma_input(t, dtype):
    """What the tensor cores multiply: the dtype-rounded value (fp32: TF32), in fp64."""
    t = t.to(dtype)
    return (tf32(t) if dtype == torch.float32 else t).double()


def make_x(B, C, size, dtype, layout, g):
    x = torch.randn(B, C, *size, generator=g, dtype=torch.float64).to(dtype)
    if layout == "channels_last_3d":
        return x.contiguous(memory_format=torch.channels_last_3d)
    if layout == "noncontiguous":
        return torch.stack([x, x], dim=2).flatten(1, 2)[:, ::2]
    return x


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


@st.composite
def _tc_problems(draw):
    size = (draw(st.integers(1, 9)), draw(st.integers(1, 20)), draw(st.integers(1, 20)))
    tubes = []
    for _ in range(draw(st.integers(1, 4))):
        k, s, o = [], [], []
        for L in size:
            ka = draw(st.integers(1, min(L, 6)))
            k.append(ka)
            s.append(draw(st.integers(1, 6)))
            o.append(draw(st.integers(0, L - ka)))
        tubes.append(tv.Tube(tuple(k), tuple(s), tuple(o)))
    return dict(size=size, tubes=tubes, C=draw(st.integers(1, 4)), d=draw(st.integers(1, 80)),
                B=draw(st.integers(1, 3)), dtype=draw(st.sampled_from(DTYPES)),
                layout=draw(st.sampled_from(["contiguous", "channels_last_3d", "noncontiguous"])),
                bias=draw(st.booleans()), pe=draw(st.booleans()), seed=draw(st.integers(0, 2 ** 16)))


def fuzz_inputs(prob):
    """A drawn problem's tensors: x, weights, biases ([] when drawn off), the position embedding
    (None when drawn off), the flat tube list and the output gradient, in the drawn dtype."""
    tubes, size, dtype, d = prob["tubes"], prob["size"], prob["dtype"], prob["d"]
    g = torch.Generator().manual_seed(prob["seed"])
    x = make_x(prob["B"], prob["C"], size, dtype, prob["layout"], g)
    ws, bs = make_params(tubes, prob["C"], d, dtype, seed=prob["seed"])
    pe = tv.sincos_pos_embed(tubes, size, d, dtype=dtype) if prob["pe"] else None
    gout = torch.randn(prob["B"], tv.num_tokens(tubes, size), d, generator=g, dtype=torch.float64).to(dtype)
    return x, ws, bs if prob["bias"] else [], pe, tv.flatten_tubes(tubes), gout


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
