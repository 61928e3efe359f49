"""The input gradient's last step on both fast CUDA paths: dx from a given dP workspace by the gather
(csrc/kernels/grad_input.h), as tubevit_testing::dx_from_dp runs it: thread by thread on the CPU
(the kernel's tile functions) and, on a GPU, the kernel itself."""
import pytest
import torch

import tubevit_ext as tv
from conftest import DX_SHAPES, check_rounded, dp_inputs, dx_from_dp_fp64
from tubevit_ext.testing import ops


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", sorted(DX_SHAPES))
def test_dx_gather_is_one_rounding_of_col2im(shape, dtype):
    """Every voxel, written once (the output starts as NaN), within one rounding of the fp64 col2im."""
    tubes, x, ws, grad, dp = dp_inputs(shape, dtype)
    got = ops.dx_from_dp(grad, x, ws, tv.flatten_tubes(tubes), dp)
    assert got.dtype == dtype and got.shape == x.shape and not torch.isnan(got).any()
    check_rounded(got, dx_from_dp_fp64(tubes, x, dp), dtype, shape, fp32_rel=2.0 ** -20)


def test_dx_from_dp_refuses_bad_arguments():
    tubes, x, ws, grad, dp = dp_inputs("w_ragged", torch.float32)
    flat = tv.flatten_tubes(tubes)
    with pytest.raises(ValueError, match="dp must be a contiguous fp32 tensor of"):
        ops.dx_from_dp(grad, x, ws, flat, dp[1:])
    with pytest.raises(TypeError, match="x must be fp16, bf16 or fp32"):
        ops.dx_from_dp(grad.double(), x.double(), [w.double() for w in ws], flat, dp)


@pytest.mark.skipif(not (torch.cuda.is_available() and tv.cuda_compiled()), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", sorted(DX_SHAPES))
def test_cuda_dx_gather_matches_its_emulation(shape, dtype):
    """The gather kernel on a GPU: bitwise its CPU emulation on the same dP (fp32 sums in the same
    order, adds only)."""
    tubes, x, ws, grad, dp = dp_inputs(shape, dtype, seed=1)
    flat = tv.flatten_tubes(tubes)
    want = ops.dx_from_dp(grad, x, ws, flat, dp)
    c = lambda t: t.cuda()
    got = ops.dx_from_dp(c(grad), c(x), [c(w) for w in ws], flat, c(dp))
    assert torch.equal(got.cpu(), want)
