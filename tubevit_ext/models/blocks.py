"""The ViT blocks over a packed token buffer (models/packed.py): the pre-norm block with per-sample
stochastic depth and the image-to-video gate (paper §3.6), and the attention-pooling readout. timm's
names throughout (norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2; num_heads), so image-ViT
weights map one to one (models/convert.py)."""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .packed import Attention, PackedLayout, _cat


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP was trained with."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": F.gelu, "quick_gelu": quick_gelu}


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0, act: str = "gelu"):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)
        self.act = ACTIVATIONS[act]

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth per sample in a packed buffer: each sample's residual branch is dropped
    with probability p (all its tokens together), the kept ones scaled by 1 / (1 - p). The mask is
    drawn on the buffer's device and expanded per group of equal-length samples: no host-to-device
    copy per call."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = []
        for count, n, _ in layout.slabs(x):
            k = (torch.rand(count, 1, 1, device=x.device) >= self.p).to(x.dtype) / (1.0 - self.p)
            keep.append(k.expand(count, n, 1).reshape(count * n, 1))
        return x * _cat(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Block(nn.Module):
    """Pre-norm ViT block (timm naming: norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2)."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, eps: float = 1e-6, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, act: str = "gelu"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, attn_drop=attn_drop, proj_drop=drop)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_dim, drop, act)
        self.drop_path = DropPath(drop_path)
        self.gate_alpha: Optional[nn.Parameter] = None  # set by image-to-video scaling

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "gate_alpha"
        if key in state_dict and state_dict[key].dim() == 0:  # saved when the gate was 0-d
            state_dict[key] = state_dict[key].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x, layout: PackedLayout, z0: Optional[torch.Tensor] = None):
        y = x + self.drop_path(self.attn(self.norm1(x), layout), layout)
        z = y + self.drop_path(self.mlp(self.norm2(y)), layout)
        if self.gate_alpha is not None and z0 is not None:
            z = z + torch.tanh(self.gate_alpha) * z0
        return z


class AttentionPool(nn.Module):
    """Attention-pooling readout (a learned probe attends over each sample's tokens, then a
    residual MLP), as in the paper's readout: (total_tokens, d) -> (samples, d), buffer order."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.probe = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.probe, std=0.02)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_dim)

    @property
    def heads(self) -> int:
        """Deprecated alias of num_heads (timm's name)."""
        warnings.warn(f"{type(self).__name__}.heads is deprecated: use num_heads", FutureWarning, stacklevel=2)
        return self.num_heads

    def forward(self, x: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
        d, h = x.shape[-1], self.num_heads
        q = self.q(self.probe).view(1, h, 1, d // h)
        outs = []
        for count, n, slab in layout.slabs(self.kv(x)):
            k, v = slab.view(count, n, 2, h, d // h).permute(2, 0, 3, 1, 4)
            outs.append(F.scaled_dot_product_attention(q.expand(count, -1, -1, -1), k, v).reshape(count, d))
        pooled = self.proj(_cat(outs))
        return pooled + self.mlp(self.norm(pooled))
