"""CUDA runtime contract of the ops: current stream, CUDA-graph capture, the
path switches and fp32 precision. GPU only (skipped without one); each runs
on every CUDA path: the default (chosen by problem size), TUBEVIT_CUDA_PATH=gemm
(the GEMM path: our gather + cuBLAS), TUBEVIT_CUDA_PATH=tc (the handwritten
tensor-core kernels) and TUBEVIT_CUDA_PATH=naive (the naive kernels), in fp32 and
bf16."""
import pytest
import torch

import tubevit_ext as tv
from conftest import set_switch
from tubevit_ext.testing import ops as testing_ops

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and tv.cuda_compiled()),
                                reason="needs a CUDA GPU and a CUDA build")
TUBES = [tv.Tube((3, 5, 4), (2, 3, 5), (1, 0, 2)), tv.Tube((1, 4, 4), (4, 4, 4)), tv.Tube((4, 2, 3), (1, 5, 2), (0, 1, 1))]
SIZE = (9, 21, 19)


def _select(monkeypatch, path):
    """Route the main ops to one CUDA path (TUBEVIT_CUDA_PATH, csrc/options.h)."""
    set_switch(monkeypatch, "TUBEVIT_CUDA_PATH",
               {"default": None, "gemm": "gemm", "tensor_core": "tc", "naive": "naive"}[path])


@pytest.fixture(params=["default", "gemm", "tensor_core", "naive"])
def cuda_path(request, monkeypatch):
    _select(monkeypatch, request.param)
    return request.param


def _step(m, x, g):
    """Forward + backward; returns the output and every gradient."""
    out = m(x)
    out.backward(g)
    return [out.detach().clone(), x.grad.clone()] + [p.grad.clone() for p in m.parameters()]


def _model(dtype):
    torch.manual_seed(0)
    return tv.SparseTubeTokenizer(3, 24, TUBES).cuda().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_side_stream_matches_default_stream(cuda_path, dtype):
    m = _model(dtype)
    x = torch.randn(3, 3, *SIZE, device="cuda", dtype=dtype, requires_grad=True)
    g = torch.randn(3, tv.num_tokens(TUBES, SIZE), 24, device="cuda", dtype=dtype)
    want = _step(m, x, g)
    m.zero_grad(set_to_none=True)
    x.grad = None
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        # the default stream is kept busy so that work issued on it instead
        # of on `s` would race with what follows
        torch.cuda._sleep(10_000_000)
        got = _step(m, x, g)
    torch.cuda.current_stream().wait_stream(s)
    for a, b in zip(want, got):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_capture_and_replay(cuda_path, dtype):
    m = _model(dtype)
    n = tv.num_tokens(TUBES, SIZE)
    static_x = torch.randn(2, 3, *SIZE, device="cuda", dtype=dtype, requires_grad=True)
    static_g = torch.randn(2, n, 24, device="cuda", dtype=dtype)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside the capture, as PyTorch's docs ask
        for _ in range(2):
            m.zero_grad(set_to_none=True)
            static_x.grad = None
            m(static_x).backward(static_g)
    torch.cuda.current_stream().wait_stream(s)
    m.zero_grad(set_to_none=True)
    static_x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = m(static_x)
        static_out.backward(static_g)
    for seed in (1, 2):
        torch.manual_seed(seed)
        new_x = torch.randn_like(static_x)
        new_g = torch.randn_like(static_g)
        with torch.no_grad():
            static_x.copy_(new_x)
            static_g.copy_(new_g)
        graph.replay()
        torch.cuda.synchronize()
        got = [static_out, static_x.grad] + [p.grad for p in m.parameters()]
        eager = _model(dtype)
        xe = new_x.clone().requires_grad_()
        want = _step(eager, xe, new_g)
        for a, b in zip(want, got):
            assert torch.equal(a, b)


def _tf32_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, *SIZE, generator=g, dtype=torch.float64)
    ws = [torch.randn(24, 3, *t.kernel, generator=g, dtype=torch.float64) * 0.2 for t in TUBES]
    bs = [torch.randn(24, generator=g, dtype=torch.float64) for _ in TUBES]
    gout = torch.randn(2, tv.num_tokens(TUBES, SIZE), 24, generator=g, dtype=torch.float64)
    return x, ws, bs, gout


