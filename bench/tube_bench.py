"""Benchmark: the fused tube tokenizer against what users would write instead.

Implementations (all compute the same (B, N, d) tokens, bias and PE included):
  reference           per-tube nn.Conv3d (cuDNN with cudnn.benchmark on / oneDNN) + flatten + cat + PE add
  unfold_gemm         per-tube strided unfold view -> patch copy -> one F.linear per tube + cat + PE add
  compiled_reference  torch.compile(reference)
  fused               tubevit_ext.SparseTubeTokenizer (on CUDA: the kernels the planner picks)
  fused_gemm / fused_tc / fused_hopper
                      the same with TUBEVIT_CUDA_PATH=gemm / tc / hopper (CUDA only; hopper: a build
                      with csrc/prototype)
Modes: fwd; fwd_bwd (weights and bias require grad); fwd_bwd_input (the input too).

Each configuration is checked against the reference first (max_abs_err), then timed in
interleaved rounds (A B C A B C ...: a shared machine's drift hits every implementation alike),
inputs rotated over fresh buffers. CUDA rows carry median_ms (one call between events),
pipelined_ms (back-to-back calls, one synchronisation: what a training loop sees) and kernel_ms
(the calls' GPU time, torch.profiler); with --cuda-graph, fwd rows also graph_ms /
graph_pipelined_ms. On GPU the dense matmul rate per dtype is measured in the same run.

    python bench/tube_bench.py --preset cpu-targets          # paper tubes, B = 4, CPU (bench/RESULTS.md)
    python bench/tube_bench.py --preset gpu-targets          # paper tubes, B = 32, GPU (bench/RESULTS.md)
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

# Compile in this process: inductor's pool of compile workers would share the CPU with every
# later timing (a bf16 fwd_bwd timed after a compile ran 30 % slower on the 2-vCPU VM).
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import tubevit_ext as tv  # noqa: E402

TUBE_SETS = {"paper": tv.PAPER_TUBES,  # and a ViViT-style tubelet pair: dense 2x16x16 plus a coarse 8x32x32
             "tubelet2": (tv.Tube((2, 16, 16), (2, 16, 16)), tv.Tube((8, 32, 32), (8, 32, 32)))}
# compiled_reference last: torch.compile's leftovers would share the CPU with the next timings
IMPLS = ["reference", "unfold_gemm", "fused", "fused_gemm", "fused_tc", "fused_hopper", "compiled_reference"]
DEFAULT_IMPLS = ["reference", "unfold_gemm", "fused", "compiled_reference"]
PATH_ENV = {"fused_gemm": {"TUBEVIT_CUDA_PATH": "gemm"}, "fused_tc": {"TUBEVIT_CUDA_PATH": "tc"},
            "fused_hopper": {"TUBEVIT_CUDA_PATH": "hopper"}}
MODES = ["fwd", "fwd_bwd", "fwd_bwd_input"]
MODE_GEMMS = {"fwd": 1, "fwd_bwd": 2, "fwd_bwd_input": 3}  # fwd, + dW, + dX


class UnfoldGemm(torch.nn.Module):
    """The fastest pure-PyTorch formulation we know: strided unfold views of each tube's slice, one
    copy into a (B, n, K) patch matrix, one GEMM per tube (F.linear, bias fused), cat, PE add.
    Shares the fused module's parameters."""

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
    if impl in PATH_ENV and next(fused.parameters()).device.type != "cuda":
        raise RuntimeError(f"{impl} selects a CUDA path: CUDA only")
    return {"reference": lambda: ref, "unfold_gemm": lambda: UnfoldGemm(fused),
            "compiled_reference": lambda: torch.compile(ref)}.get(impl, lambda: fused)()


def gemm_flops(tubes, size, C, d, batch):
    per = sum(n * C * t.kernel[0] * t.kernel[1] * t.kernel[2]
              for t, n in zip(tubes, tv.geometry.tube_token_counts(tubes, size)))
    return 2.0 * batch * d * per


