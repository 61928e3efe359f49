"""Python-side registrations for the tubevit:: dispatcher ops.

The schemas, the CPU/CUDA kernels and the autograd (reverse and forward
mode, any order; csrc/tube_tokens_autograd.cpp) are C++. Here: fake kernels
(shape, dtype and device only, for torch.compile, torch.export and meta
tensors) and vmap rules (torch.func.vmap, and the per-sample gradients built
on it). Imported by ``tubevit_ext/__init__.py`` after ``_C`` has loaded the
library, so the ops exist when we register against them.
"""
from __future__ import annotations

import torch

from .geometry import TUBE_INTS, tube_token_counts


def _check_same_device(x, named):
    # Mixing devices must fail here too: with meta or fake tensors the
    # dispatcher would otherwise route a CPU + meta call to this kernel and
    # return a tensor instead of an error.
    for name, t in named:
        torch._check(t.device == x.device,
                     lambda: f"{name} must be on the device of x ({x.device}), got {t.device}")


@torch.library.register_fake("tubevit::tube_tokens")
def _tube_tokens_fake(x, weights, biases, tubes, pos_embed):
    torch._check(x.dim() == 5, lambda: f"x must be 5-D (B, C, T, H, W), got {x.dim()}-D")
    torch._check(len(weights) * TUBE_INTS == len(tubes), lambda: "weights must hold one tensor per tube")
    _check_same_device(x, [(f"weights[{i}]", w) for i, w in enumerate(weights)]
                       + [(f"biases[{i}]", b) for i, b in enumerate(biases)]
                       + ([("pos_embed", pos_embed)] if pos_embed is not None else []))
    n = sum(tube_token_counts(tubes, x.shape[2:]))
    return x.new_empty((x.shape[0], n, weights[0].shape[0]))


@torch.library.register_fake("tubevit::tube_tokens_with_patches")
def _tube_tokens_with_patches_fake(x, weights, biases, tubes, pos_embed):
    out = _tube_tokens_fake(x, weights, biases, tubes, pos_embed)
    B, C = x.shape[0], x.shape[1]
    patches = []
    for i, n in enumerate(tube_token_counts(tubes, x.shape[2:])):
        k = tubes[i * TUBE_INTS:i * TUBE_INTS + 3]
        patches.append(x.new_empty((B, n, C * k[0] * k[1] * k[2])))
    return out, patches


@torch.library.register_fake("tubevit::tube_tokens_backward")
def _tube_tokens_backward_fake(grad_out, x, weights, patches, tubes, output_mask):
    _check_same_device(x, [("grad_out", grad_out)] + [(f"weights[{i}]", w) for i, w in enumerate(weights)]
                       + [(f"patches[{i}]", p) for i, p in enumerate(patches)])
    dx = x.new_empty(x.shape) if output_mask[0] else x.new_empty((0,))
    dws = [w.new_empty(w.shape) for w in weights] if output_mask[1] else []
    dbs = [w.new_empty((w.shape[0],)) for w in weights] if output_mask[2] else []
    return dx, dws, dbs


# ---------------------------------------------------------------- vmap
# torch.func.vmap (and grad/vjp/jacrev, which run the backward op under
# vmap) over the three ops. The vmapped dimension of x alone folds into the
# batch: one call over V*B samples, the case of vmap over inputs and of
# per-sample gradients' forward. Anything else (batched weights, biases,
# position embeddings, gradients, or weight gradients, which must stay
# separate per slice) runs the op once per slice and stacks: correct for
# every combination, as fast as a Python loop over the slices.

def _slice(t, dim, v):
    return t if dim is None else t.select(dim, v)


def _slice_arg(arg, dims, v):
    """Slice v of one op argument: a Tensor (dims: int or None), a Tensor[]
    (dims: one int or None per element) or a non-tensor (dims None)."""
    if dims is None:
        return arg
    if isinstance(dims, int):
        return arg.select(dims, v)
    return [_slice(a, d, v) for a, d in zip(arg, dims)]


def _stack_outputs(results):
    first = results[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(results), 0
    if isinstance(first, (list, tuple)) and all(isinstance(r, torch.Tensor) for r in first):
        return [torch.stack(parts) for parts in zip(*results)], [0] * len(first)
    outs, dims = zip(*(_stack_outputs([r[i] for r in results]) for i in range(len(first))))
    return tuple(outs), tuple(dims)


def _vmap_by_slices(op, info, in_dims, args):
    if info.batch_size == 0:
        raise ValueError(f"{op}: vmap over a dimension of size 0 is not supported")
    results = [op(*[_slice_arg(a, d, v) for a, d in zip(args, in_dims)]) for v in range(info.batch_size)]
    return _stack_outputs(results)


def _only_x_batched(in_dims):
    x_dim, w_dims, b_dims, _, pe_dim = in_dims
    return x_dim is not None and pe_dim is None and all(d is None for d in list(w_dims) + list(b_dims))


def _fold(x, x_dim):
    """x with its vmapped dim x_dim folded into the batch; returns it and (V, B) to unfold with
    (both kept: with V = 0 or B = 0 the folded size cannot tell them apart)."""
    xb = x.movedim(x_dim, 0)
    return xb.reshape(xb.shape[0] * xb.shape[1], *xb.shape[2:]), tuple(xb.shape[:2])


def _unfold(t, vb):
    return t.reshape(*vb, *t.shape[1:])


def _forward_vmap_rule(op, unfold_result):
    """vmap rule of a forward op; unfold_result(result, V) -> (batched result, out_dims)."""
    def rule(info, in_dims, x, weights, biases, tubes, pos_embed):
        args = (x, weights, biases, tubes, pos_embed)
        if not _only_x_batched(in_dims):
            return _vmap_by_slices(op, info, in_dims, args)
        xf, V = _fold(x, in_dims[0])
        return unfold_result(op(xf, weights, biases, tubes, pos_embed), V)
    return rule


torch.library.register_vmap("tubevit::tube_tokens", _forward_vmap_rule(
    torch.ops.tubevit.tube_tokens, lambda out, V: (_unfold(out, V), 0)))
torch.library.register_vmap("tubevit::tube_tokens_with_patches", _forward_vmap_rule(
    torch.ops.tubevit.tube_tokens_with_patches,
    lambda res, V: ((_unfold(res[0], V), [_unfold(p, V) for p in res[1]]), (0, [0] * len(res[1])))))


@torch.library.register_vmap("tubevit::tube_tokens_backward")
def _tube_tokens_backward_vmap(info, in_dims, grad_out, x, weights, patches, tubes, output_mask):
    args = (grad_out, x, weights, patches, tubes, output_mask)
    g_dim, x_dim, w_dims, p_dims, _, _ = in_dims
    # Input gradient only, gradient and x batched alike, nothing else: the
    # samples of all slices are independent, so one call over V*B of them.
    if (g_dim is not None and x_dim is not None and all(d is None for d in w_dims)
            and not output_mask[1] and not output_mask[2]):
        gf, V = _fold(grad_out, g_dim)
        xf, _ = _fold(x, x_dim)
        dx, dws, dbs = torch.ops.tubevit.tube_tokens_backward(gf, xf, weights, [], tubes, output_mask)
        return (_unfold(dx, V), dws, dbs), (0, [], [])
    return _vmap_by_slices(torch.ops.tubevit.tube_tokens_backward, info, in_dims, args)