def _fwd_bwd(x, ws, bs, gout, device, dtype):
    """[out, dW..., dx, db...] in fp64 on the CPU."""
    # copies: .to() returns the same tensor when nothing changes (fp64 on the
    # CPU), and the caller's tensors must stay plain inputs for the next call
    x = x.to(device, dtype, copy=True).requires_grad_()
    ws = [w.to(device, dtype, copy=True).requires_grad_() for w in ws]
    bs = [b.to(device, dtype, copy=True).requires_grad_() for b in bs]
    out = tv.tube_tokens(x, ws, bs, TUBES)
    out.backward(gout.to(device, dtype))
    return ([out.detach().double().cpu()] + [w.grad.double().cpu() for w in ws] + [x.grad.double().cpu()]
            + [b.grad.double().cpu() for b in bs])


def test_cuda_tensor_core_path_tf32_follows_cudnn_switch(monkeypatch):
    from conftest import round_to_tf32
    _select(monkeypatch, "tensor_core")
    x, ws, bs, gout = _tf32_case()
    oracle = _fwd_bwd(x, ws, bs, gout, "cpu", torch.float64)
    prev = torch.backends.cudnn.allow_tf32
    try:
        # TF32 off: exact fp32, bitwise what the naive kernels (TUBEVIT_CUDA_PATH=naive) give
        torch.backends.cudnn.allow_tf32 = False
        exact = _fwd_bwd(x, ws, bs, gout, "cuda", torch.float32)
        _select(monkeypatch, "naive")
        naive = _fwd_bwd(x, ws, bs, gout, "cuda", torch.float32)
        _select(monkeypatch, "tensor_core")
        for a, b in zip(exact, naive):
            assert torch.equal(a, b)
        # TF32 on: the tensor-core kernels; error budget = twice that of exact
        # arithmetic on TF32-rounded operands (x and w for the output, x and
        # the output gradient for dW, w and the output gradient for dx) + atol
        torch.backends.cudnn.allow_tf32 = True
        tf32 = _fwd_bwd(x, ws, bs, gout, "cuda", torch.float32)
    finally:
        torch.backends.cudnn.allow_tf32 = prev
    r = lambda t: round_to_tf32(t).double()
    n = len(TUBES)
    rounded_out = _fwd_bwd(r(x), [r(w) for w in ws], bs, gout, "cpu", torch.float64)[0]
    rounded_dw = _fwd_bwd(r(x), ws, bs, r(gout), "cpu", torch.float64)[1:1 + n]
    rounded_dx = _fwd_bwd(x, [r(w) for w in ws], bs, r(gout), "cpu", torch.float64)[1 + n]
    budgets = [rounded_out] + rounded_dw + [rounded_dx]  # db is exact (naive kernel) and not compared here
    for got, want, budget in zip(tf32, oracle, budgets):
        err = (got - want).abs().max().item()
        assert err <= 2 * (budget - want).abs().max().item() + 1e-4, err
    # and TF32 really was used (the output differs from exact fp32)
    assert not torch.equal(tf32[0], exact[0])


def _reference_fwd_bwd(x, ws, bs, gout):
    """PyTorch's own exact-fp32 CUDA path (Conv3d reference, cuDNN without TF32)."""
    prev = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        dev = lambda t: t.to("cuda", torch.float32, copy=True).requires_grad_()
        xc, wc, bc = dev(x), [dev(w) for w in ws], [dev(b) for b in bs]
        out = tv.reference.tube_tokens(xc, wc, bc, TUBES)
        out.backward(gout.to("cuda", torch.float32))
        return ([out.detach().double().cpu()] + [w.grad.double().cpu() for w in wc] + [xc.grad.double().cpu()]
                + [b.grad.double().cpu() for b in bc])
    finally:
        torch.backends.cudnn.allow_tf32 = prev


