"""A small CUDA workload for compute-sanitizer (run by bench/gpu_check.sh):
forward and backward of every CUDA path on odd shapes, every dtype, several
layouts, batch 0, and the naive kernels. Exits non-zero on a mismatch.
bench/gpu_check.sh runs it once per CUDA path: TUBEVIT_CUDA_PATH=gemm (the GEMM
path, our gather + cuBLAS), TUBEVIT_CUDA_PATH=tc (the handwritten tensor-core
kernels: fp16/bf16, and fp32 as TF32), TUBEVIT_CUDA_PATH=naive (the naive kernels) and, where
the build has the prototype, TUBEVIT_CUDA_PATH=hopper (the sm_90a wgmma kernels for fp16/bf16:
forward, weight and bias gradients, dP and the dx writer)."""
import os

import torch

import tubevit_ext as tv
from tubevit_ext.testing import ops as testing_ops

# on the tensor-core path fp32 runs as TF32 (PyTorch's default cudnn.allow_tf32); the GEMM path
# is exact in fp32 by default, so the TF32 bound holds for it too
TF32 = os.environ.get("TUBEVIT_CUDA_PATH") != "naive" and torch.backends.cudnn.allow_tf32

assert torch.cuda.is_available(), "needs a GPU"
torch.manual_seed(0)
CASES = [
    # odd sizes, kw = 4 / 4 / 3: every vector width falls back to 1
    ([tv.Tube((3, 5, 4), (2, 3, 5), (1, 0, 2)), tv.Tube((1, 4, 4), (4, 4, 4)), tv.Tube((4, 2, 3), (1, 5, 2), (0, 1, 1))],
     (9, 13, 11), 7),
    # kw = 4 / 8, W = 24, d = 16: 8-wide placement
    ([tv.Tube((2, 4, 4), (2, 4, 4)), tv.Tube((1, 2, 8), (2, 3, 8), (0, 1, 0))], (6, 10, 24), 16),
    # d = 136: the Hopper forward's partial second column tile; 4-byte chunks (kw 4 and 2 at w
    # offsets 2), 1-element chunks under channels_last_3d
    ([tv.Tube((3, 5, 4), (2, 3, 5), (1, 0, 2)), tv.Tube((2, 2, 2), (3, 2, 6), (0, 1, 2))], (9, 13, 22), 136),
]
for tubes, size, d in CASES:
    flat = tv.flatten_tubes(tubes)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for B in (0, 3):
            for layout in ("contiguous", "channels_last_3d"):
                x = torch.randn(B, 3, *size, device="cuda", dtype=dtype)
                if layout == "channels_last_3d":
                    x = x.contiguous(memory_format=torch.channels_last_3d)
                x.requires_grad_()
                ws = [torch.randn(d, 3, *t.kernel, device="cuda", dtype=dtype, requires_grad=True) for t in tubes]
                bs = [torch.randn(d, device="cuda", dtype=dtype, requires_grad=True) for _ in tubes]
                pe = tv.sincos_pos_embed(tubes, size, d, dtype=dtype, device="cuda")
                y = tv.tube_tokens(x, ws, bs, tubes, pe)
                y.float().square().sum().backward()
                ref = tv.reference.tube_tokens(x.detach().double(), [w.detach().double() for w in ws],
                                               [b.detach().double() for b in bs], tubes, pe.double())
                err = (y.double() - ref).abs().max().item() if y.numel() else 0.0
                tol = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
                if dtype == torch.float32 and TF32:
                    tol = 3e-3  # inputs rounded to TF32 (10-bit mantissa)
                assert err <= tol * max(1.0, ref.abs().max().item() if ref.numel() else 1.0), (dtype, B, layout, err)
                yn = testing_ops.tube_tokens_naive(x.detach(), [w.detach() for w in ws], [b.detach() for b in bs], flat, pe)
                testing_ops.tube_tokens_naive_backward(torch.ones_like(yn), x.detach(), [w.detach() for w in ws], flat,
                                                             [True, True, True])
torch.cuda.synchronize()
print("sanitize_case: ok")
