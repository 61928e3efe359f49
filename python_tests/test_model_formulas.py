"""The model layer's formulas pinned one by one, independently of the code paths they live in:
the image-to-video gate, kernel inflation (non-square, shrinking and growing), image-ViT
state_dict mapping key by key (hand-built torchvision and timm layouts, no packages needed),
joint batches against per-sample forwards, fake kernels against the real ops. Each test says
which planted bug it catches; python_tests/mutants.py plants them."""
import math
import random

import pytest
import torch
import torch.nn.functional as F

import tubevit_ext as tv
from conftest import random_tubes, torchvision_vit_state_dict as _torchvision_sd
from tubevit_ext.models import PackedLayout, TubeViT, inflate_kernel, load_image_vit

SMALL = dict(dim=24, depth=2, num_heads=2, mlp_dim=48)


def _model(**kw):
    torch.manual_seed(0)
    return TubeViT(**{**SMALL, "num_classes": 3, **kw}).double()


# ---------------------------------------------------------------- image-to-video gate (paper §3.6)
def test_gate_adds_tanh_alpha_times_the_tube_tokens():
    # z_s = MLP(LN(y_s)) + y_s + tanh(alpha) * z_0: with z_0 != the block's input and alpha where
    # tanh(alpha) != alpha, the block's output moves by exactly tanh(alpha) * z_0
    # (catches alpha * z0, and adding the block input instead of z0)
    m = _model()
    m.enable_image_to_video_scaling(1)
    blk = m.blocks[1]
    with torch.no_grad():
        blk.gate_alpha.fill_(0.9)
    layout = PackedLayout(((2, 5),), (0, 1))
    x, z0 = torch.randn(10, 24, dtype=torch.float64), torch.randn(10, 24, dtype=torch.float64)
    with torch.no_grad():
        delta = blk(x, layout, z0) - blk(x, layout, None)
    torch.testing.assert_close(delta, math.tanh(0.9) * z0, rtol=1e-12, atol=1e-12)


