"""Tube geometry in Python: a formula-for-formula mirror of csrc/tube_geometry.h.

The C++ header is the source of truth; ``python_tests/test_geometry.py``
checks this module against it (``tubevit_ext._C._token_layout``) over random
tube lists. Python keeps its own copy because fake kernels and the position
embedding must be computable while ``torch.compile`` traces (with symbolic
sizes), where a call into a pybind function would break the graph.

All triples are (T, H, W). A tube reads ``x[:, :, o_t:, o_h:, o_w:]`` with a
Conv3d of the given kernel and stride and no padding.
"""
from __future__ import annotations

from typing import Iterable, NamedTuple, Sequence, Tuple

Triple = Tuple[int, int, int]

#: Ints per tube in the ops' flat ``int[] tubes`` argument: kt kh kw st sh sw ot oh ow
#: (``kTubeInts`` in csrc/tube_geometry.h).
TUBE_INTS = 9


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _triple(value, name: str) -> Triple:
    if _is_int(value):
        return (value, value, value)
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(f"{name} must be an int or a (T, H, W) triple of ints, got {value!r}") from None
    if not all(_is_int(v) for v in items):
        raise TypeError(f"{name} must be an int or a (T, H, W) triple of ints, got {value!r}")
    if len(items) != 3:
        raise ValueError(f"{name} must be an int or a (T, H, W) triple of ints, got {len(items)} "
                         f"values {value!r}")
    return items  # type: ignore[return-value]


class _TubeFields(NamedTuple):
    kernel: Triple
    stride: Triple
    offset: Triple


class Tube(_TubeFields):
    """One sparse tube: a strided Conv3d kernel, all triples in (T, H, W) order.

    ``Tube((8, 8, 8), (16, 32, 32), (0, 0, 0))``; an int stands for the same
    value on all three axes. Validated on construction (kernel and stride
    >= 1, offset >= 0; a pair or a non-int raises, naming the argument).
    Immutable and hashable.
    """

    __slots__ = ()

    def __new__(cls, kernel, stride, offset=(0, 0, 0)):
        t = super().__new__(cls, _triple(kernel, "kernel"), _triple(stride, "stride"), _triple(offset, "offset"))
        t.validate()
        return t

    @classmethod
    def make(cls, kernel, stride, offset=(0, 0, 0)) -> "Tube":
        """The same as ``Tube(kernel, stride, offset)``."""
        return cls(kernel, stride, offset)

    def validate(self) -> None:
        for name, vals, lo in (("kernel", self.kernel, 1), ("stride", self.stride, 1), ("offset", self.offset, 0)):
            if len(vals) != 3 or any(v < lo for v in vals):
                raise ValueError(f"{self!r}: every {name} entry must be >= {lo}, got {tuple(vals)}")

    def flat(self) -> list:
        """The TUBE_INTS ints the ops take per tube: kt kh kw st sh sw ot oh ow."""
        return [*self.kernel, *self.stride, *self.offset]

    def __repr__(self) -> str:
        k, s, o = self.kernel, self.stride, self.offset
        return f"Tube({k[0]}x{k[1]}x{k[2]} s{s} o{o})"


#: The four tubes of TubeViT §4.1, in the paper's order:
#: 8x8x8 s(16,32,32); 16x4x4 s(6,32,32) o(4,8,8); 4x12x12 s(16,32,32) o(0,16,16);
#: 1x16x16 s(32,16,16). 539 tokens for a 32x224x224 video.
PAPER_TUBES: Tuple[Tube, ...] = (
    Tube((8, 8, 8), (16, 32, 32), (0, 0, 0)),
    Tube((16, 4, 4), (6, 32, 32), (4, 8, 8)),
    Tube((4, 12, 12), (16, 32, 32), (0, 16, 16)),
    Tube((1, 16, 16), (32, 16, 16), (0, 0, 0)),
)

#: The 2D tube used for images (a 1-frame video): 196 tokens at 224x224.
IMAGE_TUBE: Tube = PAPER_TUBES[3]