def test_cuda_gemm_path_fp32_precision(monkeypatch):
    # The GEMM path's fp32 GEMMs run at PyTorch's matmul precision (exact by
    # default, whatever cuDNN's switch says); TF32 only where both
    # torch.backends.cuda.matmul.allow_tf32 and cudnn.allow_tf32 allow it;
    # matmul TF32 with convolution TF32 off goes to the exact naive kernels.
    from conftest import round_to_tf32
    _select(monkeypatch, "gemm")
    x, ws, bs, gout = _tf32_case(seed=2)
    oracle = _fwd_bwd(x, ws, bs, gout, "cpu", torch.float64)
    pytorch = _reference_fwd_bwd(x, ws, bs, gout)
    prev = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        results = {}
        for conv_tf32 in (True, False):
            torch.backends.cudnn.allow_tf32 = conv_tf32
            results[conv_tf32] = _fwd_bwd(x, ws, bs, gout, "cuda", torch.float32)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        tf32 = _fwd_bwd(x, ws, bs, gout, "cuda", torch.float32)
        torch.backends.cudnn.allow_tf32 = False
        mixed = _fwd_bwd(x, ws, bs, gout, "cuda", torch.float32)
        _select(monkeypatch, "naive")
        naive = _fwd_bwd(x, ws, bs, gout, "cuda", torch.float32)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = prev
    # exact fp32 either way: within twice PyTorch's own exact-fp32 error plus 2^-16 of the
    # largest value (an fp32 GEMM summing a few hundred terms in cuBLAS's order: on the
    # H200, dW of 384 terms was 6.3e-5 off on values of 40, cuDNN's 7e-6); TF32 would be
    # ~2^-11 of it, 30x more
    for a, b in zip(results[True], results[False]):
        assert torch.equal(a, b)
    for got, want, ref in zip(results[True], oracle, pytorch):
        err = (got - want).abs().max().item()
        assert err <= 2 * (ref - want).abs().max().item() + 2.0 ** -16 * want.abs().max().item() + 1e-6, err
    # matmul TF32 with conv TF32 off: the exact naive kernels
    for a, b in zip(mixed, naive):
        assert torch.equal(a, b)
    # both allow TF32: used (differs from exact), within the TF32 budget
    assert not torch.equal(tf32[0], results[True][0])
    r = lambda t: round_to_tf32(t).double()
    n = len(TUBES)
    budgets = ([_fwd_bwd(r(x), [r(w) for w in ws], bs, gout, "cpu", torch.float64)[0]]
               + _fwd_bwd(r(x), ws, bs, r(gout), "cpu", torch.float64)[1:1 + n]
               + [_fwd_bwd(x, [r(w) for w in ws], bs, r(gout), "cpu", torch.float64)[1 + n]])
    for got, want, budget in zip(tf32, oracle, budgets):
        err = (got - want).abs().max().item()
        assert err <= 2 * (budget - want).abs().max().item() + 1e-4, err


def test_cuda_naive_ops_ignore_tensor_core_switch(monkeypatch):
    # tube_tokens_naive{,_backward} are the reference the fast paths are
    # checked against, so TUBEVIT_CUDA_PATH must not reroute them: bitwise the
    # same results with the switch off and on (the tensor-core kernels round
    # differently in bf16, so a rerouted op would not be).
    x, ws, bs, gout = _tf32_case(seed=1)
    flat = tv.flatten_tubes(TUBES)
    cast = lambda t: t.to("cuda", torch.bfloat16)
    args = (cast(x), [cast(w) for w in ws], [cast(b) for b in bs])

    def run():
        out = testing_ops.tube_tokens_naive(*args, flat, None)
        dx, dws, dbs = testing_ops.tube_tokens_naive_backward(cast(gout), args[0], args[1], flat,
                                                                     [True, True, True])
        return [out, dx, *dws, *dbs]

    set_switch(monkeypatch, "TUBEVIT_CUDA_PATH", "naive")
    off = run()
    set_switch(monkeypatch, "TUBEVIT_CUDA_PATH", "tc")
    on = run()
    for a, b in zip(off, on):
        assert torch.equal(a, b)


