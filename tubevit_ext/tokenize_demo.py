"""Tokenize a synthetic video batch with the fused op and the Conv3d
reference; print token count, max difference and time of each.

    python -m tubevit_ext.tokenize_demo [--batch 2] [--frames 32] [--size 224 224] [--dim 768]
                               [--device cpu|cuda] [--dtype float32|bfloat16|float16]
"""
from __future__ import annotations

import argparse
import time

import torch

import tubevit_ext as tv


def _time(fn, device, repeats):
    fn()  # warm-up (allocator, oneDNN/cuDNN plans)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--size", type=int, nargs=2, default=(224, 224), metavar=("H", "W"))
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    size = (args.frames, *args.size)
    fused = tv.SparseTubeTokenizer(3, args.dim).to(device, dtype)
    ref = tv.reference.SparseTubeTokenizer(3, args.dim).to(device, dtype)
    ref.load_state_dict(fused.state_dict())
    x = torch.randn(args.batch, 3, *size, device=device, dtype=dtype)

    print(f"tubevit_ext {tv.__version__} | torch {torch.__version__} | device {device} | dtype {args.dtype} "
          f"| CUDA kernels built: {tv.cuda_compiled()}")
    print(f"video batch {tuple(x.shape)}, tubes (paper §4.1):")
    for t, grid in zip(tv.PAPER_TUBES, (tv.token_grid(t, size) for t in tv.PAPER_TUBES)):
        print(f"  {t!r:42s} -> grid {grid} = {grid[0] * grid[1] * grid[2]} tokens")
    with torch.no_grad():
        y_fused, y_ref = fused(x), ref(x)
        t_fused = _time(lambda: fused(x), device, args.repeats)
        t_ref = _time(lambda: ref(x), device, args.repeats)
    print(f"tokens per video: {y_fused.shape[1]} (output {tuple(y_fused.shape)})")
    print(f"max |fused - reference|: {(y_fused.float() - y_ref.float()).abs().max().item():.3g}")
    print(f"fused     : {t_fused * 1e3:8.2f} ms (median of {args.repeats})")
    print(f"reference : {t_ref * 1e3:8.2f} ms (per-tube Conv3d + flatten + cat + PE add)")
    print(f"speed-up  : {t_ref / t_fused:.2f}x")


if __name__ == "__main__":
    main()
