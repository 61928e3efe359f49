"""Shared fixtures and helpers. GPU tests are the same tests parametrized on
``cuda``; they are skipped (not weakened) when no GPU is visible."""
import contextlib
import importlib.util
import os
import random
import signal

import pytest
import torch
from hypothesis import strategies as st

import tubevit_ext as tv

# fp32 CUDA results are compared at fp32 tolerances, so TF32 is off for the
# suite: with PyTorch's default (cudnn.allow_tf32 = True) both the cuDNN
# reference and our tensor-core path would run fp32 convolutions as TF32.
# test_cuda_runtime.py::test_cuda_tf32_* turn it on where TF32 is the subject.
torch.backends.cudnn.allow_tf32 = False

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not (torch.cuda.is_available() and tv.cuda_compiled()), reason="needs a CUDA GPU and a CUDA build"))]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _reread_switches():
    """The library reads its TUBEVIT_* switches once (csrc/options.h); after a test that
    changed one (monkeypatch undoes the variable after this fixture's setup, before its
    teardown), the next test starts from the environment again."""
    yield
    tv.reload_options()


def set_switch(monkeypatch, name, value):
    """Sets one of the library's switches (value None: unsets it) and has it read again."""
    if value is None:
        monkeypatch.delenv(name, raising=False)
    else:
        monkeypatch.setenv(name, value)
    tv.reload_options()


def cuda_graph_replay(fn):
    """fn() run once on a side stream (warm-up outside the capture, as PyTorch's docs ask), then captured
    in a CUDA graph and replayed once; returns what the captured call returned, which now holds the
    replay's result."""
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        with torch.cuda.graph(g, stream=s):
            out = fn()
    torch.cuda.current_stream().wait_stream(s)
    g.replay()
    torch.cuda.synchronize()
    return out


@contextlib.contextmanager
def time_limit(seconds: float, what: str):
    """Fails (TimeoutError naming ``what``) when the block runs longer than ``seconds``: a test of
    something that can hang (decoding, pipelines) fails instead of stalling the suite. SIGALRM
    interrupts Python code, and FFmpeg calls return to Python between packets and frames."""
    def fire(signum, frame):
        raise TimeoutError(f"{what} took more than {seconds} s")
    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def random_tubes(rng: random.Random, n_tubes: int, size=None, max_kernel=6):
    """Random tube list that fits ``size`` (T, H, W): kernel < stride,
    kernel > stride (overlapping windows) and non-zero offsets all occur."""
    tubes = []
    for _ in range(n_tubes):
        k, s, o = [], [], []
        for a in range(3):
            L = size[a]
            ka = rng.randint(1, min(max_kernel, L))
            oa = rng.randint(0, min(3, L - ka))
            sa = rng.randint(1, max(1, min(7, L)))
            k.append(ka), s.append(sa), o.append(oa)
        tubes.append(tv.Tube(tuple(k), tuple(s), tuple(o)))
    return tubes


