"""CPU breakdowns behind bench/NOTES.md (the harness, tube_bench.py, gives the comparisons).

    python bench/cpu_profile.py ops                   # op-level: forward with/without saving patches,
                                                      # backward with gathered vs saved patches, db only
    python bench/cpu_profile.py loop fwd 200          # a loop to run under `perf record` (forward, no grad)
    python bench/cpu_profile.py loop train 200 --dtype bfloat16   # forward + backward steps

Paper tubes, 3x32x224x224, d = 768, B = 4 (--batch), three rotated inputs; medians of --repeats calls.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import tubevit_ext as tv


def median_ms(fn, inputs, repeats):
    for i in range(3):
        fn(inputs[i % len(inputs)])
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(inputs[i % len(inputs)])
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["ops", "loop"])
    p.add_argument("mode", nargs="?", choices=["fwd", "train"], default="fwd")
    p.add_argument("iters", nargs="?", type=int, default=200)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=20)
    a = p.parse_args()
    dtype = getattr(torch, a.dtype)
    torch.manual_seed(0)
    m = tv.SparseTubeTokenizer(3, 768).to(dtype)
    xs = [torch.randn(a.batch, 3, 32, 224, 224).to(dtype) for _ in range(3)]

    if a.what == "loop":
        for i in range(a.iters):
            if a.mode == "fwd":
                with torch.no_grad():
                    m(xs[i % 3])
            else:
                out = m(xs[i % 3])
                out.backward(torch.ones_like(out))
                m.zero_grad(set_to_none=True)
        return

    ops = torch.ops.tubevit
    ws = [q.weight.detach() for q in m.projs]
    bs = [q.bias.detach() for q in m.projs]
    flat = tv.flatten_tubes(m.tubes)
    pe = tv.sincos_pos_embed(m.tubes, (32, 224, 224), 768, dtype=dtype)
    g = torch.ones(a.batch, tv.num_tokens(m.tubes, (32, 224, 224)), 768, dtype=dtype)
    saved = {id(x): ops.tube_tokens_with_patches(x, ws, bs, flat, pe)[1] for x in xs}
    rows = [
        ("forward", lambda x: ops.tube_tokens(x, ws, bs, flat, pe)),
        ("forward + keep patches", lambda x: ops.tube_tokens_with_patches(x, ws, bs, flat, pe)),
        ("backward dW+db, gathering again", lambda x: ops.tube_tokens_backward(g, x, ws, [], flat, [False, True, True])),
        ("backward dW+db, saved patches", lambda x: ops.tube_tokens_backward(g, x, ws, saved[id(x)], flat,
                                                                             [False, True, True])),
        ("backward db only", lambda x: ops.tube_tokens_backward(g, x, ws, [], flat, [False, False, True])),
    ]
    print(f"{a.dtype}, B={a.batch}, paper tubes, 32x224x224, d=768, {torch.get_num_threads()} threads")
    for name, fn in rows:
        print(f"  {name:34s} {median_ms(fn, xs, a.repeats):8.2f} ms")


if __name__ == "__main__":
    main()
