"""Where the GPU time of one tokenizer step goes, kernel by kernel (run by
bench/gpu_check.sh, step `profile`; needs a CUDA GPU).

    python bench/gpu_profile.py                 # torch.profiler tables, bf16 and fp32 (TF32)
    python bench/gpu_profile.py --once bf16     # one forward + backward, for ncu to look at
    python bench/gpu_profile.py --host --batch 4   # host side: self CPU time per op (launch overhead)

Paper tubes, 3x32x224x224, d = 768, B = 32 (the shape of bench/RESULTS.md) unless
--batch says otherwise. The input does not require grad (mode fwd_bwd of the
benchmark): the backward is dW + db.
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import tubevit_ext as tv

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def step(m, x, backward):
    y = m(x)
    if backward:
        y.backward(torch.ones_like(y))
    return y


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--once", choices=sorted(DTYPES))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp32"])
    ap.add_argument("--input-grad", action="store_true", help="the input requires grad too (dX)")
    ap.add_argument("--host", action="store_true",
                    help="CPU activity too, sorted by self CPU time: where the host-side time of a step goes")
    a = ap.parse_args()
    torch.manual_seed(0)
    dtypes = [a.once] if a.once else a.dtypes
    for name in dtypes:
        dt = DTYPES[name]
        m = tv.SparseTubeTokenizer(3, 768).cuda().to(dt)
        x = torch.randn(a.batch, 3, 32, 224, 224, device="cuda", dtype=dt).requires_grad_(a.input_grad)
        if a.once:
            step(m, x, True)
            torch.cuda.synchronize()
            return
        for backward in (False, True):
            for _ in range(3):
                step(m, x, backward)
            torch.cuda.synchronize()
            acts = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if a.host else [])
            with profile(activities=acts) as prof:
                for _ in range(5):
                    step(m, x, backward)
                torch.cuda.synchronize()
            print(f"\n### {name} B={a.batch} {'fwd+bwd' if backward else 'fwd'} "
                  f"(input grad: {a.input_grad}), 5 steps, TF32 conv: {torch.backends.cudnn.allow_tf32}"
                  f"{', host side' if a.host else ''}")
            sort = "self_cpu_time_total" if a.host else "cuda_time_total"
            print(prof.key_averages().table(sort_by=sort, row_limit=25 if a.host else 12, max_name_column_width=60))


if __name__ == "__main__":
    main()