def load_bench(name):
    """bench/<name>.py as a module (the benchmark scripts are not a package)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", name + ".py")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def oracle(x, ws, bs, tubes, pe=None, gout=None):
    """The suite's oracle: the reference construction (per-tube Conv3d, flatten, cat, add;
    tubevit_ext/reference.py) in fp64 on these operands' values as they are (rounded inputs stay
    rounded). Returns the tokens, and with an output gradient ``gout`` also dx, [dW_i] and [db_i]
    (db empty without biases): (out, dx, dws, dbs)."""
    x64 = x.detach().double().requires_grad_(gout is not None)
    w64 = [w.detach().double().requires_grad_(gout is not None) for w in ws]
    b64 = [b.detach().double().requires_grad_(gout is not None) for b in bs] if bs else None
    out = tv.reference.tube_tokens(x64, w64, b64, tubes, None if pe is None else pe.detach().double())
    if gout is None:
        return out.detach()
    grads = torch.autograd.grad(out, [x64, *w64, *(b64 or [])], gout.detach().double())
    return out.detach(), grads[0], list(grads[1:1 + len(w64)]), list(grads[1 + len(w64):])


def make_params(tubes, C, d, dtype=torch.float32, device="cpu", bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(d, C, *t.kernel, generator=g, dtype=torch.float64).div_((C * t.kernel[0] * t.kernel[1] * t.kernel[2]) ** 0.5)
          .to(device=device, dtype=dtype) for t in tubes]
    bs = [torch.randn(d, generator=g, dtype=torch.float64).to(device=device, dtype=dtype) for _ in tubes] if bias else None
    return ws, bs


# dx from a given dP (tubevit_testing::dx_from_dp, and the prototype's writer): shapes chosen for the
# gather's and the writer's tiles: W a multiple of 8 (16-byte stores),
# W not (partial chunks at row ends), W < 8 (one chunk per row, 256 rows per tile), W > 256 (several
# column tiles, W % 8 == 4: no 16-byte stores), overlapping windows along every axis
DX_SHAPES = {
    "w_multiple_of_8": ([tv.Tube((2, 3, 4), (2, 2, 4), (1, 0, 0)), tv.Tube((1, 2, 8), (1, 3, 8))], (5, 9, 32), 2),
    "w_ragged": ([tv.Tube((2, 2, 3), (1, 3, 2), (0, 1, 1)), tv.Tube((3, 1, 5), (2, 1, 4))], (6, 7, 19), 3),
    "w_narrow": ([tv.Tube((1, 2, 2), (1, 1, 1)), tv.Tube((2, 3, 3), (3, 2, 2), (0, 1, 1))], (4, 300, 5), 2),
    "w_wide": ([tv.Tube((1, 1, 16), (2, 2, 16), (0, 0, 3)), tv.Tube((2, 2, 7), (2, 3, 9))], (3, 4, 532), 1),
}


def dp_inputs(shape, dtype, B=2, d=16, seed=0):
    tubes, size, C = DX_SHAPES[shape]
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(B, C, *size, dtype=dtype)
    ws = [torch.zeros(d, C, *t.kernel, dtype=dtype) for t in tubes]
    grad = torch.zeros(B, tv.num_tokens(tubes, size), d, dtype=dtype)
    elems = sum(B * tv.num_tokens([t], size) * C * t.kernel[0] * t.kernel[1] * t.kernel[2] for t in tubes)
    dp = torch.randn(elems, generator=g)
    return tubes, x, ws, grad, dp


def dx_from_dp_fp64(tubes, x, dp):
    """dx = sum over tubes of col2im(dP_i) in fp64: the adjoint of the reference's patch extraction."""
    B, C = x.shape[:2]
    xd = torch.zeros(x.shape, dtype=torch.float64, requires_grad=True)
    off, total = 0, 0.0
    for t in tubes:
        n = tv.num_tokens([t], x.shape[2:])
        K = C * t.kernel[0] * t.kernel[1] * t.kernel[2]
        w = torch.eye(K, dtype=torch.float64).view(K, C, *t.kernel)  # tokens = patches
        p = tv.reference.tube_tokens(xd, [w], None, [t], None)  # (B, n, K)
        total = total + (p * dp[off:off + B * n * K].double().view(B, n, K)).sum()
        off += B * n * K
    total.backward()
    return xd.grad


# ---- tolerances: every numeric bound of the suite comes from these tables ----

#: Unit roundoff of each dtype: a value rounded once to it is within UNIT_ROUNDOFF * |value|.
UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8, torch.float32: 2.0 ** -24,
                 torch.float64: 2.0 ** -53}
