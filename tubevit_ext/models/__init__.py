"""TubeViT models built on the fused tube tokenizer: the model (tubevit.py), its blocks
(blocks.py) over a packed token buffer (packed.py), its tokenizer with the paper's variants
(tube_tokenizer.py), sizes and factories (factories.py), image-ViT loading (convert.py) and
save / load (pretrained.py)."""
from .blocks import AttentionPool, Block, DropPath
from .convert import inflate_kernel, load_image_vit
from .factories import PRESETS, SIZES, tubevit_b, tubevit_h, tubevit_l, tubevit_s, tubevit_ti
from .packed import Attention, PackedLayout
from .tube_tokenizer import PAPER_SPACE_TO_DEPTH, TubeTokenizer, pack_space_to_depth
from .tubevit import TubeViT, losses_by_head

__all__ = ["TubeViT", "TubeTokenizer", "PackedLayout", "Attention", "Block", "DropPath", "AttentionPool",
           "tubevit_ti", "tubevit_s", "tubevit_b", "tubevit_l", "tubevit_h", "SIZES", "PRESETS",
           "PAPER_SPACE_TO_DEPTH", "pack_space_to_depth", "load_image_vit", "inflate_kernel", "losses_by_head"]
