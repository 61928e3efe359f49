"""TubeViT models built on the fused tube tokenizer."""
from .convert import inflate_kernel, load_image_vit
from .tube_tokenizer import PAPER_SPACE_TO_DEPTH, TubeTokenizer, pack_space_to_depth
from .tubevit import (PRESETS, SIZES, AttentionPool, Block, PackedLayout, TubeViT, losses_by_head, tubevit_b,
                      tubevit_h, tubevit_l, tubevit_s, tubevit_ti)

__all__ = ["TubeViT", "TubeTokenizer", "PackedLayout", "Block", "AttentionPool", "tubevit_ti", "tubevit_s",
           "tubevit_b", "tubevit_l", "tubevit_h", "SIZES", "PRESETS", "PAPER_SPACE_TO_DEPTH",
           "pack_space_to_depth", "load_image_vit", "inflate_kernel", "losses_by_head"]
