"""The ops' C++ autograd (csrc/tube_tokens_autograd.cpp): which nodes it records, forward mode
(torch.autograd.forward_ad) and forward-over-reverse, gradients asked for a subset of inputs,
saved-tensor semantics (hooks, in-place checks, freeing after backward) and compiled autograd,
each against the Conv3d reference in fp64. Reverse mode of every order is in test_tokens.py,
torch.func in test_vmap.py."""
import itertools

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import tubevit_ext as tv

from conftest import make_params

TUBES = [tv.Tube((2, 3, 3), (2, 3, 3)), tv.Tube((3, 2, 2), (1, 4, 4), (1, 1, 0))]  # the second overlaps in T
FLAT = [v for t in TUBES for v in t.flat()]
SIZE = (6, 9, 10)
C, D = 2, 5
OP = torch.ops.tubevit


def _inputs(device, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(2, C, *SIZE, dtype=torch.float64, device=device)
    ws, bs = make_params(TUBES, C, D, dtype=torch.float64, device=device, seed=seed)
    pe = tv.sincos_pos_embed(TUBES, SIZE, D, dtype=torch.float64, device=device)
    return x, ws, bs, pe


def test_records_the_cpp_nodes_and_nothing_under_no_grad(device):
    x, ws, bs, pe = _inputs(device)
    assert OP.tube_tokens(x, ws, bs, FLAT, pe).grad_fn is None  # nothing requires grad
    ws = [w.requires_grad_() for w in ws]
    with torch.no_grad():
        out = OP.tube_tokens(x, ws, bs, FLAT, pe)
    assert out.grad_fn is None and not out.requires_grad
    out = OP.tube_tokens(x, ws, bs, FLAT, pe)
    assert out.grad_fn.name() == "TubeTokensBackward0"
    # edges: x, weights, biases, pos_embed; only the weights lead anywhere
    assert [e[0] is not None for e in out.grad_fn.next_functions] == [False, True, True, False, False, False]
    g = torch.randn_like(out)
    dx, dws, dbs = OP.tube_tokens_backward(g.requires_grad_(), x, ws, [], FLAT, [True, True, True])
    assert {t.grad_fn.name() for t in [dx, *dws, *dbs]} == {"TubeTokensBackwardBackward0"}
    if device == "cpu":
        out, patches = OP.tube_tokens_with_patches(x, ws, bs, FLAT, pe)
        assert out.grad_fn.name() == "TubeTokensBackward0"
        assert all(p.grad_fn is None and not p.requires_grad for p in patches)


SUBSETS = [s for r in (1, 2, 4) for s in itertools.combinations(["x", "w", "b", "pe"], r)]


@pytest.mark.parametrize("tangents", SUBSETS, ids=["+".join(s) for s in SUBSETS])
def test_forward_ad_matches_the_reference(device, tangents):
    x, ws, bs, pe = _inputs(device)
    torch.manual_seed(1)
    t = {"x": torch.randn_like(x), "w": [torch.randn_like(w) for w in ws], "b": [torch.randn_like(b) for b in bs],
         "pe": torch.randn_like(pe)}

    def tangent_of(f):
        with fwAD.dual_level():
            dual = lambda p, k: fwAD.make_dual(p, t[k]) if k in tangents else p
            xd = dual(x, "x")
            wd = [fwAD.make_dual(w, tw) if "w" in tangents else w for w, tw in zip(ws, t["w"])]
            bd = [fwAD.make_dual(b, tb) if "b" in tangents else b for b, tb in zip(bs, t["b"])]
            out = f(xd, wd, bd, dual(pe, "pe"))
            return fwAD.unpack_dual(out).tangent

    got = tangent_of(lambda x_, w_, b_, p_: OP.tube_tokens(x_, w_, b_, FLAT, p_))
    want = tangent_of(lambda x_, w_, b_, p_: tv.reference.tube_tokens(x_, w_, b_, TUBES, p_))
    torch.testing.assert_close(got, want)


def test_forward_over_reverse_hessian_vector_products(device):
    """jvp of a gradient: the backward op's forward-mode formulas (in x, the weights and the
    tokens' gradient)."""
    x, ws, bs, pe = _inputs(device)
    torch.manual_seed(2)
    vx, vw = torch.randn_like(x), [torch.randn_like(w) for w in ws]

    def hvp(f):
        with fwAD.dual_level():
            xd = fwAD.make_dual(x.clone().requires_grad_(), vx)
            wd = [fwAD.make_dual(w.clone().requires_grad_(), v) for w, v in zip(ws, vw)]
            loss = f(xd, wd).pow(2).sum() + f(xd, wd).sin().sum()
            grads = torch.autograd.grad(loss, [xd, *wd])
            return [fwAD.unpack_dual(g).tangent for g in grads]

    got = hvp(lambda x_, w_: OP.tube_tokens(x_, w_, bs, FLAT, pe))
    want = hvp(lambda x_, w_: tv.reference.tube_tokens(x_, w_, bs, TUBES, pe))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("wrt", ["x", "w0", "b1", "pe", "w1+pe"])
def test_gradients_of_a_subset_of_the_inputs(device, wrt):
    x, ws, bs, pe = _inputs(device)
    leaves = {"x": x, "w0": ws[0], "w1": ws[1], "b1": bs[1], "pe": pe}
    for v in leaves.values():
        v.requires_grad_()
    g = torch.randn_like(tv.reference.tube_tokens(x, ws, bs, TUBES, pe))
    asked = [leaves[k] for k in wrt.split("+")]
    got = torch.autograd.grad(OP.tube_tokens(x, ws, bs, FLAT, pe), asked, g)
    want = torch.autograd.grad(tv.reference.tube_tokens(x, ws, bs, TUBES, pe), asked, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_saved_tensors_follow_autograd_rules(device):
    x, ws, bs, pe = _inputs(device)
    x.requires_grad_()
    out = OP.tube_tokens(x, ws, bs, FLAT, pe)
    out.sum().backward(retain_graph=True)
    g1 = x.grad.clone()
    out.sum().backward()  # retained: runs again
    torch.testing.assert_close(x.grad, 2 * g1)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        out.sum().backward()
    # an input changed in place after the forward is caught at backward
    w = ws[0].clone().requires_grad_()
    xx = x.detach().clone()
    out = OP.tube_tokens(xx, [w, ws[1]], bs, FLAT, pe)
    xx.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_saved_tensor_hooks_see_every_saved_tensor(device):
    """torch.autograd.graph.saved_tensors_hooks (what activation offloading and checkpointing
    build on) packs x and the weights, and on the CPU the saved patch matrices."""
    x, ws, bs, pe = _inputs(device)
    ws = [w.requires_grad_() for w in ws]
    packed = []

    def pack(t):
        packed.append(tuple(t.shape))
        return t.clone()

    ref = torch.autograd.grad(OP.tube_tokens(x, ws, bs, FLAT, pe).sum(), ws)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = OP.tube_tokens(x, ws, bs, FLAT, pe)
    assert packed == [tuple(x.shape)] + [tuple(w.shape) for w in ws]
    for a, b in zip(torch.autograd.grad(out.sum(), ws), ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    if device == "cpu":
        packed.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out, patches = OP.tube_tokens_with_patches(x, ws, bs, FLAT, pe)
        assert packed[3:] == [tuple(p.shape) for p in patches]
        for a, b in zip(torch.autograd.grad(out.sum(), ws), ref):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("module_path", [False, True], ids=["op", "module"])
def test_compiled_autograd_matches_eager(device, module_path):
    """torch._dynamo's compiled autograd traces the nodes' backward (compiled_args /
    apply_with_saved), for the plain op and the CPU module's saved-patches op."""
    from torch._dynamo import compiled_autograd

    x, ws, bs, pe = _inputs(device)
    x.requires_grad_()
    tok = tv.SparseTubeTokenizer(C, D, TUBES).to(device=device, dtype=torch.float64)
    params = [x, *tok.parameters()] if module_path else [x, *ws]
    if not module_path:
        for w in ws:
            w.requires_grad_()
    f = (lambda: tok(x)) if module_path else (lambda: OP.tube_tokens(x, ws, bs, FLAT, pe))

    def grads():
        loss = f().pow(2).sum()
        return torch.autograd.grad(loss, params)

    want = grads()
    torch._dynamo.reset()
    with compiled_autograd._enable(torch.compile(backend="aot_eager", fullgraph=True)):
        got = grads()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
