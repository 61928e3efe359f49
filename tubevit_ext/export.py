"""Deployment: exported programs without the extension, and ONNX.

``torch.export`` keeps ``tubevit::`` ops as they are (their fake kernels give
the shapes), which is what AOTInductor and any runtime that loads this
package want. A runtime that cannot load the extension (ONNX Runtime,
TensorRT, ExecuTorch, a bare libtorch) needs the ops rewritten as ATen ops
first: :func:`decompositions` maps each forward op to the reference
construction (per-tube strided ``conv3d`` on the offset slice, flatten,
transpose, ``cat``, position embedding add), the same arithmetic as
``tubevit_ext.reference.tube_tokens``. The tokens then cost what the
reference costs in that runtime; the point is that the model exports at all.

::

    ep = torch.export.export(model.eval(), (x,))
    ep = ep.run_decompositions(tubevit_ext.export.decompositions())
    # or, to an ONNX file in one call (needs the optional onnx + onnxscript):
    tubevit_ext.export.to_onnx(model.eval(), (x,), "tubevit.onnx", dynamic_batch=True)
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Optional

import torch

from . import reference
from .geometry import Tube, unflatten_tubes


def _tube_tokens_aten(x, weights, biases, tubes, pos_embed=None):
    """tubevit::tube_tokens as ATen ops (the reference construction)."""
    return reference.tube_tokens(x, list(weights), list(biases), unflatten_tubes(tubes), pos_embed)


def _patches_aten(x: torch.Tensor, tube: Tube) -> torch.Tensor:
    """One tube's patch matrix (B, n, C*kt*kh*kw), K ordered (c, kt, kh, kw),
    as the CPU op returns it: strided windows of the offset slice."""
    (kt, kh, kw), (st, sh, sw), (ot, oh, ow) = tube.kernel, tube.stride, tube.offset
    u = x[:, :, ot:, oh:, ow:].unfold(2, kt, st).unfold(3, kh, sh).unfold(4, kw, sw)
    # (B, C, nt, nh, nw, kt, kh, kw) -> (B, nt, nh, nw, C, kt, kh, kw)
    u = u.permute(0, 2, 3, 4, 1, 5, 6, 7)
    return u.reshape(x.shape[0], u.shape[1] * u.shape[2] * u.shape[3], x.shape[1] * kt * kh * kw)


def _tube_tokens_with_patches_aten(x, weights, biases, tubes, pos_embed=None):
    """tubevit::tube_tokens_with_patches as ATen ops."""
    return (_tube_tokens_aten(x, weights, biases, tubes, pos_embed),
            [_patches_aten(x, t) for t in unflatten_tubes(tubes)])


def decompositions(base: Optional[Dict[Any, Callable]] = None) -> Dict[Any, Callable]:
    """A decomposition table for ``ExportedProgram.run_decompositions``.

    Returns ``base`` (default: ``torch.export.default_decompositions()``,
    the table ``run_decompositions()`` uses without arguments) plus entries
    that rewrite ``tubevit::tube_tokens`` and
    ``tubevit::tube_tokens_with_patches`` as ATen ops, so the program no
    longer needs this package. Pass ``base={}`` to rewrite only our ops
    and leave every other op of the program as it is.
    """
    table = dict(torch.export.default_decompositions()) if base is None else dict(base)
    table[torch.ops.tubevit.tube_tokens.default] = _tube_tokens_aten
    table[torch.ops.tubevit.tube_tokens_with_patches.default] = _tube_tokens_with_patches_aten
    return table


def export(model: torch.nn.Module, args: tuple, kwargs: Optional[dict] = None, *,
           dynamic_batch: bool = False, dynamic_size: bool = False, portable: bool = False,
           **export_kwargs) -> torch.export.ExportedProgram:
    """``torch.export.export`` with the options a tokenizer/TubeViT needs.

    Args:
        model, args, kwargs: as for ``torch.export.export`` (``x`` is the
            first positional argument, (B, C, T, H, W) or (B, C, H, W)).
        dynamic_batch: make dim 0 of the first argument dynamic.
        dynamic_size: make its frame count and frame size dynamic too (dims
            2.. of a (B, C, T, H, W) video or a (B, C, H, W) image): token
            count and position embedding are then computed in the program
            from the input's shape. The program accepts every size at
            which each tube yields at least one token (its range
            constraints say so); a TubeViT program also checks at run time
            that a sample has more than one token.
        portable: rewrite the ``tubevit::`` ops as ATen ops (see
            :func:`decompositions`), for runtimes without this package.
        export_kwargs: passed on (e.g. ``dynamic_shapes``, ``strict``).
    """
    if dynamic_batch or dynamic_size:
        if "dynamic_shapes" in export_kwargs:
            raise ValueError("pass either dynamic_batch/dynamic_size or dynamic_shapes, not both")
        x = args[0]
        if not isinstance(x, torch.Tensor) or x.dim() < 3:
            raise ValueError("dynamic_batch/dynamic_size need a (B, C, ...) tensor as the first argument, got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        dims = ([0] if dynamic_batch else []) + (list(range(2, x.dim())) if dynamic_size else [])
        # By name: every argument passed needs an entry (None = static).
        names = list(inspect.signature(model.forward).parameters)[:len(args)] + list(kwargs or {})
        export_kwargs["dynamic_shapes"] = {n: ({a: torch.export.Dim.DYNAMIC for a in dims} if i == 0 else None)
                                           for i, n in enumerate(names)}
    # Size-oblivious tracing: without it, every "is this size 1?" question
    # that shape propagation asks (contiguity, broadcasting) is answered for
    # the example input and kept as a guard, so an example with one position
    # on some tube axis (the paper's 1x16x16 tube at 32 frames) would pin the
    # frame count to the example's, and one with two would refuse 32 frames.
    # The answers for sizes >= 2 hold for size 1 in the ops used here (tested
    # at both: python_tests/test_export.py).
    with _size_oblivious():
        ep = torch.export.export(model, tuple(args), kwargs, **export_kwargs)
        return ep.run_decompositions(decompositions(base={})) if portable else ep


def _size_oblivious():
    try:
        import torch.fx.experimental._config as fx_config
        return fx_config.patch(backed_size_oblivious=True)
    except (ImportError, AttributeError, KeyError):  # older torch: trace with its defaults
        import contextlib
        return contextlib.nullcontext()


def to_onnx(model: torch.nn.Module, args: tuple, f: Optional[str] = None, kwargs: Optional[dict] = None, *,
            dynamic_batch: bool = False, dynamic_size: bool = False, **onnx_kwargs):
    """Export ``model`` to ONNX.

    The ``tubevit::`` ops become ONNX ``Slice``/``Conv``/``Reshape``/
    ``Transpose``/``Concat``/``Add`` through :func:`decompositions`; the rest
    of the model goes through ``torch.onnx.export(dynamo=True)`` as usual
    (``onnx_kwargs`` are passed on, e.g. ``opset_version``). Needs the
    optional packages ``onnx`` and ``onnxscript``. Returns the
    ``torch.onnx.ONNXProgram``; also writes it to ``f`` when given.
    ``dynamic_batch`` / ``dynamic_size``: as for :func:`export`.
    """
    ep = export(model, args, kwargs, dynamic_batch=dynamic_batch, dynamic_size=dynamic_size, portable=True)
    prog = torch.onnx.export(ep, dynamo=True, **onnx_kwargs)
    if f is not None:
        prog.save(f)
    return prog


__all__ = ["decompositions", "export", "to_onnx"]
