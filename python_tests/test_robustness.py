"""Bad input gets a clear error; nothing crashes, hangs or silently corrupts.
NaN/Inf, 64-bit indexing, determinism, memory stability."""
import gc
import subprocess
import sys
import textwrap

import pytest
import torch

import tubevit_ext as tv
from conftest import make_params

from tubevit_ext.testing import ops as testing_ops

ops = torch.ops.tubevit
TUBES = tv.PAPER_TUBES
SIZE = (20, 28, 28)


def _args(device="cpu", dtype=torch.float32, B=2, C=3, d=6):
    x = torch.randn(B, C, *SIZE, device=device, dtype=dtype)
    ws, bs = make_params(TUBES, C, d, dtype, device)
    pe = tv.sincos_pos_embed(TUBES, SIZE, d, dtype=dtype, device=device)
    return x, ws, bs, pe


# ---------------------------------------------------------------- bad input
BAD_CASES = {
    # name: (mutator of (x, ws, bs, pe, flat), exception type, message regex)
    "x 4-D": (lambda x, ws, bs, pe, fl: (x[0], ws, bs, pe, fl), ValueError, r"x must be 5-D .* got 4-D"),
    "x 6-D": (lambda x, ws, bs, pe, fl: (x[None], ws, bs, pe, fl), ValueError, r"x must be 5-D"),
    "channels": (lambda x, ws, bs, pe, fl: (x[:, :2], ws, bs, pe, fl), ValueError,
                 r"weights\[0\] must have shape \(d, C=2, 8, 8, 8\) .* got \[6, 3, 8, 8, 8\]"),
    "zero channels": (lambda x, ws, bs, pe, fl: (x[:, :0], ws, bs, pe, fl), ValueError, r"at least one channel"),
    "int input": (lambda x, ws, bs, pe, fl: (x.long(), [w.long() for w in ws], [], None, fl), TypeError,
                  r"x must have a floating dtype, got Long"),
    "weight dtype": (lambda x, ws, bs, pe, fl: (x, [ws[0].double()] + ws[1:], bs, pe, fl), TypeError,
                     r"weights\[0\] must have the dtype of x \(Float\), got Double"),
    "bias dtype": (lambda x, ws, bs, pe, fl: (x, ws, bs[:3] + [bs[3].half()], pe, fl), TypeError,
                   r"biases\[3\] must have the dtype of x \(Float\), got Half"),
    "pe dtype": (lambda x, ws, bs, pe, fl: (x, ws, bs, pe.double(), fl), TypeError,
                 r"pos_embed must have the dtype of x \(Float\), got Double"),
    "pe shape": (lambda x, ws, bs, pe, fl: (x, ws, bs, pe[:-1], fl), ValueError,
                 r"pos_embed must have shape \(N=5, d=6\), got \[4, 6\]"),
    "pe 1-D": (lambda x, ws, bs, pe, fl: (x, ws, bs, pe.flatten(), fl), ValueError, r"pos_embed must have shape"),
    "too few weights": (lambda x, ws, bs, pe, fl: (x, ws[:3], bs, pe, fl), ValueError,
                        r"weights must hold one tensor per tube \(4\), got 3"),
    "no weights": (lambda x, ws, bs, pe, fl: (x, [], [], None, fl), ValueError, r"weights must hold one tensor per tube"),
    "weight kernel": (lambda x, ws, bs, pe, fl: (x, [ws[1]] + ws[1:], bs, pe, fl), ValueError,
                      r"weights\[0\] must have shape \(d, C=3, 8, 8, 8\) for tube 0 .* got \[6, 3, 16, 4, 4\]"),
    "weight 4-D": (lambda x, ws, bs, pe, fl: (x, [ws[0][:, 0]] + ws[1:], bs, pe, fl), ValueError, r"weights\[0\] must have shape"),
    "d mismatch": (lambda x, ws, bs, pe, fl: (x, ws[:3] + [ws[3][:5]], [], None, fl), ValueError,
                   r"weights\[3\] has d=5 but weights\[0\] has d=6"),
    "bias count": (lambda x, ws, bs, pe, fl: (x, ws, bs[:2], pe, fl), ValueError,
                   r"biases must be empty \(no bias\) or hold one tensor per tube \(4\), got 2"),
    "bias shape": (lambda x, ws, bs, pe, fl: (x, ws, [b[:3] for b in bs], pe, fl), ValueError,
                   r"biases\[0\] must have shape \(6,\), got \[3\]"),
    "empty tubes": (lambda x, ws, bs, pe, fl: (x, ws, bs, pe, []), ValueError, r"at least one tube"),
    "tubes not 9 ints": (lambda x, ws, bs, pe, fl: (x, ws, bs, pe, fl[:-1]), ValueError, r"9 ints per tube"),
    "zero kernel": (lambda x, ws, bs, pe, fl: (x, ws, bs, pe, [0] + fl[1:]), ValueError,
                    r"tube 0 \(kernel=\(0, 8, 8\).* kernel sizes must be >= 1"),
    "zero stride": (lambda x, ws, bs, pe, fl: (x, ws, bs, pe, fl[:4] + [0] + fl[5:]), ValueError, r"tube 0 .* strides must be >= 1"),
    "negative stride": (lambda x, ws, bs, pe, fl: (x, ws, bs, pe, fl[:3] + [-16] + fl[4:]), ValueError, r"strides must be >= 1"),
    "negative offset": (lambda x, ws, bs, pe, fl: (x, ws, bs, pe, fl[:15] + [-1] + fl[16:]), ValueError,
                        r"tube 1 .* offsets must be >= 0"),
    "huge offset": (lambda x, ws, bs, pe, fl: (x, ws, bs, pe, fl[:6] + [2 ** 62] + fl[7:]), ValueError, r"<= 2\^31 - 1"),
    "tube too large": (lambda x, ws, bs, pe, fl: (x[:, :, :15], ws, bs, pe, fl), ValueError,
                       r"tube 1 \(kernel=\(16, 4, 4\), stride=\(6, 32, 32\), offset=\(4, 8, 8\)\) yields no tokens "
                       r"for input size \(T, H, W\) = \(15, 28, 28\)"),
}


