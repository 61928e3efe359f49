"""tubevit_ext: TubeViT's sparse video tubes as one fused PyTorch op.

Importing the package loads the native library (``_C``, which registers the
``torch.ops.tubevit`` ops with their CPU, CUDA and autograd kernels, the
autograd one in C++: csrc/tube_tokens_autograd.cpp), then the fake kernels
(``_ops``).
"""
import torch  # noqa: F401  (loads libc10/libtorch, which _C links against)

from . import _C  # noqa: F401  (defines torch.ops.tubevit.*; before any registration)
from . import _ops  # noqa: F401
from .functional import tube_tokens
from .geometry import (IMAGE_TUBE, PAPER_TUBES, Tube, as_tubes, flatten_tubes, num_tokens,
                       token_grid, token_offsets)
from .pos_embed import sincos_pos_embed
from .modules import SparseTubeTokenizer, TubeProjection
from . import reference  # noqa: E402,F401
from . import export  # noqa: E402,F401  (torch.export / ONNX helpers)

__version__ = "0.1.0"


def cuda_compiled() -> bool:
    """Whether this build contains the CUDA kernels."""
    return _C._cuda_compiled()


def reload_options() -> None:
    """Read the library's environment switches again (``TUBEVIT_CUDA_PATH``,
    ``TUBEVIT_CPU_CHUNK_BYTES``, ``TUBEVIT_CPU_PATCH_CACHE_MB``; csrc/options.h). They
    are read once, at the first op call; call this after changing one in-process
    (tests, benchmarks), not while ops run on other threads. Raises ValueError
    for a value the switch does not know."""
    _C._reload_options()


def patch_cache_bytes() -> int:
    """Bytes of freed CPU buffers kept for reuse: token outputs, input
    gradients and the patch matrices CPU training saves for backward (see
    ``tube_tokens(save_patches=...)``); at most TUBEVIT_CPU_PATCH_CACHE_MB MiB
    (default 256)."""
    return _C._patch_cache_bytes()


def empty_patch_cache() -> None:
    """Return the cached CPU patch buffers to the system (buffers still held
    by an autograd graph are returned when it is freed)."""
    _C._empty_patch_cache()


__all__ = [
    "Tube", "PAPER_TUBES", "IMAGE_TUBE", "as_tubes", "flatten_tubes", "token_grid", "num_tokens",
    "token_offsets", "sincos_pos_embed", "tube_tokens", "SparseTubeTokenizer", "TubeProjection",
    "reference", "export", "cuda_compiled", "reload_options", "patch_cache_bytes", "empty_patch_cache",
]
