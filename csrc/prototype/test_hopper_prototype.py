"""The prototype (csrc/prototype/): the Hopper kernels' tile code, run on the CPU
(tubevit_testing::tube_tokens_hopper_emulated and its _dw / _dx versions, see hopper_tiles.h and
hopper_emulation.cpp), the dx writer on a given dP (tubevit_testing::dx_writer_from_dp), and, on an
sm_90 GPU, the kernels themselves (their first light: bench/gpu_check.sh, step prototype).
Forward: the persistent schedule over
the tile list (tubes by decreasing K, row tiles that cross sample boundaries), every producer
thread's chunks (column walk, chunk widths 8 / 4 / 2 / 1, alignment, zero fill, each stage element
written once), the epilogue's row table, bias, position embedding and 16-byte store chunks, against
the fp64 reference without a GPU. The output starts as NaN, so an element no tile writes fails.
Shapes give several row tiles with a partial last one (B * n_i not a multiple of 128), K not a
multiple of 64 and d above 128 (a partial second column tile)."""
import pytest
import torch

import tubevit_ext as tv
from conftest import (DX_SHAPES, _reread_switches, check_rounded, cuda_graph_replay, dp_inputs,  # noqa: F401
                      dx_from_dp_fp64, make_params, oracle, set_switch)

if not tv._C._prototype_compiled():
    pytest.skip("a build without csrc/prototype (TUBEVIT_PROTOTYPE=1 builds it)", allow_module_level=True)
from tubevit_ext.testing import ops  # noqa: E402

CASES = {
    # rows of 3 samples in one tile list: 3 * 90 = 270 rows (3 tiles, the last partial), K = 54, d = 136
    "one_tube": ([tv.Tube((2, 3, 3), (1, 2, 2), (0, 1, 0))], (6, 20, 22), 3, 136, 3),
    # four tubes with offsets and overlapping windows, K from 12 to 240
    "mixed": ([tv.Tube((4, 4, 5), (2, 3, 3), (1, 0, 2)), tv.Tube((1, 2, 2), (1, 2, 2)),
               tv.Tube((3, 1, 4), (2, 1, 3), (0, 2, 1)), tv.Tube((2, 5, 2), (3, 4, 2), (1, 1, 0))],
              (9, 17, 19), 3, 144, 2),
    # the paper's four tubes (K = 1536 / 768 / 1728 / 768, the last K step of 1728 partial): 16- and
    # 8-byte chunks
    "paper": (tv.PAPER_TUBES, (33, 64, 48), 3, 24, 2),
    # widths 8 / 4 / 2 in one call: kw, then the w offset (third tube) and stride (fourth) decide
    "widths": ([tv.Tube((2, 2, 8), (2, 4, 8), (0, 1, 8)), tv.Tube((1, 3, 4), (2, 3, 4), (1, 0, 4)),
                tv.Tube((2, 2, 4), (3, 2, 8), (0, 1, 2)), tv.Tube((1, 2, 4), (2, 3, 6), (1, 0, 0))],
               (7, 12, 40), 3, 136, 3),
}


def _inputs(case, dtype, layout, seed=0):
    tubes, size, C, d, B = CASES[case]
    torch.manual_seed(seed)
    if layout == "contiguous":
        x = torch.randn(B, C, *size, dtype=torch.float64)
    elif layout == "channels_last":
        x = torch.randn(B, C, *size, dtype=torch.float64).to(memory_format=torch.channels_last_3d)
    elif layout == "strided":  # a view with a gap in every dimension's stride
        x = torch.randn(B + 1, C + 1, size[0] + 1, size[1] + 2, 2 * size[2], dtype=torch.float64)[:B, :C, 1:, 2:, ::2]
    else:  # "aligned_view": a unit-w-stride view whose strides and start keep 16-byte chunks possible
        x = torch.randn(B + 1, C + 1, size[0] + 1, size[1] + 2, size[2] + 16, dtype=torch.float64)
        x = x[:B, :C, 1:, 2:, 8:8 + size[2]]
    ws, bs = make_params(tubes, C, d, dtype=torch.float64)
    pe = tv.sincos_pos_embed(tubes, size, d, dtype=torch.float64)
    # cast keeping the layout (x.to(dtype) of a view is a fresh tensor with the same strides only
    # for dense layouts): the strided cases cast their base
    if layout in ("strided", "aligned_view"):
        base = x._base.to(dtype)
        x = base.as_strided(x.shape, x.stride(), x.storage_offset())
    else:
        x = x.to(dtype)
    return tubes, x, [w.to(dtype) for w in ws], [b.to(dtype) for b in bs], pe.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided", "aligned_view"])