@pytest.mark.parametrize("op", ["tube_tokens", "tube_tokens_naive"])
@pytest.mark.parametrize("name", sorted(BAD_CASES))
def test_bad_input_raw_ops(device, op, name):
    mutate, exc, msg = BAD_CASES[name]
    x, ws, bs, pe = _args(device)
    x, ws, bs, pe, flat = mutate(x, ws, bs, pe, tv.flatten_tubes(TUBES))
    with pytest.raises(exc, match=msg):
        getattr(ops if op == "tube_tokens" else testing_ops, op)(x, ws, bs, flat, pe)


def test_bad_input_backward_op(device):
    x, ws, bs, pe = _args(device)
    fl = tv.flatten_tubes(TUBES)
    with pytest.raises(ValueError, match=r"grad_out must have shape \(B=2, N=5, d=6\), got \[2, 5, 7\]"):
        ops.tube_tokens_backward(torch.zeros(2, 5, 7, device=device), x, ws, [], fl, [True, True, True])
    with pytest.raises(TypeError, match=r"grad_out must have the dtype of x"):
        ops.tube_tokens_backward(torch.zeros(2, 5, 6, device=device, dtype=torch.float64), x, ws, [], fl, [True] * 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device mismatch needs a second device type")
def test_device_mismatch():
    x, ws, bs, pe = _args("cpu")
    with pytest.raises(RuntimeError, match=r"weights\[0\] must be on the device of x \(cpu\), got cuda:0"):
        ops.tube_tokens(x, [ws[0].cuda()] + ws[1:], bs, tv.flatten_tubes(TUBES), pe)
    with pytest.raises(RuntimeError, match=r"pos_embed must be on the device of x"):
        ops.tube_tokens(x.cuda(), [w.cuda() for w in ws], [b.cuda() for b in bs], tv.flatten_tubes(TUBES), pe)


def test_bad_input_functional_and_module():
    x, ws, bs, pe = _args()
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got ndarray"):
        tv.tube_tokens(x.numpy(), ws, bs, TUBES)
    with pytest.raises(TypeError, match=r"weights\[2\] must be a torch.Tensor"):
        tv.tube_tokens(x, ws[:2] + [None] + ws[3:], bs, TUBES)
    with pytest.raises(ValueError, match="at least one tube"):
        tv.tube_tokens(x, ws, bs, [])
    with pytest.raises(TypeError, match=r"tubes\[0\]"):
        tv.tube_tokens(x, ws, bs, [5] + list(TUBES[1:]))
    with pytest.raises(ValueError, match=r"kernel entry must be >= 1"):
        tv.SparseTubeTokenizer(3, 8, tubes=[tv.Tube((0, 1, 1), (1, 1, 1))])
    with pytest.raises(ValueError, match=r"in_channels"):
        tv.SparseTubeTokenizer(0, 8)
    m = tv.SparseTubeTokenizer(3, 8)
    with pytest.raises(ValueError, match=r"tube 1 .* yields no tokens for input size \(T, H, W\) = \(15, 28, 28\)"):
        m(torch.randn(1, 3, 15, 28, 28))


def test_bad_calls_never_crash_the_process():
    """Each bad call runs in a child process: a segfault or abort would show
    as a non-zero exit instead of a Python exception."""
    code = textwrap.dedent("""
        import torch, tubevit_ext as tv, tubevit_ext.testing
        ops = torch.ops.tubevit
        x = torch.randn(1, 2, 9, 10, 11)
        w = [torch.randn(3, 2, 2, 2, 2)]
        calls = [
            lambda: ops.tube_tokens(x, w, [], [2, 2, 2, 1, 1, 1, 2**31 - 1, 0, 0], None),
            lambda: ops.tube_tokens(x, w, [], [2, 2, 2, 2**31 - 1, 1, 1, 0, 0, 0], None),
            lambda: ops.tube_tokens(x, w, [], [2**31 - 1, 2, 2, 1, 1, 1, 0, 0, 0], None),
            lambda: ops.tube_tokens(x, w, [torch.randn(3)] * 5, [2, 2, 2, 1, 1, 1, 0, 0, 0], None),
            lambda: ops.tube_tokens(x, w * 3, [], [2, 2, 2, 1, 1, 1, 0, 0, 0] * 2, None),
            lambda: ops.tube_tokens(x, [torch.randn(3, 2, 2, 2)], [], [2, 2, 2, 1, 1, 1, 0, 0, 0], None),
            lambda: ops.tube_tokens(x, w, [], [2, 2, 2, 1, 1, 1, 0, 0, 0], torch.randn(0)),
            lambda: ops.tube_tokens_backward(torch.randn(1), x, w, [], [2, 2, 2, 1, 1, 1, 0, 0, 0], [True] * 3),
            lambda: torch.ops.tubevit_testing.tube_tokens_naive_backward(torch.randn(1, 2, 3), x, w, [2, 2, 2, 1, 1, 1, 0, 0, 0], [True] * 3),
            lambda: ops.tube_tokens(x[..., :0], w, [], [2, 2, 2, 1, 1, 1, 0, 0, 0], None),
            lambda: ops.tube_tokens(torch.randn(1, 2, 9, 10, 11).as_strided((1, 2, 9, 10, 11), (0, 0, 0, 0, 0)), w, [],
                                    [2, 2, 2, 1, 1, 1, 0, 0, 0], None),
        ]
        caught = 0
        for i, c in enumerate(calls):
            try:
                c()
                print("bad call", i, "returned")
            except (RuntimeError, ValueError, TypeError, IndexError) as e:
                caught += 1
        print("done", caught)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    # valid: a huge stride (one position per axis) and a stride-0 input (read
    # in place); every other call must raise
    returned = [line for line in r.stdout.splitlines() if line.endswith("returned")]
    assert returned == ["bad call 1 returned", "bad call 10 returned"] and "done 9" in r.stdout, r.stdout


# ---------------------------------------------------------------- numerics
def test_nan_inf_propagate_like_reference(device):
    x, ws, bs, pe = _args(device, B=2)
    x[0, 1, 3, 5, 7] = float("nan")
    x[1, 0, 0, 20, 3] = float("inf")
    x[1, 2, 9, 2, 2] = -float("inf")
    x.requires_grad_()
    ws = [w.requires_grad_() for w in ws]
    outs = []
    for fn in (tv.tube_tokens, tv.reference.tube_tokens):
        y = fn(x, ws, bs, TUBES, pe)
        g = torch.autograd.grad(y, [x, *ws], torch.ones_like(y))
        outs.append([y, *g])
    for a, b in zip(*outs):
        assert torch.equal(a.isnan(), b.isnan())
        assert torch.equal(a.isposinf(), b.isposinf()) and torch.equal(a.isneginf(), b.isneginf())
    assert outs[0][0].isnan().any()


def test_64bit_indexing_cheap_path():
    """An input of more than 2^31 elements (bf16, ~4.3 GB of untouched virtual
    memory) with the only token at its far corner: every offset the kernel
    computes is past 2^31."""
    T, H, W = 2, 2 ** 15, 2 ** 15 + 64
    assert T * H * W > 2 ** 31
    try:
        x = torch.empty(1, 1, T, H, W, dtype=torch.bfloat16)
    except RuntimeError:
        pytest.skip("cannot reserve 4.3 GB of address space")
    corner = torch.randn(1, 1, 1, 16, 16, dtype=torch.bfloat16)
    x[:, :, 1:, H - 16:, W - 16:] = corner
    tube = tv.Tube((1, 16, 16), (1, 2 ** 15, 2 ** 15), (1, H - 16, W - 16))
    w = torch.randn(4, 1, 1, 16, 16, dtype=torch.bfloat16)
    want = torch.nn.functional.conv3d(corner.float(), w.float()).flatten(2).transpose(1, 2)
    for op in (ops.tube_tokens, testing_ops.tube_tokens_naive):
        got = op(x, [w], [], tube.flat(), None)
        assert got.shape == (1, 1, 4)
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
    del x


@pytest.mark.parametrize("deterministic", [False, True])
def test_bitwise_reproducible(device, deterministic):
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        runs = []
        for _ in range(2):
            torch.manual_seed(0)
            x = torch.randn(3, 3, 33, 40, 36, device=device, requires_grad=True)
            m = tv.SparseTubeTokenizer(3, 20).to(device)
            y = m(x)
            y.square().sum().backward()
            runs.append([y.detach(), x.grad] + [p.grad for p in m.parameters()])
        for a, b in zip(*runs):
            assert torch.equal(a, b)
    finally:
        torch.use_deterministic_algorithms(prev)


def _rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def test_no_memory_growth(device):
    m = tv.SparseTubeTokenizer(3, 16).to(device)
    x = torch.randn(2, 3, 20, 32, 32, device=device, requires_grad=True)

    def step():
        y = m(x)
        y.sum().backward()
        x.grad = None
        m.zero_grad(set_to_none=True)

    for _ in range(100):
        step()
    gc.collect()
    before = torch.cuda.memory_allocated() if device == "cuda" else _rss_mb()
    for _ in range(1000):
        step()
    gc.collect()
    after = torch.cuda.memory_allocated() if device == "cuda" else _rss_mb()
    if device == "cuda":
        assert after == before
    else:
        assert after - before < 8, f"RSS grew by {after - before:.1f} MB over 1000 steps"


def test_device_mismatch_with_meta_tensors():
    # Runs without a GPU: a CPU/meta mix reaches the fake kernel, which must refuse it too.
    x, ws, bs, pe = _args("cpu")
    fl = tv.flatten_tubes(TUBES)
    with pytest.raises(RuntimeError, match=r"weights\[1\] must be on the device of x \(cpu\), got meta"):
        ops.tube_tokens(x, [ws[0], ws[1].to("meta")] + ws[2:], bs, fl, pe)
    with pytest.raises(RuntimeError, match=r"pos_embed must be on the device of x \(meta\), got cpu"):
        ops.tube_tokens(x.to("meta"), [w.to("meta") for w in ws], [b.to("meta") for b in bs], fl, pe)
    y = ops.tube_tokens(x.to("meta"), [w.to("meta") for w in ws], [b.to("meta") for b in bs], fl, pe.to("meta"))
    assert y.device.type == "meta" and y.shape == (2, 5, 6)


def test_model_bad_input():
    from tubevit_ext.models import TubeViT
    m = TubeViT(dim=24, depth=1, num_heads=2, mlp_dim=48, num_classes={"a": 2})
    with pytest.raises(ValueError, match=r"x must be a video \(B, C, T, H, W\) or an image batch \(B, C, H, W\), got shape \(3, 32, 32\)"):
        m(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="in_channels=3"):
        m(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="unknown head 'b'"):
        m(torch.randn(1, 3, 32, 32), head="b")
    with pytest.raises(ValueError, match=r"samples\[1\] must be a \(C, T, H, W\) video or a \(C, H, W\) image"):
        m.forward_pooled([torch.randn(3, 32, 32), torch.randn(32)])
    with pytest.raises(ValueError, match="one head per sample"):
        m.forward_mixed([torch.randn(3, 32, 32)], [])
    with pytest.raises(ValueError, match=r"tube 0 .* yields no tokens"):
        m(torch.randn(1, 3, 4, 32, 32))
    with pytest.raises(ValueError, match="divisible by num_heads"):
        TubeViT(dim=10, depth=1, num_heads=4, mlp_dim=8)


def test_multi_head_model_needs_a_head_name():
    from tubevit_ext.models import TubeViT
    m = TubeViT(dim=24, depth=1, num_heads=2, mlp_dim=48, num_classes={"a": 2, "b": 3})
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"this model has 2 heads \['a', 'b'\]: pass head=<name>"):
        m(x)
    with pytest.raises(ValueError, match=r"pass head=<name>"):
        m.forward_mixed([x[0]], [None])
    assert m(x, head="b").shape == (1, 3)
    one = TubeViT(dim=24, depth=1, num_heads=2, mlp_dim=48, num_classes=4)
    assert one(x).shape == (1, 4)  # a single head needs no name


def test_no_token_message_is_the_same_on_every_path():
    # the functional op (C++ checks), the module (Python position embedding first) and the
    # model's tokenizer name the tube and the size in the same words
    from tubevit_ext.models import TubeViT
    x = torch.randn(1, 3, 15, 28, 28)
    ws = [torch.randn(8, 3, *t.kernel) for t in tv.PAPER_TUBES]
    msgs = []
    for call in (lambda: tv.tube_tokens(x, ws, None, tv.PAPER_TUBES),
                 lambda: tv.SparseTubeTokenizer(3, 12)(x),
                 lambda: TubeViT(dim=12, depth=1, num_heads=2, mlp_dim=24, num_classes=2)(x),
                 lambda: tv.num_tokens(tv.PAPER_TUBES, (15, 28, 28))):
        with pytest.raises(ValueError) as e:
            call()
        msgs.append(str(e.value).splitlines()[0])
    want = ("tube 1 (kernel=(16, 4, 4), stride=(6, 32, 32), offset=(4, 8, 8)) yields no tokens for input "
            "size (T, H, W) = (15, 28, 28): offset + kernel exceeds the input on some axis")
    assert msgs == [want] * 4, msgs


def test_functional_bias_count_and_empty_vmap_are_named():
    tubes = [tv.Tube((2, 4, 4), (2, 4, 4))]
    x = torch.randn(2, 3, 4, 8, 8)
    ws = [torch.randn(5, 3, 2, 4, 4)]
    with pytest.raises(ValueError, match=r"biases must be None or hold one tensor per tube \(1\), got 2"):
        tv.tube_tokens(x, ws, [torch.randn(5), torch.randn(5)], tubes)
    # vmap over weights loops over slices: a size-0 vmapped dimension has none to stack
    with pytest.raises(ValueError, match=r"tubevit.tube_tokens: vmap over a dimension of size 0 is not supported"):
        torch.func.vmap(lambda w: tv.tube_tokens(x, [w], None, tubes))(torch.randn(0, 5, 3, 2, 4, 4))
    # a size-0 vmapped x folds into the batch: an empty result of the right shape
    assert torch.func.vmap(lambda xi: tv.tube_tokens(xi, ws, None, tubes))(torch.randn(0, 2, 3, 4, 8, 8)).shape == (0, 2, 8, 5)
