"""Session 7 probe (not part of the build): would Winograd F(3, 3) along T for
the paper's 16x4x4 s(6, 32, 32) tube save enough GEMM time on the CPU?

Times only the GEMM shapes (random operands; no transforms), B = 4, d = 768:
direct forward (B*147 x 768) @ (768 x 768) vs five batched (B*49 x 288) @
(288 x 768) products, and the same for the weight gradient. Result on the
dev VM (NOTES "Session 7"): forward 1.90-1.95 -> 1.44-1.47 ms, dW 1.85-1.95
-> 1.49-1.57 ms. Run: python bench/experiments/winograd_gemm_shapes.py
"""
import time

import torch


def median_ms(f, n=40):
    for _ in range(5):
        f()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return ts[len(ts) // 2] * 1e3


def main(B=4, d=768):
    torch.manual_seed(0)
    P, W = torch.randn(B * 147, 768), torch.randn(d, 768)          # direct: patches, weight
    A, Wt = torch.randn(5, B * 49, 288), torch.randn(5, 288, d)     # F(3,3): 5 transformed points
    G, Gz = torch.randn(B * 147, d), torch.randn(5, B * 49, d)      # output gradients
    for _ in range(3):
        f1 = median_ms(lambda: torch.mm(P, W.t()))
        f2 = median_ms(lambda: torch.bmm(A, Wt))
        b1 = median_ms(lambda: torch.mm(G.t(), P))
        b2 = median_ms(lambda: torch.bmm(Gz.transpose(1, 2), A))
        print(f"forward direct {f1:.3f} ms, winograd-shaped {f2:.3f} ms ({f2 / f1:.2f}x) | "
              f"dW direct {b1:.3f} ms, winograd-shaped {b2:.3f} ms ({b2 / b1:.2f}x)")


if __name__ == "__main__":
    main()
