"""The per-element kernels that the CUDA backend launches, run on the CPU
(tubevit::tube_tokens_naive*), against the Conv3d reference. On a machine
without a GPU this is what tests the CUDA kernels' index arithmetic; on a GPU
the same cases also run through the CUDA launcher."""
import random

import pytest
import torch

import tubevit_ext as tv
from conftest import UNIT_ROUNDOFF, make_params, max_err, random_tubes

from tubevit_ext.testing import ops


def _case(seed):
    rng = random.Random(seed)
    size = (rng.randint(1, 10), rng.randint(3, 15), rng.randint(3, 15))
    tubes = random_tubes(rng, rng.randint(1, 6), size)
    return tubes, size, rng.choice([1, 2, 3]), rng.choice([3, 6, 7]), rng.choice([0, 1, 2]), rng.random() < 0.5


@pytest.mark.parametrize("seed", range(16))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last_3d"])
def test_naive_forward_backward(device, seed, layout):
    tubes, size, C, d, B, use_pe = _case(seed)
    flat = tv.flatten_tubes(tubes)
    x = torch.randn(B, C, *size, dtype=torch.float64, requires_grad=True)
    ws, bs = make_params(tubes, C, d, torch.float64, "cpu", seed=seed)
    for t in ws + bs:
        t.requires_grad_()
    pe = tv.sincos_pos_embed(tubes, size, d, dtype=torch.float64) if use_pe else None
    ref = tv.reference.tube_tokens(x, ws, bs, tubes, pe)
    g = torch.randn_like(ref)
    want = torch.autograd.grad(ref, [x, *ws, *bs], g)

    dev = lambda t: t.detach().to(device)
    xd = dev(x)
    if layout == "channels_last_3d":
        xd = xd.contiguous(memory_format=torch.channels_last_3d)
    out = ops.tube_tokens_naive(xd, [dev(w) for w in ws], [dev(b) for b in bs], flat,
                                None if pe is None else dev(pe))
    assert max_err(out.cpu(), ref) < 1e-10
    dx, dws, dbs = ops.tube_tokens_naive_backward(dev(g), xd, [dev(w) for w in ws], flat, [True, True, True])
    for got, exp in zip([dx, *dws, *dbs], want):
        assert got.shape == exp.shape and max_err(got.cpu(), exp) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_naive_low_precision(device, dtype):
    tubes, size = tv.PAPER_TUBES, (20, 32, 36)
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    ws, bs = make_params(tubes, 3, 12, torch.float64)
    cast = lambda t: t.to(device=device, dtype=dtype)
    out = ops.tube_tokens_naive(cast(x), [cast(w) for w in ws], [cast(b) for b in bs], tv.flatten_tubes(tubes), None)
    # against fp64 on the same dtype-rounded inputs: the naive kernels accumulate in fp64 (fp32
    # inputs) or fp32 (16-bit inputs) and round once, so the error is one output rounding
    # (plus fp32 accumulation, far below a 16-bit rounding)
    back = lambda t: cast(t).double().cpu()
    ref = tv.reference.tube_tokens(back(x), [back(w) for w in ws], [back(b) for b in bs], tubes)
    assert out.dtype == dtype
    err, tol = max_err(out.cpu(), ref), 2 * UNIT_ROUNDOFF[dtype] * ref.abs().max().item()
    assert err <= tol, (err, tol)


def test_naive_masks_and_batch_zero(device):
    tubes = tv.PAPER_TUBES
    x = torch.randn(0, 3, 20, 28, 28, device=device)
    ws, _ = make_params(tubes, 3, 6, device=device)
    flat = tv.flatten_tubes(tubes)
    out = ops.tube_tokens_naive(x, ws, [], flat, None)
    assert out.shape == (0, tv.num_tokens(tubes, (20, 28, 28)), 6)
    dx, dws, dbs = ops.tube_tokens_naive_backward(out, x, ws, flat, [True, True, True])
    assert dx.shape == x.shape and all(torch.all(w == 0) for w in dws) and all(torch.all(b == 0) for b in dbs)
    dx, dws, dbs = ops.tube_tokens_naive_backward(out, x, ws, flat, [False, False, True])
    assert dx.numel() == 0 and dws == [] and len(dbs) == 4


def test_naive_too_many_tubes():
    tubes = [tv.Tube((1, 1, 1), (1, 1, 1))] * 17
    x = torch.randn(1, 1, 2, 2, 2)
    ws = [torch.randn(2, 1, 1, 1, 1) for _ in tubes]
    with pytest.raises(RuntimeError, match="at most 16 tubes, got 17"):
        ops.tube_tokens_naive(x, ws, [], tv.flatten_tubes(tubes), None)
