"""The test-only ops of ``torch.ops.tubevit_testing`` and their fake kernels.

These ops run the CUDA backend's kernels' logic where the test suite can check
it against the fp64 reference: the per-element "naive" kernels (CPU and
CUDA), the tensor-core kernels' tile code through a host emulator, the GEMM
path's orchestration on the CPU and the dP -> dx gather on a given dP
(schemas in csrc/testing/testing_ops.cpp); in a build with the prototype,
its emulators too (csrc/prototype/hopper_emulation.cpp).
They are not part of the library's interface. Importing this module fails
with ImportError on a build made with ``TUBEVIT_TESTING_OPS=0``.
"""
from __future__ import annotations

import torch

from . import _C
from ._ops import _tube_tokens_backward_fake, _tube_tokens_fake

if not _C._testing_ops_compiled():
    raise ImportError("this build of tubevit_ext leaves out the test-only ops (built with TUBEVIT_TESTING_OPS=0); "
                      "rebuild with TUBEVIT_TESTING_OPS=1 to run the test suite")

ops = torch.ops.tubevit_testing

torch.library.register_fake("tubevit_testing::tube_tokens_naive")(_tube_tokens_fake)


@torch.library.register_fake("tubevit_testing::tube_tokens_naive_backward")
def _tube_tokens_naive_backward_fake(grad_out, x, weights, tubes, output_mask):
    return _tube_tokens_backward_fake(grad_out, x, weights, [], tubes, output_mask)