def test_hopper_tiles_match_the_reference(case, dtype, layout):
    tubes, x, ws, bs, pe = _inputs(case, dtype, layout)
    flat = tv.flatten_tubes(tubes)
    grid = 3 if case != "paper" else 7  # several tiles per CTA
    got = ops.tube_tokens_hopper_emulated(x, ws, bs, flat, pe, grid)
    assert not torch.isnan(got).any(), "an output element no tile wrote"
    # the fp64 result on the same rounded operands; the emulator accumulates in fp32 (fp64 for fp64)
    want = tv.reference.tube_tokens(x.double(), [w.double() for w in ws], [b.double() for b in bs], tubes,
                                    pe.double())
    if dtype == torch.float64:
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    else:
        check_rounded(got, want, dtype, f"{case} {layout}", fp32_rel=2.0 ** -20)


@pytest.mark.parametrize("grid", [1, 2, 5, 132, 1000])
def test_hopper_schedule_any_grid(grid):
    """Every tile exactly once whatever the number of persistent CTAs (more CTAs than tiles too)."""
    tubes, x, ws, bs, pe = _inputs("mixed", torch.float64, "contiguous", seed=3)
    got = ops.tube_tokens_hopper_emulated(x, ws, bs, tv.flatten_tubes(tubes), pe, grid)
    want = tv.reference.tube_tokens(x, ws, bs, tubes, pe)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_hopper_chunk_widths():
    """16 / 8 / 4-byte cp.async where kw, the w offset and stride, x's strides and start allow it; plain
    loads (1) otherwise, e.g. channels_last (w stride C) or a view starting at an odd element."""
    widths = lambda x, tubes, ws: ops.hopper_chunk_widths(x, ws, tv.flatten_tubes(tubes))
    tubes, x, ws, _, _ = _inputs("paper", torch.bfloat16, "contiguous")
    assert widths(x, tubes, ws) == [8, 8, 4, 8, 4, 8, 8, 8]  # kw 8 / 4 / 12 / 16; every K % 8 == 0
    tubes, x, ws, _, _ = _inputs("widths", torch.bfloat16, "contiguous")
    assert widths(x, tubes, ws) == [8, 8, 4, 4, 2, 8, 2, 8]  # K = 96 / 36 / 48 / 24
    assert widths(x[..., 1:33], tubes, ws) == [1, 8, 1, 4, 1, 8, 1, 8]  # starts at an odd element
    assert widths(x[..., 2:34], tubes, ws) == [2, 8, 2, 4, 2, 8, 2, 8]
    assert widths(x.contiguous(memory_format=torch.channels_last_3d), tubes, ws) == [1, 8, 1, 4, 1, 8, 1, 8]
    tubes, x, ws, _, _ = _inputs("one_tube", torch.bfloat16, "contiguous")
    assert widths(x, tubes, ws) == [1, 2]  # kw = 3; K = 54


def test_hopper_emulator_refuses_what_the_kernel_refuses():
    tubes, x, ws, bs, pe = _inputs("one_tube", torch.float64, "contiguous")
    with pytest.raises(ValueError, match="d % 8"):
        ops.tube_tokens_hopper_emulated(x, [w[:130] for w in ws], [b[:130] for b in bs], tv.flatten_tubes(tubes),
                                        None)


def test_hopper_tiles_without_bias_or_pos_embed():
    tubes, x, ws, _, _ = _inputs("mixed", torch.float64, "contiguous", seed=1)
    got = ops.tube_tokens_hopper_emulated(x, ws, [], tv.flatten_tubes(tubes), None)
    torch.testing.assert_close(got, tv.reference.tube_tokens(x, ws, None, tubes, None), rtol=1e-12, atol=1e-12)



# ---- weight and bias gradients (dw_kernel + dw_reduce_kernel)

def _reference_grads(x, ws, tubes, grad, bias):
    """dW and db of the fp64 reference for this output gradient, on the same rounded operands."""
    bs = [torch.zeros(w.shape[0], dtype=torch.float64) for w in ws] if bias else None
    _, _, dws, dbs = oracle(x, ws, bs, tubes, gout=grad)
    return dws, dbs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "aligned_view"])
