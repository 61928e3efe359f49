"""Python-side registrations for the tubevit:: dispatcher ops.

The schemas and the CPU/CUDA kernels are C++ (csrc/). Here: fake kernels
(shape, dtype and device only, for torch.compile and meta tensors) and the
autograd formula. Imported by ``tubevit_ext/__init__.py`` after ``_C`` has
loaded the library, so the ops exist when we register against them.
"""
from __future__ import annotations

import torch

from .geometry import axis_positions

_KT = 9  # ints per tube in the flat `tubes` argument


def _tube_token_counts(x_shape, tubes) -> list:
    """n_i of every tube in the flat tube list on an input of shape (B, C, T, H, W)."""
    size = x_shape[2:]
    counts = []
    for i in range(0, len(tubes), _KT):
        k, s, o = tubes[i:i + 3], tubes[i + 3:i + 6], tubes[i + 6:i + 9]
        n = 1
        for a in range(3):
            n = n * axis_positions(size[a], k[a], s[a], o[a])
        counts.append(n)
    return counts


def _token_count(x_shape, tubes) -> int:
    """N for the flat tube list on an input of shape (B, C, T, H, W)."""
    return sum(_tube_token_counts(x_shape, tubes))


def _check_same_device(x, named):
    # Mixing devices must fail here too: with meta or fake tensors the
    # dispatcher would otherwise route a CPU + meta call to this kernel and
    # return a tensor instead of an error.
    for name, t in named:
        torch._check(t.device == x.device,
                     lambda: f"{name} must be on the device of x ({x.device}), got {t.device}")


@torch.library.register_fake("tubevit::tube_tokens_naive")
@torch.library.register_fake("tubevit::tube_tokens")
def _tube_tokens_fake(x, weights, biases, tubes, pos_embed):
    torch._check(x.dim() == 5, lambda: f"x must be 5-D (B, C, T, H, W), got {x.dim()}-D")
    torch._check(len(weights) * _KT == len(tubes), lambda: "weights must hold one tensor per tube")
    _check_same_device(x, [(f"weights[{i}]", w) for i, w in enumerate(weights)]
                       + [(f"biases[{i}]", b) for i, b in enumerate(biases)]
                       + ([("pos_embed", pos_embed)] if pos_embed is not None else []))
    n = _token_count(x.shape, tubes)
    return x.new_empty((x.shape[0], n, weights[0].shape[0]))


@torch.library.register_fake("tubevit::tube_tokens_with_patches")
def _tube_tokens_with_patches_fake(x, weights, biases, tubes, pos_embed):
    out = _tube_tokens_fake(x, weights, biases, tubes, pos_embed)
    B, C = x.shape[0], x.shape[1]
    patches = []
    for i, n in enumerate(_tube_token_counts(x.shape, tubes)):
        k = tubes[i * _KT:i * _KT + 3]
        patches.append(x.new_empty((B, n, C * k[0] * k[1] * k[2])))
    return out, patches


@torch.library.register_fake("tubevit::tube_tokens_naive_backward")
def _tube_tokens_naive_backward_fake(grad_out, x, weights, tubes, output_mask):
    return _tube_tokens_backward_fake(grad_out, x, weights, [], tubes, output_mask)


@torch.library.register_fake("tubevit::tube_tokens_backward")
def _tube_tokens_backward_fake(grad_out, x, weights, patches, tubes, output_mask):
    _check_same_device(x, [("grad_out", grad_out)] + [(f"weights[{i}]", w) for i, w in enumerate(weights)]
                       + [(f"patches[{i}]", p) for i, p in enumerate(patches)])
    dx = x.new_empty(x.shape) if output_mask[0] else x.new_empty((0,))
    dws = [w.new_empty(w.shape) for w in weights] if output_mask[1] else []
    dbs = [w.new_empty((w.shape[0],)) for w in weights] if output_mask[2] else []
    return dx, dws, dbs


def _setup_context(ctx, inputs, output):
    x, weights, biases, tubes, pos_embed = inputs
    # x is needed for grad-weights, weights for grad-input; both are views of
    # tensors the caller holds anyway, so saving them costs no memory.
    ctx.save_for_backward(x, *weights)
    ctx.tubes = list(tubes)
    ctx.has_bias = len(biases) > 0
    ctx.n_patches = 0


def _setup_context_with_patches(ctx, inputs, output):
    x, weights, biases, tubes, pos_embed = inputs
    _, patches = output
    # The patch matrices are the one thing saved here that the caller does
    # not hold: the memory traded for skipping the gather in backward.
    ctx.save_for_backward(x, *weights, *patches)
    ctx.mark_non_differentiable(*patches)
    # Otherwise autograd hands _backward a zero-filled gradient for every
    # patch matrix: fresh memory as large as the patches, ~1 ms per step.
    ctx.set_materialize_grads(False)
    ctx.tubes = list(tubes)
    ctx.has_bias = len(biases) > 0
    ctx.n_patches = len(patches)


def _backward(ctx, grad, *unused_patch_grads):
    saved = ctx.saved_tensors
    x = saved[0]
    n_w = len(saved) - 1 - ctx.n_patches
    weights, patches = list(saved[1:1 + n_w]), list(saved[1 + n_w:])
    # For list arguments needs_input_grad holds one bool per element.
    need_x, need_ws, need_bs, _, need_pe = ctx.needs_input_grad
    need_w, need_b = any(need_ws), ctx.has_bias and any(need_bs)
    dx, dws, dbs = None, [None] * len(weights), [None] * len(need_bs)
    if grad is None:  # no gradient reached the tokens (grads are not materialised)
        return dx, dws, dbs, None, None
    if need_x or need_w or need_b:
        dx, dws_, dbs_ = torch.ops.tubevit.tube_tokens_backward(
            grad, x, weights, patches if need_w else [], ctx.tubes, [bool(need_x), need_w, need_b])
        dx = dx if need_x else None
        dws = list(dws_) if need_w else dws
        dbs = list(dbs_) if need_b else dbs
    return dx, dws, dbs, None, (grad.sum(0) if need_pe else None)


torch.library.register_autograd("tubevit::tube_tokens", _backward, setup_context=_setup_context)
torch.library.register_autograd("tubevit::tube_tokens_with_patches", _backward,
                                setup_context=_setup_context_with_patches)


def _double_backward(ctx, *grads):
    raise RuntimeError(
        "tubevit::tube_tokens does not support double backward (higher-order gradients); "
        "compute second derivatives with tubevit_ext.reference.tube_tokens instead")


def _setup_backward_context(ctx, inputs, output):
    pass


torch.library.register_autograd("tubevit::tube_tokens_backward", _double_backward,
                                setup_context=_setup_backward_context)
