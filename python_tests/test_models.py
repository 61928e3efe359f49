"""TubeViT model: sizes, tube variants against plain-PyTorch constructions,
images and joint packed batching, image-ViT initialisation, image-to-video
scaling, compile, autocast."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import tubevit_ext as tv
from tubevit_ext.models import (PAPER_SPACE_TO_DEPTH, TubeTokenizer, TubeViT, inflate_kernel, load_image_vit,
                                tubevit_b, tubevit_h, tubevit_l, tubevit_s, tubevit_ti)
from conftest import reference_rule_bound
from tubevit_ext.pos_embed import sincos_from_positions, sincos_pos_embed

SMALL = dict(dim=48, depth=2, num_heads=4, mlp_dim=96)


def _small(**kw):
    torch.manual_seed(0)
    return TubeViT(**{**SMALL, **kw})


@pytest.mark.parametrize("ctor,dim,depth,heads,mlp", [
    (tubevit_ti, 192, 12, 3, 768), (tubevit_s, 384, 12, 6, 1536), (tubevit_b, 768, 12, 12, 3072),
    (tubevit_l, 1024, 24, 16, 4096), (tubevit_h, 1280, 32, 16, 5120)])
def test_every_size_runs_forward_backward(ctor, dim, depth, heads, mlp, monkeypatch):
    from tubevit_ext.models import tube_tokenizer
    m = ctor(num_classes=7)
    assert (m.dim, len(m.blocks), m.blocks[0].attn.num_heads, m.blocks[0].mlp.fc1.out_features) == (dim, depth, heads, mlp)
    x = torch.randn(1, 3, 20, 28, 28, requires_grad=True)
    w = m.tokenizer.projs[0].weight
    out = m(x)
    assert out.shape == (1, 7)
    got = torch.autograd.grad(out.sum(), [x, w])
    # the same model with the Conv3d reference tokenizer: same output and gradients
    monkeypatch.setattr(tube_tokenizer, "tube_tokens", tv.reference.tube_tokens)
    ref = m(x)
    want = torch.autograd.grad(ref.sum(), [x, w])
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * b.abs().max().item())
    if dim % 6:  # ViT-L/H widths: the position embedding is well defined and distinct per token
        pe = m.tokenizer._pos_embed((20, 28, 28), "video", torch.float32, "cpu")
        assert pe.shape == (5, dim) and torch.unique(pe, dim=0).shape[0] == 5


# ---------------------------------------------------------------- tube variants
def test_per_tube_matches_conv3d():
    tok = TubeTokenizer(3, 24)
    x = torch.randn(2, 3, 32, 64, 48)
    ws = [p.weight for p in tok.projs]
    bs = [p.bias for p in tok.projs]
    want = tv.reference.tube_tokens(x, ws, bs, tv.PAPER_TUBES, sincos_pos_embed(tv.PAPER_TUBES, (32, 64, 48), 24))
    torch.testing.assert_close(tok(x), want, rtol=1e-5, atol=1e-5)


def test_interpolated_kernels_match_plain_construction():
    torch.manual_seed(0)
    tok = TubeTokenizer(3, 24, kernels="interpolated")
    x = torch.randn(2, 3, 32, 64, 48)
    base = tok.base_weight.detach().clone().requires_grad_()
    outs = []
    for t, b in zip(tv.PAPER_TUBES, tok.biases):
        w = F.interpolate(base, size=t.kernel, mode="trilinear", align_corners=False)
        y = F.conv3d(x[:, :, t.offset[0]:, t.offset[1]:, t.offset[2]:], w, b.detach(), stride=t.stride)
        outs.append(y.flatten(2).transpose(1, 2))
    want = torch.cat(outs, 1) + sincos_pos_embed(tv.PAPER_TUBES, (32, 64, 48), 24)
    got = tok(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(got)
    (gb,) = torch.autograd.grad(got, [tok.base_weight], g)
    (wb,) = torch.autograd.grad(want, [base], g)
    torch.testing.assert_close(gb, wb, rtol=1e-4, atol=1e-4)
    assert all(p.grad is None for p in tok.parameters())  # no per-tube kernels exist


def _packed_by_loops(fine, grid, f):
    """Independent packing: token (gt, gh, gw) = concat over members (dt, dh, dw) row-major."""
    B, _, c = fine.shape
    nt, nh, nw = grid
    ft, fh, fw = f
    view = fine.view(B, nt, nh, nw, c)
    rows = []
    for gt, gh, gw in itertools.product(range(nt // ft), range(nh // fh), range(nw // fw)):
        rows.append(torch.cat([view[:, gt * ft + dt, gh * fh + dh, gw * fw + dw]
                               for dt, dh, dw in itertools.product(range(ft), range(fh), range(fw))], dim=-1))
    return torch.stack(rows, dim=1)


@pytest.mark.parametrize("size", [(32, 224, 224), (40, 72, 104)])
def test_space_to_depth_matches_plain_construction(size):
    torch.manual_seed(0)
    d = 24
    tok = TubeTokenizer(3, d, space_to_depth=PAPER_SPACE_TO_DEPTH)
    if size == (32, 224, 224):  # paper Table 12: same token count and width as without it
        assert tok.num_tokens(size) == 539
    x = torch.randn(1, 3, *size)
    parts, positions = [], []
    for i, t in enumerate(tv.PAPER_TUBES):
        w, b = tok.projs[i].weight, tok.projs[i].bias
        f = PAPER_SPACE_TO_DEPTH.get(i, (1, 1, 1))
        stride = tuple(s // fa for s, fa in zip(t.stride, f))
        y = F.conv3d(x[:, :, t.offset[0]:, t.offset[1]:, t.offset[2]:], w, b, stride=stride)
        grid = tuple(y.shape[2:])
        fine = y.flatten(2).transpose(1, 2)
        parts.append(_packed_by_loops(fine, grid, f))
        assert w.shape[0] == d // (f[0] * f[1] * f[2])
        # positions: mean of member centres, computed directly
        for gt, gh, gw in itertools.product(range(grid[0] // f[0]), range(grid[1] // f[1]), range(grid[2] // f[2])):
            c = [sum(t.offset[a] + stride[a] * (g * f[a] + m) + t.kernel[a] // 2 for m in range(f[a])) / f[a]
                 for a, g in enumerate((gt, gh, gw))]
            positions.append(c)
    want = torch.cat(parts, 1) + sincos_from_positions(torch.tensor(positions, dtype=torch.float64), d).float()
    got = tok(x)
    assert got.shape == want.shape == (1, tok.num_tokens(size), d)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_variant_errors():
    with pytest.raises(ValueError, match="not divisible by S=4"):
        TubeTokenizer(3, 10, space_to_depth={1: (1, 2, 2)})
    with pytest.raises(ValueError, match="stride"):
        TubeTokenizer(3, 24, space_to_depth={1: (4, 1, 1)})  # stride 6 not divisible by 4
    with pytest.raises(ValueError, match="per_tube"):
        TubeTokenizer(3, 24, kernels="interpolated", space_to_depth={0: (2, 1, 1)})
    with pytest.raises(ValueError, match="no image tube"):
        TubeTokenizer(3, 24, tubes=tv.PAPER_TUBES[:3])(torch.randn(1, 3, 32, 32))


# ---------------------------------------------------------------- images and joint batching
def test_image_tokens_share_the_video_tube():
    tok = TubeTokenizer(3, 24)
    img = torch.randn(2, 3, 224, 224)
    y = tok(img)
    assert y.shape == (2, 196, 24)
    p = tok.projs[3]
    want = tv.reference.tube_tokens(img[:, :, None], [p.weight], [p.bias], [tv.IMAGE_TUBE],
                                    sincos_pos_embed([tv.IMAGE_TUBE], (1, 224, 224), 24))
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


def _mixed():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(3, 32, 64, 64, generator=g), torch.randn(3, 64, 64, generator=g),
            torch.randn(3, 24, 48, 80, generator=g), torch.randn(3, 32, 64, 64, generator=g),
            torch.randn(3, 32, 48, generator=g), torch.randn(3, 64, 64, generator=g)]


def test_mixed_batch_equals_each_sample_alone():
    m = _small(num_classes={"video": 5, "image": 3})
    samples = _mixed()
    together = m.forward_pooled(samples)
    alone = torch.cat([m.forward_pooled([s]) for s in samples])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    # and equal to the plain batched path for a same-shape batch
    torch.testing.assert_close(m(torch.stack([samples[0], samples[3]]), head="video"),
                               torch.stack(m.forward_mixed([samples[0], samples[3]], ["video", "video"])),
                               rtol=1e-5, atol=1e-5)


def test_mixed_batch_no_cross_talk_and_no_dense_mask(monkeypatch):
    m = _small(num_classes=4)
    samples = _mixed()
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *a, **kw):
        assert "attn_mask" not in kw and not a
        calls.append(tuple(k.shape))
        return real(q, k, v)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    base = m.forward_pooled(samples)
    lengths = {m.tokenizer.num_tokens(tuple(s.shape[1:])) for s in samples}
    assert {c[2] for c in calls} == lengths  # every attention call is within one sample length
    assert max(c[0] * c[2] for c in calls) <= sum(m.tokenizer.num_tokens(tuple(s.shape[1:])) for s in samples)
    changed = list(samples)
    changed[2] = changed[2] * 3 + 1
    other = m.forward_pooled(changed)
    keep = [i for i in range(len(samples)) if i != 2]
    torch.testing.assert_close(other[keep], base[keep], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(other[2], base[2])


def test_joint_loss_per_head():
    m = _small(num_classes={"video": 5, "image": 3})
    samples = _mixed()
    heads = ["video", "image", "video", "video", "image", "image"]
    labels = [1, 2, 4, 0, 1, 0]
    total, per = m.joint_loss(samples, heads, labels, weights={"image": 0.5})
    logits = m.forward_mixed(samples, heads)
    v = F.cross_entropy(torch.stack([logits[i] for i in (0, 2, 3)]), torch.tensor([1, 4, 0]))
    im = F.cross_entropy(torch.stack([logits[i] for i in (1, 4, 5)]), torch.tensor([2, 1, 0]))
    torch.testing.assert_close(per["video"], v)
    torch.testing.assert_close(total, v + 0.5 * im)  # gradients: test_model_formulas.py
    with pytest.raises(ValueError, match="unknown head"):
        m.forward_mixed(samples[:1], ["audio"])


# ---------------------------------------------------------------- image ViT initialisation
def _check_blocks_match(model, ref_blocks, run_ref):
    x = torch.randn(2, 9, model.dim)
    ours = x.reshape(-1, model.dim)
    layout = tv.models.PackedLayout(((2, 9),), (0, 1))
    for blk, rblk in zip(model.blocks, ref_blocks):
        ours = blk(ours, layout)
        x = run_ref(rblk, x)
        torch.testing.assert_close(ours.view(2, 9, -1), x, rtol=1e-5, atol=1e-5)


def test_load_torchvision_vit():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    ref = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=4,
                                               hidden_dim=48, mlp_dim=96)
    m = _small(num_classes=3)
    unused = load_image_vit(m, ref.state_dict())
    assert set(unused) == {"class_token", "encoder.pos_embedding", "heads.head.weight", "heads.head.bias"}
    _check_blocks_match(m, ref.encoder.layers, lambda blk, x: blk(x))
    torch.testing.assert_close(m.norm.weight, ref.encoder.ln.weight)
    img = torch.randn(2, 3, 32, 32)
    want = ref.conv_proj(img).flatten(2).transpose(1, 2)
    got = m.tokenizer(img) - m.tokenizer._pos_embed((1, 32, 32), "image", torch.float32, "cpu")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_load_timm_vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ref = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=16, embed_dim=48, depth=2,
                                                           num_heads=4, mlp_ratio=2.0, num_classes=3)
    m = _small(num_classes=3)
    unused = load_image_vit(m, ref.state_dict())
    assert {"cls_token", "pos_embed", "head.weight", "head.bias"} <= set(unused)
    _check_blocks_match(m, ref.blocks, lambda blk, x: blk(x))
    img = torch.randn(2, 3, 32, 32)
    got = m.tokenizer(img) - m.tokenizer._pos_embed((1, 32, 32), "image", torch.float32, "cpu")
    torch.testing.assert_close(got, ref.patch_embed(img), rtol=1e-5, atol=1e-5)


def test_inflation_keeps_constant_and_static_responses():
    torch.manual_seed(0)
    w2d = torch.randn(8, 3, 16, 16, dtype=torch.float64)
    colour = torch.randn(3, dtype=torch.float64)
    patch_response = (w2d * colour[None, :, None, None]).sum((1, 2, 3))
    for kernel in [(8, 8, 8), (16, 4, 4), (1, 16, 16), (2, 16, 16)]:
        w = inflate_kernel(w2d, kernel)
        assert w.shape == (8, 3, *kernel)
        # a constant-colour video gives the image patch response (integer resize factors)
        torch.testing.assert_close((w * colour[None, :, None, None, None]).sum((1, 2, 3, 4)), patch_response)
    torch.testing.assert_close(inflate_kernel(w2d, (1, 16, 16))[:, :, 0], w2d)
    # static video == image for a tube with the full 16x16 kernel
    img = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    w = inflate_kernel(w2d, (4, 16, 16))
    torch.testing.assert_close(F.conv3d(img[:, :, None].expand(-1, -1, 4, -1, -1), w).flatten(),
                               F.conv2d(img, w2d).flatten())


# ---------------------------------------------------------------- image-to-video scaling
def test_image_to_video_scaling_starts_as_the_image_model():
    m = _small(num_classes=3)
    x = torch.randn(2, 3, 32, 64, 64)
    before = m(x)
    m.enable_image_to_video_scaling(1)
    after = m(x)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert not any(p.requires_grad for p in m.blocks[0].parameters())
    assert all(p.requires_grad for p in m.blocks[1].parameters())
    after.sum().backward()
    # d out / d alpha at alpha = 0, against a central difference in fp64
    m64 = _small(num_classes=3).double()
    m64.enable_image_to_video_scaling(1)
    x64 = x.double()
    grad = torch.autograd.grad(m64(x64).sum(), m64.blocks[1].gate_alpha)[0]
    with torch.no_grad():
        m64.blocks[1].gate_alpha.fill_(1e-6)
        up = m64(x64).sum()
        m64.blocks[1].gate_alpha.fill_(-1e-6)
        down = m64(x64).sum()
    assert grad.abs() > 0
    torch.testing.assert_close(grad, ((up - down) / 2e-6).reshape(1), rtol=1e-5, atol=1e-8)
    # a state_dict saved while the gate was 0-d still loads
    sd = m64.state_dict()
    sd["blocks.1.gate_alpha"] = torch.tensor(0.25, dtype=torch.float64)
    m64.load_state_dict(sd)
    assert m64.blocks[1].gate_alpha.shape == (1,) and m64.blocks[1].gate_alpha.item() == 0.25
    with torch.no_grad():
        m.blocks[1].gate_alpha.fill_(0.5)
    assert not torch.allclose(m(x), before)


def _saved_bytes_and_grads(m, x):
    """(output, gradients of x and trainable parameters, bytes autograd saved in the forward)."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = m(x)
    grads = torch.autograd.grad(out.square().sum(), [x, *[p for p in m.parameters() if p.requires_grad]])
    return out, grads, sum(saved)