def test_hopper_dw_tiles_match_the_reference(case, dtype, layout):
    tubes, x, ws, _, _ = _inputs(case, dtype, layout)
    B, N, d = x.shape[0], tv.num_tokens(tubes, x.shape[2:]), ws[0].shape[0]
    grad = torch.randn(B, N, d, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).to(dtype)
    flat = tv.flatten_tubes(tubes)
    # a small split target: several token splits per tube, several tiles per CTA
    dws, dbs = ops.tube_tokens_hopper_dw_emulated(grad, x, ws, flat, True, 3, 12)
    want_w, want_b = _reference_grads(x, ws, tubes, grad, True)
    fp32_rel = 2.0 ** -16  # fp32 partials over up to hundreds of tokens, then summed
    for i, (got, want) in enumerate(zip(dws + dbs, want_w + want_b)):
        assert not torch.isnan(got).any(), f"output {i}: an entry nothing wrote"
        check_rounded(got, want, dtype, f"{case} {layout} output {i}", fp32_rel=fp32_rel)


@pytest.mark.parametrize("target", [1, 7, 100, 10000])
@pytest.mark.parametrize("grid", [1, 4, 1000])
def test_hopper_dw_any_split_and_grid(target, grid):
    """The same gradients whatever the split target (one split per tube .. as many as the 8-step minimum
    allows) and the number of persistent CTAs; without bias the db list is empty."""
    tubes, x, ws, _, _ = _inputs("widths", torch.float32, "contiguous", seed=2)
    B, N, d = x.shape[0], tv.num_tokens(tubes, x.shape[2:]), ws[0].shape[0]
    grad = torch.randn(B, N, d, generator=torch.Generator().manual_seed(6))
    dws, dbs = ops.tube_tokens_hopper_dw_emulated(grad, x, ws, tv.flatten_tubes(tubes), False, grid, target)
    assert dbs == []
    want_w, _ = _reference_grads(x, ws, tubes, grad, False)
    for got, want in zip(dws, want_w):
        check_rounded(got, want, torch.float32, f"target {target} grid {grid}", fp32_rel=2.0 ** -16)


def test_hopper_dw_empty_batch_gives_zeros():
    """B = 0: no tiles, no partials; the reduction still writes every dW and db entry (zeros)."""
    tubes, x, ws, _, _ = _inputs("mixed", torch.bfloat16, "contiguous")
    x0 = x[:0]
    grad = torch.empty(0, tv.num_tokens(tubes, x.shape[2:]), ws[0].shape[0], dtype=torch.bfloat16)
    dws, dbs = ops.tube_tokens_hopper_dw_emulated(grad, x0, ws, tv.flatten_tubes(tubes), True, 3, 12)
    assert len(dbs) == len(tubes)
    for t in dws + dbs:
        assert torch.equal(t, torch.zeros_like(t))