def test_gated_block_receives_the_tokenizer_output():
    # _encode hands block `layer` the tube tokens z_0 (the tokenizer's output), not its own input
    m = _model(depth=3)
    m.enable_image_to_video_scaling(2)
    with torch.no_grad():
        m.blocks[2].gate_alpha.fill_(0.5)
    seen = {}
    m.blocks[2].register_forward_pre_hook(lambda mod, args: seen.update(x=args[0], z=args[2]))
    video = torch.randn(2, 3, 32, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        m(video)
        tokens = m.tokenizer(video).reshape(-1, 24)
    torch.testing.assert_close(seen["z"], tokens, rtol=0, atol=0)
    assert not torch.allclose(seen["x"], tokens)  # the block's input differs: the test can tell them apart


def test_scaling_layer_out_of_range_is_named():
    m = _model()
    for layer in (-1, 2):
        with pytest.raises(ValueError, match=r"layer must be in \[0, 2\), got " + str(layer)):
            m.enable_image_to_video_scaling(layer)


# ---------------------------------------------------------------- kernel inflation
def _expected_inflation(w2d, kernel):
    """The documented formula, written out: resize (area when shrinking, bilinear when growing),
    scale by (ph * pw) / (kh * kw), repeat over kt and divide by kt."""
    kt, kh, kw = kernel
    ph, pw = w2d.shape[-2:]
    mode = dict(mode="area") if kh <= ph and kw <= pw else dict(mode="bilinear", align_corners=False)
    w = F.interpolate(w2d, size=(kh, kw), **mode) * (ph * pw) / (kh * kw)
    return torch.stack([w / kt] * kt, dim=2)


@pytest.mark.parametrize("kernel", [(2, 8, 4), (3, 4, 16), (1, 20, 24), (2, 32, 12), (4, 12, 12)],
                         ids=["shrink-nonsquare", "shrink-wide", "grow-nonsquare", "grow-tall", "shrink-12"])
def test_inflation_formula_nonsquare_and_growing(kernel):
    torch.manual_seed(1)
    w2d = torch.randn(6, 3, 16, 16, dtype=torch.float64)
    w = inflate_kernel(w2d, kernel)
    assert w.shape == (6, 3, *kernel)
    torch.testing.assert_close(w, _expected_inflation(w2d, kernel), rtol=1e-12, atol=1e-12)
    # and what the formula is for: a constant-colour clip gives (about) the patch's response.
    # Area shrinking by integer factors keeps it exactly, bilinear growth on both axes to within
    # a few % (a kernel growing on one axis and shrinking on the other is pinned by the formula only)
    exact = 16 % kernel[1] == 0 and 16 % kernel[2] == 0
    if not exact and not (kernel[1] >= 16 and kernel[2] >= 16):
        return
    colour = torch.randn(3, dtype=torch.float64)
    ref = (w2d * colour[None, :, None, None]).sum((1, 2, 3))
    got = (w * colour[None, :, None, None, None]).sum((1, 2, 3, 4))
    tol = 1e-12 if exact else 0.08 * ref.abs().max().item()
    assert (got - ref).abs().max().item() <= tol, (got, ref)


# ---------------------------------------------------------------- image-ViT state_dicts, key by key
# ours <- torchvision suffix, per block
_TV_BLOCK = {"norm1": "ln_1", "norm2": "ln_2", "attn.qkv.weight": "self_attention.in_proj_weight",
             "attn.qkv.bias": "self_attention.in_proj_bias", "attn.proj": "self_attention.out_proj",
             "mlp.fc1": "mlp.0", "mlp.fc2": "mlp.3"}
# ours <- timm suffix, per block
_TIMM_BLOCK = {"norm1": "norm1", "norm2": "norm2", "attn.qkv.weight": "attn.qkv.weight", "attn.qkv.bias": "attn.qkv.bias",
               "attn.proj": "attn.proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


def _timm_sd(dim=24, depth=2, mlp=48, classes=5):
    tv_sd = _torchvision_sd(dim, depth, mlp, classes)
    sd = {"cls_token": tv_sd["class_token"], "pos_embed": tv_sd["encoder.pos_embedding"],
          "patch_embed.proj.weight": tv_sd["conv_proj.weight"], "patch_embed.proj.bias": tv_sd["conv_proj.bias"],
          "norm.weight": tv_sd["encoder.ln.weight"], "norm.bias": tv_sd["encoder.ln.bias"],
          "head.weight": tv_sd["heads.head.weight"], "head.bias": tv_sd["heads.head.bias"]}
    for i in range(depth):
        for ours, theirs_tv in _TV_BLOCK.items():
            theirs = _TIMM_BLOCK[ours]
            for suffix in ([""] if ours.endswith(("weight", "bias")) else [".weight", ".bias"]):
                sd[f"blocks.{i}.{theirs}{suffix}"] = tv_sd[f"encoder.layers.encoder_layer_{i}.{theirs_tv}{suffix}"]
    return sd


def _huggingface_sd(layout="hub", prefix="vit."):
    """The timm-layout state_dict of _timm_sd in HuggingFace ViT's names: the google/vit-* hub
    layout (encoder.layer.i.attention.attention.query ...) or transformers 5's (layers.i.*.q_proj)."""
    t = _timm_sd()
    d = 24
    sd = {prefix + "embeddings.cls_token": t["cls_token"], prefix + "embeddings.position_embeddings": t["pos_embed"],
          prefix + "embeddings.patch_embeddings.projection.weight": t["patch_embed.proj.weight"],
          prefix + "embeddings.patch_embeddings.projection.bias": t["patch_embed.proj.bias"],
          prefix + "layernorm.weight": t["norm.weight"], prefix + "layernorm.bias": t["norm.bias"],
          "classifier.weight": t["head.weight"], "classifier.bias": t["head.bias"]}
    for i in range(2):
        b, L = f"blocks.{i}.", (f"{prefix}encoder.layer.{i}." if layout == "hub" else f"{prefix}layers.{i}.")
        for s in ("weight", "bias"):
            q, k, v = t[b + f"attn.qkv.{s}"].split(d)
            names = ({"q": "attention.attention.query", "k": "attention.attention.key", "v": "attention.attention.value",
                      "o": "attention.output.dense", "fc1": "intermediate.dense", "fc2": "output.dense"} if layout == "hub" else
                     {"q": "attention.q_proj", "k": "attention.k_proj", "v": "attention.v_proj", "o": "attention.o_proj",
                      "fc1": "mlp.fc1", "fc2": "mlp.fc2"})
            sd.update({L + f"{names['q']}.{s}": q, L + f"{names['k']}.{s}": k, L + f"{names['v']}.{s}": v,
                       L + f"{names['o']}.{s}": t[b + f"attn.proj.{s}"], L + f"{names['fc1']}.{s}": t[b + f"mlp.fc1.{s}"],
                       L + f"{names['fc2']}.{s}": t[b + f"mlp.fc2.{s}"],
                       L + f"layernorm_before.{s}": t[b + f"norm1.{s}"], L + f"layernorm_after.{s}": t[b + f"norm2.{s}"]})
    return sd, t


@pytest.mark.parametrize("layout,prefix", [("hub", "vit."), ("hub", ""), ("v5", "vit."), ("v5", "")])
def test_huggingface_vit_mapping_key_by_key(layout, prefix):
    # the same weights through both HuggingFace layouts land where the timm layout puts them
    torch.manual_seed(0)
    sd, timm_sd = _huggingface_sd(layout, prefix)
    torch.manual_seed(1)
    a = TubeViT(**SMALL, num_classes=3)
    torch.manual_seed(1)
    b = TubeViT(**SMALL, num_classes=3)
    unused = load_image_vit(a, sd)
    load_image_vit(b, timm_sd)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(va, vb, rtol=0, atol=0, msg=ka)
    assert set(unused) == {prefix + "embeddings.cls_token", prefix + "embeddings.position_embeddings",
                           "classifier.weight", "classifier.bias"}


def test_huggingface_vit_built_by_transformers():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                                 image_size=32, patch_size=16, layer_norm_eps=1e-6, num_labels=4)
    ref = transformers.ViTForImageClassification(cfg).eval()
    m = TubeViT(**SMALL, num_classes=3).eval()
    load_image_vit(m, ref.state_dict())
    # block by block on the same tokens (the embeddings differ by design: fixed sin/cos, tubes)
    layers = getattr(ref.vit, "layers", None) or ref.vit.encoder.layer
    x = torch.randn(2, 5, 24)
    ours = x.reshape(-1, 24)
    layout = PackedLayout(((2, 5),), (0, 1))
    with torch.no_grad():
        for blk, rblk in zip(m.blocks, layers):
            ours = blk(ours, layout)
            out = rblk(x)
            x = out[0] if isinstance(out, tuple) else out
            torch.testing.assert_close(ours.view(2, 5, -1), x, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m.norm(ours).view(2, 5, -1), ref.vit.layernorm(x), rtol=1e-5, atol=1e-5)
    img = torch.randn(1, 3, 32, 32)
    want = ref.vit.embeddings.patch_embeddings(img)
    got = m.tokenizer(img) - m.tokenizer._pos_embed((1, 32, 32), "image", torch.float32, "cpu")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


CLIP_MODEL = dict(SMALL, pre_norm=True, eps=1e-5, act="quick_gelu")


def _clip_tower(fmt):
    """A randomly initialised whole CLIP model (vision and text towers) built by its own library:
    transformers' CLIPModel or OpenCLIP's CLIP with QuickGELU; returns (model, its vision blocks,
    pre-norm, post-norm, patch conv, the keys load_image_vit should leave unused)."""
    torch.manual_seed(0)
    if fmt == "clip":
        transformers = pytest.importorskip("transformers")
        vis = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                   patch_size=16, hidden_act="quick_gelu")
        ref = transformers.CLIPModel(transformers.CLIPConfig(
            vision_config=vis, text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                num_attention_heads=2), projection_dim=8)).eval()
        v = ref.vision_model
        for p in v.parameters():  # LayerNorms start at (1, 0): randomise every parameter
            torch.nn.init.normal_(p, std=0.2)
        layers = [lambda x, L=L: L(x, None) for L in v.encoder.layers]
        unused_tower = {"vision_model.embeddings.class_embedding", "vision_model.embeddings.position_embedding.weight",
                        "visual_projection.weight"}
        return ref, layers, v.pre_layrnorm, v.post_layernorm, v.embeddings.patch_embedding, unused_tower
    open_clip = pytest.importorskip("open_clip")
    ref = open_clip.CLIP(embed_dim=8, vision_cfg=dict(layers=2, width=24, head_width=12, mlp_ratio=2.0, patch_size=16,
                                                      image_size=32),
                         text_cfg=dict(context_length=8, vocab_size=50, width=16, heads=2, layers=1),
                         quick_gelu=True).eval()
    v = ref.visual
    for p in v.parameters():
        torch.nn.init.normal_(p, std=0.2)
    layers = [lambda x, L=L: L(x) for L in v.transformer.resblocks]
    return ref, layers, v.ln_pre, v.ln_post, v.conv1, {"visual.class_embedding", "visual.positional_embedding",
                                                         "visual.proj"}


