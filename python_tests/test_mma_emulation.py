"""The ldmatrix + mma.sync forward and weight gradient (csrc/cuda/tube_tokens_mma.cu,
TUBEVIT_TC_MMA=1): their tile code (csrc/kernels/mma_tiles.h) run on the CPU by
tubevit_testing::tube_tokens_mma_emulated{,_dw}, with ldmatrix (.trans for dW) and mma.sync computed
from the PTX ISA's fragment layouts, against the fp64 reference; the emulator also checks ldmatrix
alignment and bank conflicts, copy alignment, reads inside every tensor, every output element
written (csrc/testing/mma_emulation.cpp). Then, on a GPU, the kernels themselves.

Shapes: 128-row tiles flattened across samples (tiles that start mid-sample), partial channel tiles,
K steps of 32 with fewer steps than pipeline stages, odd d (element stores), every copy width."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tubevit_ext as tv
from conftest import check_rounded, cuda_graph_replay, make_params, set_switch
from test_tc_emulation import CASES as TC_CASES
from test_tc_emulation import _tc_problems, as_mma_input, fuzz_inputs, make_x

from tubevit_ext.testing import ops

DTYPES = [torch.float16, torch.bfloat16]
CASES = dict(TC_CASES)
CASES.update({
    # n = 100 tokens, B = 3 below: 300 rows = 3 tiles, two starting inside a sample; d = 200: a
    # partial second channel tile; K = 2*2*4*4 = 64: two steps (fewer than the pipeline's stages + 1)
    "flat": ([tv.Tube((2, 4, 4), (2, 4, 4), (0, 0, 0))], (8, 20, 20), 2, 200),
    # d odd: the epilogue's element-by-element stores; K = 12 (one step, partial)
    "odd_d": ([tv.Tube((1, 2, 2), (1, 2, 2), (0, 1, 1)), tv.Tube((1, 1, 3), (1, 2, 3))], (3, 15, 16), 3, 129),
    # K = 3*3*3*3 = 81: weight rows of odd length (one-element weight copies), kw = 3 (one-element gathers)
    "odd_k": ([tv.Tube((3, 3, 3), (2, 2, 2), (0, 1, 0))], (7, 12, 12), 3, 40),
})


def _x(case, dtype, layout, B=3, seed=1):
    tubes, size, C, d = CASES[case]
    return make_x(B, C, size, dtype, layout, torch.Generator().manual_seed(seed))


def _want(x, ws, bias, tubes, pos, dtype):
    return tv.reference.tube_tokens(as_mma_input(x, dtype), [as_mma_input(w, dtype) for w in ws],
                                    [b.double() for b in bias] or None, tubes, None if pos is None else pos.double())


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last_3d", "noncontiguous"])
def test_forward_tiles(case, dtype, layout):
    tubes, size, C, d = CASES[case]
    x = _x(case, dtype, layout)
    ws, bs = make_params(tubes, C, d, dtype)
    pe = tv.sincos_pos_embed(tubes, size, d, dtype=dtype)
    flat = tv.flatten_tubes(tubes)
    for bias, pos in [(bs, pe), ([], None)]:
        got = ops.tube_tokens_mma_emulated(x, ws, bias, flat, pos)
        want = _want(x, ws, bias, tubes, pos, dtype)
        assert got.dtype == dtype and got.shape == want.shape
        check_rounded(got, want, dtype, f"{case} {layout} (bias={bool(bias)})", 0)


def test_misaligned_input_takes_narrow_copies():
    # x starting one element past a 16-byte boundary: every gather copy is one element wide; the
    # emulator's put_bytes checks would raise if any wider copy were attempted at that address
    tubes, size, C, d = CASES["paper"]
    base = torch.randn(2 * C * size[0] * size[1] * size[2] + 1, dtype=torch.bfloat16)
    x = base[1:].view(2, C, *size)
    ws, bs = make_params(tubes, C, d, torch.bfloat16)
    got = ops.tube_tokens_mma_emulated(x, ws, bs, tv.flatten_tubes(tubes), None)
    check_rounded(got, _want(x, ws, bs, tubes, None, torch.bfloat16), torch.bfloat16, "misaligned", 0)


def test_emulation_detects_a_wrong_result():
    tubes, size, C, d = CASES["flat"]
    x = _x("flat", torch.bfloat16, "contiguous")
    ws, bs = make_params(tubes, C, d, torch.bfloat16)
    got = ops.tube_tokens_mma_emulated(x, ws, bs, tv.flatten_tubes(tubes), None)
    x2 = x.clone()
    x2[1, 1, 3, 5, 7] += 4  # a sample inside a tile that starts mid-sample
    with pytest.raises(AssertionError):
        check_rounded(got, _want(x2, ws, bs, tubes, None, torch.bfloat16), torch.bfloat16, "perturbed", 0)


def test_refusals_and_empty_batch():
    tubes, size, C, d = CASES["one_tube"]
    flat = tv.flatten_tubes(tubes)
    ws, _ = make_params(tubes, C, d, torch.float16)
    x = torch.randn(0, C, *size, dtype=torch.float16)
    assert ops.tube_tokens_mma_emulated(x, ws, [], flat, None).shape == (0, 450, d)
    for dtype in (torch.float32, torch.float64):
        w, _ = make_params(tubes, C, d, dtype)
        with pytest.raises(ValueError, match="float16 and bfloat16"):
            ops.tube_tokens_mma_emulated(torch.randn(1, C, *size, dtype=dtype), w, [], flat, None)
    many = [tv.Tube((1, 1, 1), (1, 1, 1))] * 17
    with pytest.raises(ValueError, match="at most 16 tubes, got 17"):
        ops.tube_tokens_mma_emulated(torch.randn(1, 1, 2, 2, 2, dtype=torch.float16),
                                     [torch.randn(4, 1, 1, 1, 1, dtype=torch.float16)] * 17, [],
                                     tv.flatten_tubes(many), None)


def test_switch_is_read_and_checked(monkeypatch):
    # TUBEVIT_TC_MMA takes 0 or 1 (read again by reload_options); the CPU backend does not depend on it
    tubes, size, C, d = CASES["one_tube"]
    x = _x("one_tube", torch.bfloat16, "contiguous")
    ws, bs = make_params(tubes, C, d, torch.bfloat16)
    outs = []
    for v in ("0", "1"):
        set_switch(monkeypatch, "TUBEVIT_TC_MMA", v)
        outs.append(tv.tube_tokens(x, ws, bs, tubes))
    assert torch.equal(*outs)
    monkeypatch.setenv("TUBEVIT_TC_MMA", "2")
    with pytest.raises(ValueError, match="TUBEVIT_TC_MMA must be 0 or 1, got '2'"):
        tv.reload_options()
    set_switch(monkeypatch, "TUBEVIT_TC_MMA", None)


@settings(max_examples=40, deadline=None)
@given(_tc_problems().filter(lambda p: p["dtype"] != torch.float32))
def test_fuzz_forward(prob):
    tubes, dtype = prob["tubes"], prob["dtype"]
    x, ws, bs, pe, flat, _ = fuzz_inputs(prob)
    out = ops.tube_tokens_mma_emulated(x, ws, bs, flat, pe)
    check_rounded(out, _want(x, ws, bs, tubes, pe, dtype), dtype, "out", 0)


# ---------------------------------------------------------------- weight gradient
def _dw_case(case):
    """The case with d rounded up to a multiple of 8 (the mma dW copies gradient rows 16 bytes at a time)."""
    tubes, size, C, d = CASES[case]
    return tubes, size, C, -(-d // 8) * 8


def _dw_want(gout, x, ws, tubes, dtype):
    w64 = [w.double().requires_grad_() for w in ws]
    out = tv.reference.tube_tokens(as_mma_input(x, dtype), w64, None, tubes)
    return torch.autograd.grad(out, w64, as_mma_input(gout, dtype))


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last_3d", "noncontiguous"])
def test_weight_gradient_tiles(case, dtype, layout):
    # target 1: one split per tube (dW written by the blocks); 10**6: as many splits as the steps allow
    # (fp32 partials, then the reduction)
    tubes, size, C, d = _dw_case(case)
    x = _x(case, dtype, layout, B=3, seed=2)
    ws, _ = make_params(tubes, C, d, dtype)
    gout = torch.randn(3, tv.num_tokens(tubes, size), d, generator=torch.Generator().manual_seed(5),
                       dtype=torch.float64).to(dtype)
    want = _dw_want(gout, x, ws, tubes, dtype)
    flat = tv.flatten_tubes(tubes)
    for target in (1, 10 ** 6):
        got = ops.tube_tokens_mma_emulated_dw(gout, x, ws, flat, target)
        for i, (a, b) in enumerate(zip(got, want)):
            assert a.dtype == dtype and a.shape == b.shape
            check_rounded(a, b, dtype, f"{case} {layout} target={target} dW[{i}]", 0)


def test_weight_gradient_split_plan():
    # splits: about `target` tiles, each split at least 8 token steps of 32, none empty; the kernel's
    # result does not depend on the plan beyond fp32 summation order
    tubes, size, C, d = _dw_case("paper")
    x = _x("paper", torch.bfloat16, "contiguous", B=4)
    ws, _ = make_params(tubes, C, d, torch.bfloat16)
    gout = torch.randn(4, tv.num_tokens(tubes, size), d, dtype=torch.bfloat16)
    flat = tv.flatten_tubes(tubes)
    for target in (1, 7, 40, 10 ** 6):
        plan = ops.mma_dw_splits(gout, x, ws, flat, target)
        for t, (splits, per) in zip(tubes, zip(plan[::2], plan[1::2])):
            steps = -(-4 * tv.num_tokens([t], size) // 32)
            assert splits >= 1 and (splits - 1) * per < steps <= splits * per, (target, t, splits, per)
            assert splits == 1 or per >= 8
            if target == 1:
                assert splits == 1
    # B = 32 paper tubes on 132 SMs (target 528): several splits, each >= 8 steps
    xb = torch.empty(32, 3, 32, 224, 224, dtype=torch.bfloat16)
    wb = [torch.empty(768, 3, *t.kernel, dtype=torch.bfloat16) for t in tv.PAPER_TUBES]
    plan = ops.mma_dw_splits(torch.empty(32, 539, 768, dtype=torch.bfloat16), xb, wb,
                             tv.flatten_tubes(tv.PAPER_TUBES), 528)
    assert plan[::2] == [3, 3, 3, 3] and min(plan[1::2]) >= 8, plan


def test_weight_gradient_empty_batch_and_refusals():
    tubes, size, C, d = _dw_case("one_tube")
    flat = tv.flatten_tubes(tubes)
    ws, _ = make_params(tubes, C, d, torch.float16)
    x = torch.randn(0, C, *size, dtype=torch.float16)
    dws = ops.tube_tokens_mma_emulated_dw(torch.zeros(0, 450, d, dtype=torch.float16), x, ws, flat, 528)
    assert all(torch.equal(w, torch.zeros_like(w)) for w in dws)  # empty reduction: zeros, every entry written
    x = torch.randn(1, C, *size, dtype=torch.float16)
    w70, _ = make_params(tubes, C, 70, torch.float16)
    with pytest.raises(ValueError, match=r"d % 8 == 0 \(got d = 70\)"):
        ops.tube_tokens_mma_emulated_dw(torch.zeros(1, 450, 70, dtype=torch.float16), x, w70, flat, 528)
    w32, _ = make_params(tubes, C, d, torch.float32)
    with pytest.raises(ValueError, match="float16 and bfloat16"):
        ops.tube_tokens_mma_emulated_dw(torch.zeros(1, 450, d), x.float(), w32, flat, 528)


@settings(max_examples=30, deadline=None)
@given(_tc_problems().filter(lambda p: p["dtype"] != torch.float32), st.sampled_from([1, 3, 10 ** 6]))
def test_fuzz_weight_gradient(prob, target):
    prob = dict(prob, d=-(-prob["d"] // 8) * 8)
    tubes, dtype = prob["tubes"], prob["dtype"]
    x, ws, _, _, flat, gout = fuzz_inputs(prob)
    got = ops.tube_tokens_mma_emulated_dw(gout, x, ws, flat, target)
    for i, (a, b) in enumerate(zip(got, _dw_want(gout, x, ws, tubes, dtype))):
        check_rounded(a, b, dtype, f"dW[{i}]", 0)


# ---------------------------------------------------------------- the kernels on a GPU
MMA_GPU = pytest.mark.skipif(
    not (torch.cuda.is_available() and tv.cuda_compiled() and torch.cuda.get_device_capability()[0] >= 8),
    reason="needs an sm_80+ GPU")


def _kernels_in(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def _on_cuda(t):
    """t on the GPU with the same strides (the non-contiguous case keeps its base's storage)."""
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last_3d):
        return t.cuda()
    return t._base.cuda().as_strided(t.shape, t.stride(), t.storage_offset())


