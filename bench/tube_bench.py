"""Benchmark: the fused tube tokenizer against what users would write instead.

Implementations (all compute the same (B, N, d) tokens, bias and PE included):
  reference           per-tube nn.Conv3d (cuDNN / oneDNN) + flatten + cat + PE add
  unfold_gemm         per-tube strided unfold view -> patch copy -> one F.linear per tube + cat + PE add
  compiled_reference  torch.compile(reference)
  fused               tubevit_ext.SparseTubeTokenizer (on CUDA: the path the library picks by size)
  fused_gemm          the same with TUBEVIT_CUDA_PATH=gemm (CUDA only, opt-in: the GEMM path forced)
  fused_tc            the same with TUBEVIT_CUDA_PATH=tc (CUDA only, opt-in: the tensor-core kernels, the
                      WMMA forward)
  fused_hopper        the same with TUBEVIT_CUDA_PATH=hopper (CUDA only, a build with csrc/prototype: the
                      sm_90a wgmma forward, weight and bias gradients, and dP + the dx writer, where
                      they apply)

Modes: fwd; fwd_bwd (weights and bias require grad, input does not);
fwd_bwd_input (input requires grad too).

Each configuration is first checked against the reference (max_abs_err), then timed: warm-up,
repeats, median; CUDA events on GPU, perf_counter on CPU; inputs rotated over several fresh
buffers so no implementation runs on cache-hot data. On CUDA each row has three times:
median_ms (one call between events: host work and launch latency included), pipelined_ms
(--repeats back-to-back calls, one synchronisation, per call: what a training loop sees) and
kernel_ms (GPU time in the call's kernels, torch.profiler); with --cuda-graph, fwd rows also
graph_ms / graph_pipelined_ms (the call captured in a torch.cuda.CUDAGraph and replayed). On GPU the card's dense matmul rate per
dtype is measured in the same run and every result reports its achieved TFLOP/s.

    python bench/tube_bench.py --preset cpu-targets          # paper tubes, B = 4, CPU (bench/RESULTS.md)
    python bench/tube_bench.py --preset gpu-targets          # paper tubes, B = 32, GPU (bench/RESULTS.md)
    python bench/tube_bench.py --device cpu --batch 1 2 4 --frames 32 --dim 384 768 --modes fwd
Outputs: table on stdout, JSON (--json), PNG plot (--plot; needs matplotlib, skipped otherwise).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time

# Compile in this process: inductor's default pool of compile workers keeps
# processes alive that share the CPU with every timing after the first
# torch.compile (seen on the 2-vCPU VM: a bf16 fwd_bwd timed after a compile
# ran 30 % slower). Must be set before torch._inductor is imported.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import tubevit_ext as tv  # noqa: E402

TUBE_SETS = {
    "paper": tv.PAPER_TUBES,
    # A ViViT-style tubelet pair: dense 2x16x16 plus a coarse 8x32x32 tube.
    "tubelet2": (tv.Tube((2, 16, 16), (2, 16, 16)), tv.Tube((8, 32, 32), (8, 32, 32), (0, 0, 0))),
}
# compiled_reference last in each configuration: torch.compile leaves compile
# workers behind that would otherwise share the CPU with the next timings.
IMPLS = ["reference", "unfold_gemm", "fused", "fused_gemm", "fused_tc", "fused_hopper",
         "compiled_reference"]
DEFAULT_IMPLS = ["reference", "unfold_gemm", "fused", "compiled_reference"]
# the fused module with one CUDA path forced: the environment the op reads per
# call, set for the whole step (forward and backward)
PATH_ENV = {"fused_gemm": {"TUBEVIT_CUDA_PATH": "gemm"},
            "fused_tc": {"TUBEVIT_CUDA_PATH": "tc"},
            "fused_hopper": {"TUBEVIT_CUDA_PATH": "hopper"}}
MODES = ["fwd", "fwd_bwd", "fwd_bwd_input"]


# ---------------------------------------------------------------- implementations
class UnfoldGemm(torch.nn.Module):
    """The fastest pure-PyTorch formulation we know: strided unfold views of
    each tube's slice, one copy into a (B, n, K) patch matrix, one GEMM per
    tube (F.linear, bias fused), cat, PE add. Shares the fused module's
    parameters."""

    def __init__(self, fused: tv.SparseTubeTokenizer):
        super().__init__()
        self.fused = fused

    def forward(self, x):
        outs = []
        for tube, proj in zip(self.fused.tubes, self.fused.projs):
            (kt, kh, kw), (st, sh, sw), (ot, oh, ow) = tube.kernel, tube.stride, tube.offset
            p = x[:, :, ot:, oh:, ow:].unfold(2, kt, st).unfold(3, kh, sh).unfold(4, kw, sw)
            B, C, nt, nh, nw = p.shape[:5]
            p = p.permute(0, 2, 3, 4, 1, 5, 6, 7).reshape(B, nt * nh * nw, C * kt * kh * kw)
            outs.append(F.linear(p, proj.weight.reshape(proj.weight.shape[0], -1), proj.bias))
        out = torch.cat(outs, dim=1)
        if self.fused.use_pos_embed:
            out = out + self.fused._pe.get(self.fused._compute_pos_embed, tuple(x.shape[2:]), x.dtype, x.device)
        return out


def build(impl, fused, ref):
    if impl == "fused":
        return fused
    if impl in PATH_ENV:
        if next(fused.parameters()).device.type != "cuda":
            raise RuntimeError(f"{impl} selects a CUDA path: CUDA only")
        return fused
    if impl == "reference":
        return ref
    if impl == "unfold_gemm":
        return UnfoldGemm(fused)
    if impl == "compiled_reference":
        return torch.compile(ref)
    raise ValueError(impl)


def gemm_flops(tubes, size, C, d, batch):
    per = sum(n * C * t.kernel[0] * t.kernel[1] * t.kernel[2]
              for t, n in zip(tubes, tv.geometry.tube_token_counts(tubes, size)))
    return 2.0 * batch * d * per


MODE_GEMMS = {"fwd": 1, "fwd_bwd": 2, "fwd_bwd_input": 3}  # fwd, + dW, + dX


# ---------------------------------------------------------------- timing
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, inputs, device, warmup, repeats):
    """Median seconds of fn(x) over `repeats` calls, rotating through `inputs`."""
    return statistics.median(time_samples(fn, inputs, device, warmup, repeats))


def time_samples(fn, inputs, device, warmup, repeats):
    """Seconds of each of `repeats` calls of fn(x) after `warmup` calls, rotating through `inputs`."""
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    sync(device)
    times = []
    if device.type == "cuda":
        for i in range(repeats):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn(inputs[i % len(inputs)])
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
    else:
        for i in range(repeats):
            t0 = time.perf_counter()
            fn(inputs[i % len(inputs)])
            times.append(time.perf_counter() - t0)
    return times


def pipelined_seconds(fn, inputs, device, calls):
    """Seconds per call of `calls` back-to-back calls of fn(x) with one synchronisation at the end:
    what a training or inference loop sees, where the host queues call i + 1 while the GPU runs
    call i (time_samples synchronises every call, so it adds the launch latency each time)."""
    fn(inputs[0])
    sync(device)
    t0 = time.perf_counter()
    for i in range(calls):
        fn(inputs[i % len(inputs)])
    sync(device)
    return (time.perf_counter() - t0) / calls


def kernel_seconds(fn, inputs, device, calls):
    """GPU seconds per call spent in kernels (torch.profiler's CUDA activity, summed over every
    kernel and memset/memcpy the calls launched), so host and device shares of a call are
    visible next to its wall time. CUDA only."""
    from torch.profiler import ProfilerActivity, profile

    fn(inputs[0])
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(calls):
            fn(inputs[i % len(inputs)])
        sync(device)
    total_us = sum(e.self_device_time_total for e in prof.key_averages()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    return total_us / 1e6 / calls


def graph_seconds(fn, inputs, device, warmup, repeats):
    """(one replay between events, per replay of `repeats` back-to-back replays) of fn captured in
    a torch.cuda.CUDAGraph on a static input buffer, the input copied in before each replay (part
    of the time, as it would be in an inference server). CUDA, forward without grad."""
    static_x = inputs[0].detach().clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up on a side stream, as CUDA graph capture requires
        for _ in range(max(warmup, 2)):
            fn(static_x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn(static_x)

    def replay(x):
        static_x.copy_(x)
        g.replay()
    one = statistics.median(time_samples(replay, inputs, device, warmup, repeats))
    return one, pipelined_seconds(replay, inputs, device, repeats)


def matmul_peak(device, dtype, n=8192):
    """Dense square matmul TFLOP/s on this device (the roofline for the GEMM work)."""
    if device.type != "cuda":
        n = 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_fn(lambda _: torch.mm(a, b), [None], device, 3, 10 if device.type == "cuda" else 3)
    return 2.0 * n ** 3 / t / 1e12


class pinned_env:
    """Environment variables set inside (for the fused_gemm / fused_tc / fused_hopper variants),
    restored after."""

    def __init__(self, env):
        self.env = env or {}

    def __enter__(self):
        self.prev = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        tv.reload_options()

    def __exit__(self, *exc):
        for k, v in self.prev.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        tv.reload_options()


def make_step(model, mode, env=None):
    params = list(model.parameters()) if not isinstance(model, torch._dynamo.eval_frame.OptimizedModule) \
        else list(model._orig_mod.parameters())
    if env:
        inner = make_step(model, mode)

        def pinned(x):
            with pinned_env(env):
                return inner(x)
        return pinned

    def step(x):
        if mode == "fwd":
            with torch.no_grad():
                return model(x)
        out = model(x)
        out.backward(torch.ones_like(out))  # fixed cost; identical for every impl
        for p in params:
            p.grad = None
        if x.grad is not None:
            x.grad = None
        return out
    return step


# ---------------------------------------------------------------- one configuration
def run_config(args, device, dtype, batch, frames, dim, tubes_name, mode, impls, peak, rows, progress):
    tubes = TUBE_SETS[tubes_name]
    size = (frames, *args.size)
    torch.manual_seed(0)
    fused = tv.SparseTubeTokenizer(3, dim, tubes).to(device, dtype)
    ref = tv.reference.SparseTubeTokenizer(3, dim, tubes).to(device, dtype)
    ref.load_state_dict(fused.state_dict())
    need_x = mode == "fwd_bwd_input"
    inputs = [torch.randn(batch, 3, *size, device=device, dtype=dtype).requires_grad_(need_x)
              for _ in range(args.rotate)]
    flops = gemm_flops(tubes, size, 3, dim, batch) * MODE_GEMMS[mode]
    with torch.no_grad():
        want = ref(inputs[0]).float()
    variants = []
    for impl in sorted(impls, key=IMPLS.index):
        if impl == "reference" and device.type == "cuda":
            variants += [(impl, False), (impl, True)]  # cudnn.benchmark off / on
        else:
            variants.append((impl, None))
    # Agreement first, then timing in `args.rounds` interleaved rounds
    # (impl A, B, C, A, B, C, ...): slow drifts of a shared machine then
    # hit every implementation alike instead of whichever ran last.
    timed = []
    for impl, bench_flag in variants:
        row = dict(impl=impl, mode=mode, dtype=dtype_name(dtype), batch=batch, frames=frames, dim=dim,
                   tubes=tubes_name, size=list(size), tokens=want.shape[1])
        if bench_flag is not None:
            row["cudnn_benchmark"] = bench_flag
        rows.append(row)
        try:
            with cudnn_benchmark(bench_flag), pinned_env(PATH_ENV.get(impl)):
                model = build(impl, fused, ref)
                with torch.no_grad():
                    got = model(inputs[0]).float()
            row["max_abs_err"] = (got - want).abs().max().item()
            # agreement check before timing: outputs within the dtype's
            # tolerance of the reference (relative to the output scale)
            tol = {"float32": 1e-3, "float64": 1e-9, "bfloat16": 5e-2, "float16": 1e-2}.get(row["dtype"], 1e-2)
            row["agrees"] = bool(row["max_abs_err"] <= tol * max(1.0, want.abs().max().item()))
            if not row["agrees"]:
                print(f"WARNING: {impl} disagrees with the reference: max_abs_err {row['max_abs_err']:.3g}",
                      file=sys.stderr)
            timed.append((row, make_step(model, mode, PATH_ENV.get(impl)), bench_flag, []))
        except Exception as e:  # e.g. compile unavailable: recorded, not fatal
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    for r in range(args.rounds):
        for row, step, bench_flag, samples in timed:
            if "error" in row:
                continue
            progress(f"{tubes_name} {dtype_name(dtype)} B={batch} T={frames} d={dim} {mode} {row['impl']}"
                     + ("" if bench_flag is None else f" cudnn.benchmark={bench_flag}")
                     + (f" (round {r + 1}/{args.rounds})" if args.rounds > 1 else ""))
            try:
                with cudnn_benchmark(bench_flag):
                    samples += time_samples(step, inputs, device, args.warmup, args.repeats)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    for row, step, bench_flag, samples in timed:
        if "error" in row or not samples:
            continue
        t = statistics.median(samples)
        row["median_ms"] = t * 1e3
        row["samples"] = len(samples)
        row["tflops"] = flops / t / 1e12
        if peak.get(row["dtype"]):
            row["frac_of_matmul_peak"] = row["tflops"] / peak[row["dtype"]]
        if device.type != "cuda":
            continue
        # Host and device shares (CUDA): median_ms is one call between events (launch latency
        # and host work included); pipelined_ms what a loop sees; kernel_ms the GPU's share.
        try:
            with cudnn_benchmark(bench_flag):
                row["pipelined_ms"] = pipelined_seconds(step, inputs, device, args.repeats) * 1e3
                row["kernel_ms"] = kernel_seconds(step, inputs, device, min(args.repeats, 10)) * 1e3
                if args.cuda_graph and mode == "fwd":
                    one, piped = graph_seconds(step, inputs, device, args.warmup, args.repeats)
                    row["graph_ms"], row["graph_pipelined_ms"] = one * 1e3, piped * 1e3
        except Exception as e:  # e.g. an implementation that cannot be captured: recorded, not fatal
            row["timing_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"


class cudnn_benchmark:
    """torch.backends.cudnn.benchmark set to `flag` inside (None: untouched)."""

    def __init__(self, flag):
        self.flag = flag

    def __enter__(self):
        self.prev = torch.backends.cudnn.benchmark
        if self.flag is not None:
            torch.backends.cudnn.benchmark = self.flag

    def __exit__(self, *exc):
        torch.backends.cudnn.benchmark = self.prev


def dtype_name(dt):
    return str(dt).replace("torch.", "")


def git_commit():
    # The device machine's copy of the tree may carry an older .git than the
    # tree being run: the caller can name the commit (bench/gpu_check.sh
    # passes TUBEVIT_COMMIT through).
    if os.environ.get("TUBEVIT_COMMIT"):
        return os.environ["TUBEVIT_COMMIT"]
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except OSError:
        return "unknown"


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


# ---------------------------------------------------------------- reporting
def print_table(rows):
    hdr = f"{'tubes':8s} {'dtype':8s} {'B':>3s} {'T':>3s} {'d':>5s} {'mode':13s} {'impl':24s} {'ms':>9s} {'TFLOP/s':>8s} {'xref':>6s} {'err':>9s}"
    print(hdr)
    print("-" * len(hdr))
    base = {}
    for r in rows:
        if r["impl"] == "reference" and not r.get("cudnn_benchmark", False) and "median_ms" in r:
            base[key(r)] = r["median_ms"]
    for r in rows:
        name = r["impl"] + ("" if "cudnn_benchmark" not in r else f" (bench={'on' if r['cudnn_benchmark'] else 'off'})")
        if "error" in r:
            print(f"{r['tubes']:8s} {r['dtype']:8s} {r['batch']:3d} {r['frames']:3d} {r['dim']:5d} {r['mode']:13s} {name:24s} skipped: {r['error']}")
            continue
        sp = base.get(key(r), float("nan")) / r["median_ms"]
        print(f"{r['tubes']:8s} {r['dtype']:8s} {r['batch']:3d} {r['frames']:3d} {r['dim']:5d} {r['mode']:13s} {name:24s} "
              f"{r['median_ms']:9.2f} {r['tflops']:8.3f} {sp:6.2f} {r['max_abs_err']:9.2e}"
              + ("" if r.get("agrees", True) else "  MISMATCH")
              + "".join(f"  {k[:-3]} {r[k]:.3f}" for k in ("pipelined_ms", "kernel_ms", "graph_ms") if k in r))


def key(r):
    return (r["tubes"], r["dtype"], r["batch"], r["frames"], r["dim"], r["mode"])


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: plot skipped (pip install matplotlib)")
        return
    base = {key(r): r["median_ms"] for r in rows
            if r["impl"] == "reference" and not r.get("cudnn_benchmark", False) and "median_ms" in r}
    panels = sorted({(r["dtype"], r["mode"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (dt, mode) in zip(axes[0], panels):
        groups = {}
        for r in rows:
            if (r["dtype"], r["mode"]) != (dt, mode) or "median_ms" not in r or key(r) not in base:
                continue
            name = r["impl"] + (" (bench)" if r.get("cudnn_benchmark") else "")
            label = f"{name} {r['tubes']} T={r['frames']} d={r['dim']}"
            groups.setdefault(label, []).append((r["batch"], base[key(r)] / r["median_ms"]))
        for label, pts in sorted(groups.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("speed-up over reference")
        ax.set_title(f"{dt} {mode}")
        ax.axhline(1.0, color="gray", lw=0.5)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def check_targets(rows, device):
    """Prints the targets that this run can judge (ratios from the same run)."""
    def med(impl, mode, dtype, field="median_ms", **kw):
        for r in rows:
            if r["impl"] == impl and r["mode"] == mode and r["dtype"] == dtype and "median_ms" in r \
                    and not r.get("cudnn_benchmark", False) and all(r[k] == v for k, v in kw.items()):
                return r.get(field, r["median_ms"])
        return None

    print("\ntargets (ratio of medians, same run):")
    if device.type == "cpu":
        checks = [("fwd", "reference", 3.0), ("fwd", "unfold_gemm", 1.2),
                  ("fwd_bwd", "reference", 4.0), ("fwd_bwd", "unfold_gemm", 1.2)]
        dt, kw = "float32", dict(tubes="paper", batch=4, frames=32, dim=768)
    else:
        checks = [("fwd", "reference", 5.0), ("fwd", "unfold_gemm", 1.5), ("fwd", "compiled_reference", 1.5),
                  ("fwd_bwd", "reference", 3.0)]
        dt, kw = "bfloat16", dict(tubes="paper", batch=32, frames=32, dim=768)
    for mode, other, goal in checks:
        a, b = med("fused", mode, dt, **kw), med(other, mode, dt, **kw)
        if a and b:
            print(f"  {dt} {mode}: fused vs {other}: {b / a:.2f}x (target >= {goal}x) {'OK' if b / a >= goal else 'MISSED'}")
    if device.type == "cuda":
        # the fused kernels' targets (bench/DESIGN.md), for the path the library picks and the forced
        # Hopper kernels: ratios of pipelined_ms (back-to-back calls, what a training loop sees)
        kernel_checks = [("fwd", "bfloat16", "unfold_gemm", 2.5), ("fwd", "bfloat16", "reference", 25.0),
                         ("fwd_bwd", "bfloat16", "unfold_gemm", 2.5), ("fwd_bwd_input", "bfloat16", "unfold_gemm", 2.0),
                         ("fwd", "float32", "reference", 10.0)]
        for impl in ("fused", "fused_hopper"):
            for mode, dt2, other, goal in kernel_checks:
                a = med(impl, mode, dt2, "pipelined_ms", **kw)
                b = med(other, mode, dt2, "pipelined_ms", **kw)
                if a and b:
                    print(f"  {dt2} {mode}: {impl} vs {other}: {b / a:.2f}x pipelined (target >= {goal}x) "
                          f"{'OK' if b / a >= goal else 'MISSED'}")
            for r in rows:
                if r["impl"] == impl and r["mode"] == "fwd" and r["dtype"] == "bfloat16" \
                        and "frac_of_matmul_peak" in r and all(r[k] == v for k, v in kw.items()):
                    frac = r["frac_of_matmul_peak"] * r["median_ms"] / r.get("pipelined_ms", r["median_ms"])
                    print(f"  bf16 fwd: {impl} achieved {frac * 100:.0f}% of matmul peak pipelined "
                          f"({r['frac_of_matmul_peak'] * 100:.0f}% one call between events) (target >= 50%)")

PRESETS = {
    # the shared CPU VM drifts: three interleaved rounds (see run_config)
    "cpu-targets": dict(device="cpu", dtypes=["float32"], batch=[4], frames=[32], dim=[768], tubes=["paper"],
                        modes=["fwd", "fwd_bwd"], impls=DEFAULT_IMPLS, rounds=3),
    "cpu-sweep": dict(device="cpu", dtypes=["float32", "bfloat16"], batch=[1, 2, 4], frames=[32, 64],
                      dim=[384, 768, 1024], tubes=["paper", "tubelet2"], modes=MODES,
                      impls=["reference", "unfold_gemm", "fused"], rounds=2),
    "gpu-targets": dict(device="cuda", dtypes=["bfloat16", "float32"], batch=[32], frames=[32], dim=[768],
                        tubes=["paper"], modes=["fwd", "fwd_bwd"], impls=DEFAULT_IMPLS),
    "gpu-sweep": dict(device="cuda", dtypes=["bfloat16", "float16", "float32"], batch=[8, 16, 32, 64],
                      frames=[32, 64], dim=[384, 768, 1024], tubes=["paper", "tubelet2"], modes=MODES,
                      impls=DEFAULT_IMPLS),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    presets = "; ".join(f"{k}: " + ", ".join(f"{a}={v}" for a, v in c.items()) for k, c in PRESETS.items())
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="a named configuration; explicit options below override its fields (" + presets + ")")
    p.add_argument("--device", help="cpu or cuda (default: cuda when a GPU is visible, else cpu)")
    p.add_argument("--dtypes", nargs="+", help="float32, bfloat16, float16, float64 (default: float32)")
    p.add_argument("--batch", nargs="+", type=int, help="batch sizes B (default: 4)")
    p.add_argument("--frames", nargs="+", type=int, help="frame counts T (default: 32)")
    p.add_argument("--dim", nargs="+", type=int, help="token widths d (default: 768)")
    p.add_argument("--tubes", nargs="+", choices=sorted(TUBE_SETS),
                   help="tube sets: paper (the four tubes of the paper), tubelet2 (2x16x16 + 8x32x32) "
                        "(default: paper)")
    p.add_argument("--modes", nargs="+", choices=MODES,
                   help="fwd, fwd_bwd (weights and bias require grad), fwd_bwd_input (x too) "
                        "(default: fwd fwd_bwd)")
    p.add_argument("--impls", nargs="+", choices=IMPLS,
                   help="implementations, see above (default: " + " ".join(DEFAULT_IMPLS) + ")")
    p.add_argument("--size", nargs=2, type=int, default=(224, 224), metavar=("H", "W"),
                   help="frame size (default: 224 224)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first (default: 3)")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per implementation and round (default: 10)")
    p.add_argument("--rounds", type=int,
                   help="interleaved timing rounds, A B C A B C ... (default: the preset's, else 1)")
    p.add_argument("--rotate", type=int, default=3,
                   help="fresh input buffers rotated between calls, so none is cache-hot (default: 3)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="CUDA, fwd rows: also time the call captured in a CUDA graph (graph_ms, "
                        "graph_pipelined_ms)")
    p.add_argument("--json", help="write results here (default: bench/out/<device>-<date>.json)")
    p.add_argument("--plot", help="write a PNG plot here, needs matplotlib (default: next to the JSON)")
    args = p.parse_args(argv)

    cfg = dict(PRESETS.get(args.preset, {}))
    defaults = dict(device="cuda" if torch.cuda.is_available() else "cpu", dtypes=["float32"], batch=[4],
                    frames=[32], dim=[768], tubes=["paper"], modes=["fwd", "fwd_bwd"], impls=DEFAULT_IMPLS, rounds=1)
    for k, v in defaults.items():
        if getattr(args, k, None) is not None:
            cfg[k] = getattr(args, k)
        cfg.setdefault(k, v)
    args.rounds = cfg["rounds"]
    device = torch.device(cfg["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device visible")

    dtypes = [getattr(torch, d) for d in cfg["dtypes"]]
    peak = {}
    if device.type == "cuda":
        for dt in dtypes:
            prev = torch.backends.cuda.matmul.allow_tf32
            peak[dtype_name(dt)] = matmul_peak(device, dt)
            torch.backends.cuda.matmul.allow_tf32 = prev
    configs = [(dt, b, f, d, tn, m) for dt in dtypes for tn in cfg["tubes"] for f in cfg["frames"]
               for d in cfg["dim"] for m in cfg["modes"] for b in cfg["batch"]]
    rows = []
    t_start = time.time()
    for i, (dt, b, f, d, tn, m) in enumerate(configs):
        def progress(msg, i=i):
            print(f"[{i + 1}/{len(configs)} {time.time() - t_start:6.0f}s] {msg}", file=sys.stderr, flush=True)
        run_config(args, device, dt, b, f, d, tn, m, cfg["impls"], peak, rows, progress)

    result = {"device": device_name(device), "torch": torch.__version__, "cuda": torch.version.cuda,
              "cudnn": str(torch.backends.cudnn.version()) if device.type == "cuda" else None,
              "commit": git_commit(), "date": _dt.date.today().isoformat(),
              "threads": torch.get_num_threads(), "peak_tflops": peak, "config": cfg,
              "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
              # the CUDA path "fused" was told to take (csrc/options.h): auto, gemm, tc or naive
              "cuda_path": os.environ.get("TUBEVIT_CUDA_PATH", "auto"),
              "results": rows}
    print(f"\ndevice: {result['device']} | torch {result['torch']} | commit {result['commit']}")
    if peak:
        print("dense matmul peak (TFLOP/s): " + ", ".join(f"{k} {v:.1f}" for k, v in peak.items()))
    print_table(rows)
    check_targets(rows, device)
    root = os.path.dirname(os.path.abspath(__file__))
    path = args.json or os.path.join(root, "out", f"{device.type}-{result['date']}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"json: {path}")
    plot(rows, args.plot or os.path.splitext(path)[0] + ".png")


if __name__ == "__main__":
    main()
