"""The reference Conv3d implementation: the oracle every test checks against.

Deliberately the obvious construction (per-tube ``F.conv3d`` on the offset
slice, flatten, transpose, cat, add the position embedding), so that it is
correct by inspection. Uses cuDNN / oneDNN through PyTorch.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .geometry import PAPER_TUBES, Tube, as_tubes
from .pos_embed import sincos_pos_embed
from .modules import PosEmbedCache


def tube_tokens(x: torch.Tensor, weights: Sequence[torch.Tensor],
                biases: Optional[Sequence[torch.Tensor]], tubes: Sequence[Tube],
                pos_embed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Same contract as tubevit_ext.tube_tokens, built from F.conv3d + cat."""
    tubes = as_tubes(tubes)
    outs = []
    for i, tube in enumerate(tubes):
        ot, oh, ow = tube.offset
        y = F.conv3d(x[:, :, ot:, oh:, ow:], weights[i], biases[i] if biases else None,
                     stride=tube.stride)
        outs.append(y.flatten(2).transpose(1, 2))
    out = torch.cat(outs, dim=1)
    if pos_embed is not None:
        out = out + pos_embed
    return out


class SparseTubeTokenizer(nn.Module):
    """nn.Conv3d-based twin of tubevit_ext.SparseTubeTokenizer.

    Same constructor, same parameter names and shapes (``projs.{i}.weight``,
    ``projs.{i}.bias``), so a state_dict moves between the two unchanged.
    """

    def __init__(self, in_channels: int, dim: int, tubes=PAPER_TUBES, pos_embed: bool = True,
                 bias: bool = True):
        super().__init__()
        self.tubes = as_tubes(tubes)
        self.in_channels, self.dim, self.use_pos_embed = in_channels, dim, pos_embed
        self.projs = nn.ModuleList(
            nn.Conv3d(in_channels, dim, t.kernel, stride=t.stride, bias=bias) for t in self.tubes)
        self.register_buffer("pos_embed", torch.empty(0), persistent=False)
        self._pe = PosEmbedCache(self)

    def _compute_pos_embed(self, kind, size, dtype, device):
        return sincos_pos_embed(self.tubes, size, self.dim, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for tube, conv in zip(self.tubes, self.projs):
            ot, oh, ow = tube.offset
            outs.append(conv(x[:, :, ot:, oh:, ow:]).flatten(2).transpose(1, 2))
        out = torch.cat(outs, dim=1)
        if self.use_pos_embed:
            out = out + self._pe.get(self._compute_pos_embed, tuple(x.shape[2:]), x.dtype, x.device)
        return out


__all__ = ["tube_tokens", "SparseTubeTokenizer", "sincos_pos_embed"]