@MMA_GPU
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last_3d", "noncontiguous"])
def test_cuda_mma_forward_matches_the_reference(monkeypatch, case, dtype, layout):
    """TUBEVIT_CUDA_PATH=tc TUBEVIT_TC_MMA=1: the profiler sees the mma kernel, the result is within two
    roundings of the fp64 result on the same operands, and two calls agree bitwise."""
    set_switch(monkeypatch, "TUBEVIT_CUDA_PATH", "tc")
    set_switch(monkeypatch, "TUBEVIT_TC_MMA", "1")
    tubes, size, C, d = CASES[case]
    x = _x(case, dtype, layout)
    ws, bs = make_params(tubes, C, d, dtype)
    pe = tv.sincos_pos_embed(tubes, size, d, dtype=dtype)
    xc, wc, bc, pc = _on_cuda(x), [w.cuda() for w in ws], [b.cuda() for b in bs], pe.cuda()
    assert xc.stride() == x.stride()
    names = _kernels_in(lambda: tv.tube_tokens(xc, wc, bc, tubes, pc))
    assert any("tube_tokens_mma_kernel" in n for n in names), names
    got = tv.tube_tokens(xc, wc, bc, tubes, pc)
    check_rounded(got.cpu(), _want(x, ws, bs, tubes, pe, dtype), dtype, f"{case} {layout}", 0)
    assert torch.equal(got, tv.tube_tokens(xc, wc, bc, tubes, pc)), "two calls differ"


