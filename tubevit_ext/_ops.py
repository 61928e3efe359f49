"""Python-side registrations for the tubevit:: dispatcher ops.

The schemas and the CPU/CUDA kernels are C++ (csrc/). Here: fake kernels
(shape, dtype and device only, for torch.compile and meta tensors) and the
autograd formula. Imported by ``tubevit_ext/__init__.py`` after ``_C`` has
loaded the library, so the ops exist when we register against them.
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


def _token_grads(B, grad, x, weights, n_biases, need_x, need_w, need_b, need_pe):
    """(dx, dws, dbs, d_pos_embed) for the tokens' gradient, None where not
    needed (lists of None for weights / biases). B(grad, x, weights, mask) ->
    (dx, dws, dbs) is the backward op, as the caller has to call it."""
    dx, dws, dbs = None, [None] * len(weights), [None] * n_biases
    if need_x or need_w or need_b:
        dx_, dws_, dbs_ = B(grad, x, weights, [bool(need_x), bool(need_w), bool(need_b)])
        dx = dx_ if need_x else None
        dws = list(dws_) if need_w else dws
        dbs = list(dbs_) if need_b else dbs
    return dx, dws, dbs, (grad.sum(0) if need_pe else None)


def _backward(ctx, grad, *unused_patch_grads):
    saved = ctx.saved_tensors
    x = saved[0]
    n_w = len(saved) - 1 - ctx.n_patches
    weights, patches = list(saved[1:1 + n_w]), list(saved[1 + n_w:])
    # For list arguments needs_input_grad holds one bool per element.
    need_x, need_ws, need_bs, _, need_pe = ctx.needs_input_grad
    need_w, need_b = any(need_ws), ctx.has_bias and any(need_bs)
    if grad is None:  # no gradient reached the tokens (grads are not materialised)
        return None, [None] * len(weights), [None] * len(need_bs), None, None
    dx, dws, dbs, dpe = _token_grads(
        lambda g, x_, w, mask: torch.ops.tubevit.tube_tokens_backward(g, x_, w, patches if mask[1] else [],
                                                                       ctx.tubes, mask),
        grad, x, weights, len(need_bs), need_x, need_w, need_b, need_pe)
    return dx, dws, dbs, None, dpe


torch.library.register_autograd("tubevit::tube_tokens", _backward, setup_context=_setup_context)
torch.library.register_autograd("tubevit::tube_tokens_with_patches", _backward,
                                setup_context=_setup_context_with_patches)


# ---------------------------------------------------------------- double backward
# The backward op computes, per tube i (P_i(x): the patch matrix, G_i: the
# tube's rows of grad_out):
#   dx = Bx(G, W)  = col2im of G_i W_i      (linear in G, linear in W)
#   dW = Bw(G, x)  = G_i^T P_i(x)           (linear in G, linear in x)
#   db = Bb(G)     = column sums of G_i     (linear in G)
# so with cotangents u (of dx), V (of dW), c (of db) its vector-Jacobian
# product is made of the two ops themselves:
#   grad_G = F(u; W) + F(x; V, c)     (F = tube_tokens without bias/PE unless given)
#   grad_x = Bx(G, V)
#   grad_W = Bw(G, u)
# Each is again differentiable, so any order works (gradient penalties such
# as R1 / WGAN-GP, and hessians under torch.func).

def _filled(tensors, like):
    """Gradients for a list, zeros where absent; None when all are absent."""
    if tensors is None or all(t is None for t in tensors):
        return None
    return [torch.zeros_like(w) if t is None else t for t, w in zip(tensors, like)]


def _tokens_tangent(F, tubes, x, weights, x_t, w_t, b_t, pe_t=None):
    """F(x_t; W) + F(x; W_t, b_t, pe_t), absent terms left out (None if all
    are): the tokens' change along (x_t, W_t, b_t, pe_t), F being bilinear in
    (x, W) and affine in (b, pe). Both the forward's jvp and grad_G above.
    F(x, ws, bs, tubes, pe) -> tokens; w_t / b_t: lists with None entries."""
    out = F(x_t, weights, [], tubes, None) if x_t is not None else None
    w_t = _filled(w_t, weights)
    b_t = _filled(b_t, [w[:, 0, 0, 0, 0] for w in weights])
    if w_t is not None or b_t is not None or pe_t is not None:
        term = F(x, w_t if w_t is not None else [torch.zeros_like(w) for w in weights], b_t or [], tubes, pe_t)
        out = term if out is None else out + term
    return out


def _backward_vjp(F, B, tubes, G, x, weights, u, V, c, need_g, need_x, need_w):
    """(grad_G, grad_x, grad_W list or None) from the formulas above.
    F as for _tokens_tangent, B(G, x, ws, tubes, mask) -> (dx, dws, dbs)."""
    gG = _tokens_tangent(F, tubes, x, weights, u, V, c) if need_g else None
    V = _filled(V, weights)
    gx = B(G, x, V, tubes, [True, False, False])[0] if need_x and V is not None else None
    gW = list(B(G, u, weights, tubes, [False, True, False])[1]) if need_w and u is not None else None
    return gG, gx, gW


def _op_forward(x, weights, biases, tubes, pos_embed):
    return torch.ops.tubevit.tube_tokens(x, weights, biases, tubes, pos_embed)


def _op_backward(G, x, weights, tubes, mask):
    return torch.ops.tubevit.tube_tokens_backward(G, x, weights, [], tubes, mask)


def _setup_backward_context(ctx, inputs, output):
    grad_out, x, weights, patches, tubes, output_mask = inputs
    ctx.save_for_backward(grad_out, x, *weights)
    ctx.tubes, ctx.mask, ctx.n_patches = list(tubes), list(output_mask), len(patches)
    ctx.set_materialize_grads(False)


def _backward_of_backward(ctx, gdx, gdws, gdbs):
    G, x, *weights = ctx.saved_tensors
    need_g, need_x, need_ws = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    u = gdx if ctx.mask[0] else None
    gG, gx, gW = _backward_vjp(_op_forward, _op_backward, ctx.tubes, G, x, weights, u,
                               gdws if ctx.mask[1] else None, gdbs if ctx.mask[2] else None,
                               need_g, need_x, any(need_ws))
    return gG, gx, (gW if gW is not None else [None] * len(weights)), [None] * ctx.n_patches, None, None


torch.library.register_autograd("tubevit::tube_tokens_backward", _backward_of_backward,
                                setup_context=_setup_backward_context)


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


# ---------------------------------------------------------------- torch.func
class _Static:
    """A non-tensor argument of the Functions below, held as one pytree leaf:
    torch.func flattens a plain list of ints/bools into leaves of its own and
    then miscounts the tangents of a Function with tuple outputs."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = list(value)


