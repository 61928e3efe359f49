"""timm's model interface on TubeViT (forward_features, forward_head, classifiers, weight-decay
exclusions, intermediate layers) and its regularisation (dropout, attention dropout, stochastic
depth): same meanings as timm's VisionTransformer, defaults leave outputs unchanged."""
import pytest
import torch

import tubevit_ext as tv
from tubevit_ext.models import PackedLayout, TubeViT
from tubevit_ext.models import DropPath

TUBES = [tv.Tube((4, 8, 8), (4, 8, 8)), tv.Tube((8, 4, 4), (8, 8, 8), (0, 2, 2)), tv.Tube((1, 8, 8), (8, 8, 8))]
SMALL = dict(dim=24, depth=3, num_heads=2, mlp_dim=48, tubes=TUBES)


def _model(**kw):
    torch.manual_seed(0)
    return TubeViT(**{**SMALL, "num_classes": 5, **kw}).double().eval()


def test_forward_is_features_then_head():
    m = _model()
    x = torch.randn(2, 3, 8, 32, 32, dtype=torch.float64)
    feats = m.forward_features(x)
    assert feats.shape == (2, m.tokenizer.num_tokens((8, 32, 32)), 24) and m.num_features == 24
    torch.testing.assert_close(m.forward_head(feats), m(x), rtol=0, atol=0)
    pre = m.forward_head(feats, pre_logits=True)
    assert pre.shape == (2, 24)
    torch.testing.assert_close(m.get_classifier()(pre), m(x), rtol=0, atol=0)
    # a joint list: per-sample token features, input order, equal to each sample alone
    samples = [torch.randn(3, 8, 32, 32, dtype=torch.float64), torch.randn(3, 32, 40, dtype=torch.float64),
               torch.randn(3, 8, 32, 32, dtype=torch.float64)]
    got = m.forward_features(samples)
    for s, g in zip(samples, got):
        torch.testing.assert_close(g, m.forward_features(s[None])[0], rtol=1e-10, atol=1e-12)


def test_classifiers_and_weight_decay_exclusions():
    m = _model(num_classes={"video": 5, "image": 3})
    x = torch.randn(2, 3, 8, 32, 32, dtype=torch.float64)
    assert m.get_classifier("image").out_features == 3
    with pytest.raises(ValueError, match="pass head=<name>"):
        m.get_classifier()
    m.reset_classifier(7, head="image")
    assert m(x, head="image").shape == (2, 7) and m.config["num_classes"]["image"] == 7
    m.reset_classifier(0, head="video")  # no head: the pooled features
    torch.testing.assert_close(m(x, head="video"), m.forward_head(m.forward_features(x), pre_logits=True))
    m.enable_image_to_video_scaling(1)
    names = dict(m.named_parameters())
    assert m.no_weight_decay() == {"pool.probe", "blocks.1.gate_alpha"} and m.no_weight_decay() <= set(names)


def test_intermediate_layers():
    m = _model()
    x = torch.randn(2, 3, 8, 32, 32, dtype=torch.float64)
    last2 = m.get_intermediate_layers(x, n=2)
    picked = m.get_intermediate_layers(x, n=[0, -1], norm=True)
    assert len(last2) == 2 and all(t.shape == m.forward_features(x).shape for t in last2)
    torch.testing.assert_close(picked[1], m.forward_features(x), rtol=0, atol=0)
    torch.testing.assert_close(m.norm(last2[1]), picked[1], rtol=0, atol=0)
    assert not torch.allclose(picked[0], picked[1])


def test_regularisation_defaults_and_eval_change_nothing():
    x = torch.randn(2, 3, 8, 32, 32, dtype=torch.float64)
    plain = _model()
    reg = _model(drop_rate=0.3, attn_drop_rate=0.2, drop_path_rate=0.4)
    reg.load_state_dict(plain.state_dict())
    torch.testing.assert_close(reg(x), plain(x), rtol=0, atol=0)  # eval mode: identity
    assert [b.drop_path.p for b in reg.blocks] == pytest.approx([0.0, 0.2, 0.4])  # timm's linear schedule
    assert reg.blocks[0].attn.attn_drop == 0.2 and reg.blocks[0].mlp.drop.p == 0.3 and reg.head_drop.p == 0.3
    reg.train()
    torch.manual_seed(1)
    a = reg(x)
    torch.manual_seed(2)
    assert not torch.allclose(a, reg(x))  # train mode: stochastic
    plain.train()
    torch.testing.assert_close(plain(x), plain.eval()(x), rtol=0, atol=0)  # rates 0: nothing random
    for name in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
        with pytest.raises(ValueError, match=f"{name} must be in \\[0, 1\\), got 1.0"):
            TubeViT(**SMALL, **{name: 1.0})


def test_drop_path_drops_whole_samples():
    # packed buffer: 2 samples of 3 tokens, then 1 of 4; every sample's tokens kept or dropped together
    layout = PackedLayout(((2, 3), (1, 4)), (0, 1, 2))
    torch.manual_seed(0)
    seen = set()
    dp = DropPath(0.5).train()
    for _ in range(40):
        y = dp(torch.ones(10, 6), layout)
        for lo, hi in ((0, 3), (3, 6), (6, 10)):
            vals = y[lo:hi].unique().tolist()
            assert len(vals) == 1 and vals[0] in (0.0, 2.0)
            seen.add(vals[0])
    assert seen == {0.0, 2.0}
    x = torch.randn(10, 6)
    assert dp.eval()(x, layout) is x
    # the mask is drawn where the buffer is: no host list becomes a device tensor per call
    real = torch.tensor
    def no_tensor(*a, **k):
        raise AssertionError("DropPath built a tensor from host data")
    torch.tensor = no_tensor
    try:
        dp.train()(x, layout)
    finally:
        torch.tensor = real


def test_drop_path_with_checkpointing_recomputes_the_same_masks():
    m = _model(drop_path_rate=0.5).train()
    x = torch.randn(2, 3, 8, 32, 32, dtype=torch.float64)
    params = [p for p in m.parameters()]
    torch.manual_seed(3)
    g0 = torch.autograd.grad(m(x).sum(), params, allow_unused=True)
    m.set_grad_checkpointing()
    torch.manual_seed(3)
    g1 = torch.autograd.grad(m(x).sum(), params, allow_unused=True)
    for a, b in zip(g0, g1):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
