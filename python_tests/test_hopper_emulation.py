"""The Hopper forward kernel's tile code, run on the CPU (tubevit_testing::tube_tokens_hopper_emulated,
see csrc/kernels/hopper_tiles.h and csrc/testing/hopper_emulation.cpp): the flat tile list over tubes,
row tiles that cross sample boundaries, the row-origin and column-offset tables, zero-filled edges of
every tile axis and the epilogue's row map, bias and position embedding, against the fp64
reference without a GPU. The output starts as NaN, so an element no tile writes fails. Shapes give
several row tiles with a partial last one (B * n_i not a multiple of 128), K not a multiple of 64 and
d above 128 (a partial second column tile)."""
import pytest
import torch

import tubevit_ext as tv
from conftest import check_rounded, make_params
from tubevit_ext.testing import ops

CASES = {
    # rows of 3 samples in one tile list: 3 * 90 = 270 rows (3 tiles, the last partial), K = 54, d = 140
    "one_tube": ([tv.Tube((2, 3, 3), (1, 2, 2), (0, 1, 0))], (6, 20, 22), 3, 140, 3),
    # four tubes with offsets and overlapping windows, K from 12 to 240
    "mixed": ([tv.Tube((4, 4, 5), (2, 3, 3), (1, 0, 2)), tv.Tube((1, 2, 2), (1, 2, 2)),
               tv.Tube((3, 1, 4), (2, 1, 3), (0, 2, 1)), tv.Tube((2, 5, 2), (3, 4, 2), (1, 1, 0))],
              (9, 17, 19), 3, 130, 2),
    # the paper's four tubes (K = 1536 / 768 / 1728 / 768, the last K step of 1728 partial)
    "paper": (tv.PAPER_TUBES, (33, 64, 48), 3, 20, 2),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_hopper_tiles_match_the_reference(case, dtype, layout):
    tubes, size, C, d, B = CASES[case]
    torch.manual_seed(0)
    x = torch.randn(B, C, *size, dtype=torch.float64)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last_3d)
    elif layout == "strided":  # a view with a gap in every dimension's stride
        x = torch.randn(B + 1, C + 1, size[0] + 1, size[1] + 2, 2 * size[2], dtype=torch.float64)[:B, :C, 1:, 2:, ::2]
    ws, bs = make_params(tubes, C, d, dtype=torch.float64)
    pe = tv.sincos_pos_embed(tubes, size, d, dtype=torch.float64)
    flat = tv.flatten_tubes(tubes)
    got = ops.tube_tokens_hopper_emulated(x.to(dtype), [w.to(dtype) for w in ws], [b.to(dtype) for b in bs], flat,
                                          pe.to(dtype))
    assert not torch.isnan(got).any(), "an output element no tile wrote"
    # the fp64 result on the same rounded operands; the emulator accumulates in fp32 (fp64 for fp64)
    r = lambda t: t.to(dtype).double()
    want = tv.reference.tube_tokens(r(x), [r(w) for w in ws], [r(b) for b in bs], tubes, r(pe))
    if dtype == torch.float64:
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    else:
        check_rounded(got, want, dtype, f"{case} {layout}", fp32_rel=2.0 ** -20)


def test_hopper_tiles_without_bias_or_pos_embed():
    tubes, size, C, d, B = CASES["mixed"]
    torch.manual_seed(1)
    x = torch.randn(B, C, *size, dtype=torch.float64)
    ws, _ = make_params(tubes, C, d, dtype=torch.float64, bias=False)
    got = ops.tube_tokens_hopper_emulated(x, ws, [], tv.flatten_tubes(tubes), None)
    torch.testing.assert_close(got, tv.reference.tube_tokens(x, ws, None, tubes, None), rtol=1e-12, atol=1e-12)