def as_tubes(tubes: Iterable) -> Tuple[Tube, ...]:
    """Normalises a tube list: Tube records or (kernel, stride[, offset]) tuples."""
    out = []
    for i, t in enumerate(tubes):
        if isinstance(t, Tube):
            t.validate()
            out.append(t)
        else:
            try:
                out.append(Tube.make(*t))
            except TypeError as e:
                raise TypeError(f"tubes[{i}]: expected Tube or (kernel, stride[, offset]), got {t!r}: {e}") from None
    if not out:
        raise ValueError("tubes must contain at least one tube, got an empty list")
    return tuple(out)


def axis_positions(length, kernel: int, stride: int, offset: int):
    """Grid positions on one axis; 0 when the kernel does not fit (as the C++)."""
    span = length - offset - kernel
    return 0 if span < 0 else span // stride + 1


def axis_centre(index, kernel: int, stride: int, offset: int):
    """Voxel coordinate of grid index ``index``'s centre: o + s*i + k//2."""
    return offset + stride * index + kernel // 2


def token_grid(tube: Tube, input_size: Sequence[int]) -> Triple:
    """(nt, nh, nw) token grid of ``tube`` on a (T, H, W) input."""
    if len(input_size) != 3:
        raise ValueError(f"input_size must be (T, H, W), got {tuple(input_size)!r}")
    return tuple(  # type: ignore[return-value]
        axis_positions(L, k, s, o) for L, k, s, o in zip(input_size, tube.kernel, tube.stride, tube.offset)
    )


def tube_token_counts(tubes, input_size: Sequence[int]) -> list:
    """Tokens per tube on a (T, H, W) input: ``tubes`` is a sequence of Tube
    records or the ops' flat int list. Sizes may be symbolic (fake kernels);
    with concrete sizes a tube that yields no tokens raises ValueError in the
    C++ ops' words."""
    if len(tubes) and _is_int(tubes[0]):
        tubes = unflatten_tubes(tubes)
    counts = []
    for i, tube in enumerate(tubes):
        nt, nh, nw = token_grid(tube, input_size)
        n = nt * nh * nw
        if isinstance(n, int) and n <= 0:
            raise ValueError(
                f"{tube_description(i, tube)} yields no tokens for input size (T, H, W) = "
                f"{tuple(input_size)}: offset + kernel exceeds the input on some axis")
        counts.append(n)
    return counts


def num_tokens(tubes: Sequence[Tube], input_size: Sequence[int]) -> int:
    """Total tokens N of a tube list on a (T, H, W) input."""
    return sum(tube_token_counts(as_tubes(tubes), input_size))


def token_offsets(tubes: Sequence[Tube], input_size: Sequence[int]) -> list:
    """First token row of each tube in the concatenated sequence."""
    offsets, total = [], 0
    for n in tube_token_counts(as_tubes(tubes), input_size):
        offsets.append(total)
        total += n
    return offsets


def tube_description(i: int, tube: Tube) -> str:
    """How error messages name tube i: the words of the C++ checks (csrc/tube_tokens.cpp)."""
    return f"tube {i} (kernel={tuple(tube.kernel)}, stride={tuple(tube.stride)}, offset={tuple(tube.offset)})"


def flatten_tubes(tubes: Sequence[Tube]) -> list:
    """The ``int[] tubes`` argument of the dispatcher ops (TUBE_INTS ints per tube)."""
    return [v for t in as_tubes(tubes) for v in t.flat()]


def unflatten_tubes(flat: Sequence[int]) -> Tuple[Tube, ...]:
    """The inverse of flatten_tubes: Tube records from the ops' ``int[] tubes``."""
    if len(flat) % TUBE_INTS:
        raise ValueError(f"tubes must hold {TUBE_INTS} ints per tube, got {len(flat)}")
    return tuple(Tube(tuple(flat[i:i + 3]), tuple(flat[i + 3:i + 6]), tuple(flat[i + 6:i + 9]))
                 for i in range(0, len(flat), TUBE_INTS))
