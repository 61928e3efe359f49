"""TubeTokenizer: the model-level tokenizer with the paper's tube variants.

* ``kernels="per_tube"`` (default, the paper's main model): one learned kernel
  per tube; all tubes in ONE fused ``tube_tokens`` call.
* ``kernels="interpolated"``: one learned base kernel (8x8x8 in the paper),
  trilinearly resized to every tube's shape in each forward pass
  (``F.interpolate(..., mode="trilinear", align_corners=False)``); gradients
  flow to the base. Each tube keeps its own bias.
* ``space_to_depth={tube_index: (ft, fh, fw)}``: that tube gets d/S output
  channels (S = ft*fh*fw) and its stride divided by f on each axis; then S
  neighbouring outputs are packed into the channel axis so token count and
  width stay those of the plain tube (paper Table 12: ``{0: (2, 1, 1),
  1: (1, 2, 2)}``).

  Packing order: a packed token holds its members in row-major (dt, dh, dw)
  order, each member's d/S channels contiguous:
  ``channels = [member(0,0,0) | member(0,0,1) | ...]``. When a fine grid
  size is not a multiple of its factor, the trailing incomplete group is
  dropped. Position of a packed token: the mean of its members' centres
  (fractional voxel coordinates), fed to the same sin/cos formula.

Images (B, C, H, W) go through the image tube alone (by default the tube whose
kernel has one frame, e.g. 1x16x16: 196 tokens at 224^2), with that tube's
weights and the same position-embedding convention (a 1-frame video).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..functional import tube_tokens
from ..geometry import PAPER_TUBES, Tube, as_tubes, token_grid, tube_token_counts
from ..pos_embed import sincos_from_positions, tube_centres
from ..modules import PosEmbedCache, TubeProjection, projection_params

#: Table 12 of the paper: 2x temporal space-to-depth on the 8x8x8 tube, 4x
#: spatial (2x2) on the 16x4x4 tube.
PAPER_SPACE_TO_DEPTH: Dict[int, Tuple[int, int, int]] = {0: (2, 1, 1), 1: (1, 2, 2)}


def _conv_init_(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        bound = 1 / math.sqrt(weight[0].numel())
        nn.init.uniform_(bias, -bound, bound)


def pack_space_to_depth(tokens: torch.Tensor, grid: Sequence[int], factors: Sequence[int]) -> torch.Tensor:
    """(B, nt*nh*nw, c) fine tokens -> (B, gt*gh*gw, S*c) packed tokens (see module doc)."""
    B, _, c = tokens.shape
    (nt, nh, nw), (ft, fh, fw) = grid, factors
    gt, gh, gw = nt // ft, nh // fh, nw // fw
    t = tokens.view(B, nt, nh, nw, c)[:, :gt * ft, :gh * fh, :gw * fw]
    t = t.reshape(B, gt, ft, gh, fh, gw, fw, c).permute(0, 1, 3, 5, 2, 4, 6, 7)
    return t.reshape(B, gt * gh * gw, ft * fh * fw * c)


class TubeTokenizer(nn.Module):
    """Video (B, C, T, H, W) or image (B, C, H, W) -> tokens (B, N, dim).

    Args:
        in_channels, dim: C and the token width d.
        tubes: Tube list (default PAPER_TUBES).
        kernels: "per_tube" or "interpolated" (see module doc).
        base_kernel: kernel size of the shared base for "interpolated".
        space_to_depth: {tube index: (ft, fh, fw)}; per_tube kernels only.
        image_tube: index of the tube used for images (default: the first
            tube with a one-frame kernel, or None if there is none).
        pos_embed: add the fixed sin/cos embedding.
    """

    def __init__(self, in_channels: int, dim: int, tubes=PAPER_TUBES, *, kernels: str = "per_tube",
                 base_kernel=(8, 8, 8), space_to_depth: Optional[Dict[int, Sequence[int]]] = None,
                 image_tube: Optional[int] = None, pos_embed: bool = True, bias: bool = True):
        super().__init__()
        self.tubes = as_tubes(tubes)
        self.in_channels, self.dim, self.kernels, self.use_pos_embed = in_channels, dim, kernels, pos_embed
        if kernels not in ("per_tube", "interpolated"):
            raise ValueError(f"kernels must be 'per_tube' or 'interpolated', got {kernels!r}")
        self.s2d: Dict[int, Tuple[int, int, int]] = {}
        for i, f in (space_to_depth or {}).items():
            if not 0 <= i < len(self.tubes):
                raise ValueError(f"space_to_depth tube index {i} out of range for {len(self.tubes)} tubes")
            f = tuple(int(v) for v in f)
            if len(f) != 3 or min(f) < 1:
                raise ValueError(f"space_to_depth[{i}] must be three factors >= 1, got {f}")
            S = f[0] * f[1] * f[2]
            if dim % S:
                raise ValueError(f"space_to_depth[{i}]: dim={dim} is not divisible by S={S}")
            if any(s % fa for s, fa in zip(self.tubes[i].stride, f)):
                raise ValueError(f"space_to_depth[{i}]: stride {self.tubes[i].stride} not divisible by {f}")
            self.s2d[i] = f
        if self.s2d and kernels != "per_tube":
            raise ValueError("space_to_depth needs kernels='per_tube' (its tubes have d/S channels)")
        # The convolutions actually run: s2d tubes with the finer stride.
        self.conv_tubes = tuple(
            Tube(t.kernel, tuple(s // fa for s, fa in zip(t.stride, self.s2d[i])), t.offset) if i in self.s2d else t
            for i, t in enumerate(self.tubes))
        widths = [dim // (f[0] * f[1] * f[2]) if (f := self.s2d.get(i)) else dim for i in range(len(self.tubes))]
        if kernels == "per_tube":
            self.projs = nn.ModuleList(TubeProjection(in_channels, w, t.kernel, bias)
                                       for w, t in zip(widths, self.tubes))
        else:
            self.base_kernel = tuple(base_kernel)
            self.base_weight = nn.Parameter(torch.empty(dim, in_channels, *self.base_kernel))
            self.biases = nn.ParameterList(nn.Parameter(torch.empty(dim)) for _ in self.tubes) if bias else None
            _conv_init_(self.base_weight, None)
            if bias:
                for b in self.biases:
                    _conv_init_(self.base_weight, b)
        if image_tube is None:
            image_tube = next((i for i, t in enumerate(self.tubes) if t.kernel[0] == 1 and i not in self.s2d), None)
        self.image_tube = image_tube
        self.register_buffer("pos_embed", torch.empty(0), persistent=False)
        self._pe = PosEmbedCache(self)

    # -------------------------------------------------------------- parameters
    def tube_weights(self):
        """Per-tube (weights, biases) as the fused op takes them."""
        if self.kernels == "per_tube":
            return projection_params(self.projs)
        ws = [F.interpolate(self.base_weight, size=t.kernel, mode="trilinear", align_corners=False)
              if t.kernel != self.base_kernel else self.base_weight for t in self.tubes]
        return ws, (list(self.biases) if self.biases is not None else [])

    # -------------------------------------------------------------- positions
    def positions(self, input_size) -> torch.Tensor:
        """(N, 3) float64 token centres (t, h, w) in output token order."""
        rows = []
        for i, t in enumerate(self.tubes):
            if i in self.s2d:
                ct = self.conv_tubes[i]
                grid = token_grid(ct, input_size)
                c = tube_centres(ct, input_size).double()
                packed = pack_space_to_depth(c[None], grid, self.s2d[i])[0]  # (n, S*3)
                rows.append(packed.view(packed.shape[0], -1, 3).mean(dim=1))
            else:
                rows.append(tube_centres(t, input_size).double())
        return torch.cat(rows)

    def _compute_pos_embed(self, kind, size, dtype, device):
        if kind == "image":
            pos = tube_centres(self.tubes[self.image_tube], size).double()
        else:
            pos = self.positions(size)
        return sincos_from_positions(pos.to(device), self.dim).to(dtype)

    def _pos_embed(self, size, kind, dtype, device):
        return self._pe.get(self._compute_pos_embed, size, dtype, device, kind) if self.use_pos_embed else None

    def num_tokens(self, input_size) -> int:
        """Tokens for a (T, H, W) video, or an (H, W) image."""
        if len(input_size) == 2:
            return tube_token_counts([self.tubes[self.image_tube]], (1, *input_size))[0]
        counts = tube_token_counts(self.conv_tubes, input_size)
        total = 0
        for i, n in enumerate(counts):
            if i in self.s2d:
                g = token_grid(self.conv_tubes[i], input_size)
                f = self.s2d[i]
                n = (g[0] // f[0]) * (g[1] // f[1]) * (g[2] // f[2])
            total += n
        return total

    # -------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 4:
            return self.forward_image(x)
        if x.dim() != 5:
            raise ValueError(f"x must be a video (B, C, T, H, W) or an image batch (B, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"x has {x.shape[1]} channels, expected in_channels={self.in_channels}")
        size = tuple(x.shape[2:])
        ws, bs = self.tube_weights()
        pe = self._pos_embed(size, "video", x.dtype, x.device)
        if not self.s2d:  # the common case: all tubes in one fused call
            return tube_tokens(x, ws, bs or None, self.tubes, pe)
        plain = [i for i in range(len(self.tubes)) if i not in self.s2d]
        segments, row = {}, 0
        offsets = []
        for i in range(len(self.tubes)):
            offsets.append(row)
            row += self._tube_count(i, size)
        if plain:
            pe_plain = None if pe is None else torch.cat([pe[offsets[i]:offsets[i] + self._tube_count(i, size)] for i in plain])
            y = tube_tokens(x, [ws[i] for i in plain], [bs[i] for i in plain] if bs else None,
                            [self.tubes[i] for i in plain], pe_plain)
            start = 0
            for i in plain:
                n = self._tube_count(i, size)
                segments[i] = y[:, start:start + n]
                start += n
        for i, f in self.s2d.items():
            fine = tube_tokens(x, [ws[i]], [bs[i]] if bs else None, [self.conv_tubes[i]])
            y = pack_space_to_depth(fine, token_grid(self.conv_tubes[i], size), f)
            if pe is not None:
                y = y + pe[offsets[i]:offsets[i] + y.shape[1]]
            segments[i] = y
        return torch.cat([segments[i] for i in range(len(self.tubes))], dim=1)

    def _tube_count(self, i, size):
        g = token_grid(self.conv_tubes[i], size)
        f = self.s2d.get(i, (1, 1, 1))
        return (g[0] // f[0]) * (g[1] // f[1]) * (g[2] // f[2])

    def forward_image(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N_img, dim) through the image tube only."""
        if self.image_tube is None:
            raise ValueError("this tokenizer has no image tube (no tube with a one-frame kernel); "
                             "pass image_tube= to choose one")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"x has {x.shape[1]} channels, expected in_channels={self.in_channels}")
        i = self.image_tube
        ws, bs = self.tube_weights()
        x5 = x.unsqueeze(2)
        size = tuple(x5.shape[2:])
        pe = self._pos_embed(size, "image", x.dtype, x.device)
        return tube_tokens(x5, [ws[i]], [bs[i]] if bs else None, [self.tubes[i]], pe)