@pytest.mark.parametrize("fmt", ["clip", "open_clip"])
def test_clip_vision_towers_built_by_their_libraries(fmt):
    """A whole CLIP model's state_dict (format told apart automatically): the tower's blocks,
    pre- and post-norm compute what the library's own modules compute on the same tokens, the
    image tube is the patch convolution (no bias), and the text tower, class and position
    embeddings and projection come back unused."""
    ref, layers, pre, post, conv, unused_tower = _clip_tower(fmt)
    sd = ref.state_dict()
    m = TubeViT(**CLIP_MODEL, num_classes=3).eval()
    unused = load_image_vit(m, sd)
    text = {k for k in sd if not k.startswith("vision_model." if fmt == "clip" else "visual.")} - unused_tower
    assert set(unused) == unused_tower | text and any("text" in k or "transformer." in k for k in text)
    x = torch.randn(2, 5, 24)
    layout = PackedLayout(((2, 5),), (0, 1))
    with torch.no_grad():
        ours, want = m.norm_pre(x.reshape(-1, 24)), pre(x)
        torch.testing.assert_close(ours.view(2, 5, -1), want, rtol=1e-5, atol=1e-5)
        for blk, layer in zip(m.blocks, layers):
            ours, want = blk(ours, layout), layer(want)
            want = want[0] if isinstance(want, tuple) else want
            torch.testing.assert_close(ours.view(2, 5, -1), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m.norm(ours).view(2, 5, -1), post(want), rtol=1e-5, atol=1e-5)
        img = torch.randn(1, 3, 32, 32)
        got = m.tokenizer(img) - m.tokenizer._pos_embed((1, 32, 32), "image", torch.float32, "cpu")
        torch.testing.assert_close(got, conv(img).flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-5)
    # the tower alone (CLIPVisionModel / VisionTransformer: no prefix) loads the same weights
    tower = ref.vision_model if fmt == "clip" else ref.visual
    m2 = TubeViT(**CLIP_MODEL, num_classes=3)
    load_image_vit(m2, tower.state_dict(), fmt=fmt)
    for (k, a), b in zip(m.state_dict().items(), m2.state_dict().values()):
        if not k.startswith(("pool.", "heads.")):  # freshly initialised, not loaded
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


