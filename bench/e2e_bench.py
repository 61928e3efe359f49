"""What a user's TubeViT step gains: the same model, same weights, with this library's tokenizer
and with the nn.Conv3d reference tokenizer the public TubeViT ports use, timed in one run.

    python bench/e2e_bench.py [--sizes ti] [--batch 1 4] [--frames 32] [--modes train infer]
                              [--compile off] [--device cpu] [--repeats 5] [--json out.json] [--plot out.png]

Rows: a training step (forward, cross-entropy, backward, AdamW step, under --precision: bf16
autocast and/or fp32; default bf16 on CUDA, fp32 on the CPU) or inference (forward under inference_mode), per model size, batch, frame count and
torch.compile off/on. Before timing, the two models must give the same loss and gradients
(within the dtype's rounding): a failed check stops the run. Per row: median step time of each,
the speed-up, the tokenizer's share of our step (torch.profiler: the self and child time of the
tokenizer's forward over the whole step's), peak CUDA memory and pipelined_ms (CUDA only: the
--repeats steps back to back, one synchronisation, per step). JSON rows follow the tokenizer
benchmark's fields (impl, mode, dtype, batch, frames, median_ms, samples); --plot draws each row's
speed-up (needs matplotlib).
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import statistics
import time

import torch

import tubevit_ext as tv
from tubevit_ext.models import tube_tokenizer
from tubevit_ext.models import SIZES, TubeViT


class _ReferenceTokenizer(torch.nn.Module):
    """The model's tokenizer, run through the per-tube nn.Conv3d construction (same parameters)."""

    def __init__(self, tok):
        super().__init__()
        self.tok = tok

    def forward(self, x):
        real = tube_tokenizer.tube_tokens
        tube_tokenizer.tube_tokens = tv.reference.tube_tokens
        try:
            return self.tok(x)
        finally:
            tube_tokenizer.tube_tokens = real

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["tok"], name)


def build_pair(size, seed=0, device="cpu"):
    torch.manual_seed(seed)
    ours = TubeViT(**SIZES[size], num_classes=400).to(device)
    ref = copy.deepcopy(ours)
    ref.tokenizer = _ReferenceTokenizer(ref.tokenizer)
    return ours, ref


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_step(model, mode, x, y, device, autocast_dtype):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4) if mode == "train" else None

    def step():
        if mode == "infer":
            with torch.inference_mode(), torch.autocast(device.type, autocast_dtype, enabled=autocast_dtype is not None):
                return model(x)
        with torch.autocast(device.type, autocast_dtype, enabled=autocast_dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss
    return step


def check_same(ours, ref, x, y, autocast_dtype, device):
    """Same loss and gradients (tokenizer weights included) before anything is timed."""
    outs = []
    for m in (ours, ref):
        m.zero_grad(set_to_none=True)
        with torch.autocast(device.type, autocast_dtype, enabled=autocast_dtype is not None):
            loss = torch.nn.functional.cross_entropy(m(x).float(), y)
        loss.backward()
        outs.append((loss.detach(), [p.grad.detach().clone() for p in m.parameters() if p.grad is not None]))
    (la, ga), (lb, gb) = outs
    if autocast_dtype is None:
        torch.testing.assert_close(la, lb, rtol=1e-3, atol=1e-5)
        assert len(ga) == len(gb)
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5 * max(1.0, b.abs().max().item()))
    else:  # bf16: elementwise, two tokenizers' gradients through a whole model differ by bf16 rounding
        # (sign flips of near-zero entries included); the gradient as a whole agrees to a few per cent,
        # where a wrong tokenizer is off by O(1)
        torch.testing.assert_close(la, lb, rtol=2e-2, atol=2e-3)
        flat_a, flat_b = (torch.cat([g.float().flatten() for g in gs]) for gs in (ga, gb))
        rel = ((flat_a - flat_b).norm() / flat_b.norm()).item()
        assert rel < 0.05, f"bf16 gradients differ by {rel:.3f} of their norm"
    for m in (ours, ref):
        m.zero_grad(set_to_none=True)


def time_steps(step, repeats, device):
    step(), _sync(device)  # warm-up (and compilation)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        _sync(device)
        ts.append((time.perf_counter() - t) * 1e3)
    return ts


