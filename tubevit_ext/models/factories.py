"""TubeViT's sizes and tokenizer presets, timm-style factories: ``tubevit_ti(num_classes=400)``."""
from __future__ import annotations

from ..geometry import PAPER_TUBES
from .tube_tokenizer import PAPER_SPACE_TO_DEPTH
from .tubevit import TubeViT

# Paper Table 11 (B, L, H) and the usual ViT-Ti/S widths.
SIZES = {
    "ti": dict(dim=192, depth=12, num_heads=3, mlp_dim=768),
    "s": dict(dim=384, depth=12, num_heads=6, mlp_dim=1536),
    "b": dict(dim=768, depth=12, num_heads=12, mlp_dim=3072),
    "l": dict(dim=1024, depth=24, num_heads=16, mlp_dim=4096),
    "h": dict(dim=1280, depth=32, num_heads=16, mlp_dim=5120),
}


def _make(size, **kw):
    return TubeViT(**{**SIZES[size], **kw})


def tubevit_ti(**kw) -> TubeViT:
    return _make("ti", **kw)


def tubevit_s(**kw) -> TubeViT:
    return _make("s", **kw)


def tubevit_b(**kw) -> TubeViT:
    return _make("b", **kw)


def tubevit_l(**kw) -> TubeViT:
    return _make("l", **kw)


def tubevit_h(**kw) -> TubeViT:
    return _make("h", **kw)


#: Tokenizer presets: the paper's §4.1 tubes, and Table 12 (with space-to-depth).
PRESETS = {
    "paper": dict(tubes=PAPER_TUBES),
    "paper_space_to_depth": dict(tubes=PAPER_TUBES, space_to_depth=PAPER_SPACE_TO_DEPTH),
    "paper_interpolated": dict(tubes=PAPER_TUBES, kernels="interpolated"),
}