@pytest.mark.parametrize("scaling", [False, True], ids=["plain", "image_to_video_scaling"])
def test_grad_checkpointing_same_gradients_less_saved_memory(scaling):
    x = torch.randn(2, 3, 32, 64, 64, requires_grad=True)
    per_depth = {}
    for depth in (2, 4):
        m = _small(num_classes=3, depth=depth)
        if scaling:
            m.enable_image_to_video_scaling(1)
            with torch.no_grad():
                m.blocks[1].gate_alpha.fill_(0.3)
        out0, g0, bytes0 = _saved_bytes_and_grads(m, x)
        m.set_grad_checkpointing()
        out1, g1, bytes1 = _saved_bytes_and_grads(m, x)
        torch.testing.assert_close(out1, out0, rtol=0, atol=0)
        assert len(g1) == len(g0)
        for a, b in zip(g1, g0):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        with torch.no_grad():
            torch.testing.assert_close(m(x), out0, rtol=0, atol=0)
        per_depth[depth] = (bytes0, bytes1)
        m.set_grad_checkpointing(False)
        assert m.grad_checkpointing is False
    # what two more blocks add to the saved activations: everything they
    # compute without checkpointing, only their inputs with it
    plain = per_depth[4][0] - per_depth[2][0]
    ckpt = per_depth[4][1] - per_depth[2][1]
    assert plain > 0 and ckpt < plain / 4, (ckpt, plain)