#: fp32 results of a BLAS GEMM (cuBLAS, MKL) against fp64 on the same operands: their summation order
#: over K <= 1728 terms adds this much relative error (the GEMM-path tests).
FP32_BLAS_REL = 2.0 ** -16
#: fp32 results of the tensor-core kernels' emulation against fp64 on the same TF32-rounded operands:
#: fp32 accumulation in MMA-depth steps.
FP32_TC_REL = 2.0 ** -20
#: The project's rule for the fused op against the fp64 oracle (flash-attention's test rule):
#: err <= 2 * err(PyTorch's own same-dtype path) + ATOL_ULPS[dtype] * UNIT_ROUNDOFF[dtype] * max|oracle|.
#: The slack is a few roundings of the largest value: where PyTorch's path is exact or nearly so
#: (fp64, short fp32 sums) another summation order may still differ by that much. Measured over
#: test_tokens.py: the largest slack any case needs is 10 (fp64), 1.6 (fp32) and 0 (bf16, fp16)
#: roundings; the typical bound is then 3-14x the observed error. bf16 allows 2: the CPU bf16
#: forward rounds twice by construction (oneDNN's bf16 GEMM, reached through ATen, writes bf16 and
#: has no fp32-output form on the CPU; bias and PE are then added in fp32 and rounded again), and a
#: fuzz example with d = 1 and K = 10 (B = 2, seed 691) lands 1.97 roundings from the fp64 oracle
#: where PyTorch's bias-inside-conv path happens to be 0.2 away. fp64 allows 32: there PyTorch's
#: path is the oracle itself (its error is 0), so the slack alone covers another summation order,
#: and a fuzz example with K = 288 (seven tubes, d = 2, seed 131) needs 16.9 roundings of the
#: largest output. The property-based fuzz (test_fuzz.py) holds to this rule.
ATOL_ULPS = {torch.float64: 32, torch.float32: 8, torch.bfloat16: 2, torch.float16: 1}


def reference_rule_bound(ref_err, oracle, dtype):
    """The bound of the project's rule for a result whose oracle is ``oracle`` (fp64)."""
    scale = oracle.abs().max().item() if oracle.numel() else 0.0
    return 2 * ref_err + ATOL_ULPS[dtype] * UNIT_ROUNDOFF[dtype] * scale


def check_rounded(got, want, dtype, name, fp32_rel):
    """got (any dtype) against the fp64 result on the same rounded operands: within two roundings of
    the output's dtype (fp32: fp32_rel, the accumulation order's error) of max|want|, plus 1e-5."""
    err = (got.double() - want).abs().max().item()
    rel = fp32_rel if dtype == torch.float32 else UNIT_ROUNDOFF[dtype]
    tol = 2 * rel * want.abs().max().item() + 1e-5
    assert err <= tol, f"{name}: max error {err:.3g} > {tol:.3g}"


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def round_to_tf32(t):
    """fp32 rounded to TF32's 10-bit mantissa as the tensor-core kernels' __float_to_tf32 does
    (nearest, ties away from zero): the input rounding of fp32-as-TF32 arithmetic."""
    bits = t.float().contiguous().view(torch.int32)
    out = ((bits + 0x1000) & ~0x1FFF).view(torch.float32)
    return torch.where(torch.isfinite(t), out, t.float())


# ---- shared problems: the tensor-core and GEMM-path tile cases, hypothesis strategies, layouts

def make_x(B, C, size, dtype, layout, g):
    """x (B, C, *size) from generator g in `layout`: contiguous, channels_last_3d, or noncontiguous (the
    same values in a view with no dense layout: every other channel of a doubled tensor)."""
    x = torch.randn(B, C, *size, generator=g, dtype=torch.float64).to(dtype)
    if layout == "channels_last_3d":
        return x.contiguous(memory_format=torch.channels_last_3d)
    if layout == "noncontiguous":
        return torch.stack([x, x], dim=2).flatten(1, 2)[:, ::2]
    return x


