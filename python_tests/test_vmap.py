"""torch.func over the ops: vmap (inputs, weights, position embeddings),
per-sample gradients (vmap of grad), jacobians (jacrev), against loops of
the eager op and the Conv3d reference."""
import pytest
import torch
from torch.func import functional_call, grad, jacrev, vmap

import tubevit_ext as tv

from conftest import make_params

TUBES = [tv.Tube((2, 3, 3), (2, 3, 3)), tv.Tube((3, 2, 2), (1, 4, 4), (1, 1, 0))]  # the second overlaps in T
SIZE = (6, 9, 10)
C, D = 2, 5


def _params(device, dtype=torch.float64):
    ws, bs = make_params(TUBES, C, D, dtype=dtype, device=device)
    pe = tv.sincos_pos_embed(TUBES, SIZE, D, dtype=dtype, device=device)
    return ws, bs, pe


@pytest.mark.parametrize("in_dim", [0, 2])
def test_vmap_over_inputs_folds_into_the_batch(device, in_dim):
    ws, bs, pe = _params(device)
    xs = torch.randn(3, 2, C, *SIZE, dtype=torch.float64, device=device)  # (V, B, ...)
    f = lambda x: tv.tube_tokens(x, ws, bs, TUBES, pe)
    out = vmap(f, in_dims=in_dim)(xs.movedim(0, in_dim))
    expect = torch.stack([f(x) for x in xs])
    torch.testing.assert_close(out, expect, rtol=0, atol=0)  # the same samples in one call: bitwise
    torch.testing.assert_close(out, torch.stack([tv.reference.tube_tokens(x, ws, bs, TUBES, pe) for x in xs]))


def test_vmap_over_weights_biases_and_pos_embed(device):
    """A model ensemble: one weight set per vmap slice."""
    x = torch.randn(2, C, *SIZE, dtype=torch.float64, device=device)
    sets = [_params(device) for _ in range(3)]
    for s, (ws, bs, pe) in enumerate(sets):
        ws[:] = [w * (s + 1) for w in ws]
    W = [torch.stack([s[0][i] for s in sets]) for i in range(len(TUBES))]
    Bs = [torch.stack([s[1][i] for s in sets]) for i in range(len(TUBES))]
    P = torch.stack([s[2] * (k + 1) for k, s in enumerate(sets)])
    f = lambda w, b, p: tv.tube_tokens(x, w, b, TUBES, p)
    out = vmap(f)(W, Bs, P)
    for k, (ws, bs, pe) in enumerate(sets):
        torch.testing.assert_close(out[k], tv.reference.tube_tokens(x, ws, bs, TUBES, pe * (k + 1)))
    # weights batched, x batched along another dimension
    xs = torch.randn(3, 2, C, *SIZE, dtype=torch.float64, device=device)
    out = vmap(lambda w, xx: tv.tube_tokens(xx, w, None, TUBES), in_dims=(0, 1))(W, xs.movedim(0, 1))
    for k in range(3):
        torch.testing.assert_close(out[k], tv.reference.tube_tokens(xs[k], [w[k] for w in W], None, TUBES))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_per_sample_gradients(device, dtype):
    """vmap(grad(loss)) over samples: the forward folds, the backward runs per
    sample (weight gradients must stay separate); equals one autograd call per sample."""
    torch.manual_seed(0)
    tok = tv.SparseTubeTokenizer(C, D, TUBES).to(device=device, dtype=dtype)
    params = {k: v.detach() for k, v in tok.named_parameters()}
    xs = torch.randn(4, C, *SIZE, dtype=dtype, device=device)

    def loss(p, x):
        return functional_call(tok, p, (x[None],)).square().sum()

    per_sample = vmap(grad(loss, argnums=(0, 1)), in_dims=(None, 0))(params, xs)
    tol = dict(rtol=0, atol=0) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    for i in range(xs.shape[0]):
        x = xs[i:i + 1].clone().requires_grad_()
        tok.zero_grad()
        tok(x).square().sum().backward()
        for k, p in tok.named_parameters():
            torch.testing.assert_close(per_sample[0][k][i], p.grad, **tol)
        torch.testing.assert_close(per_sample[1][i], x.grad[0], **tol)


def test_jacrev_matches_the_reference(device):
    ws, bs, pe = _params(device)
    x = torch.randn(1, C, 4, 5, 5, dtype=torch.float64, device=device)
    tubes = [tv.Tube((2, 2, 2), (1, 2, 3)), tv.Tube((1, 3, 3), (2, 2, 2), (1, 0, 1))]
    ws = [torch.randn(3, C, *t.kernel, dtype=torch.float64, device=device) for t in tubes]
    jac = jacrev(lambda xx: tv.tube_tokens(xx, ws, None, tubes))(x)
    ref = jacrev(lambda xx: tv.reference.tube_tokens(xx, ws, None, tubes))(x)
    torch.testing.assert_close(jac, ref)
    jw = jacrev(lambda w0: tv.tube_tokens(x, [w0, ws[1]], None, tubes))(ws[0])
    rw = jacrev(lambda w0: tv.reference.tube_tokens(x, [w0, ws[1]], None, tubes))(ws[0])
    torch.testing.assert_close(jw, rw)


