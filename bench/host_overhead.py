"""Host overhead of one tokenizer call: what Python, the dispatcher and autograd cost when the
kernel costs nothing, against an nn.Linear on an input of the same size, in one process.

    python bench/host_overhead.py [--calls 2000] [--rounds 3] [--device cpu] [--json out.json]

Tiny input: four tubes on a 1x3x4x8x8 clip, d = 8 (the kernels take ~1 us). Per row: the 10th
percentile of --calls timed calls, in --rounds interleaved rounds (the median round is reported),
for the forward under no_grad, the forward with parameters requiring grad, and forward +
backward. On CUDA each call is synchronised, so the times include the launch latency.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import tubevit_ext as tv

TUBES = [tv.Tube((2, 4, 4), (2, 4, 4)), tv.Tube((4, 2, 2), (4, 4, 4), (0, 1, 1)), tv.Tube((1, 4, 4), (4, 4, 4)),
         tv.Tube((2, 2, 2), (2, 2, 2))]


def p10_us(fn, calls, sync):
    ts = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return ts[calls // 10] * 1e6


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=2000, help="timed calls per row and round (default: 2000)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    tok = tv.SparseTubeTokenizer(3, 8, tubes=TUBES).to(dev)
    lin = torch.nn.Linear(8, 8).to(dev)
    x = torch.randn(1, 3, 4, 8, 8, device=dev)
    xl = torch.randn(x.numel() // 8, 8, device=dev)

    def fwd_bwd(m, inp):
        return lambda: m(inp).sum().backward()

    def no_grad(m, inp):
        def f():
            with torch.no_grad():
                m(inp)
        return f

    rows = {"forward, no_grad": (no_grad(tok, x), no_grad(lin, xl)),
            "forward, parameters require grad": (lambda: tok(x), lambda: lin(xl)),
            "forward + backward": (fwd_bwd(tok, x), fwd_bwd(lin, xl))}
    for f, g in rows.values():  # warm-up: caches, allocator, first-call dispatch
        for _ in range(50):
            f(), g()
    samples = {k: ([], []) for k in rows}
    for _ in range(a.rounds):
        for k, (f, g) in rows.items():
            samples[k][0].append(p10_us(f, a.calls, sync))
            samples[k][1].append(p10_us(g, a.calls, sync))
    out = []
    print(f"{'':36s} {'tokenizer':>10s} {'nn.Linear':>10s} {'ratio':>6s}")
    for k, (ts, ls) in samples.items():
        t, l_ = statistics.median(ts), statistics.median(ls)
        out.append(dict(row=k, tokenizer_us=t, linear_us=l_, ratio=t / l_, device=str(dev), calls=a.calls,
                        rounds=a.rounds))
        print(f"{k:36s} {t:8.1f}us {l_:8.1f}us {t / l_:6.1f}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(dict(torch=torch.__version__, rows=out), fh, indent=2)
    return out


if __name__ == "__main__":
    main()