def test_cuda_default_path_follows_problem_size(monkeypatch):
    # the planner (csrc/cuda_plan.h, its table in test_cuda_plan.py): with no switch set, 16-bit calls take the
    # tensor-core kernels below 2^20 output elements (forward) / 12 * 2^20 (backward) and the
    # GEMM path from there on; the fp32 forward takes the GEMM path at any size. Each default
    # result must be bitwise the forced path's (both paths are deterministic) and the two
    # paths must differ, so the comparison can tell them apart.
    tubes = [tv.Tube((1, 8, 8), (1, 8, 8))]  # (8, 64, 64): 512 tokens; d = 512: 2^18 per sample
    d = 512

    def run(B, path, dtype, backward):
        _select(monkeypatch, path)
        g = torch.Generator().manual_seed(B)
        x = torch.randn(B, 3, 8, 64, 64, generator=g).to("cuda", dtype)
        w = (torch.randn(d, 3, 1, 8, 8, generator=g) * 0.1).to("cuda", dtype).requires_grad_()
        gout = torch.randn(B, 512, d, generator=g).to("cuda", dtype)
        out = tv.tube_tokens(x, [w], None, tubes)
        if not backward:
            return out.detach()
        out.backward(gout)  # the weight gradient depends on the backward op's path only
        return w.grad

    cases = [(2, torch.bfloat16, False, "tensor_core"), (4, torch.bfloat16, False, "gemm"),
             (8, torch.bfloat16, True, "tensor_core"), (48, torch.bfloat16, True, "gemm"),
             (1, torch.float32, False, "gemm")]
    prev = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True  # the tensor-core kernels take fp32 (as TF32) only then
    try:
        sm = torch.cuda.get_device_capability()[0]
        for B, dtype, backward, want in cases:
            # what runs is what the planner says, for this GPU
            names = tv._C._cuda_plan(str(dtype).split(".")[1], B, 512, d, 1, sm, True,
                                     torch.backends.cuda.matmul.allow_tf32, True)
            assert names[1 if backward else 0] == {"gemm": "gemm", "tensor_core": "tc"}[want], (B, dtype, names)
            got = {p: run(B, p, dtype, backward) for p in ("default", "gemm", "tensor_core")}
            assert not torch.equal(got["gemm"], got["tensor_core"]), (B, dtype, backward)
            assert torch.equal(got["default"], got[want]), (B, dtype, backward, want)
    finally:
        torch.backends.cudnn.allow_tf32 = prev


def _capture(fn, static_x):
    """fn(static_x) captured in a CUDA graph after a side-stream warm-up; returns (graph, output)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn(static_x)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(static_x)
    return graph, out


def test_cuda_graph_tiny_batch_inference():
    """The README's recipe for B = 1 inference, where a call is host-bound: a TubeViT forward
    captured by hand in a torch.cuda.CUDAGraph, and under torch.compile(mode="reduce-overhead"),
    returns eager's logits for new inputs copied into the static buffer."""
    from tubevit_ext.models import TubeViT

    torch.manual_seed(0)
    model = TubeViT(dim=64, depth=2, num_heads=2, mlp_dim=128, num_classes=10).cuda().eval()
    size = (20, 64, 64)
    static_x = torch.randn(1, 3, *size, device="cuda")

    def forward(x):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            return model(x)

    graph, static_out = _capture(forward, static_x)
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        x = torch.randn(1, 3, *size, device="cuda")
        static_x.copy_(x)
        graph.replay()
        want = forward(x)
        torch.testing.assert_close(static_out, want, rtol=0, atol=0)  # the same kernels, replayed
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            got = compiled(x).clone()  # reduce-overhead outputs are overwritten by the next replay
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16", "fp32-autocast"])
def test_cuda_varlen_attention_joint_batch_equals_each_sample_alone(autocast):
    """use_varlen_attention(): a joint batch of several shape groups (images, videos of two
    sizes) attended in one FlashAttention varlen call per block gives each sample's logits and
    the gradients of running the samples one by one (bf16 rounding), and the per-group path's."""
    from tubevit_ext.models import TubeViT

    torch.manual_seed(0)
    dtype = torch.float32 if autocast else torch.bfloat16
    model = TubeViT(dim=64, depth=2, num_heads=2, mlp_dim=128, num_classes=5).cuda().to(dtype)
    samples = [torch.randn(3, 20, 32, 32), torch.randn(3, 32, 32), torch.randn(3, 24, 48, 40),
               torch.randn(3, 20, 32, 32), torch.randn(3, 48, 32)]
    samples = [s.to("cuda", dtype) for s in samples]

    def run(joint):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            logits = model(samples) if joint else [model(s[None])[0] for s in samples]
        sum(l.float().square().sum() for l in logits).backward()
        return [l.float() for l in logits], [p.grad.float().clone() for p in model.parameters()]

    want_logits, want_grads = run(joint=False)  # one sample at a time
    group_logits, _ = run(joint=True)           # joint, one SDPA per shape group
    model.use_varlen_attention()
    calls = []
    real = torch.nn.attention.varlen.varlen_attn
    import tubevit_ext.models.tubevit as tvm
    tvm._varlen_attn = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        got_logits, got_grads = run(joint=True)
    finally:
        tvm._varlen_attn = real
    assert len(calls) == 2  # one call per block for the whole batch of four shape groups
    for g, w, s in zip(got_logits, want_logits, group_logits):
        torch.testing.assert_close(g, w, rtol=3e-2, atol=3e-2)
        torch.testing.assert_close(g, s, rtol=3e-2, atol=3e-2)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=5e-2, atol=5e-2 * max(1.0, w.abs().max().item()))