def test_hopper_dw_splits():
    """Token splits: about `target` tiles in all (4 per SM in the kernel), every split non-empty and at
    least 8 K steps of 64 tokens unless the tube has one split. The paper's tubes at B = 32, d = 768
    on 132 SMs: 2 / 3 / 2 / 4 splits of 25 steps, 564 tiles."""
    x = torch.empty(32, 3, 32, 224, 224, dtype=torch.bfloat16)  # never touched: shapes only
    g = torch.empty(32, 539, 768, dtype=torch.bfloat16)
    ws = [torch.empty(768, 3, *t.kernel, dtype=torch.bfloat16) for t in tv.PAPER_TUBES]
    assert ops.hopper_dw_splits(g, x, ws, tv.flatten_tubes(tv.PAPER_TUBES), 528) == [2, 25, 3, 25, 2, 25, 4, 25]
    tubes, x, ws, _, _ = _inputs("mixed", torch.bfloat16, "contiguous")
    g = torch.empty(x.shape[0], tv.num_tokens(tubes, x.shape[2:]), ws[0].shape[0], dtype=torch.bfloat16)
    for target in (1, 10, 100, 1000):
        r = ops.hopper_dw_splits(g, x, ws, tv.flatten_tubes(tubes), target)
        for t, splits, per in zip(tubes, r[::2], r[1::2]):
            steps = -(-x.shape[0] * tv.num_tokens([t], x.shape[2:]) // 64)
            assert splits >= 1 and (splits - 1) * per < steps <= splits * per, (target, t, splits, per)
            assert splits == 1 or per >= 8


HOPPER_GPU = pytest.mark.skipif(
    not (torch.cuda.is_available() and tv.cuda_compiled() and tv._C._prototype_compiled()
         and torch.cuda.get_device_capability() == (9, 0)),
    reason="needs an sm_90 GPU")


def _hopper_kernels_in(fn):
    """Names of the CUDA kernels fn() launches."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@HOPPER_GPU
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided", "aligned_view"])
def test_cuda_hopper_forward_matches_the_reference(monkeypatch, case, dtype, layout):
    """The kernel itself (TUBEVIT_CUDA_PATH=hopper) on every case and layout of the emulator tests: within
    two roundings of the fp64 result on the same operands, the kernel the profiler saw is the Hopper one,
    and two calls agree bitwise."""
    set_switch(monkeypatch, "TUBEVIT_CUDA_PATH", "hopper")
    tubes, x, ws, bs, pe = _inputs(case, dtype, layout)
    on = lambda t: t.cuda() if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last_3d) else \
        t._base.cuda().as_strided(t.shape, t.stride(), t.storage_offset())
    xc, wc, bc, pc = on(x), [w.cuda() for w in ws], [b.cuda() for b in bs], pe.cuda()
    assert xc.stride() == x.stride()
    names = _hopper_kernels_in(lambda: tv.tube_tokens(xc, wc, bc, tubes, pc))
    assert any("hopper" in n for n in names), names
    got = tv.tube_tokens(xc, wc, bc, tubes, pc)
    want = tv.reference.tube_tokens(x.double(), [w.double() for w in ws], [b.double() for b in bs], tubes, pe.double())
    check_rounded(got.cpu(), want, dtype, f"{case} {layout}", fp32_rel=2.0 ** -20)
    assert torch.equal(got, tv.tube_tokens(xc, wc, bc, tubes, pc)), "two calls differ"


@HOPPER_GPU
def test_cuda_hopper_forward_paper_batch_and_graph(monkeypatch):
    """The paper's tubes at 32 x 224 x 224, B = 4 (hundreds of tiles, several per CTA), bf16: against
    the GEMM path's result (same dtype; both within two roundings of fp32 accumulation), under a CUDA
    graph replay too."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 224, 224, device="cuda", dtype=torch.bfloat16)
    ws, bs = make_params(tv.PAPER_TUBES, 3, 768, dtype=torch.bfloat16, device="cuda")
    pe = tv.sincos_pos_embed(tv.PAPER_TUBES, (32, 224, 224), 768, dtype=torch.bfloat16, device="cuda")
    set_switch(monkeypatch, "TUBEVIT_CUDA_PATH", "gemm")
    want = tv.tube_tokens(x, ws, bs, tv.PAPER_TUBES, pe)
    set_switch(monkeypatch, "TUBEVIT_CUDA_PATH", "hopper")
    got = tv.tube_tokens(x, ws, bs, tv.PAPER_TUBES, pe)
    err = (got.float() - want.float()).abs().max().item()
    assert err <= 4 * 2.0 ** -8 * want.float().abs().max().item(), err
    assert torch.equal(cuda_graph_replay(lambda: tv.tube_tokens(x, ws, bs, tv.PAPER_TUBES, pe)), got)


@HOPPER_GPU
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "aligned_view"])
def test_cuda_hopper_grad_weight_matches_the_reference(monkeypatch, case, dtype, layout):
    """The weight and bias gradient kernels (TUBEVIT_CUDA_PATH=hopper, backward through autograd): within
    two roundings of the fp64 reference's gradients, the profiler sees them, two runs agree bitwise."""
    set_switch(monkeypatch, "TUBEVIT_CUDA_PATH", "hopper")
    tubes, x, ws, bs, pe = _inputs(case, dtype, layout)
    on = lambda t: t.cuda() if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last_3d) else \
        t._base.cuda().as_strided(t.shape, t.stride(), t.storage_offset())
    xc = on(x)
    B, N, d = x.shape[0], tv.num_tokens(tubes, x.shape[2:]), ws[0].shape[0]
    grad = torch.randn(B, N, d, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).to(dtype)

    def run():
        wc = [w.cuda().requires_grad_() for w in ws]
        bc = [b.cuda().requires_grad_() for b in bs]
        tv.tube_tokens(xc, wc, bc, tubes, pe.cuda()).backward(grad.cuda())
        return [w.grad for w in wc] + [b.grad for b in bc]

    names = _hopper_kernels_in(run)
    assert any("dw_kernel" in n for n in names) and any("dw_reduce_kernel" in n for n in names), names
    got = run()
    want_w, want_b = _reference_grads(x, ws, tubes, grad, True)
    for i, (g, w) in enumerate(zip(got, want_w + want_b)):
        check_rounded(g.cpu(), w, dtype, f"{case} {layout} output {i}", fp32_rel=2.0 ** -16)
    assert all(torch.equal(a, b) for a, b in zip(got, run())), "two runs differ"


