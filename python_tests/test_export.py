"""Deployment: torch.export (with and without the extension), AOTInductor, ONNX."""
import pytest
import torch

import tubevit_ext as tv
from tubevit_ext import export as tvx
from tubevit_ext.models import TubeViT

from conftest import make_params, max_err

SMALL_TUBES = [tv.Tube((2, 4, 4), (4, 8, 8)), tv.Tube((4, 2, 2), (2, 6, 6), (1, 2, 3)), tv.Tube((1, 8, 8), (8, 8, 8))]


def _tubevit_ops(gm):
    return sorted({str(n.target) for n in gm.graph.nodes if n.op == "call_function" and "tubevit" in str(n.target)})


def _small_model(device, **kw):
    torch.manual_seed(0)
    return TubeViT(dim=24, depth=2, num_heads=2, mlp_dim=48, num_classes={"video": 5, "image": 3}, **kw).to(device).eval()


def test_export_keeps_the_plain_op_and_batch_is_dynamic(device):
    """While torch.export traces, the tokenizer calls tube_tokens (not the
    CPU-only patch-saving op), even with weights that require grad."""
    tok = tv.SparseTubeTokenizer(3, 12, tubes=SMALL_TUBES).to(device)
    assert all(p.requires_grad for p in tok.parameters())
    x = torch.randn(2, 3, 12, 20, 28, device=device)
    ep = tvx.export(tok, (x,), dynamic_batch=True)
    assert _tubevit_ops(ep.graph_module) == ["tubevit.tube_tokens.default"]
    for b in (1, 3):
        xb = torch.randn(b, 3, 12, 20, 28, device=device)
        out = ep.module()(xb)
        assert out.shape == (b, tv.num_tokens(SMALL_TUBES, (12, 20, 28)), 12)
        assert torch.equal(out, tok(xb))
    # the eager module (grad mode, CPU) still takes the patch-saving op
    if device == "cpu":
        with torch.profiler.profile() as prof:
            tok(x)
        assert "tubevit::tube_tokens_with_patches" in {e.name for e in prof.events()}


def test_exported_program_trains_like_eager(device):
    tok = tv.SparseTubeTokenizer(3, 12, tubes=SMALL_TUBES).to(device)
    x = torch.randn(2, 3, 12, 20, 28, device=device, requires_grad=True)
    ep_mod = tvx.export(tok, (x.detach(),)).module()
    g_eager = torch.autograd.grad(tok(x).square().sum(), [x, *tok.parameters()])
    g_exp = torch.autograd.grad(ep_mod(x).square().sum(), [x, *ep_mod.parameters()])
    assert len(g_eager) == len(g_exp)
    for a, b in zip(g_eager, g_exp):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_decompositions_remove_every_tubevit_op(device):
    torch.manual_seed(0)
    ws, bs = make_params(SMALL_TUBES, 3, 12, device=device)
    pe = tv.sincos_pos_embed(SMALL_TUBES, (12, 20, 28), 12, device=device)

    class Both(torch.nn.Module):
        def forward(self, x):
            a = tv.tube_tokens(x, ws, bs, SMALL_TUBES, pe, save_patches=False)
            b, patches = torch.ops.tubevit.tube_tokens_with_patches(x, ws, [], tv.flatten_tubes(SMALL_TUBES), None) \
                if x.device.type == "cpu" else (tv.tube_tokens(x, ws, [], SMALL_TUBES), [])
            return a, b, patches

    x = torch.randn(2, 3, 12, 20, 28, device=device)
    ep = torch.export.export(Both(), (x,))
    assert "tubevit.tube_tokens.default" in _tubevit_ops(ep.graph_module)
    portable = ep.run_decompositions(tvx.decompositions())
    assert _tubevit_ops(portable.graph_module) == []
    assert any("convolution" in str(n.target) for n in portable.graph.nodes)
    a, b, patches = portable.module()(x)
    a_ref, b_ref, patches_ref = Both()(x)
    ref64 = tv.reference.tube_tokens(x.double(), [w.double() for w in ws], [v.double() for v in bs], SMALL_TUBES,
                                     pe.double())
    # the decomposed program is the reference construction in the same dtype
    assert max_err(a, ref64) <= 2 * max_err(tv.reference.tube_tokens(x, ws, bs, SMALL_TUBES, pe), ref64) + 1e-6
    torch.testing.assert_close(a, a_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b, b_ref, rtol=1e-5, atol=1e-5)
    assert len(patches) == len(patches_ref)
    for p, q in zip(patches, patches_ref):  # patches are copies of x: exact
        assert torch.equal(p, q)


