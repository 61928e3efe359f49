"""The packed token buffer of a joint batch and attention over it.

A list of samples of any shapes (images and videos, videos of different sizes) is tokenized per
shape group and packed into ONE (total_tokens, d) buffer with no padding, ordered by group, so
every group of equal-length samples is a contiguous (count, n, d) slab. Token-wise layers run once
over the buffer; attention is restricted to each sample: per slab with
``F.scaled_dot_product_attention`` (memory linear in the token count, no dense mask, fused/flash
kernels where the backend has them), or, with ``Attention.varlen`` on CUDA in fp16/bf16, one
FlashAttention varlen call over the whole buffer. Every sample's output equals running it alone.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

try:  # FlashAttention's variable-length kernel (torch >= 2.10, CUDA)
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
except ImportError:  # pragma: no cover - older torch
    _varlen_attn = None


@dataclass(frozen=True)
class PackedLayout:
    """How samples sit in a packed (total_tokens, d) buffer.

    groups: (count, tokens per sample) per slab, in buffer order.
    order:  order[j] = index (in the caller's list) of the j-th sample in the buffer;
            None when the buffer holds the samples in the caller's order (the
            same-shape forward: no tuple of B entries, so B can stay symbolic
            under torch.export / torch.compile(dynamic=True)).
    """

    groups: Tuple[Tuple[int, int], ...]
    order: Optional[Tuple[int, ...]] = None

    @property
    def total_tokens(self) -> int:
        return sum(c * n for c, n in self.groups)

    def slabs(self, x: torch.Tensor) -> Iterator[Tuple[int, int, torch.Tensor]]:
        """(count, n, view) per group: ``x`` (total_tokens, ...) viewed as (count, n, ...)."""
        start = 0
        for count, n in self.groups:
            yield count, n, x[start:start + count * n].view(count, n, *x.shape[1:])
            start += count * n

    def per_sample(self, x: torch.Tensor) -> list:
        """``x`` (total_tokens, ...) as a list of (n_i, ...) views, buffer order."""
        return [s for _, _, slab in self.slabs(x) for s in slab.unbind(0)]


@functools.lru_cache(maxsize=64)
def _cu_seqlens(groups: Tuple[Tuple[int, int], ...], device: torch.device) -> torch.Tensor:
    """int32 (samples + 1,) cumulative token offsets of a layout's samples, on ``device``; cached
    per layout, so a forward's blocks share one host-to-device copy."""
    cum = [0]
    for count, n in groups:
        for _ in range(count):
            cum.append(cum[-1] + n)
    return torch.tensor(cum, dtype=torch.int32, device=device)


def _cat(parts):
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class Attention(nn.Module):
    """Multi-head self-attention over packed tokens, restricted to each sample (timm's names:
    ``num_heads``, ``qkv``, ``proj``).

    ``varlen`` (set by TubeViT.use_varlen_attention): where _varlen_applies, one varlen
    FlashAttention call for all samples instead of one scaled_dot_product_attention per group
    of equal-length samples (same result up to the kernels' rounding)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)
        self.varlen = False

    @property
    def heads(self) -> int:
        """Deprecated alias of num_heads (timm's name)."""
        warnings.warn(f"{type(self).__name__}.heads is deprecated: use num_heads", FutureWarning, stacklevel=2)
        return self.num_heads

    def _varlen_applies(self, qkv: torch.Tensor, layout: PackedLayout, p: float) -> bool:
        """FlashAttention's varlen kernel: CUDA, fp16 / bf16 q, k, v (autocast's, too), head size
        a multiple of 8 up to 256, no attention dropout; worth it with more than one group (one
        group is one SDPA call)."""
        hd = qkv.shape[-1] // (3 * self.num_heads)
        return (self.varlen and _varlen_attn is not None and qkv.is_cuda
                and qkv.dtype in (torch.float16, torch.bfloat16)
                and hd % 8 == 0 and hd <= 256 and p == 0.0 and len(layout.groups) > 1)

    def forward(self, x: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
        qkv = self.qkv(x)  # (total, 3d): one GEMM for all samples
        d, h = x.shape[-1], self.num_heads
        p = self.attn_drop if self.training else 0.0
        if self._varlen_applies(qkv, layout, p):
            q, k, v = (t.contiguous() for t in qkv.view(-1, 3, h, d // h).unbind(1))  # (total, h, hd) each
            cu = _cu_seqlens(layout.groups, x.device)
            longest = max(n for _, n in layout.groups)
            o = _varlen_attn(q, k, v, cu, cu, longest, longest)
            return self.proj_drop(self.proj(o.reshape(-1, d)))
        outs = []
        for count, n, slab in layout.slabs(qkv):
            q, k, v = slab.view(count, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
            o = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # (count, h, n, hd)
            outs.append(o.transpose(1, 2).reshape(count * n, d))
        return self.proj_drop(self.proj(_cat(outs)))