class TubeTokensFunction(torch.autograd.Function):
    """tube_tokens' autograd for torch.func transforms (grad, vjp, jacrev, and
    vmap over them). torch.func only accepts autograd.Functions written with a
    separate ``setup_context``; the Function that ``register_autograd``
    generates for the dispatcher op is not, so tubevit_ext.tube_tokens routes
    here while a transform is active. Same backward op, same gradients; vmap
    of forward and backward goes through the ops' vmap rules above.

    Arguments are flat for autograd: ``apply(x, pos_embed, _Static(tubes),
    n_weights, has_bias, *weights, *biases)``.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, pos_embed, tubes, n_weights, has_bias, *params):
        weights = list(params[:n_weights])
        biases = list(params[n_weights:]) if has_bias else []
        return torch.ops.tubevit.tube_tokens(x, weights, biases, tubes.value, pos_embed)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, _, tubes, n_weights, has_bias, *params = inputs
        ctx.save_for_backward(x, *params[:n_weights])
        ctx.save_for_forward(x, *params[:n_weights])
        ctx.tubes, ctx.n_weights, ctx.has_bias = tubes.value, n_weights, has_bias

    @staticmethod
    def jvp(ctx, x_t, pe_t, _tubes_t, _n_t, _has_bias_t, *params_t):
        """Forward mode (jvp, jacfwd): two calls of the op (_tokens_tangent)."""
        x, *weights = ctx.saved_tensors
        n = ctx.n_weights
        return _tokens_tangent(_op_forward, ctx.tubes, x, weights, x_t, list(params_t[:n]), list(params_t[n:]),
                               pe_t)

    @staticmethod
    def backward(ctx, grad):
        x, *weights = ctx.saved_tensors
        n = ctx.n_weights
        need = ctx.needs_input_grad
        dx, dws, dbs, dpe = _token_grads(
            lambda g, x_, w, mask: _func_backward(g, x_, w, ctx.tubes, mask), grad, x, weights,
            n if ctx.has_bias else 0, need[0], any(need[5:5 + n]), ctx.has_bias and any(need[5 + n:]), need[1])
        return (dx, dpe, None, None, None, *dws, *dbs)


class TubeTokensBackwardFunction(torch.autograd.Function):
    """The backward op under torch.func, as a Function of its own: torch.func
    cannot use the op's dispatcher autograd (see TubeTokensFunction), and
    second derivatives (grad of grad, hessians) need this one's backward and
    jvp, which are the formulas of _backward_vjp built from the two
    Functions again.
    ``apply(grad, x, _Static(tubes), _Static(output_mask), *weights)`` ->
    (dx, *dws, *dbs), each group present only where output_mask asks for it
    (dx: an empty tensor when not asked for)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad, x, tubes, output_mask, *weights):
        dx, dws, dbs = torch.ops.tubevit.tube_tokens_backward(grad, x, list(weights), [], tubes.value,
                                                              output_mask.value)
        return (dx, *dws, *dbs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad, x, tubes, output_mask, *weights = inputs
        ctx.save_for_backward(grad, x, *weights)
        ctx.save_for_forward(grad, x, *weights)
        ctx.tubes, ctx.mask = tubes.value, output_mask.value

    @staticmethod
    def backward(ctx, gdx, *g):
        G, x, *weights = ctx.saved_tensors
        n, mask = len(weights), ctx.mask
        gdws = list(g[:n]) if mask[1] else None
        gdbs = list(g[n if mask[1] else 0:]) if mask[2] else None
        need = ctx.needs_input_grad
        gG, gx, gW = _backward_vjp(_func_forward, _func_backward, ctx.tubes, G, x, weights,
                                   gdx if mask[0] else None, gdws, gdbs, need[0], need[1], any(need[4:]))
        return (gG, gx, None, None, *(gW if gW is not None else [None] * n))

    @staticmethod
    def jvp(ctx, G_t, x_t, _tubes_t, _mask_t, *w_t):
        """Tangents of (dx, dW, db): dx is bilinear in (G, W), dW in (G, x),
        db linear in G, so each is one or two calls of this Function."""
        G, x, *weights = ctx.saved_tensors
        mask, tubes = ctx.mask, ctx.tubes
        dx_t = torch.zeros(x.shape if mask[0] else (0,), dtype=x.dtype, device=x.device)
        dws_t = [torch.zeros_like(w) for w in weights] if mask[1] else []
        dbs_t = [w.new_zeros(w.shape[0]) for w in weights] if mask[2] else []
        if G_t is not None:
            a, b, c = _func_backward(G_t, x, weights, tubes, mask)
            dx_t = dx_t + a if mask[0] else dx_t
            dws_t = [s + t for s, t in zip(dws_t, b)]
            dbs_t = [s + t for s, t in zip(dbs_t, c)]
        w_t = _filled(list(w_t), weights)
        if mask[0] and w_t is not None:
            dx_t = dx_t + _func_backward(G, x, w_t, tubes, [True, False, False])[0]
        if mask[1] and x_t is not None:
            dws_t = [s + t for s, t in zip(dws_t, _func_backward(G, x_t, weights, tubes, [False, True, False])[1])]
        return (dx_t, *dws_t, *dbs_t)


def _func_forward(x, weights, biases, tubes, pos_embed):
    return TubeTokensFunction.apply(x, pos_embed, _Static(tubes), len(weights), bool(biases), *weights, *biases)


def _func_backward(G, x, weights, tubes, mask):
    """TubeTokensBackwardFunction with the op's (dx, dws, dbs) result shape."""
    out = TubeTokensBackwardFunction.apply(G, x, _Static(tubes), _Static(mask), *weights)
    n = len(weights)
    dws = list(out[1:1 + n]) if mask[1] else []
    return out[0], dws, list(out[1 + len(dws):])