@MMA_GPU
def test_cuda_mma_forward_paper_batch_and_graph(monkeypatch):
    """Paper tubes, 32 x 224 x 224, B = 4, bf16: against the WMMA kernel (both within two roundings of fp32
    accumulation), and under CUDA-graph replay."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 224, 224, device="cuda", dtype=torch.bfloat16)
    ws, bs = make_params(tv.PAPER_TUBES, 3, 768, dtype=torch.bfloat16, device="cuda")
    pe = tv.sincos_pos_embed(tv.PAPER_TUBES, (32, 224, 224), 768, dtype=torch.bfloat16, device="cuda")
    set_switch(monkeypatch, "TUBEVIT_CUDA_PATH", "tc")
    want = tv.tube_tokens(x, ws, bs, tv.PAPER_TUBES, pe)
    set_switch(monkeypatch, "TUBEVIT_TC_MMA", "1")
    got = tv.tube_tokens(x, ws, bs, tv.PAPER_TUBES, pe)
    err = (got.float() - want.float()).abs().max().item()
    assert err <= 4 * 2.0 ** -8 * want.float().abs().max().item(), err
    assert torch.equal(cuda_graph_replay(lambda: tv.tube_tokens(x, ws, bs, tv.PAPER_TUBES, pe)), got)


@MMA_GPU
def test_cuda_mma_switch_leaves_fp32_on_the_wmma_kernel(monkeypatch):
    set_switch(monkeypatch, "TUBEVIT_CUDA_PATH", "tc")
    set_switch(monkeypatch, "TUBEVIT_TC_MMA", "1")
    tubes, size, C, d = CASES["one_tube"]
    x = torch.randn(2, C, *size, device="cuda")
    ws, bs = make_params(tubes, C, d, device="cuda")
    names = _kernels_in(lambda: tv.tube_tokens(x, ws, bs, tubes))
    assert not any("tube_tokens_mma_kernel" in n for n in names), names


@MMA_GPU
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last_3d", "noncontiguous"])
def test_cuda_mma_grad_weight_matches_the_reference(monkeypatch, case, dtype, layout):
    """The weight gradient under TUBEVIT_CUDA_PATH=tc TUBEVIT_TC_MMA=1: the profiler sees the mma dW kernel,
    dW within two roundings of the fp64 result on the same operands, bitwise repeatable."""
    set_switch(monkeypatch, "TUBEVIT_CUDA_PATH", "tc")
    set_switch(monkeypatch, "TUBEVIT_TC_MMA", "1")
    tubes, size, C, d = _dw_case(case)
    x = _x(case, dtype, layout, B=3, seed=2)
    ws, _ = make_params(tubes, C, d, dtype)
    gout = torch.randn(3, tv.num_tokens(tubes, size), d, generator=torch.Generator().manual_seed(5),
                       dtype=torch.float64).to(dtype)
    xc = _on_cuda(x)

    def dws():
        wc = [w.cuda().requires_grad_() for w in ws]
        tv.tube_tokens(xc, wc, None, tubes).backward(gout.cuda())
        return [w.grad for w in wc]

    names = _kernels_in(dws)
    assert any("tube_dw_mma_kernel" in n for n in names), names
    got = dws()
    for i, (a, b) in enumerate(zip(got, _dw_want(gout, x, ws, tubes, dtype))):
        check_rounded(a.cpu(), b, dtype, f"{case} {layout} dW[{i}]", 0)
    assert all(torch.equal(a, b) for a, b in zip(got, dws())), "two calls differ"


@MMA_GPU
def test_cuda_mma_grad_weight_paper_batch(monkeypatch):
    """Paper tubes, 32 x 224 x 224, B = 4, bf16 (split tokens, the reduction launch): against the WMMA dW
    (both within two roundings of fp32 accumulation), and under CUDA-graph replay."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 224, 224, device="cuda", dtype=torch.bfloat16)
    ws, _ = make_params(tv.PAPER_TUBES, 3, 768, dtype=torch.bfloat16, device="cuda")
    grad = torch.randn(4, 539, 768, device="cuda", dtype=torch.bfloat16)

    def dws():
        wc = [w.detach().clone().requires_grad_() for w in ws]
        tv.tube_tokens(x, wc, None, tv.PAPER_TUBES).backward(grad)
        return [w.grad for w in wc]

    set_switch(monkeypatch, "TUBEVIT_CUDA_PATH", "tc")
    want = dws()
    set_switch(monkeypatch, "TUBEVIT_TC_MMA", "1")
    got = dws()
    for a, b in zip(got, want):
        err = (a.float() - b.float()).abs().max().item()
        assert err <= 4 * 2.0 ** -8 * b.float().abs().max().item(), err
    # the backward op (dW kernel + the splits' reduction) captured in a CUDA graph and replayed: the same bits
    flat = tv.flatten_tubes(tv.PAPER_TUBES)
    bwd = lambda: torch.ops.tubevit.tube_tokens_backward(grad, x, ws, [], flat, [False, True, False])[1]
    assert all(torch.equal(a, b) for a, b in zip(cuda_graph_replay(bwd), got))