# ---------------------------------------------------------------- timing
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_samples(fn, inputs, device, warmup, repeats):
    """Seconds of each of `repeats` calls of fn(x) after `warmup` calls, rotating through `inputs`."""
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    sync(device)
    times = []
    for i in range(repeats):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn(inputs[i % len(inputs)])
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn(inputs[i % len(inputs)])
            times.append(time.perf_counter() - t0)
    return times


def pipelined_seconds(fn, inputs, device, calls):
    """Seconds per call of `calls` back-to-back calls with one synchronisation at the end: what a
    loop sees, where the host queues call i + 1 while the GPU runs call i."""
    fn(inputs[0])
    sync(device)
    t0 = time.perf_counter()
    for i in range(calls):
        fn(inputs[i % len(inputs)])
    sync(device)
    return (time.perf_counter() - t0) / calls


def kernel_seconds(fn, inputs, device, calls):
    """GPU seconds per call in the calls' kernels, memsets and copies (torch.profiler). CUDA only."""
    from torch.profiler import ProfilerActivity, profile
    fn(inputs[0])
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(calls):
            fn(inputs[i % len(inputs)])
        sync(device)
    return sum(e.self_device_time_total for e in prof.key_averages()
               if e.device_type == torch.autograd.DeviceType.CUDA) / 1e6 / calls


