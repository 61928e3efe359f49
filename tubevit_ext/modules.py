"""The op-level nn.Modules: SparseTubeTokenizer (the drop-in module around the fused op) and
TubeProjection (its parameters); the model-level tokenizer with the paper's variants is
tubevit_ext/models/tube_tokenizer.py."""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Optional

import torch
from torch import nn

from .functional import tube_tokens_flat
from .geometry import PAPER_TUBES, as_tubes
from .pos_embed import sincos_pos_embed


class PosEmbedCache:
    """Per-(kind, size, dtype, device) cache of a module's fixed position embedding.

    ``compute(kind, size, dtype, device) -> Tensor`` (passed per call, so the
    cache holds no reference back to its module) builds an entry; ``kind``
    tells apart embeddings of one module that differ by more than the input
    size (e.g. videos vs images in the model tokenizer). The most recent
    entry is also the module's non-persistent ``pos_embed`` buffer (so it
    shows up in ``module.buffers()`` and follows ``.to()``). Under
    torch.compile the embedding is computed in the graph instead (it depends
    only on Python ints, so it is constant-folded), keeping the traced
    forward free of side effects.
    """

    max_entries = 16

    def __init__(self, module: nn.Module):
        # module.__dict__, not the module: no reference cycle through
        # nn.Module.__setattr__, and deepcopy/pickle remap it consistently.
        self._module_dict = module.__dict__
        self._cache: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()

    def __len__(self) -> int:
        return len(self._cache)

    def get(self, compute, size, dtype, device, kind: str = "video") -> torch.Tensor:
        if torch.compiler.is_compiling():
            return compute(kind, tuple(size), dtype, device)
        key = (kind, tuple(size), dtype, device if isinstance(device, torch.device) else torch.device(device))
        pe = self._cache.get(key)
        if pe is None:
            pe = compute(kind, key[1], dtype, device)
            self._cache[key] = pe
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        self._module_dict["_buffers"]["pos_embed"] = pe
        return pe


def projection_params(projs: nn.ModuleList):
    """(weights, biases) of a ModuleList of TubeProjections as the op takes them (biases [] when
    the projections have none).

    Read from each module's parameter dict: ``m.weight`` goes through nn.Module.__getattr__,
    ~0.35 us per access, which for eight parameters was a third of a small call's Python time
    (bench/host_overhead.py). A name missing from the dict (a parametrization such as
    weight_norm, or a plain tensor attribute) is read the ordinary way. Under torch.compile,
    the ordinary way throughout.
    """
    if torch.compiler.is_compiling():
        return [p.weight for p in projs], [p.bias for p in projs if p.bias is not None]
    ws, bs = [], []
    for m in projs._modules.values():
        d = m._parameters
        ws.append(d["weight"] if "weight" in d else m.weight)
        b = d["bias"] if "bias" in d else m.bias
        if b is not None:
            bs.append(b)
    return ws, bs


class TubeProjection(nn.Module):
    """Parameters of one tube, shaped and initialised exactly like nn.Conv3d.

    weight: (d, C, kt, kh, kw); bias: (d,) or None.
    """

    def __init__(self, in_channels: int, dim: int, kernel, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, in_channels, *kernel))
        if bias:
            self.bias = nn.Parameter(torch.empty(dim))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv3d's default initialisation, so both tokenizers start alike.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight[0].numel()
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)


class SparseTubeTokenizer(nn.Module):
    """Video (B, C, T, H, W) -> tokens (B, N, dim) with sparse tubes, fused.

    Args:
        in_channels: C.
        dim: token width d (any positive int; the position embedding handles
            widths not divisible by 6, see pos_embed.py).
        tubes: Tube records, default the paper's four (PAPER_TUBES).
        pos_embed: add the fixed sin/cos embedding of the tube centres,
            computed for each input size seen and cached.
        bias: per-tube bias, as nn.Conv3d's ``bias``.
        save_patches: CPU training memory/speed trade, see
            ``tubevit_ext.tube_tokens`` (None: save when training a weight).

    Parameters are ``projs.{i}.weight`` (d, C, kt, kh, kw) and
    ``projs.{i}.bias`` (d,), the same names and shapes as
    tubevit_ext.reference.SparseTubeTokenizer.
    """

    def __init__(self, in_channels: int, dim: int, tubes=PAPER_TUBES, pos_embed: bool = True,
                 bias: bool = True, save_patches: Optional[bool] = None):
        super().__init__()
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        self.tubes = as_tubes(tubes)
        self._flat_tubes = [v for t in self.tubes for v in t.flat()]  # validated once, here
        self.in_channels, self.dim, self.use_pos_embed = in_channels, dim, pos_embed
        self.save_patches = save_patches
        self.projs = nn.ModuleList(TubeProjection(in_channels, dim, t.kernel, bias) for t in self.tubes)
        self.register_buffer("pos_embed", torch.empty(0), persistent=False)
        self._pe = PosEmbedCache(self)

    def _compute_pos_embed(self, kind, size, dtype, device):
        return sincos_pos_embed(self.tubes, size, self.dim, dtype=dtype, device=device)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, dim={self.dim}, tubes={list(self.tubes)}, pos_embed={self.use_pos_embed}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 5:
            raise ValueError(f"x must be 5-D (B, C, T, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"x has {x.shape[1]} channels, expected in_channels={self.in_channels}")
        pe = self._pe.get(self._compute_pos_embed, x.shape[2:], x.dtype, x.device) if self.use_pos_embed else None
        weights, biases = projection_params(self.projs)
        return tube_tokens_flat(x, weights, biases, self._flat_tubes, pe, self.save_patches)