#: The kernels' tile cases (test_tc_emulation.py, test_gemm_path.py): (tubes, (T, H, W), C, d)
TILE_CASES = {
    # many tokens (M tiles), K = 54 (two K steps, partial), d = 70 (two channel tiles, partial)
    "one_tube": ([tv.Tube((2, 3, 3), (1, 2, 2), (0, 1, 0))], (6, 20, 22), 3, 70),
    # four tubes, K from 12 to 240, overlapping windows, offsets
    "mixed": ([tv.Tube((4, 4, 5), (2, 3, 3), (1, 0, 2)), tv.Tube((1, 2, 2), (1, 2, 2)),
               tv.Tube((3, 1, 4), (2, 1, 3), (0, 2, 1)), tv.Tube((2, 5, 2), (3, 4, 2), (1, 1, 0))],
              (9, 17, 19), 3, 130),
    # widths/offsets that allow 8-, 4- (and for fp32 4-) element accesses in the gather and
    # the weight tile (kw 8/4/12/16, W = 48, K = 1536/768/1728/768)
    "paper": (tv.PAPER_TUBES, (33, 64, 48), 3, 20),
    # kw = 6 on W = 36: 2-element gather accesses (16-bit types), K = 2*2*6*2 = 48
    "vec2": ([tv.Tube((2, 2, 6), (2, 3, 6), (0, 1, 0))], (5, 11, 36), 2, 33),
    # H > 32 and W > 64: the dX gather's (32 x 64)-voxel tiles, with partial last tiles on both
    # axes and windows that straddle tile borders (kw = 5 with stride 3)
    # d = 72: every grad-row access of dW's token-major A tile is 8 (16-bit) or 4 (fp32) channels
    # wide, with a partial second channel tile
    "d72": ([tv.Tube((2, 4, 4), (2, 4, 4), (0, 0, 0))], (6, 16, 24), 3, 72),
    "wide": ([tv.Tube((2, 3, 5), (1, 2, 3), (0, 1, 2)), tv.Tube((1, 4, 4), (2, 4, 4), (1, 0, 1))],
             (3, 37, 70), 2, 20),
}


@st.composite
def tile_problems(draw):
    size = (draw(st.integers(1, 9)), draw(st.integers(1, 20)), draw(st.integers(1, 20)))
    tubes = []
    for _ in range(draw(st.integers(1, 4))):
        k, s, o = [], [], []
        for L in size:
            ka = draw(st.integers(1, min(L, 6)))
            k.append(ka)
            s.append(draw(st.integers(1, 6)))
            o.append(draw(st.integers(0, L - ka)))
        tubes.append(tv.Tube(tuple(k), tuple(s), tuple(o)))
    return dict(size=size, tubes=tubes, C=draw(st.integers(1, 4)), d=draw(st.integers(1, 80)),
                B=draw(st.integers(1, 3)), dtype=draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float32])),
                layout=draw(st.sampled_from(["contiguous", "channels_last_3d", "noncontiguous"])),
                bias=draw(st.booleans()), pe=draw(st.booleans()), seed=draw(st.integers(0, 2 ** 16)))


def tile_inputs(prob):
    """A drawn problem's tensors: x, weights, biases ([] when drawn off), the position embedding
    (None when drawn off), the flat tube list and the output gradient, in the drawn dtype."""
    tubes, size, dtype, d = prob["tubes"], prob["size"], prob["dtype"], prob["d"]
    g = torch.Generator().manual_seed(prob["seed"])
    x = make_x(prob["B"], prob["C"], size, dtype, prob["layout"], g)
    ws, bs = make_params(tubes, prob["C"], d, dtype, seed=prob["seed"])
    pe = tv.sincos_pos_embed(tubes, size, d, dtype=dtype) if prob["pe"] else None
    gout = torch.randn(prob["B"], tv.num_tokens(tubes, size), d, generator=g, dtype=torch.float64).to(dtype)
    return x, ws, bs if prob["bias"] else [], pe, tv.flatten_tubes(tubes), gout


