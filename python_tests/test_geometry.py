import random

import pytest

import tubevit_ext as tv
from tubevit_ext import _C

from conftest import random_tubes


def test_paper_token_counts():
    assert tv.num_tokens(tv.PAPER_TUBES, (32, 224, 224)) == 539
    assert tv.num_tokens(tv.PAPER_TUBES, (64, 224, 224)) == 1176
    assert tv.num_tokens([tv.IMAGE_TUBE], (1, 224, 224)) == 196
    assert [tv.token_grid(t, (32, 224, 224)) for t in tv.PAPER_TUBES] == [
        (2, 7, 7), (3, 7, 7), (2, 7, 7), (1, 14, 14)]


def test_paper_tubes_are_the_papers():
    assert tv.PAPER_TUBES[0] == tv.Tube((8, 8, 8), (16, 32, 32), (0, 0, 0))
    assert tv.PAPER_TUBES[1] == tv.Tube((16, 4, 4), (6, 32, 32), (4, 8, 8))
    assert tv.PAPER_TUBES[2] == tv.Tube((4, 12, 12), (16, 32, 32), (0, 16, 16))
    assert tv.PAPER_TUBES[3] == tv.Tube((1, 16, 16), (32, 16, 16), (0, 0, 0))


def test_non_square_grid():
    # 16x4x4 s(6,32,32) o(4,8,8) on 32x160x288: h (160-8-4)//32+1 = 5, w (288-8-4)//32+1 = 9
    assert tv.token_grid(tv.PAPER_TUBES[1], (32, 160, 288)) == (3, 5, 9)
    assert tv.token_offsets(tv.PAPER_TUBES, (32, 224, 224)) == [0, 98, 245, 343]


def test_python_geometry_matches_cpp():
    rng = random.Random(0)
    for _ in range(300):
        size = (rng.randint(1, 40), rng.randint(1, 40), rng.randint(1, 40))
        tubes = random_tubes(rng, rng.randint(1, 6), size, max_kernel=12)
        got = _C._token_layout(tv.flatten_tubes(tubes), *size)
        offs = tv.token_offsets(tubes, size)
        want = [v for t, o in zip(tubes, offs) for v in (*tv.token_grid(t, size), o)]
        assert got == want


def test_tube_that_does_not_fit_is_named():
    big = tv.Tube((8, 8, 8), (1, 1, 1), (0, 0, 2))
    with pytest.raises(ValueError, match=r"tube 0 .* yields no tokens .*\(8, 9, 9\)"):
        tv.num_tokens([big], (8, 9, 9))
    with pytest.raises(ValueError, match=r"tube 0 .* yields no tokens"):
        _C._token_layout(tv.flatten_tubes([big]), 8, 9, 9)


@pytest.mark.parametrize("bad,msg", [(((0, 1, 1), (1, 1, 1)), r"every kernel entry must be >= 1, got \(0, 1, 1\)"),
                                     (((1, 1, 1), (1, 0, 1)), r"every stride entry must be >= 1, got \(1, 0, 1\)"),
                                     (((1, 1, 1), (1, 1, 1), (0, -1, 0)), r"every offset entry must be >= 0, got \(0, -1, 0\)")])
def test_bad_tube_parameters(bad, msg):
    with pytest.raises(ValueError, match=msg):
        tv.Tube.make(*bad)


def test_tube_normalisation():
    assert tv.Tube.make(16, (32, 16, 16)) == tv.Tube((16, 16, 16), (32, 16, 16), (0, 0, 0))
    assert tv.as_tubes([((1, 16, 16), (32, 16, 16))]) == (tv.IMAGE_TUBE,)
    with pytest.raises(ValueError, match="at least one tube"):
        tv.as_tubes([])
    with pytest.raises(TypeError, match=r"stride must be an int or a \(T, H, W\) triple of ints"):
        tv.Tube.make(1, (1.5, 2, 2))


@pytest.mark.parametrize("make", [lambda: tv.Tube((16, 16), (16, 16)), lambda: tv.Tube.make((1, 2), 1),
                                  lambda: tv.SparseTubeTokenizer(3, 8, tubes=[((16, 16), (16, 16))]),
                                  lambda: tv.num_tokens([((16, 16), (16, 16))], (8, 32, 32))])
def test_two_dimensional_tube_is_rejected_where_it_is_made(make):
    # a (kh, kw) pair is not silently accepted only to fail later with an IndexError
    with pytest.raises(ValueError, match=r"kernel must be an int or a \(T, H, W\) triple of ints, got 2 values"):
        make()


def test_unflatten_tubes_inverts_flatten():
    tubes = tv.PAPER_TUBES + (tv.Tube((2, 3, 4), (5, 6, 7), (1, 0, 2)),)
    assert tv.geometry.unflatten_tubes(tv.flatten_tubes(tubes)) == tubes
    with pytest.raises(ValueError, match="9 ints per tube, got 10"):
        tv.geometry.unflatten_tubes(list(range(10)))
