"""CPU breakdowns behind bench/DESIGN.md (the harness, tube_bench.py, gives the comparisons).

    python bench/cpu_profile.py ops                   # op-level: forward with/without saving patches,
                                                      # backward with gathered vs saved patches, db only
    python bench/cpu_profile.py loop fwd 200          # a loop to run under `perf record` (forward, no grad)
    python bench/cpu_profile.py loop train 200 --dtype bfloat16   # forward + backward steps
    python bench/cpu_profile.py split                 # training steps of fused vs unfold_gemm,
                                                      # interleaved: forward / ones_like / backward
                                                      # times, GEMM time per step (profiler), minor
                                                      # page faults, and the ops called directly
                                                      # vs through autograd vs through the module
    python bench/cpu_profile.py split --glibc-keep    # the same with glibc told never to return
                                                      # memory (no page faults after warm-up)

Paper tubes, 3x32x224x224, d = 768, B = 4 (--batch), three rotated inputs; medians of --repeats calls.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import resource
import statistics
import sys
import time

if "--glibc-keep" in sys.argv:
    # Before torch allocates anything: mmap threshold 1 GiB, trim threshold
    # 2 GiB, so freed blocks stay in the heap and are reused without new
    # page faults (bench/DESIGN.md, "What bounds it": how much of the fwd_bwd margin
    # is page faults).
    _libc = ctypes.CDLL("libc.so.6")
    assert _libc.mallopt(-3, 1 << 30) == 1  # M_MMAP_THRESHOLD
    assert _libc.mallopt(-1, (1 << 31) - 1) == 1  # M_TRIM_THRESHOLD

import torch  # noqa: E402

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


def split(m, xs, repeats):
    """Where a training step's time goes, fused vs unfold_gemm (bench/DESIGN.md, "What bounds it")."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from tube_bench import UnfoldGemm

    impls = {"fused": m, "unfold_gemm": UnfoldGemm(m)}
    params = list(m.parameters())

    def step(mod, x, parts=None):
        t0 = time.perf_counter()
        out = mod(x)
        t1 = time.perf_counter()
        g = torch.ones_like(out)
        t2 = time.perf_counter()
        out.backward(g)
        t3 = time.perf_counter()
        for q in params:
            q.grad = None
        if parts is not None:
            for k, v in zip(("forward", "ones_like", "backward", "step"), (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
                parts.setdefault(k, []).append(v)

    for mod in impls.values():
        for i in range(3):
            step(mod, xs[i % 3])
    parts = {name: {} for name in impls}
    faults = {name: 0 for name in impls}
    for i in range(repeats):  # interleaved, like the harness
        for name, mod in impls.items():
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            step(mod, xs[i % 3], parts[name])
            faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    print("median ms per step (interleaved):")
    for name, d in parts.items():
        cols = "  ".join(f"{k} {statistics.median(v) * 1e3:6.2f}" for k, v in d.items())
        print(f"  {name:12s} {cols}  minor faults {faults[name] / repeats:.0f}")

    from torch.profiler import profile
    gemm = {name: [] for name in impls}
    for _ in range(3):  # alternating blocks of 4 profiled steps
        for name, mod in impls.items():
            with profile() as prof:
                for i in range(4):
                    step(mod, xs[i % 3])
            gemm[name].append(sum(e.self_cpu_time_total for e in prof.key_averages()
                                  if e.key in ("aten::mm", "aten::addmm")) / 1e3 / 4)
    print("aten::mm + aten::addmm ms per step (profiler, 3 blocks):")
    for name, v in gemm.items():
        print(f"  {name:12s} " + " ".join(f"{t:6.2f}" for t in v))

    ops = torch.ops.tubevit
    ws = [q.weight for q in m.projs]
    bs = [q.bias for q in m.projs]
    wd, bd = [w.detach() for w in ws], [b.detach() for b in bs]
    flat = tv.flatten_tubes(m.tubes)
    pe = tv.sincos_pos_embed(m.tubes, tuple(xs[0].shape[2:]), m.dim, dtype=xs[0].dtype)
    g = torch.ones(xs[0].shape[0], pe.shape[0], m.dim, dtype=xs[0].dtype)

    def direct(x):
        _, patches = ops.tube_tokens_with_patches(x, wd, bd, flat, pe)
        ops.tube_tokens_backward(g, x, wd, patches, flat, [False, True, True])

    def autograd(x):
        ops.tube_tokens_with_patches(x, ws, bs, flat, pe)[0].backward(g)
        for q in params:
            q.grad = None

    def module(x):
        m(x).backward(g)
        for q in params:
            q.grad = None

    rows = {"ops called directly": direct, "ops through autograd": autograd, "module": module}
    times = {k: [] for k in rows}
    for i in range(repeats + 2):
        for k, fn in rows.items():
            t0 = time.perf_counter()
            fn(xs[i % 3])
            times[k].append(time.perf_counter() - t0)
    print("training step, same gradient (median ms, interleaved):")
    for k, v in times.items():
        print(f"  {k:22s} {statistics.median(v[2:]) * 1e3:7.2f}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["ops", "loop", "split"])
    p.add_argument("mode", nargs="?", choices=["fwd", "train"], default="fwd")
    p.add_argument("iters", nargs="?", type=int, default=200)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--glibc-keep", action="store_true", help="see the module docstring (acted on at import)")
    a = p.parse_args()
    dtype = getattr(torch, a.dtype)
    torch.manual_seed(0)
    m = tv.SparseTubeTokenizer(3, 768).to(dtype)
    xs = [torch.randn(a.batch, 3, 32, 224, 224).to(dtype) for _ in range(3)]

    if a.what == "split":
        split(m, xs, a.repeats)
        return

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