def test_clip_towers_need_the_pre_norm_and_name_what_they_cannot_map():
    pytest.importorskip("open_clip")
    ref = _clip_tower("open_clip")[0]
    with pytest.raises(ValueError, match=r"the open_clip ViT normalises its tokens before the first block .* "
                                         r"build it with pre_norm=True"):
        load_image_vit(TubeViT(**SMALL, num_classes=3), ref.state_dict())
    sd = dict(ref.state_dict(), **{"visual.transformer.resblocks.0.ls_1.gamma": torch.ones(24)})  # layer scale
    with pytest.raises(ValueError, match=r"keys of the open_clip state_dict that map to nothing in TubeViT: "
                                         r"\['visual.transformer.resblocks.0.ls_1.gamma'\]"):
        load_image_vit(TubeViT(**CLIP_MODEL, num_classes=3), sd)
    with pytest.raises(ValueError, match=r"not a HuggingFace CLIP vision tower"):
        load_image_vit(TubeViT(**CLIP_MODEL, num_classes=3), ref.state_dict(), fmt="clip")
    with pytest.raises(ValueError, match=r"act must be one of \['gelu', 'quick_gelu'\], got 'relu'"):
        TubeViT(**SMALL, act="relu")


def test_pre_norm_and_quick_gelu_options(tmp_path):
    """pre_norm adds a LayerNorm before the first block (and the image-to-video gate adds what
    that block receives); act="quick_gelu" is x * sigmoid(1.702 x) in every block's MLP; both
    are in the config, so save_pretrained / from_pretrained rebuild them; defaults unchanged."""
    torch.manual_seed(0)
    m = TubeViT(**SMALL, num_classes=3, pre_norm=True, act="quick_gelu").eval()
    assert m.config["pre_norm"] is True and m.config["act"] == "quick_gelu"
    x = torch.randn(7, 24)
    mlp = m.blocks[0].mlp
    torch.testing.assert_close(mlp(x), mlp.fc2(mlp.fc1(x) * torch.sigmoid(1.702 * mlp.fc1(x))))
    layout = PackedLayout(((1, 7),), (0,))
    with torch.no_grad():
        m.norm_pre.weight.normal_()
        want = m.norm(m.blocks[1](m.blocks[0](m.norm_pre(x), layout), layout))
        torch.testing.assert_close(m._blocks(x, layout)[0], want, rtol=0, atol=0)
    m.save_pretrained(str(tmp_path / "m"))
    back = TubeViT.from_pretrained(str(tmp_path / "m")).eval()
    assert back.config == m.config
    v = torch.randn(1, 3, 20, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(back(v), m(v), rtol=0, atol=0)
    default = TubeViT(**SMALL, num_classes=3)
    assert isinstance(default.norm_pre, torch.nn.Identity) and not any("norm_pre" in k for k in default.state_dict())
    assert default.blocks[0].mlp.act is F.gelu


@pytest.mark.parametrize("fmt", ["torchvision", "timm"])
def test_image_vit_mapping_key_by_key(fmt):
    # every parameter of every block lands in the right place (catches e.g. ln_1 <-> ln_2),
    # the final norm, the image tube's kernel exactly, the 3D tubes inflated from it; the
    # class token, the learned position embedding and the head are returned as unused
    torch.manual_seed(0)
    sd = _torchvision_sd() if fmt == "torchvision" else _timm_sd()
    m = TubeViT(**SMALL, num_classes=3)
    unused = load_image_vit(m, sd)
    own = m.state_dict()
    names = _TV_BLOCK if fmt == "torchvision" else _TIMM_BLOCK
    prefix = (lambda i: f"encoder.layers.encoder_layer_{i}.") if fmt == "torchvision" else (lambda i: f"blocks.{i}.")
    for i in range(2):
        for ours, theirs in names.items():
            for suffix in ([""] if ours.endswith(("weight", "bias")) else [".weight", ".bias"]):
                torch.testing.assert_close(own[f"blocks.{i}.{ours}{suffix}"], sd[prefix(i) + theirs + suffix],
                                           rtol=0, atol=0, msg=f"blocks.{i}.{ours}{suffix}")
    final = "encoder.ln." if fmt == "torchvision" else "norm."
    torch.testing.assert_close(own["norm.weight"], sd[final + "weight"], rtol=0, atol=0)
    torch.testing.assert_close(own["norm.bias"], sd[final + "bias"], rtol=0, atol=0)
    patch = "conv_proj." if fmt == "torchvision" else "patch_embed.proj."
    tok = m.tokenizer
    img = tok.image_tube
    torch.testing.assert_close(own[f"tokenizer.projs.{img}.weight"][:, :, 0], sd[patch + "weight"], rtol=0, atol=0)
    for i, t in enumerate(tok.tubes):
        torch.testing.assert_close(own[f"tokenizer.projs.{i}.weight"], inflate_kernel(sd[patch + "weight"], t.kernel))
        torch.testing.assert_close(own[f"tokenizer.projs.{i}.bias"], sd[patch + "bias"], rtol=0, atol=0)
    want_unused = ({"class_token", "encoder.pos_embedding", "heads.head.weight", "heads.head.bias"}
                   if fmt == "torchvision" else {"cls_token", "pos_embed", "head.weight", "head.bias"})
    assert set(unused) == want_unused


def test_image_vit_errors_are_named():
    m = TubeViT(**SMALL, num_classes=3)
    with pytest.raises(ValueError, match=r"cannot tell the state_dict format: no conv_proj.weight \(torchvision\), "
                                         r"patch_embed.proj.weight \(timm\), embeddings.patch_embeddings"):
        load_image_vit(m, {"visual.conv1.weight": torch.randn(24, 3, 16, 16)})
    extra = dict(_torchvision_sd(), **{"encoder.layers.encoder_layer_0.adapter.weight": torch.randn(3)})
    with pytest.raises(ValueError, match=r"keys of the torchvision state_dict that map to nothing in TubeViT: "
                                         r"\['encoder.layers.encoder_layer_0.adapter.weight'\]"):
        load_image_vit(m, extra)
    assert "encoder.layers.encoder_layer_0.adapter.weight" in load_image_vit(m, extra, strict=False)
    with pytest.raises(ValueError, match=r"fmt must be one of 'auto', 'torchvision', 'timm', 'huggingface', 'clip', "
                                         r"'open_clip', got 'keras'"):
        load_image_vit(m, _torchvision_sd(), fmt="keras")
    wide = _torchvision_sd(dim=32)
    with pytest.raises(ValueError, match=r"encoder.ln.weight has shape \(32,\) but norm.weight has \(24,\)"):
        load_image_vit(m, wide)
    deep = TubeViT(**{**SMALL, "depth": 3}, num_classes=3)
    with pytest.raises(ValueError, match=r"the state_dict has no weights for \['blocks\.2\."):
        load_image_vit(deep, _torchvision_sd(depth=2))


# ---------------------------------------------------------------- joint batches vs each sample alone
def _mixed():
    g = torch.Generator().manual_seed(3)
    shapes = [(3, 32, 64, 64), (3, 64, 64), (3, 20, 48, 56), (3, 32, 64, 64), (3, 48, 40), (3, 64, 64)]
    return [torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes]


def test_joint_loss_equals_each_sample_alone():
    # logits and per-head losses against per-sample forwards (not against forward_mixed, which
    # shares the packing code): catches outputs returned in packing order instead of input order
    m = _model(num_classes={"video": 5, "image": 3})
    samples = _mixed()
    heads = ["video", "image", "video", "video", "image", "image"]
    labels = [1, 2, 4, 0, 1, 0]
    alone = [m(s[None], head=h)[0] for s, h in zip(samples, heads)]
    for got, want in zip(m.forward_mixed(samples, heads), alone):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    total, per = m.joint_loss(samples, heads, labels, weights={"image": 0.25})
    want = {h: F.cross_entropy(torch.stack([alone[i] for i in range(6) if heads[i] == h]),
                               torch.tensor([labels[i] for i in range(6) if heads[i] == h])) for h in ("video", "image")}
    torch.testing.assert_close(per["video"], want["video"], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(per["image"], want["image"], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(total, want["video"] + 0.25 * want["image"], rtol=1e-9, atol=1e-9)
    # and the gradient of the joint loss is the gradient of the per-sample losses
    params = [m.tokenizer.projs[0].weight, m.blocks[0].attn.qkv.weight, m.heads["image"].weight]
    g_joint = torch.autograd.grad(total, params)
    g_alone = torch.autograd.grad(want["video"] + 0.25 * want["image"], params)
    for a, b in zip(g_joint, g_alone):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_joint_batch_errors_are_named():
    m = _model(num_classes={"video": 5, "image": 3})
    with pytest.raises(ValueError, match="samples must not be empty"):
        m.pack([])
    with pytest.raises(ValueError, match="samples, heads and labels must have the same length"):
        m.joint_loss(_mixed()[:2], ["video", "image"], [1])
    with pytest.raises(ValueError, match=r"num_classes must name at least one head"):
        TubeViT(**SMALL, num_classes={})


# ---------------------------------------------------------------- fake kernels vs the real ops
@pytest.mark.parametrize("seed", range(4))
def test_fake_kernels_give_the_real_shapes(seed):
    # torch.compile and torch.export trust the fake kernels for shapes: every output of every op
    # must match the real op's shape and dtype (catches e.g. a wrong token width or count)
    from torch._subclasses.fake_tensor import FakeTensorMode
    rng = random.Random(seed)
    size = (rng.randint(4, 12), rng.randint(6, 20), rng.randint(6, 20))
    tubes = random_tubes(rng, rng.randint(1, 4), size)
    flat = tv.flatten_tubes(tubes)
    d, C, B = rng.choice([5, 8, 13]), rng.randint(1, 3), rng.randint(1, 3)
    x = torch.randn(B, C, *size)
    ws = [torch.randn(d, C, *t.kernel) for t in tubes]
    bs = [torch.randn(d) for _ in tubes]
    pe = torch.randn(tv.num_tokens(tubes, size), d)
    real_out = torch.ops.tubevit.tube_tokens(x, ws, bs, flat, pe)
    real_wp = torch.ops.tubevit.tube_tokens_with_patches(x, ws, bs, flat, pe)
    g = torch.randn_like(real_out)
    real_bwd = torch.ops.tubevit.tube_tokens_backward(g, x, ws, [], flat, [True, True, True])
    with FakeTensorMode() as mode:
        fx, fws, fbs, fpe, fg = (mode.from_tensor(t) for t in (x, ws[0], bs[0], pe, g))
        fws = [mode.from_tensor(w) for w in ws]
        fbs = [mode.from_tensor(b) for b in bs]
        fake_out = torch.ops.tubevit.tube_tokens(fx, fws, fbs, flat, fpe)
        fake_wp = torch.ops.tubevit.tube_tokens_with_patches(fx, fws, fbs, flat, fpe)
        fake_bwd = torch.ops.tubevit.tube_tokens_backward(fg, fx, fws, [], flat, [True, True, True])

    def flat_outputs(r):
        out = []
        for item in (r if isinstance(r, (tuple, list)) else [r]):
            out += list(item) if isinstance(item, (tuple, list)) else [item]
        return out

    for real, fake in ((real_out, fake_out), (real_wp, fake_wp), (real_bwd, fake_bwd)):
        r, f = flat_outputs(real), flat_outputs(fake)
        assert len(r) == len(f)
        for a, b in zip(r, f):
            assert (tuple(a.shape), a.dtype) == (tuple(b.shape), b.dtype)


@pytest.mark.parametrize("kw,msg", [
    (dict(kernels="trilinear"), r"kernels must be 'per_tube' or 'interpolated', got 'trilinear'"),
    (dict(space_to_depth={7: (2, 1, 1)}), r"space_to_depth tube index 7 out of range for 4 tubes"),
    (dict(space_to_depth={0: (0, 1, 1)}), r"space_to_depth\[0\] must be three factors >= 1, got \(0, 1, 1\)"),
    (dict(space_to_depth={0: (2, 2, 1)}, dim=30), r"space_to_depth\[0\]: dim=30 is not divisible by S=4"),
    (dict(space_to_depth={0: (3, 1, 1)}), r"space_to_depth\[0\]: stride \(16, 32, 32\) not divisible by \(3, 1, 1\)"),
    (dict(space_to_depth={0: (2, 1, 1)}, kernels="interpolated"),
     r"space_to_depth needs kernels='per_tube' \(its tubes have d/S channels\)"),
])
def test_tube_variant_errors_are_named(kw, msg):
    with pytest.raises(ValueError, match=msg):
        TubeViT(**{**SMALL, **kw})


def test_varlen_attention_switch_off_cuda_keeps_the_per_group_path():
    """use_varlen_attention() on the CPU (or in fp32) changes nothing: FlashAttention's varlen
    kernel is CUDA fp16/bf16 only, so the per-group path runs and results are bitwise the same;
    the cumulative sequence lengths follow the buffer's sample order."""
    from tubevit_ext.models.packed import _cu_seqlens
    torch.manual_seed(0)
    m = TubeViT(**SMALL, num_classes=3).eval()
    samples = [torch.randn(3, 20, 32, 32), torch.randn(3, 32, 32), torch.randn(3, 20, 32, 32)]
    with torch.no_grad():
        want = m(samples)
        m.use_varlen_attention()
        assert all(b.attn.varlen for b in m.blocks)
        got = m(samples)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    qkv = torch.zeros(10, 3 * 24, dtype=torch.bfloat16)
    assert not m.blocks[0].attn._varlen_applies(qkv, PackedLayout(((2, 3), (1, 4))), 0.0)  # CPU
    cu = _cu_seqlens(((2, 3), (1, 4)), torch.device("cpu"))
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 6, 10]
    m.use_varlen_attention(False)
    assert not any(b.attn.varlen for b in m.blocks)


def _varlen_attn_reference(q, k, v, cu_q, cu_k, max_q, max_k):
    """varlen_attn's documented contract (torch.nn.attention.varlen: (total, heads, head_dim) q, k, v,
    int32 cumulative offsets of the samples, the longest sample's length), computed per sample with
    scaled_dot_product_attention; it checks the arguments as the CUDA kernel requires them."""
    assert q.dim() == 3 and q.shape == k.shape == v.shape and q.is_contiguous() and k.is_contiguous()
    assert v.is_contiguous() and torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32
    cu = cu_q.tolist()
    assert cu[0] == 0 and cu[-1] == q.shape[0] and max_q == max_k == max(b - a for a, b in zip(cu, cu[1:]))
    out = torch.empty_like(q)
    for a, b in zip(cu, cu[1:]):
        o = F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v)))  # (heads, n, hd)
        out[a:b] = o.transpose(0, 1)
    return out


