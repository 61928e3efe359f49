"""CPU training keeps the patch matrices for the weight gradient
(tubevit::tube_tokens_with_patches + the `patches` argument of
tube_tokens_backward); recycled buffers come from a small pool."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import tubevit_ext as tv
from conftest import make_params, set_switch

ops = torch.ops.tubevit
TUBES = [tv.Tube((2, 3, 2), (2, 2, 3), (1, 0, 1)), tv.Tube((4, 2, 3), (1, 3, 2), (0, 1, 0)),
         tv.Tube((1, 4, 4), (2, 4, 4))]
SIZE = (7, 9, 11)
LOW = [torch.bfloat16, torch.float16]


def unfold_patches(x, tube):
    """(B, n, C*kt*kh*kw) patch matrix of one tube, K ordered (c, kt, kh, kw)."""
    (kt, kh, kw), (st, sh, sw), (ot, oh, ow) = tube.kernel, tube.stride, tube.offset
    p = x[:, :, ot:, oh:, ow:].unfold(2, kt, st).unfold(3, kh, sh).unfold(4, kw, sw)
    B, C, nt, nh, nw = p.shape[:5]
    return p.permute(0, 2, 3, 4, 1, 5, 6, 7).reshape(B, nt * nh * nw, C * kt * kh * kw)


def make_x(layout, dtype, B=3, C=2):
    x = torch.randn(B, C, *SIZE, dtype=torch.float64).to(dtype)
    if layout == "channels_last_3d":
        return x.contiguous(memory_format=torch.channels_last_3d)
    if layout == "noncontiguous":
        return torch.stack([x, x], dim=2).flatten(1, 2)[:, ::2]
    return x


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, *LOW])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last_3d", "noncontiguous"])
def test_with_patches_outputs(dtype, layout):
    x = make_x(layout, dtype)
    ws, bs = make_params(TUBES, x.shape[1], 5, dtype)
    pe = tv.sincos_pos_embed(TUBES, SIZE, 5, dtype=dtype)
    flat = tv.flatten_tubes(TUBES)
    out, patches = ops.tube_tokens_with_patches(x, ws, bs, flat, pe)
    assert torch.equal(out, ops.tube_tokens(x, ws, bs, flat, pe))  # same GEMMs, same bits
    assert len(patches) == len(TUBES)
    for p, t in zip(patches, TUBES):
        want = unfold_patches(x, t)
        assert p.dtype == dtype and p.is_contiguous() and p.shape == want.shape
        assert torch.equal(p, want)  # copies, exact


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, *LOW])
@pytest.mark.parametrize("chunk_bytes", [None, "64"])
@pytest.mark.parametrize("x_grad", [False, True])
def test_saved_and_recomputed_gradients_are_bitwise_equal(monkeypatch, dtype, chunk_bytes, x_grad):
    if chunk_bytes is not None:  # one-sample chunks: the cross-chunk accumulation paths
        set_switch(monkeypatch, "TUBEVIT_CPU_CHUNK_BYTES", chunk_bytes)
    x0 = make_x("contiguous", dtype)
    ws0, bs0 = make_params(TUBES, x0.shape[1], 5, dtype)
    pe = tv.sincos_pos_embed(TUBES, SIZE, 5, dtype=dtype)
    gout = torch.randn(x0.shape[0], tv.num_tokens(TUBES, SIZE), 5, dtype=torch.float64).to(dtype)
    results = []
    for save, run_dtype in ((True, dtype), (False, dtype), (False, torch.float64)):
        x = x0.to(run_dtype, copy=True).requires_grad_(x_grad)
        ws = [w.to(run_dtype, copy=True).requires_grad_() for w in ws0]
        bs = [b.to(run_dtype, copy=True).requires_grad_() for b in bs0]
        out = tv.tube_tokens(x, ws, bs, TUBES, pe.to(run_dtype), save_patches=save)
        out.backward(gout.to(run_dtype))
        results.append([out] + [t.grad for t in ws + bs] + ([x.grad] if x_grad else []))
    saved, recomputed, exact = results
    # bf16 GEMMs (oneDNN) reading saved patches take the whole batch in one
    # dW GEMM, rounded once; re-gathering goes chunk by chunk (each partial
    # rounded, summed in fp32). Over several chunks dW and db then differ in
    # the last bits: both must be within bf16 rounding of the exact result.
    n = len(TUBES)
    # (the C++ test for native bf16 GEMMs: fast_bf16_gemm() in tube_tokens_cpu.cpp)
    one_gemm = (dtype == torch.bfloat16 and chunk_bytes is not None and torch.backends.mkldnn.is_available()
                and torch.backends.mkldnn.enabled and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    for k, (a, b, e) in enumerate(zip(saved, recomputed, exact)):
        if one_gemm and 1 <= k <= 2 * n:  # dW (1 .. n) and db (n+1 .. 2n)
            tol = 2 ** -6 * e.abs().max().item()
            assert (a.double() - e).abs().max().item() <= tol
            assert (b.double() - e).abs().max().item() <= tol
        else:
            assert torch.equal(a, b)


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (ops.tube_tokens.default, ops.tube_tokens_with_patches.default):
            self.calls.append(func._opname)
        elif func is ops.tube_tokens_backward.default:
            self.calls.append(f"backward with {len(args[3])} patch matrices")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("save,w_grad,grad_mode,expect", [
    (None, True, True, ["tube_tokens_with_patches", "backward with 3 patch matrices"]),
    (False, True, True, ["tube_tokens", "backward with 0 patch matrices"]),
    (None, False, True, ["tube_tokens", "backward with 0 patch matrices"]),  # only x needs grad
    (None, True, False, ["tube_tokens"]),  # no_grad: nothing to save for
    (True, False, True, ["tube_tokens_with_patches", "backward with 0 patch matrices"]),
])
def test_save_policy(save, w_grad, grad_mode, expect):
    m = tv.SparseTubeTokenizer(2, 5, TUBES, save_patches=save)
    m.requires_grad_(w_grad)
    x = torch.randn(2, 2, *SIZE, requires_grad=not w_grad)
    with _RecordOps() as rec, torch.set_grad_enabled(grad_mode):
        out = m(x)
        if grad_mode:
            out.sum().backward()
    assert rec.calls == expect


def test_cuda_ignores_save_patches():
    if not (torch.cuda.is_available() and tv.cuda_compiled()):
        pytest.skip("needs a CUDA GPU and a CUDA build")
    m = tv.SparseTubeTokenizer(2, 5, TUBES, save_patches=True).cuda()
    with _RecordOps() as rec:
        m(torch.randn(2, 2, *SIZE, device="cuda")).sum().backward()
    assert rec.calls == ["tube_tokens", "backward with 0 patch matrices"]


def test_opcheck_with_patches():
    x = torch.randn(2, 2, *SIZE, requires_grad=True)
    ws, bs = make_params(TUBES, 2, 5)
    for t in ws + bs:
        t.requires_grad_()
    pe = tv.sincos_pos_embed(TUBES, SIZE, 5)
    flat = tv.flatten_tubes(TUBES)
    torch.library.opcheck(ops.tube_tokens_with_patches.default, (x, ws, bs, flat, pe))
    torch.library.opcheck(ops.tube_tokens_with_patches.default, (x, ws, [], flat, None))
    _, patches = ops.tube_tokens_with_patches(x.detach(), [w.detach() for w in ws], [], flat, None)
    g = torch.randn(2, tv.num_tokens(TUBES, SIZE), 5)
    for mask in ([True, True, True], [False, True, False]):
        torch.library.opcheck(ops.tube_tokens_backward.default,
                              (g, x.detach(), [w.detach() for w in ws], list(patches), flat, mask))


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_training_step_matches_eager(dynamic):
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = tv.SparseTubeTokenizer(2, 6, TUBES)
    cm = torch.compile(m, fullgraph=True, dynamic=dynamic)
    for size in [SIZE, (8, 13, 12)]:  # a second size: symbolic patch shapes when dynamic
        x = torch.randn(2, 2, *size)
        m(x).square().sum().backward()
        eager = [p.grad.clone() for p in m.parameters()]
        m.zero_grad(set_to_none=True)
        cm(x).square().sum().backward()
        for a, b in zip(eager, [p.grad for p in m.parameters()]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        m.zero_grad(set_to_none=True)


def test_patch_arguments_are_checked(device):
    x = torch.randn(2, 2, *SIZE, device=device)
    ws, _ = make_params(TUBES, 2, 5, device=device)
    flat = tv.flatten_tubes(TUBES)
    g = torch.zeros(2, tv.num_tokens(TUBES, SIZE), 5, device=device)
    good = [unfold_patches(x, t).contiguous() for t in TUBES]
    mask = [False, True, False]
    with pytest.raises(ValueError, match=r"patches must be empty \(gather from x\) or hold one tensor per tube \(3\), got 2"):
        ops.tube_tokens_backward(g, x, ws, good[:2], flat, mask)
    bad = good[:1] + [good[1][:, 1:]] + good[2:]
    with pytest.raises(ValueError, match=r"patches\[1\] must have shape \(B=2, n=\d+, K=48\), got \[2, \d+, 48\]"):
        ops.tube_tokens_backward(g, x, ws, bad, flat, mask)
    with pytest.raises(TypeError, match=r"patches\[2\] must have the dtype of x \(Float\), got Double"):
        ops.tube_tokens_backward(g, x, ws, good[:2] + [good[2].double()], flat, mask)


def test_patch_buffers_are_recycled(monkeypatch):
    set_switch(monkeypatch, "TUBEVIT_CPU_PATCH_CACHE_MB", None)
    m = tv.SparseTubeTokenizer(2, 5, TUBES)
    x = torch.randn(2, 2, *SIZE)
    tv.empty_patch_cache()
    assert tv.patch_cache_bytes() == 0
    m(x).sum().backward()  # graph freed: the three patch buffers and the tokens go to the pool
    held = tv.patch_cache_bytes()
    tokens, patches = ops.tube_tokens_with_patches(x, [p.weight for p in m.projs], [], tv.flatten_tubes(TUBES), None)
    per_step = 4 * tokens.numel() + sum(4 * p.numel() for p in patches)
    del tokens, patches
    assert held == per_step
    m(x).sum().backward()  # reuses them: nothing new is cached
    assert tv.patch_cache_bytes() == held
    tv.empty_patch_cache()
    assert tv.patch_cache_bytes() == 0
    set_switch(monkeypatch, "TUBEVIT_CPU_PATCH_CACHE_MB", "0")
    m(x).sum().backward()
    assert tv.patch_cache_bytes() == 0  # limit 0: freed blocks go back to the system


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_input_gradient_comes_from_the_pool_and_is_an_ordinary_tensor(monkeypatch, tmp_path, dtype):
    """The CPU input gradient (as large as the video) is a pool block: freed,
    it is reused by the next backward instead of fresh pages; handed to the
    user, it behaves like any tensor (resize, numpy, share_memory_, save)."""
    set_switch(monkeypatch, "TUBEVIT_CPU_PATCH_CACHE_MB", None)
    torch.manual_seed(0)
    m = tv.SparseTubeTokenizer(2, 5, TUBES).to(dtype)
    x = torch.randn(2, 2, *SIZE, dtype=dtype, requires_grad=True)
    ref_m = tv.reference.SparseTubeTokenizer(2, 5, TUBES).double()
    ref_m.load_state_dict(m.state_dict())
    ref = x.detach().double().requires_grad_()
    ref_m(ref).square().sum().backward()

    m(x).square().sum().backward()
    first = x.grad
    assert first.shape == x.shape and first.dtype == dtype and first.is_contiguous()
    torch.testing.assert_close(first.double(), ref.grad, rtol=2e-2 if dtype == torch.bfloat16 else 1e-5,
                               atol=2e-2 if dtype == torch.bfloat16 else 1e-5)
    ptr, value = first.data_ptr(), first.clone()
    held = tv.patch_cache_bytes()
    x.grad = None
    del first  # back to the pool ...
    assert tv.patch_cache_bytes() - held >= x.numel() * x.element_size()
    m(x).square().sum().backward()
    assert x.grad.data_ptr() == ptr  # ... and reused, with the same result
    assert torch.equal(x.grad, value)
    # while a gradient is held, the next one gets other memory
    kept = x.grad
    x.grad = None
    m(x).square().sum().backward()
    assert x.grad.data_ptr() != kept.data_ptr() and torch.equal(x.grad, kept)

    g = x.grad.detach()
    torch.save(g, tmp_path / "g.pt")
    assert torch.equal(torch.load(tmp_path / "g.pt"), g)
    g.resize_(g.numel() * 2)  # storage is resizable: a bigger pool block, contents kept
    assert torch.equal(g[:value.numel()].view_as(value), value)
    assert torch.equal(torch.from_numpy(kept.float().numpy()), kept.float())
    h = kept.share_memory_()
    assert h.is_shared() and torch.equal(h, value)


def test_token_output_comes_from_the_pool(monkeypatch):
    set_switch(monkeypatch, "TUBEVIT_CPU_PATCH_CACHE_MB", None)
    m = tv.SparseTubeTokenizer(2, 5, TUBES).eval()
    x = torch.randn(2, 2, *SIZE)
    with torch.no_grad():
        first = m(x)
        ptr, value = first.data_ptr(), first.clone()
        held = tv.patch_cache_bytes()
        del first  # back to the pool ...
        assert tv.patch_cache_bytes() - held >= value.numel() * value.element_size()
        again = m(x)
    assert again.data_ptr() == ptr and torch.equal(again, value)  # ... and reused
    again.resize_(again.numel() * 3)  # an ordinary, resizable tensor
    assert torch.equal(again[:value.numel()].view_as(value), value)


@pytest.mark.parametrize("bias,pe", [(True, True), (True, False), (False, True), (False, False)])
def test_bf16_epilogue_rounds_like_torch(bias, pe):
    # A 1x1x1 tube with one channel and unit weights makes the GEMM an exact
    # copy of x, so the output is the epilogue alone: bf16(x + pe + bias),
    # rounded to nearest even with NaN/Inf kept, as torch rounds.
    d = 37  # odd width: the vectorised loop's tail
    tube = [tv.Tube((1, 1, 1), (1, 1, 1))]
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 1, 3, 4, 5, generator=g) * 100).bfloat16()
    x.view(-1)[:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0])
    w = torch.ones(d, 1, 1, 1, 1, dtype=torch.bfloat16)
    b = (torch.randn(d, generator=g) * 1e-2).bfloat16() if bias else None
    n = tv.num_tokens(tube, (3, 4, 5))
    p = (torch.randn(n, d, generator=g) * 3).bfloat16() if pe else None
    out = tv.tube_tokens(x, [w], None if b is None else [b], tube, p)
    want = x.permute(0, 2, 3, 4, 1).reshape(2, n, 1).float().expand(2, n, d)
    if p is not None:
        want = want + p.float()
    if b is not None:
        want = want + b.float()
    torch.testing.assert_close(out, want.bfloat16(), rtol=0, atol=0, equal_nan=True)


def test_concurrent_training_steps_match_sequential():
    # The ops release the GIL: four threads run forward + backward at once,
    # sharing the patch pool (mutex) and using per-thread workspaces.
    import threading
    torch.manual_seed(0)
    m = tv.SparseTubeTokenizer(2, 5, TUBES)
    xs = [torch.randn(3, 2, *SIZE) for _ in range(4)]

    def grads(x):
        out = m(x)
        return [out.detach()] + list(torch.autograd.grad(out.square().sum(), list(m.parameters())))

    want = [grads(x) for x in xs]
    got = [None] * len(xs)

    def worker(i):
        for _ in range(5):
            got[i] = grads(xs[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for w, g in zip(want, got):
        for a, b in zip(w, g):
            assert torch.equal(a, b)
