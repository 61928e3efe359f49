"""Fixed sin/cos position embedding from tube centres.

Layout per token (the convention of the public TubeViT code when dim % 6 == 0):
``[t-block | h-block | w-block]``; the block of an axis with ``m`` frequency
pairs is ``[sin(p*w_0) .. sin(p*w_{m-1}) | cos(p*w_0) .. cos(p*w_{m-1})]`` with
``w_k = 10000 ** (-k / m)`` and ``p = offset + stride * index + kernel // 2``
(the token's centre voxel on that axis, see geometry.axis_centre).

Generalisation to any ``dim`` (ViT-L 1024, ViT-H 1280 and others, where
dim % 6 != 0): the ``dim // 2`` sin/cos pairs are split over the axes as
evenly as possible, the remainder going to t first, then h:
``pairs = (P//3 + (r > 0), P//3 + (r > 1), P//3)``, ``P = dim // 2``,
``r = P % 3``; each axis then uses its own ``m`` in ``w_k``. For dim % 6 == 0
this is exactly the convention above (m = dim / 6 per axis). 1024 -> (171,
171, 170) pairs, 1280 -> (214, 213, 213). An odd ``dim`` gets a final
all-zero channel. Positions are per axis in voxels, so non-square frames get
their true h and w coordinates.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch

from .geometry import Tube, as_tubes, axis_centre, token_grid, tube_token_counts


def axis_pairs(dim: int) -> Tuple[int, int, int]:
    """Frequency pairs given to the (t, h, w) axes for embedding width ``dim``."""
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    pairs, r = divmod(dim // 2, 3)
    return (pairs + (r > 0), pairs + (r > 1), pairs)


def _axis_block(pos: torch.Tensor, m: int) -> torch.Tensor:
    """(n,) positions -> (n, 2m) [sin | cos] block, float64."""
    omega = torch.pow(10000.0, -torch.arange(m, dtype=torch.float64, device=pos.device) / m)
    angles = pos.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def tube_centres(tube: Tube, input_size: Sequence[int], device=None) -> torch.Tensor:
    """(n_tokens, 3) centre voxel (t, h, w) of every token of ``tube``, row-major."""
    nt, nh, nw = token_grid(tube, input_size)
    # Row-major grid indices from the token index by integer division, not
    # meshgrid + reshape: under torch.export with symbolic frames a reshape
    # of a possibly size-1 axis adds a guard that pins the frame count.
    # (q - r * n instead of %: ONNX export has no remainder by a symbolic int.)
    j = torch.arange(nt * nh * nw, device=device)
    q = j // nw
    t = q // nh
    idx = (t, q - t * nh, j - q * nw)
    return torch.stack([axis_centre(i, k, s, o) for i, k, s, o in zip(idx, tube.kernel, tube.stride, tube.offset)],
                       dim=1)


def sincos_from_positions(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """(n, 3) float positions (t, h, w) -> (n, dim) float64 embedding."""
    blocks = [_axis_block(pos[:, a], m) for a, m in enumerate(axis_pairs(dim)) if m > 0]
    if dim % 2:
        blocks.append(torch.zeros(pos.shape[0], 1, dtype=torch.float64, device=pos.device))
    return torch.cat(blocks, dim=1)


def sincos_pos_embed(tubes, input_size: Sequence[int], dim: int, *, dtype=torch.float32,
                     device=None) -> torch.Tensor:
    """(N, dim) fixed sin/cos position embedding of every token of ``tubes``.

    Rows follow the token order of the ops (tubes in list order, each
    row-major over its (t, h, w) grid). Computed in float64, returned in
    ``dtype`` on ``device``.
    """
    tubes = as_tubes(tubes)
    tube_token_counts(tubes, input_size)  # clear error for a tube with no tokens
    pos = torch.cat([tube_centres(t, input_size, device) for t in tubes], dim=0)
    return sincos_from_positions(pos, dim).to(dtype)