def test_varlen_attention_packing_on_the_cpu(monkeypatch):
    """The varlen branch of Attention.forward (q, k, v split from the packed qkv, the cumulative
    offsets, the longest sample, the output's reshape) with FlashAttention's kernel replaced by its
    contract computed per sample on the CPU: a joint batch of three shape groups gives each sample's
    logits and gradients as the per-group SDPA path does, in one call per block."""
    import tubevit_ext.models.packed as tvm
    torch.manual_seed(0)
    m = TubeViT(**SMALL, num_classes=3)
    samples = [torch.randn(3, 20, 32, 32), torch.randn(3, 32, 32), torch.randn(3, 24, 48, 40),
               torch.randn(3, 20, 32, 32)]

    def run():
        m.zero_grad(set_to_none=True)
        logits = m(samples)
        sum(lg.square().sum() for lg in logits).backward()
        return logits, [p.grad.clone() for p in m.parameters()]

    want_logits, want_grads = run()
    calls = []
    monkeypatch.setattr(tvm, "_varlen_attn", lambda *a: calls.append(a[3].tolist()) or _varlen_attn_reference(*a))
    monkeypatch.setattr(tvm.Attention, "_varlen_applies", lambda self, qkv, layout, p: self.varlen)
    m.use_varlen_attention()
    got_logits, got_grads = run()
    assert len(calls) == len(m.blocks)
    assert len(set(map(tuple, calls))) == 1 and len(calls[0]) == len(samples) + 1
    for g, w in zip(got_logits, want_logits):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
