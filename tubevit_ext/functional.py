"""Functional entry point of the fused tokenizer."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .geometry import Tube, as_tubes


def _autocast_device_types() -> frozenset:
    """Device types with an autocast mode in this torch build, looked up once.

    ``torch.amp.is_autocast_available`` cannot be traced by Dynamo in torch
    2.11 (a hard error under ``fullgraph=True``; fine in 2.14), while a set
    lookup can; see _autocast_enabled.
    """
    names = ["cpu", "cuda", "xpu", "mps", "hpu", "mtia", "xla", "ipu", torch._C._get_privateuse1_backend_name()]
    out = set()
    for name in names:
        try:
            if torch.amp.is_autocast_available(name):
                out.add(name)
        except RuntimeError:  # a name this build does not know
            pass
    return frozenset(out)


_AUTOCAST_DEVICE_TYPES = _autocast_device_types()


def _autocast_enabled(dev: str) -> bool:
    if dev in _AUTOCAST_DEVICE_TYPES:
        return torch.is_autocast_enabled(dev)
    if torch.compiler.is_compiling():
        return False
    # Eager: a device type not seen at import (e.g. a privateuse1 backend
    # renamed afterwards) is asked for directly.
    return torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev)


def _check_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def tube_tokens(x: torch.Tensor, weights: Sequence[torch.Tensor],
                biases: Optional[Sequence[torch.Tensor]], tubes: Sequence[Tube],
                pos_embed: Optional[torch.Tensor] = None,
                save_patches: Optional[bool] = None) -> torch.Tensor:
    """All tubes of ``x`` in one pass: (B, C, T, H, W) -> tokens (B, N, d).

    Equal to, for every tube i in list order,
    ``F.conv3d(x[:, :, o_t:, o_h:, o_w:], weights[i], biases[i], stride=s_i)``
    flattened over (t, h, w) row-major, concatenated along tokens, channels
    last, plus ``pos_embed`` (N, d) when given.

    Args:
        x: (B, C, T, H, W) floating tensor, any strides (channels_last_3d and
            non-contiguous views are read in place).
        weights: one (d, C, kt, kh, kw) tensor per tube, dtype/device of x.
        biases: None, or one (d,) tensor per tube.
        tubes: Tube records (or (kernel, stride[, offset]) tuples).
        pos_embed: None or (N, d), dtype/device of x (see sincos_pos_embed).
        save_patches: CPU training only. Keep each tube's patch matrix
            (B, n_i, C*kt*kh*kw, dtype of x) from the forward so that the
            weight gradient does not gather them from x again: ~5 % faster
            training steps for ~1.4x the token output's memory (paper tubes).
            None (default): save when x is on the CPU, grad mode is on, a
            weight requires grad and torch.export is not tracing; False:
            never (recompute in backward).
            Results are bitwise the same either way, except bf16 weight/bias
            gradients on CPUs with native bf16 GEMMs when the batch spans
            several chunks (with saved patches: one GEMM, rounded once; without:
            chunk by chunk). The CUDA kernels always
            gather on the fly and ignore it.

    Returns a contiguous (B, N, d) tensor of x's dtype. Differentiable in x,
    weights, biases and pos_embed, to any order, in reverse and forward mode
    (torch.autograd.forward_ad) and under torch.func (vmap, grad, jvp,
    jacrev/jacfwd, hessian).

    Under ``torch.autocast`` the op follows PyTorch's policy for convolutions:
    floating inputs are cast to the autocast dtype (e.g. bf16), so the output
    has that dtype and gradients flow back to the original (fp32) tensors.
    """
    _check_tensor(x, "x")
    weights = list(weights)
    for i, w in enumerate(weights):
        _check_tensor(w, f"weights[{i}]")
    biases = [] if biases is None else list(biases)
    for i, b in enumerate(biases):
        _check_tensor(b, f"biases[{i}]")
    if pos_embed is not None:
        _check_tensor(pos_embed, "pos_embed")
    tubes = as_tubes(tubes)
    if len(weights) != len(tubes):
        raise ValueError(f"weights must hold one tensor per tube ({len(tubes)}), got {len(weights)}")
    if biases and len(biases) != len(tubes):
        raise ValueError(f"biases must be None or hold one tensor per tube ({len(tubes)}), got {len(biases)}")
    return tube_tokens_flat(x, weights, biases, [v for t in tubes for v in t.flat()], pos_embed, save_patches)


def tube_tokens_flat(x, weights, biases, flat_tubes, pos_embed, save_patches=None):
    """tube_tokens for callers that validated their tubes once (modules): ``flat_tubes`` is the
    ops' int list (TUBE_INTS per tube), ``weights`` / ``biases`` lists (biases [] for none).
    Autocast and the CPU saved-patches choice as in tube_tokens; argument checks are the op's own
    (C++ and fake kernels)."""
    dev = x.device.type
    if torch._C._is_any_autocast_enabled() and _autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        cast = lambda t: t.to(dt) if t.is_floating_point() and t.dtype != dt else t
        x, weights, biases = cast(x), [cast(w) for w in weights], [cast(b) for b in biases]
        pos_embed = None if pos_embed is None else cast(pos_embed)
    if save_patches is None:
        # Not while torch.export traces: an exported program is usually run
        # for inference, maybe on another device (the patch-saving op has a
        # CPU kernel only); its backward still works, gathering again. Nor
        # under torch.func transforms: under vmap the saved patches would be
        # V times as large, and jvp / jacfwd never read them.
        save_patches = (torch.is_grad_enabled() and any(w.requires_grad for w in weights)
                        and not torch.compiler.is_exporting() and not torch._C._are_functorch_transforms_active())
    if save_patches and x.device.type == "cpu":
        return torch.ops.tubevit.tube_tokens_with_patches(x, weights, biases, flat_tubes, pos_embed)[0]
    return torch.ops.tubevit.tube_tokens(x, weights, biases, flat_tubes, pos_embed)