def test_vmap_of_the_patch_saving_op():
    ws, bs, _ = _params("cpu")
    xs = torch.randn(3, 2, C, *SIZE, dtype=torch.float64)
    flat = tv.flatten_tubes(TUBES)
    op = torch.ops.tubevit.tube_tokens_with_patches
    out, patches = vmap(lambda x: op(x, ws, bs, flat, None))(xs)
    # batched weights take the per-slice path; both must equal per-slice calls
    W = [torch.stack([w, 2 * w, 3 * w]) for w in ws]
    out_w, patches_w = vmap(lambda w, x: op(x, w, bs, flat, None))(W, xs)
    for v in range(3):
        o, ps = op(xs[v], ws, bs, flat, None)
        torch.testing.assert_close(out[v], o, rtol=0, atol=0)
        o2, _ = op(xs[v], [w[v] for w in W], bs, flat, None)
        torch.testing.assert_close(out_w[v], o2, rtol=0, atol=0)
        for a, b, c in zip(patches, patches_w, ps):
            assert torch.equal(a[v], c) and torch.equal(b[v], c)


def test_func_grad_with_live_parameters():
    torch.manual_seed(0)
    tok = tv.SparseTubeTokenizer(C, D, TUBES).double()
    x = torch.randn(2, C, *SIZE, dtype=torch.float64)
    params = dict(tok.named_parameters())  # requires_grad=True at the base level
    g = grad(lambda p: functional_call(tok, p, (x,)).square().sum())(params)
    tok(x).square().sum().backward()
    for k, p in tok.named_parameters():
        torch.testing.assert_close(g[k], p.grad, rtol=0, atol=0)


def test_second_order_transforms_match_the_reference(device):
    """hessian (forward over reverse: the backward Function's jvp), grad of
    grad and a mixed jacobian (its backward), in x and in the weights."""
    tubes = [tv.Tube((2, 2, 2), (1, 2, 3)), tv.Tube((1, 3, 3), (2, 2, 2), (1, 0, 1))]
    x = torch.randn(1, C, 4, 5, 6, dtype=torch.float64, device=device)
    ws = [torch.randn(3, C, *t.kernel, dtype=torch.float64, device=device) for t in tubes]
    bs = [torch.randn(3, dtype=torch.float64, device=device) for _ in tubes]
    f = {impl: (lambda xx, w0, impl=impl: impl(xx, [w0, ws[1]], bs, tubes).pow(3).sum())
         for impl in (tv.tube_tokens, tv.reference.tube_tokens)}
    got, ref = f[tv.tube_tokens], f[tv.reference.tube_tokens]
    torch.testing.assert_close(torch.func.hessian(got, argnums=0)(x, ws[0]),
                               torch.func.hessian(ref, argnums=0)(x, ws[0]))
    torch.testing.assert_close(torch.func.hessian(got, argnums=1)(x, ws[0]),
                               torch.func.hessian(ref, argnums=1)(x, ws[0]))
    gg = lambda fn: grad(lambda xx: grad(fn)(xx, ws[0]).square().sum())(x)
    torch.testing.assert_close(gg(got), gg(ref))
    mixed = lambda fn: jacrev(lambda w0: grad(fn)(x, w0))(ws[0])
    torch.testing.assert_close(mixed(got), mixed(ref))
    # forward over reverse across arguments: the W tangent of dx, the x tangent of dW
    fwd_w = lambda fn: torch.func.jacfwd(lambda w0: grad(fn)(x, w0))(ws[0])
    torch.testing.assert_close(fwd_w(got), fwd_w(ref))
    fwd_x = lambda fn: torch.func.jacfwd(lambda xx: grad(fn, argnums=1)(xx, ws[0]))(x)
    torch.testing.assert_close(fwd_x(got), fwd_x(ref))


def test_forward_mode_jvp_and_jacfwd(device):
    ws, bs, pe = _params(device)
    x = torch.randn(2, C, *SIZE, dtype=torch.float64, device=device)
    tangents = (torch.randn_like(x), [torch.randn_like(w) for w in ws], [torch.randn_like(b) for b in bs],
                torch.randn_like(pe))
    f = lambda xx, w, b, p: tv.tube_tokens(xx, w, b, TUBES, p)
    r = lambda xx, w, b, p: tv.reference.tube_tokens(xx, w, b, TUBES, p)
    out, out_t = torch.func.jvp(f, (x, ws, bs, pe), tangents)
    ref, ref_t = torch.func.jvp(r, (x, ws, bs, pe), tangents)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(out_t, ref_t)
    # tangents on a subset of the inputs (the others held fixed)
    _, t_x = torch.func.jvp(lambda xx: f(xx, ws, bs, pe), (x,), (tangents[0],))
    _, t_w = torch.func.jvp(lambda w: f(x, w, bs, pe), (ws,), (tangents[1],))
    _, t_b = torch.func.jvp(lambda b: f(x, ws, b, pe), (bs,), (tangents[2],))
    torch.testing.assert_close(t_x + t_w + t_b + tangents[3], out_t)
    small = x[:1, :, :4, :5, :5]
    tubes = [tv.Tube((2, 2, 2), (1, 2, 3))]
    w0 = ws[0][:, :, :2, :2, :2].contiguous()
    torch.testing.assert_close(torch.func.jacfwd(lambda xx: tv.tube_tokens(xx, [w0], None, tubes))(small),
                               jacrev(lambda xx: tv.reference.tube_tokens(xx, [w0], None, tubes))(small))
