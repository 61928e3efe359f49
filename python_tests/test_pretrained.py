"""save_pretrained / from_pretrained: a model and its configuration round trip (safetensors and
the torch.save fallback), and loading refuses weights that do not match the configuration."""
import json
import os

import pytest
import torch

import tubevit_ext as tv
from tubevit_ext.models import PAPER_SPACE_TO_DEPTH, TubeViT
from tubevit_ext.models import pretrained as pt

SMALL = dict(dim=48, depth=2, num_heads=4, mlp_dim=96)


def _same(a, b, x):
    a.eval(), b.eval()
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    with torch.no_grad():
        torch.testing.assert_close(a(x, head="v"), b(x, head="v"), rtol=0, atol=0)


@pytest.mark.parametrize("storage", ["safetensors", "torch"])
@pytest.mark.parametrize("variant", ["per_tube", "interpolated", "space_to_depth", "scaling"])
def test_round_trip(tmp_path, monkeypatch, storage, variant):
    if storage == "safetensors":
        pytest.importorskip("safetensors")
    else:
        monkeypatch.setattr(pt, "_safetensors", lambda: None)
    torch.manual_seed(0)
    kw = dict(SMALL, num_classes={"v": 5, "img": 3}, tubes=tv.PAPER_TUBES, image_tube=3)
    if variant == "interpolated":
        kw["kernels"] = "interpolated"
    if variant == "space_to_depth":
        kw["space_to_depth"] = PAPER_SPACE_TO_DEPTH
    m = TubeViT(**kw)
    if variant == "scaling":
        m.enable_image_to_video_scaling(1)
        with torch.no_grad():
            m.blocks[1].gate_alpha.fill_(0.4)
    m.save_pretrained(str(tmp_path))
    assert os.path.exists(tmp_path / ("model.safetensors" if storage == "safetensors" else "model.pt"))
    back = TubeViT.from_pretrained(str(tmp_path))
    assert back.config == m.config and back.scaling_layer == m.scaling_layer
    _same(m, back, torch.randn(1, 3, 32, 64, 64))


def test_mismatched_configuration_is_refused(tmp_path):
    m = TubeViT(**SMALL, num_classes={"v": 5})
    m.save_pretrained(str(tmp_path))
    cfg_path = tmp_path / "config.json"
    meta = json.loads(cfg_path.read_text())
    meta["config"]["num_classes"] = {"v": 7}
    cfg_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"heads.v.weight has shape \(5, 48\) in the weights but \(7, 48\) in the model"):
        TubeViT.from_pretrained(str(tmp_path))
    meta["config"]["num_classes"] = {"v": 5}
    meta["config"]["depth"] = 3
    cfg_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"the weights have no 'blocks.2.norm1.weight'"):
        TubeViT.from_pretrained(str(tmp_path))
    meta["config"]["depth"] = 1
    cfg_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"the weights hold \['blocks.1\."):
        TubeViT.from_pretrained(str(tmp_path))
    meta["format"] = "other"
    cfg_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format 'other', expected 'tubevit_ext-pretrained-1'"):
        TubeViT.from_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        TubeViT.from_pretrained(str(tmp_path / "nowhere"))


def test_config_is_the_constructors_signature_and_old_names_still_load(tmp_path):
    """TubeViT.config holds every constructor argument but the deprecated alias, by name, so
    model_from_config rebuilds the same model; `heads=` (the old name of num_heads) warns and
    means num_heads, and a configuration saved with it still loads."""
    import inspect
    import warnings

    from tubevit_ext.models.pretrained import model_from_config
    m = TubeViT(**SMALL, num_classes={"a": 3}, drop_path_rate=0.1)
    params = set(inspect.signature(TubeViT.__init__).parameters) - {"self", "heads"}
    assert set(m.config) == params
    assert m.config["num_heads"] == 4 and m.config["drop_path_rate"] == 0.1
    again = model_from_config(m.config)
    assert again.config == m.config
    with pytest.warns(FutureWarning, match="use num_heads"):
        old = TubeViT(dim=48, depth=1, heads=4, mlp_dim=96)
    assert old.blocks[0].attn.num_heads == 4 and old.config["num_heads"] == 4
    with pytest.warns(FutureWarning, match="Attention.heads is deprecated"):
        assert old.blocks[0].attn.heads == 4
    legacy = {k: v for k, v in m.config.items() if k != "num_heads"}
    legacy["heads"] = 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the loader maps the old key itself
        assert model_from_config(legacy).config == m.config