# ---- input gradient (dp_kernel, then the dx writer)

def _reference_dx(x, ws, tubes, grad):
    """dx of the fp64 reference for this output gradient, on the same rounded operands."""
    return oracle(x, ws, None, tubes, gout=grad)[1]


def _grad_for(x, ws, tubes, dtype, seed=5):
    B, N, d = x.shape[0], tv.num_tokens(tubes, x.shape[2:]), ws[0].shape[0]
    return torch.randn(B, N, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("case", sorted(CASES))
def test_hopper_dx_tiles_match_the_reference(case, dtype):
    """dP by the dP kernel's tiles (every chunk checked, each dP element written once), then dx by the
    writer (each dx element stored once, 16-byte stores aligned): within the fp32-accumulation bound of
    the fp64 reference, and bitwise equal to the gather run on the same dP (same sums, same order)."""
    tubes, x, ws, _, _ = _inputs(case, dtype, "contiguous")
    grad = _grad_for(x, ws, tubes, dtype)
    flat = tv.flatten_tubes(tubes)
    got = ops.tube_tokens_hopper_dx_emulated(grad, x, ws, flat, 3, True)
    assert not torch.isnan(got).any(), "a dx element nothing wrote"
    check_rounded(got, _reference_dx(x, ws, tubes, grad), dtype, case, fp32_rel=2.0 ** -16)
    assert torch.equal(got, ops.tube_tokens_hopper_dx_emulated(grad, x, ws, flat, 3, False))


@pytest.mark.parametrize("grid", [1, 4, 1000])
def test_hopper_dx_any_grid(grid):
    """Every dP tile exactly once whatever the number of persistent CTAs; a channels_last x (the
    input's layout does not enter the input gradient) gives the same dx."""
    tubes, x, ws, _, _ = _inputs("widths", torch.float32, "contiguous", seed=2)
    grad = _grad_for(x, ws, tubes, torch.float32, seed=6)
    flat = tv.flatten_tubes(tubes)
    got = ops.tube_tokens_hopper_dx_emulated(grad, x, ws, flat, grid)
    check_rounded(got, _reference_dx(x, ws, tubes, grad), torch.float32, f"grid {grid}", fp32_rel=2.0 ** -16)
    xl = x.contiguous(memory_format=torch.channels_last_3d)
    assert torch.equal(got, ops.tube_tokens_hopper_dx_emulated(grad, xl, ws, flat, grid))


def test_hopper_dx_empty_batch_and_refusals():
    tubes, x, ws, _, _ = _inputs("mixed", torch.bfloat16, "contiguous")
    grad = _grad_for(x, ws, tubes, torch.bfloat16)
    got = ops.tube_tokens_hopper_dx_emulated(grad[:0], x[:0], ws, tv.flatten_tubes(tubes))
    assert got.shape == x[:0].shape
    with pytest.raises(ValueError, match="d % 8"):
        ops.tube_tokens_hopper_dx_emulated(grad[..., :130], x, [w[:130] for w in ws], tv.flatten_tubes(tubes))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", sorted(DX_SHAPES))
def test_dx_writer_equals_the_gather(shape, dtype):
    """On the same dP the writer and the gather give the same bits (the same fp32 sums in the same
    order), both within one rounding of the fp64 col2im."""
    tubes, x, ws, grad, dp = dp_inputs(shape, dtype)
    flat = tv.flatten_tubes(tubes)
    gather = ops.dx_from_dp(grad, x, ws, flat, dp)
    writer = ops.dx_writer_from_dp(grad, x, ws, flat, dp)
    assert not torch.isnan(writer).any()
    assert torch.equal(writer, gather)
    check_rounded(writer, dx_from_dp_fp64(tubes, x, dp), dtype, shape, fp32_rel=2.0 ** -20)


def test_dx_writer_refuses_bad_arguments():
    tubes, x, ws, grad, dp = dp_inputs("w_ragged", torch.float32)
    flat = tv.flatten_tubes(tubes)
    with pytest.raises(ValueError, match="dp must be a contiguous fp32 tensor of"):
        ops.dx_writer_from_dp(grad, x, ws, flat, dp[1:])


ANY_CUDA = pytest.mark.skipif(not (torch.cuda.is_available() and tv.cuda_compiled()), reason="needs a CUDA GPU")


@ANY_CUDA
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", sorted(DX_SHAPES))
def test_cuda_dx_writer_matches_its_emulation(shape, dtype):
    """The writer kernel on a GPU: bitwise equal to its CPU emulation and to the gather kernel on the
    same dP (fp32 sums in the same order, no contraction: adds only)."""
    tubes, x, ws, grad, dp = dp_inputs(shape, dtype, seed=1)
    flat = tv.flatten_tubes(tubes)
    want = ops.dx_writer_from_dp(grad, x, ws, flat, dp)
    c = lambda t: t.cuda()
    writer = ops.dx_writer_from_dp(c(grad), c(x), [c(w) for w in ws], flat, c(dp))
    gather = ops.dx_from_dp(c(grad), c(x), [c(w) for w in ws], flat, c(dp))
    assert torch.equal(writer.cpu(), want) and torch.equal(gather.cpu(), want)


@HOPPER_GPU
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_cuda_hopper_grad_input_matches_the_reference(monkeypatch, case, dtype, layout):
    """The input gradient under TUBEVIT_CUDA_PATH=hopper (dp_kernel, then the writer) through autograd:
    within the fp32-accumulation bound of the fp64 reference, the profiler sees both kernels, two runs
    agree bitwise."""
    set_switch(monkeypatch, "TUBEVIT_CUDA_PATH", "hopper")
    tubes, x, ws, _, _ = _inputs(case, dtype, layout)
    grad = _grad_for(x, ws, tubes, dtype)
    base = x._base if layout == "strided" else None

    def run():
        xc = (base.cuda().as_strided(x.shape, x.stride(), x.storage_offset()) if base is not None
              else x.cuda()).requires_grad_()
        tv.tube_tokens(xc, [w.cuda() for w in ws], None, tubes, None).backward(grad.cuda())
        return xc.grad

    names = _hopper_kernels_in(run)
    assert any("dp_kernel" in n for n in names) and any("tube_dx_writer_kernel" in n for n in names), names
    got = run()
    check_rounded(got.cpu(), _reference_dx(x, ws, tubes, grad), dtype, f"{case} {layout}", fp32_rel=2.0 ** -16)
    assert torch.equal(got, run()), "two runs differ"


@HOPPER_GPU
def test_cuda_hopper_grad_input_paper_batch(monkeypatch):
    """The paper's tubes at 32 x 224 x 224, B = 2, bf16: the Hopper input gradient against the GEMM
    path's (cuBLAS dP, then the gather), within a few roundings of the larger; the same under a CUDA
    graph replay."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 224, 224, device="cuda", dtype=torch.bfloat16)
    ws, _ = make_params(tv.PAPER_TUBES, 3, 768, dtype=torch.bfloat16, device="cuda")
    grad = torch.randn(2, 539, 768, device="cuda", dtype=torch.bfloat16)

    def dx(path):
        set_switch(monkeypatch, "TUBEVIT_CUDA_PATH", path)
        xc = x.clone().requires_grad_()
        tv.tube_tokens(xc, ws, None, tv.PAPER_TUBES, None).backward(grad)
        return xc.grad.float()

    want, got = dx("gemm"), dx("hopper")
    err = (got - want).abs().max().item()
    assert err <= 4 * 2.0 ** -8 * want.abs().max().item(), err
    # the backward op (dP kernel + writer) captured in a CUDA graph and replayed: the same bits
    flat = tv.flatten_tubes(tv.PAPER_TUBES)
    bwd = lambda: torch.ops.tubevit.tube_tokens_backward(grad, x, ws, [], flat, [True, False, False])[0]
    assert torch.equal(cuda_graph_replay(bwd).float(), got)