@st.composite
def tube_problems(draw):
    size = (draw(st.integers(1, 10)), draw(st.integers(1, 14)), draw(st.integers(1, 14)))
    tubes = []
    for _ in range(draw(st.integers(1, 8))):
        k, s, o = [], [], []
        for L in size:
            ka = draw(st.integers(1, min(L, 6)))
            k.append(ka)
            s.append(draw(st.integers(1, 8)))  # below and above the kernel size
            o.append(draw(st.integers(0, L - ka)))
        tubes.append(tv.Tube(tuple(k), tuple(s), tuple(o)))
    return dict(
        size=size, tubes=tubes, C=draw(st.integers(1, 4)), d=draw(st.sampled_from([1, 2, 3, 5, 6, 7, 12, 13])),
        B=draw(st.integers(0, 3)), bias=draw(st.booleans()), pe=draw(st.booleans()),
        dtype=draw(st.sampled_from([torch.float64, torch.float32, torch.bfloat16])),
        layout=draw(st.sampled_from(["contiguous", "channels_last_3d", "noncontiguous"])),
        grads=draw(st.tuples(st.booleans(), st.booleans(), st.booleans(), st.booleans())),
        seed=draw(st.integers(0, 2 ** 16)))


def torchvision_vit_state_dict(dim=24, depth=2, mlp=48, classes=5, g=None):
    """A random state_dict in torchvision VisionTransformer's layout (image-ViT loading tests)."""
    sd = {"class_token": torch.randn(1, 1, dim), "encoder.pos_embedding": torch.randn(1, 5, dim),
          "conv_proj.weight": torch.randn(dim, 3, 16, 16), "conv_proj.bias": torch.randn(dim),
          "encoder.ln.weight": torch.randn(dim), "encoder.ln.bias": torch.randn(dim),
          "heads.head.weight": torch.randn(classes, dim), "heads.head.bias": torch.randn(classes)}
    for i in range(depth):
        p = f"encoder.layers.encoder_layer_{i}."
        sd.update({p + "ln_1.weight": torch.randn(dim), p + "ln_1.bias": torch.randn(dim),
                   p + "self_attention.in_proj_weight": torch.randn(3 * dim, dim),
                   p + "self_attention.in_proj_bias": torch.randn(3 * dim),
                   p + "self_attention.out_proj.weight": torch.randn(dim, dim),
                   p + "self_attention.out_proj.bias": torch.randn(dim),
                   p + "ln_2.weight": torch.randn(dim), p + "ln_2.bias": torch.randn(dim),
                   p + "mlp.0.weight": torch.randn(mlp, dim), p + "mlp.0.bias": torch.randn(mlp),
                   p + "mlp.3.weight": torch.randn(dim, mlp), p + "mlp.3.bias": torch.randn(dim)})
    return sd


def make_motion_folder(root, n_per_class=32, frames=16, size=40, seed=0, ext=".mp4", split_dirs=False):
    """Two classes that differ only in motion: a square moving left or right over noise (needs PyAV)."""
    from tubevit_ext.video import io as vio
    g = torch.Generator().manual_seed(seed)
    for cls, dx in (("left", -2), ("right", 2)):
        for k in range(n_per_class):
            sub = os.path.join(root, ("val" if k % 4 == 0 else "train") if split_dirs else "", cls)
            os.makedirs(sub, exist_ok=True)
            fr = (torch.rand(frames, size, size, 3, generator=g) * 60).to(torch.uint8)
            col = torch.randint(120, 256, (3,), generator=g).to(torch.uint8)
            y = int(torch.randint(4, size - 12, (1,), generator=g))
            x0 = int(torch.randint(0, size - 8, (1,), generator=g))
            for t in range(frames):
                x = (x0 + dx * t) % (size - 8)
                fr[t, y:y + 8, x:x + 8] = col
            vio.write_video(os.path.join(sub, f"{cls}_{k:02d}{ext}"), fr, fps=25)


def interrupt_after_first_checkpoint(monkeypatch):
    """`tubevit train` stops (KeyboardInterrupt) right after it wrote its first last.pt, as an
    interrupted run would; undo with monkeypatch.undo() or by setting cli.save_checkpoint back."""
    from tubevit_ext import cli
    save = cli.save_checkpoint

    def save_then_interrupt(path, ckpt):
        save(path, ckpt)
        if path.endswith("last.pt"):
            raise KeyboardInterrupt
    monkeypatch.setattr(cli, "save_checkpoint", save_then_interrupt)
    return save