def plot(rows, path):
    """One bar per (size, mode, B, T, compile) row: our step's speed-up over the reference
    tokenizer's model. Skipped (with a note) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot skipped: matplotlib is not installed")
        return
    fused = [r for r in rows if r["impl"] == "fused"]
    labels = [f"{r['model']} {r['mode']}\nB={r['batch']} T={r['frames']}" + ("\ncompiled" if r["compile"] == "on" else "")
              for r in fused]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(fused) + 1.5), 3.6))
    ax.bar(range(len(fused)), [r["speedup"] for r in fused], color="tab:blue")
    ax.axhline(1.0, color="gray", lw=0.8)
    for i, r in enumerate(fused):
        ax.text(i, r["speedup"], f"{r['speedup']:.2f}x\n{100 * r['tokenizer_share']:.0f}% tok", ha="center",
                va="bottom", fontsize=7)
    ax.set_xticks(range(len(fused)), labels, fontsize=7)
    ax.set_ylabel("step speed-up vs Conv3d tokenizer")
    ax.set_title(f"TubeViT step, this tokenizer vs nn.Conv3d ({fused[0]['device']}, {fused[0]['dtype']})" if fused else "",
                 fontsize=9)
    ax.set_ylim(0, max([1.2] + [1.15 * r["speedup"] for r in fused]))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path}")


def tokenizer_share(model, step, device):
    """The tokenizer forward's share of one step's time, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile, record_function
    real = model.tokenizer.forward

    def marked(*a, **k):
        with record_function("tubevit_ext.tokenizer"):
            return real(*a, **k)
    model.tokenizer.forward = marked
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    try:
        with profile(activities=acts) as prof:
            with record_function("step"):
                step()
                _sync(device)
    finally:
        del model.tokenizer.forward
    ev = {e.key: e for e in prof.key_averages()}
    attr = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    tok, total = getattr(ev["tubevit_ext.tokenizer"], attr, 0), getattr(ev["step"], attr, 0)
    if device.type == "cuda" or not total:
        total = max(total, 1)
    return tok / total


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["ti"], choices=sorted(SIZES), help="model sizes (default: ti)")
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 4], help="(default: 1 4)")
    ap.add_argument("--frames", nargs="+", type=int, default=[32], help="(default: 32)")
    ap.add_argument("--size", type=int, default=224, help="frame size (default: 224)")
    ap.add_argument("--modes", nargs="+", default=["train", "infer"], choices=["train", "infer"])
    ap.add_argument("--compile", nargs="+", default=["off"], choices=["off", "on"], help="(default: off)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=None,
                    help="autocast of the step (default: bf16 on CUDA, fp32 on the CPU)")
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per model and row (default: 5)")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--plot", help="write a PNG of the speed-ups here (needs matplotlib)")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    precisions = a.precision or (["bf16"] if device.type == "cuda" else ["fp32"])
    rows = []
    print(f"{'size':4s} {'mode':5s} {'prec':4s} {'B':>3s} {'T':>3s} {'compile':7s} {'reference':>10s} {'fused':>10s} "
          f"{'speed-up':>8s} {'tok share':>9s}")
    for size in a.sizes:
        ours, ref = build_pair(size, device=device)
        for B in a.batch:
            for T in a.frames:
                g = torch.Generator().manual_seed(B * 1000 + T)
                x = torch.randn(B, 3, T, a.size, a.size, generator=g).to(device)
                y = torch.randint(0, 400, (B,), generator=g).to(device)
                for comp, prec, mode in [(c, p, m) for c in a.compile for p in precisions for m in a.modes]:
                    autocast_dtype = torch.bfloat16 if prec == "bf16" else None
                    check_same(ours, ref, x, y, autocast_dtype, device)
                    models = {"reference": copy.deepcopy(ref), "fused": copy.deepcopy(ours)}
                    res = {}
                    for impl, m in models.items():
                        runner = torch.compile(m) if comp == "on" else m
                        step = make_step(runner, mode, x, y, device, autocast_dtype)
                        if device.type == "cuda":
                            torch.cuda.reset_peak_memory_stats()
                        ts = time_steps(step, a.repeats, device)
                        res[impl] = dict(median_ms=statistics.median(ts), samples=ts,
                                         peak_mem_mb=(torch.cuda.max_memory_allocated() / 2 ** 20
                                                      if device.type == "cuda" else None))
                        if device.type == "cuda":
                            res[impl]["pipelined_ms"] = 1e3 * _tube_bench().pipelined_seconds(
                                lambda _: step(), [None], device, a.repeats)
                    share = tokenizer_share(models["fused"], make_step(models["fused"], mode, x, y, device,
                                                                      autocast_dtype), device)
                    speedup = res["reference"]["median_ms"] / res["fused"]["median_ms"]
                    for impl in models:
                        rows.append(dict(impl=impl, model=size, mode=mode, dtype="bfloat16" if autocast_dtype else
                                         "float32", precision=prec, batch=B, frames=T, size=a.size, compile=comp,
                                         device=str(device), speedup=speedup if impl == "fused" else 1.0,
                                         tokenizer_share=share if impl == "fused" else None, **res[impl]))
                    print(f"{size:4s} {mode:5s} {prec:4s} {B:3d} {T:3d} {comp:7s} {res['reference']['median_ms']:8.1f}ms "
                          f"{res['fused']['median_ms']:8.1f}ms {speedup:7.2f}x {100 * share:8.1f}%", flush=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(dict(torch=torch.__version__, device=str(device), commit=_tube_bench().git_commit(), rows=rows), fh, indent=2)
    if a.plot:
        plot(rows, a.plot)
    return rows


@functools.lru_cache(maxsize=None)
def _tube_bench():
    """bench/tube_bench.py, for its timing helpers and git_commit (TUBEVIT_COMMIT when set, else
    the checkout's HEAD, -dirty if so); loaded by path, so this runs as a script or a module."""
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tube_bench.py")
    spec = importlib.util.spec_from_file_location("tube_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


if __name__ == "__main__":
    main()