def test_decompositions_base_table():
    only_ours = tvx.decompositions(base={})
    assert set(only_ours) == {torch.ops.tubevit.tube_tokens.default, torch.ops.tubevit.tube_tokens_with_patches.default}
    full = tvx.decompositions()
    assert set(only_ours) < set(full) and len(full) > len(only_ours)


@pytest.mark.parametrize("video", [True, False], ids=["video", "image"])
def test_model_exports_with_dynamic_batch(device, video):
    model = _small_model(device)
    shape = (3, 20, 48, 48) if video else (3, 48, 48)
    head = "video" if video else "image"
    x = torch.randn(2, *shape, device=device)
    ep = tvx.export(model, (x,), {"head": head}, dynamic_batch=True)
    portable = tvx.export(model, (x,), {"head": head}, dynamic_batch=True, portable=True)
    assert _tubevit_ops(portable.graph_module) == []
    for b in (1, 3):
        xb = torch.randn(b, *shape, device=device)
        with torch.no_grad():
            ref = model(xb, head=head)
            torch.testing.assert_close(ep.module()(xb, head=head), ref, rtol=0, atol=0)
            torch.testing.assert_close(portable.module()(xb, head=head), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("video", [True, False], ids=["video", "image"])
def test_model_exports_with_dynamic_size(device, video):
    """Frames and frame size symbolic: token count and position embedding
    are computed in the program (paper tubes: 539 tokens at 32x224x224,
    1176 at 64 frames), and the range constraints are where the tubes fit."""
    model = _small_model(device)
    head = "video" if video else "image"
    x = torch.randn(2, 3, 32, 64, 64, device=device) if video else torch.randn(2, 3, 64, 64, device=device)
    ep = tvx.export(model, (x,), {"head": head}, dynamic_batch=True, dynamic_size=True)
    portable = tvx.export(model, (x,), {"head": head}, dynamic_batch=True, dynamic_size=True, portable=True)
    sizes = [(32, 224, 224), (64, 224, 224), (20, 48, 80), (40, 28, 28)] if video else [(224, 224), (48, 96), (16, 32)]
    for i, size in enumerate(sizes):
        xs = torch.randn(1 + i % 3, 3, *size, device=device)
        with torch.no_grad():
            ref = model(xs, head=head)
            torch.testing.assert_close(ep.module()(xs, head=head), ref, rtol=0, atol=0)
            torch.testing.assert_close(portable.module()(xs, head=head), ref, rtol=1e-4, atol=1e-5)
    # the smallest input every paper tube fits: T >= 4 + 16 (tube 1), H, W >= 16 + 12 (tube 2)
    # (the batch's lower bound is at most 2, so it sorts first)
    mins = sorted(int(r.lower) for r in ep.range_constraints.values())
    assert mins[1:] == ([20, 28, 28] if video else [16, 16])
    too_small = torch.randn(1, 3, 19, 48, 48, device=device) if video else torch.randn(1, 3, 15, 48, device=device)
    # the exported program's range guard names the axis and the bound
    with pytest.raises(AssertionError, match=r"Guard failed: x\.size\(\)\[2\] >= 20" if video
                       else r"Guard failed: x\.size\(\)\[2\] >= 16"):
        ep.module()(too_small, head=head)


def test_tokenizer_dynamic_size_token_counts():
    tok = tv.SparseTubeTokenizer(3, 12).eval()
    ep = tvx.export(tok, (torch.randn(1, 3, 32, 224, 224),), dynamic_size=True)
    for size, n in [((32, 224, 224), 539), ((64, 224, 224), 1176)]:
        xs = torch.randn(1, 3, *size)
        out = ep.module()(xs)
        assert out.shape == (1, n, 12) == (1, tv.num_tokens(tv.PAPER_TUBES, size), 12)
        assert torch.equal(out, tok(xs))


def test_export_argument_errors():
    tok = tv.SparseTubeTokenizer(3, 12, tubes=SMALL_TUBES)
    x = torch.randn(1, 3, 12, 20, 28)
    with pytest.raises(ValueError, match="dynamic_batch/dynamic_size or dynamic_shapes"):
        tvx.export(tok, (x,), dynamic_batch=True, dynamic_shapes=({0: torch.export.Dim("b")},))
    with pytest.raises(ValueError, match="need a \\(B, C, ...\\) tensor"):
        tvx.export(tok, (x[0, 0, 0],), dynamic_size=True)


def test_onnx_runtime_matches_eager(tmp_path):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    import onnx
    model = _small_model("cpu")
    x = torch.randn(2, 3, 32, 64, 64)
    path = str(tmp_path / "tubevit.onnx")
    prog = tvx.to_onnx(model, (x,), path, {"head": "video"}, dynamic_batch=True, dynamic_size=True)
    assert prog is not None
    graph = onnx.load(path).graph
    assert "Conv" in {n.op_type for n in graph.node}
    assert not any("tubevit" in (n.domain or "") + n.op_type for n in graph.node)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for shape in [(1, 3, 32, 224, 224), (2, 3, 64, 224, 224), (3, 3, 20, 48, 80)]:
        xb = torch.randn(*shape)
        (out,) = sess.run(None, {sess.get_inputs()[0].name: xb.numpy()})
        with torch.no_grad():
            ref = model(xb, head="video")
        torch.testing.assert_close(torch.from_numpy(out), ref, rtol=1e-4, atol=1e-5)


def test_aot_inductor_package_runs_the_op(tmp_path):
    """AOTInductor keeps the op as an extern call into this library."""
    aoti = getattr(torch._inductor, "aoti_compile_and_package", None)
    if aoti is None:
        pytest.skip("torch._inductor.aoti_compile_and_package needs torch >= 2.6")
    tok = tv.SparseTubeTokenizer(3, 12, tubes=SMALL_TUBES).eval()
    x = torch.randn(2, 3, 12, 20, 28)
    ep = tvx.export(tok, (x,))
    path = aoti(ep, package_path=str(tmp_path / "tok.pt2"))
    runner = torch._inductor.aoti_load_package(path)
    with torch.no_grad():
        torch.testing.assert_close(runner(x), tok(x), rtol=0, atol=0)


# The decompositions are plain functions of the op's arguments: fuzz them against the op itself
# (fp64, so both sides are exact to rounding), tubes with and without overlapping windows.
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import tube_problems as problems  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(problems())
def test_fuzz_decompositions_equal_the_ops(p):
    g = torch.Generator().manual_seed(p["seed"])
    x = torch.randn(p["B"], p["C"], *p["size"], generator=g, dtype=torch.float64)
    ws = [torch.randn(p["d"], p["C"], *t.kernel, generator=g, dtype=torch.float64) for t in p["tubes"]]
    bs = [torch.randn(p["d"], generator=g, dtype=torch.float64) for _ in p["tubes"]] if p["bias"] else []
    flat = tv.flatten_tubes(p["tubes"])
    pe = tv.sincos_pos_embed(p["tubes"], p["size"], p["d"], dtype=torch.float64) if p["pe"] else None
    decomp = tvx.decompositions(base={})
    out = decomp[torch.ops.tubevit.tube_tokens.default](x, ws, bs, flat, pe)
    torch.testing.assert_close(out, torch.ops.tubevit.tube_tokens(x, ws, bs, flat, pe), rtol=1e-12, atol=1e-12)
    out2, patches = decomp[torch.ops.tubevit.tube_tokens_with_patches.default](x, ws, bs, flat, pe)
    ref2, ref_patches = torch.ops.tubevit.tube_tokens_with_patches(x, ws, bs, flat, pe)
    torch.testing.assert_close(out2, ref2, rtol=1e-12, atol=1e-12)
    assert len(patches) == len(ref_patches) == len(p["tubes"])
    for a, b in zip(patches, ref_patches):
        assert a.shape == b.shape and torch.equal(a, b)
