"""Session 7 probes behind numbers in bench/NOTES.md ("Session 7"), dev CPU,
fp32, paper tubes, d = 768. Not part of the build or the tests.

    python bench/experiments/session7_probes.py dx    # input-gradient-only backward, B = 4, vs torch.zeros of dx
    python bench/experiments/session7_probes.py b32   # B = 32 forward (no grad): time and page faults per call
    python bench/experiments/session7_probes.py ort   # portable tokenizer in ONNX Runtime vs fused vs reference, B = 4
"""
import resource
import sys
import time

import torch

import tubevit_ext as tv


def median_ms(f, n=10, warmup=2):
    for _ in range(warmup):
        f()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return ts[n // 2] * 1e3


def probe_dx(B=4, d=768):
    torch.manual_seed(0)
    tubes = tv.PAPER_TUBES
    x = torch.randn(B, 3, 32, 224, 224)
    ws = [torch.randn(d, 3, *t.kernel) * 0.02 for t in tubes]
    flat = tv.flatten_tubes(tubes)
    g = torch.randn(B, tv.num_tokens(tubes, (32, 224, 224)), d)
    op = torch.ops.tubevit.tube_tokens_backward
    for _ in range(2):
        dx_only = median_ms(lambda: op(g, x, ws, [], flat, [True, False, False]))
        zeros = median_ms(lambda: torch.zeros(B, 3, 32, 224, 224))
        print(f"dx-only backward {dx_only:.2f} ms; torch.zeros of dx (fresh memory) {zeros:.2f} ms")


def probe_b32(B=32, d=768):
    torch.manual_seed(0)
    tok = tv.SparseTubeTokenizer(3, d).eval()
    xs = [torch.randn(B, 3, 32, 224, 224) for _ in range(2)]
    for _ in range(3):
        ts, f0 = [], resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        with torch.no_grad():
            for i in range(8):
                t = time.perf_counter()
                y = tok(xs[i % 2])
                ts.append(time.perf_counter() - t)
                del y
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 8
        ts.sort()
        print(f"B={B} forward {ts[4] * 1e3:.1f} ms, {faults:.0f} page faults per call")


def probe_ort(B=4, d=768, path="/tmp/tubevit_tokenizer.onnx"):
    import onnxruntime as ort
    from tubevit_ext import export as tvx
    tok = tv.SparseTubeTokenizer(3, d).eval()
    ref = tv.reference.SparseTubeTokenizer(3, d)
    ref.load_state_dict(tok.state_dict())
    xs = [torch.randn(B, 3, 32, 224, 224) for _ in range(4)]
    tvx.to_onnx(tok, (xs[0],), path, dynamic_batch=True)
    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    arrays = [x.numpy() for x in xs]
    it = iter(range(10 ** 9))
    with torch.no_grad():
        for _ in range(2):
            o = median_ms(lambda: sess.run(None, {"x": arrays[next(it) % 4]}), n=20)
            f = median_ms(lambda: tok(xs[next(it) % 4]), n=20)
            r = median_ms(lambda: ref(xs[next(it) % 4]), n=10)
            print(f"ONNX Runtime {o:.2f} ms, fused {f:.2f} ms, PyTorch reference {r:.2f} ms")


if __name__ == "__main__":
    {"dx": probe_dx, "b32": probe_b32, "ort": probe_ort}[sys.argv[1] if len(sys.argv) > 1 else "dx"]()