def graph_seconds(fn, inputs, device, warmup, repeats):
    """(one replay between events, per replay back to back) of fn captured in a CUDA graph on a
    static input, the input copied in before each replay (as an inference server would)."""
    static_x = inputs[0].detach().clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up on a side stream, as capture requires
        for _ in range(max(warmup, 2)):
            fn(static_x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn(static_x)

    def replay(x):
        static_x.copy_(x)
        g.replay()
    return (statistics.median(time_samples(replay, inputs, device, warmup, repeats)),
            pipelined_seconds(replay, inputs, device, repeats))


def matmul_peak(device, dtype, n=8192):
    """Dense square matmul TFLOP/s on this device (the roofline for the GEMM work)."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2.0 * n ** 3 / statistics.median(time_samples(lambda _: torch.mm(a, b), [None], device, 3, 10)) / 1e12


class pinned_env:
    """Environment variables set inside (the fused_* variants), restored after; options re-read."""

    def __init__(self, env):
        self.env = env or {}

    def __enter__(self):
        self.prev = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        tv.reload_options()

    def __exit__(self, *exc):
        for k, v in self.prev.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        tv.reload_options()


def make_step(model, mode, env=None):
    mod = getattr(model, "_orig_mod", model)
    params = list(mod.parameters())
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
        x.grad = None
        return out
    return step


# ---------------------------------------------------------------- one configuration
def run_config(args, device, dtype, batch, frames, dim, tubes_name, mode, impls, peak, rows, progress):
    tubes, size = TUBE_SETS[tubes_name], (frames, *args.size)
    torch.manual_seed(0)
    fused = tv.SparseTubeTokenizer(3, dim, tubes).to(device, dtype)
    ref = tv.reference.SparseTubeTokenizer(3, dim, tubes).to(device, dtype)
    ref.load_state_dict(fused.state_dict())
    inputs = [torch.randn(batch, 3, *size, device=device, dtype=dtype).requires_grad_(mode == "fwd_bwd_input")
              for _ in range(args.rotate)]
    flops = gemm_flops(tubes, size, 3, dim, batch) * MODE_GEMMS[mode]
    with torch.no_grad():
        want = ref(inputs[0]).float()
    tol = {"float32": 1e-3, "float64": 1e-9, "bfloat16": 5e-2, "float16": 1e-2}[dtype_name(dtype)]
    timed = []
    for impl in sorted(impls, key=IMPLS.index):  # agreement first, then the timing rounds
        row = dict(impl=impl, mode=mode, dtype=dtype_name(dtype), batch=batch, frames=frames, dim=dim,
                   tubes=tubes_name, size=list(size), tokens=want.shape[1])
        rows.append(row)
        try:
            with pinned_env(PATH_ENV.get(impl)), torch.no_grad():
                model = build(impl, fused, ref)
                row["max_abs_err"] = (model(inputs[0]).float() - want).abs().max().item()
            row["agrees"] = bool(row["max_abs_err"] <= tol * max(1.0, want.abs().max().item()))
            if not row["agrees"]:
                print(f"WARNING: {impl} disagrees with the reference: max_abs_err {row['max_abs_err']:.3g}",
                      file=sys.stderr)
            timed.append((row, make_step(model, mode, PATH_ENV.get(impl)), []))
        except Exception as e:  # e.g. compile unavailable: recorded, not fatal
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    for r in range(args.rounds):
        for row, step, samples in timed:
            progress(f"{tubes_name} {row['dtype']} B={batch} T={frames} d={dim} {mode} {row['impl']}"
                     + (f" (round {r + 1}/{args.rounds})" if args.rounds > 1 else ""))
            try:
                samples += time_samples(step, inputs, device, args.warmup, args.repeats)
            except Exception as e:  # recorded, not fatal
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    for row, step, samples in timed:
        if "error" in row:
            continue
        t = statistics.median(samples)
        row.update(median_ms=t * 1e3, samples=len(samples), tflops=flops / t / 1e12)
        if peak.get(row["dtype"]):
            row["frac_of_matmul_peak"] = row["tflops"] / peak[row["dtype"]]
        if device.type == "cuda":
            try:
                row["pipelined_ms"] = pipelined_seconds(step, inputs, device, args.repeats) * 1e3
                row["kernel_ms"] = kernel_seconds(step, inputs, device, min(args.repeats, 10)) * 1e3
                if args.cuda_graph and mode == "fwd":
                    one, piped = graph_seconds(step, inputs, device, args.warmup, args.repeats)
                    row["graph_ms"], row["graph_pipelined_ms"] = one * 1e3, piped * 1e3
            except Exception as e:  # e.g. an implementation that cannot be captured: recorded
                row["timing_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"


def dtype_name(dt):
    return str(dt).replace("torch.", "")


def git_commit():
    """The commit, or TUBEVIT_COMMIT (the device machine's .git may be older than its tree)."""
    if os.environ.get("TUBEVIT_COMMIT"):
        return os.environ["TUBEVIT_COMMIT"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
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
    if os.path.exists("/proc/cpuinfo"):
        cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), cpu)
    return f"{cpu} ({torch.get_num_threads()} threads)"


# ---------------------------------------------------------------- reporting
def key(r):
    return (r["tubes"], r["dtype"], r["batch"], r["frames"], r["dim"], r["mode"])


def print_table(rows):
    hdr = f"{'tubes':8s} {'dtype':8s} {'B':>3s} {'T':>3s} {'d':>5s} {'mode':13s} {'impl':18s} {'ms':>9s} " \
          f"{'TFLOP/s':>8s} {'xref':>6s} {'err':>9s}"
    print(hdr + "\n" + "-" * len(hdr))
    base = {key(r): r["median_ms"] for r in rows if r["impl"] == "reference" and "median_ms" in r}
    for r in rows:
        head = f"{r['tubes']:8s} {r['dtype']:8s} {r['batch']:3d} {r['frames']:3d} {r['dim']:5d} {r['mode']:13s} " \
               f"{r['impl']:18s}"
        if "error" in r:
            print(f"{head} skipped: {r['error']}")
            continue
        print(f"{head} {r['median_ms']:9.2f} {r['tflops']:8.3f} {base.get(key(r), float('nan')) / r['median_ms']:6.2f} "
              f"{r['max_abs_err']:9.2e}" + ("" if r.get("agrees", True) else "  MISMATCH")
              + "".join(f"  {k[:-3]} {r[k]:.3f}" for k in ("pipelined_ms", "kernel_ms", "graph_ms") if k in r))


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: plot skipped (pip install matplotlib)")
        return
    base = {key(r): r["median_ms"] for r in rows if r["impl"] == "reference" and "median_ms" in r}
    panels = sorted({(r["dtype"], r["mode"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (dt, mode) in zip(axes[0], panels):
        groups = {}
        for r in rows:
            if (r["dtype"], r["mode"]) == (dt, mode) and "median_ms" in r and key(r) in base:
                label = f"{r['impl']} {r['tubes']} T={r['frames']} d={r['dim']}"
                groups.setdefault(label, []).append((r["batch"], base[key(r)] / r["median_ms"]))
        for label, pts in sorted(groups.items()):
            ax.plot(*zip(*sorted(pts)), marker="o", label=label)
        ax.set(xscale="log", xlabel="batch size", ylabel="speed-up over reference", title=f"{dt} {mode}")
        ax.axhline(1.0, color="gray", lw=0.5)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def check_targets(rows, device):
    """Prints the targets this run can judge (ratios from the same run)."""
    def med(impl, mode, dtype, field="median_ms", **kw):
        return next((r.get(field, r["median_ms"]) for r in rows if r["impl"] == impl and r["mode"] == mode
                     and r["dtype"] == dtype and "median_ms" in r and all(r[k] == v for k, v in kw.items())), None)

    def line(label, a, b, goal):
        if a and b:
            print(f"  {label}: {b / a:.2f}x (target >= {goal}x) {'OK' if b / a >= goal else 'MISSED'}")

    print("\ntargets (ratio of medians, same run):")
    cpu = device.type == "cpu"
    dt, kw = ("float32", dict(tubes="paper", batch=4, frames=32, dim=768)) if cpu else \
        ("bfloat16", dict(tubes="paper", batch=32, frames=32, dim=768))
    checks = [("fwd", "reference", 3.0), ("fwd", "unfold_gemm", 1.2), ("fwd_bwd", "reference", 4.0),
              ("fwd_bwd", "unfold_gemm", 1.2)] if cpu else \
        [("fwd", "reference", 5.0), ("fwd", "unfold_gemm", 1.5), ("fwd", "compiled_reference", 1.5),
         ("fwd_bwd", "reference", 3.0)]
    for mode, other, goal in checks:
        line(f"{dt} {mode}: fused vs {other}", med("fused", mode, dt, **kw), med(other, mode, dt, **kw), goal)
    if cpu:
        return
    # the fused kernels' targets (bench/DESIGN.md) for the planner's choice and the prototype's
    # kernels, as ratios of pipelined_ms (back-to-back calls, what a training loop sees)
    for impl in ("fused", "fused_hopper"):
        for mode, dt2, other, goal in [("fwd", "bfloat16", "unfold_gemm", 2.5), ("fwd", "bfloat16", "reference", 25.0),
                                       ("fwd_bwd", "bfloat16", "unfold_gemm", 2.5),
                                       ("fwd_bwd_input", "bfloat16", "unfold_gemm", 2.0),
                                       ("fwd", "float32", "reference", 10.0)]:
            a, b = med(impl, mode, dt2, "pipelined_ms", **kw), med(other, mode, dt2, "pipelined_ms", **kw)
            if a and b:
                print(f"  {dt2} {mode}: {impl} vs {other}: {b / a:.2f}x pipelined (target >= {goal}x) "
                      f"{'OK' if b / a >= goal else 'MISSED'}")
        for r in rows:
            if r["impl"] == impl and r["mode"] == "fwd" and r["dtype"] == "bfloat16" and "frac_of_matmul_peak" in r \
                    and all(r[k] == v for k, v in kw.items()):
                frac = r["frac_of_matmul_peak"] * r["median_ms"] / r.get("pipelined_ms", r["median_ms"])
                print(f"  bf16 fwd: {impl} achieved {frac * 100:.0f}% of matmul peak pipelined "
                      f"({r['frac_of_matmul_peak'] * 100:.0f}% one call between events) (target >= 50%)")


PRESETS = {
    # the shared CPU VM drifts: three interleaved rounds
    "cpu-targets": dict(device="cpu", dtypes=["float32"], batch=[4], frames=[32], dim=[768], tubes=["paper"],
                        modes=["fwd", "fwd_bwd"], impls=DEFAULT_IMPLS, rounds=3),
    "cpu-sweep": dict(device="cpu", dtypes=["float32", "bfloat16"], batch=[1, 2, 4], frames=[32, 64],
                      dim=[384, 768, 1024], tubes=["paper", "tubelet2"], modes=MODES,
                      impls=["reference", "unfold_gemm", "fused"], rounds=2),
    "gpu-targets": dict(device="cuda", dtypes=["bfloat16", "float32"], batch=[32], frames=[32], dim=[768],
                        tubes=["paper"], modes=["fwd", "fwd_bwd"], impls=DEFAULT_IMPLS),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named configuration; the options below override it")
    p.add_argument("--device", help="cpu or cuda (default: cuda when a GPU is visible)")
    p.add_argument("--dtypes", nargs="+", help="float32, bfloat16, float16, float64 (default: float32)")
    for name, default in (("batch", 4), ("frames", 32), ("dim", 768)):
        p.add_argument(f"--{name}", nargs="+", type=int, help=f"(default: {default})")
    p.add_argument("--tubes", nargs="+", choices=sorted(TUBE_SETS), help="(default: paper)")
    p.add_argument("--modes", nargs="+", choices=MODES, help="(default: fwd fwd_bwd)")
    p.add_argument("--impls", nargs="+", choices=IMPLS, help="(default: " + " ".join(DEFAULT_IMPLS) + ")")
    p.add_argument("--size", nargs=2, type=int, default=(224, 224), metavar=("H", "W"), help="(default: 224 224)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first (default: 3)")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per implementation and round (default: 10)")
    p.add_argument("--rounds", type=int, help="interleaved timing rounds (default: the preset's, else 1)")
    p.add_argument("--rotate", type=int, default=3, help="fresh input buffers rotated between calls (default: 3)")
    p.add_argument("--cuda-graph", action="store_true", help="CUDA fwd rows: also the call replayed from a CUDA graph")
    p.add_argument("--json", help="results (default: bench/out/<device>-<date>.json)")
    p.add_argument("--plot", help="PNG plot, needs matplotlib (default: next to the JSON)")
    args = p.parse_args(argv)
    cfg = dict(PRESETS.get(args.preset, {}))
    defaults = dict(device="cuda" if torch.cuda.is_available() else "cpu", dtypes=["float32"], batch=[4],
                    frames=[32], dim=[768], tubes=["paper"], modes=["fwd", "fwd_bwd"], impls=DEFAULT_IMPLS, rounds=1)
    for k, v in defaults.items():
        cfg[k] = getattr(args, k) if getattr(args, k, None) is not None else cfg.get(k, v)
    args.rounds = cfg["rounds"]
    device = torch.device(cfg["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device visible")
    torch.backends.cudnn.benchmark = True  # the reference at cuDNN's best algorithm
    dtypes = [getattr(torch, d) for d in cfg["dtypes"]]
    peak = {dtype_name(dt): matmul_peak(device, dt) for dt in dtypes} if device.type == "cuda" else {}
    configs = [(dt, b, f, d, tn, m) for dt in dtypes for tn in cfg["tubes"] for f in cfg["frames"]
               for d in cfg["dim"] for m in cfg["modes"] for b in cfg["batch"]]
    rows, t_start = [], time.time()
    for i, c in enumerate(configs):
        def progress(msg, i=i):
            print(f"[{i + 1}/{len(configs)} {time.time() - t_start:6.0f}s] {msg}", file=sys.stderr, flush=True)
        run_config(args, device, *c, cfg["impls"], peak, rows, progress)
    result = {"device": device_name(device), "torch": torch.__version__, "cuda": torch.version.cuda,
              "cudnn": str(torch.backends.cudnn.version()) if device.type == "cuda" else None,
              "commit": git_commit(), "date": _dt.date.today().isoformat(), "threads": torch.get_num_threads(),
              "peak_tflops": peak, "config": cfg, "cuda_path": os.environ.get("TUBEVIT_CUDA_PATH", "auto"),
              "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
              "results": rows}
    print(f"\ndevice: {result['device']} | torch {result['torch']} | commit {result['commit']}")
    if peak:
        print("dense matmul peak (TFLOP/s): " + ", ".join(f"{k} {v:.1f}" for k, v in peak.items()))
    print_table(rows)
    check_targets(rows, device)
    path = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "out",
                                     f"{device.type}-{result['date']}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"json: {path}")
    plot(rows, args.plot or os.path.splitext(path)[0] + ".png")


if __name__ == "__main__":
    main()