# ---------------------------------------------------------------- compile and autocast
def test_compile_whole_model():
    torch._dynamo.reset()
    m = _small(num_classes=3, depth=1)
    x = torch.randn(2, 3, 32, 64, 64, requires_grad=True)
    eager = m(x)
    cm = torch.compile(m, fullgraph=True)
    out = cm(x)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)
    g1 = torch.autograd.grad(out.sum(), [x, m.tokenizer.projs[0].weight])
    g2 = torch.autograd.grad(eager.sum(), [x, m.tokenizer.projs[0].weight])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_bf16_autocast(monkeypatch):
    # under bf16 autocast the model's error against its fp32 output stays within the project's
    # rule of the same model with the Conv3d reference tokenizer (everything else identical)
    from tubevit_ext.models import tube_tokenizer
    m = _small(num_classes=3)
    x = torch.randn(2, 3, 32, 64, 64)
    exact = m(x).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
    with monkeypatch.context() as mp, torch.no_grad():
        mp.setattr(tube_tokenizer, "tube_tokens", tv.reference.tube_tokens)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref = m(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    err, ref_err = (out.float() - exact).abs().max().item(), (ref.float() - exact).abs().max().item()
    assert err <= reference_rule_bound(ref_err, exact, torch.bfloat16), (err, ref_err)
    out.float().sum().backward()
    assert m.tokenizer.projs[0].weight.grad.dtype == torch.float32
    assert torch.isfinite(m.tokenizer.projs[0].weight.grad).all()


def test_demo_learns_motion_and_colour(capsys):
    from tubevit_ext import demo
    acc_v, acc_i = demo.main(["--steps", "400", "--eval", "256", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "head 'motion'" in out and "chance 0.250" in out
    assert acc_v > 0.5 and acc_i > 0.9  # chance: 0.25 and 0.33


@pytest.mark.parametrize("preset", ["paper", "paper_space_to_depth", "paper_interpolated"])
def test_presets_build_and_run(preset):
    from tubevit_ext.models import PRESETS
    m = TubeViT(**SMALL, num_classes=2, **PRESETS[preset])
    assert m.tokenizer.num_tokens((32, 224, 224)) == 539
    assert m(torch.randn(1, 3, 32, 64, 64)).shape == (1, 2)
