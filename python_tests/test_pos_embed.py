
import numpy as np
import pytest
import torch

import tubevit_ext as tv


def public_convention(tubes, size, dim):
    """Independent numpy version of the convention of the public TubeViT ports
    (MAE-style 1-D sin/cos per axis, [t | h | w], sin block then cos block)."""
    assert dim % 6 == 0
    m = dim // 6
    omega = 1.0 / 10000 ** (np.arange(m, dtype=np.float64) / m)
    rows = []
    for t in tubes:
        grid = tv.token_grid(t, size)
        for it in range(grid[0]):
            for ih in range(grid[1]):
                for iw in range(grid[2]):
                    row = []
                    for a, i in enumerate((it, ih, iw)):
                        p = t.offset[a] + t.stride[a] * i + t.kernel[a] // 2
                        row += [np.sin(p * omega), np.cos(p * omega)]
                    rows.append(np.concatenate(row))
    return np.stack(rows)


@pytest.mark.parametrize("dim", [6, 96, 768])
@pytest.mark.parametrize("size", [(32, 224, 224), (20, 48, 80)])
def test_matches_public_convention(dim, size):
    pe = tv.sincos_pos_embed(tv.PAPER_TUBES, size, dim, dtype=torch.float64)
    np.testing.assert_allclose(pe.numpy(), public_convention(tv.PAPER_TUBES, size, dim), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dim,pairs", [(1024, (171, 171, 170)), (1280, (214, 213, 213)), (768, (128, 128, 128)),
                                       (100, (17, 17, 16)), (2, (1, 0, 0))])
def test_generalised_widths(dim, pairs):
    assert tv.pos_embed.axis_pairs(dim) == pairs
    size = (32, 64, 96)
    pe = tv.sincos_pos_embed(tv.PAPER_TUBES, size, dim, dtype=torch.float64)
    assert pe.shape == (tv.num_tokens(tv.PAPER_TUBES, size), dim)
    # Each axis block is a 1-D sin/cos embedding of that axis' centre, with its own m.
    centres = torch.cat([tv.pos_embed.tube_centres(t, size) for t in tv.PAPER_TUBES]).double()
    start = 0
    for a, m in enumerate(pairs):
        if m == 0:
            continue
        omega = 10000.0 ** (-torch.arange(m, dtype=torch.float64) / m)
        ang = centres[:, a:a + 1] * omega
        torch.testing.assert_close(pe[:, start:start + m], torch.sin(ang), rtol=0, atol=1e-12)
        torch.testing.assert_close(pe[:, start + m:start + 2 * m], torch.cos(ang), rtol=0, atol=1e-12)
        start += 2 * m
    assert start == dim
    # Rows are distinct when every axis has frequencies: one code per position.
    if min(pairs) > 0:
        assert torch.unique(pe.round(decimals=9), dim=0).shape[0] == len({tuple(c) for c in centres.tolist()})


def test_odd_dim_has_zero_last_channel():
    pe = tv.sincos_pos_embed(tv.PAPER_TUBES, (32, 64, 64), 97)
    assert pe.shape[1] == 97 and torch.all(pe[:, -1] == 0)
    torch.testing.assert_close(pe[:, :96], tv.sincos_pos_embed(tv.PAPER_TUBES, (32, 64, 64), 96))


def test_non_square_positions_per_axis():
    tube = tv.Tube((1, 16, 16), (1, 16, 16), (0, 0, 0))
    size = (1, 32, 64)  # 2 rows x 4 columns
    c = tv.pos_embed.tube_centres(tube, size)
    assert c.tolist() == [[0, h, w] for h in (8, 24) for w in (8, 24, 40, 56)]
    pe = tv.sincos_pos_embed([tube], size, 12, dtype=torch.float64)
    # h-block of token (row 1, col 0) encodes 24, its w-block encodes 8.
    m = 2
    omega = 10000.0 ** (-torch.arange(m, dtype=torch.float64) / m)
    torch.testing.assert_close(pe[4, 4:6], torch.sin(24 * omega))
    torch.testing.assert_close(pe[4, 8:10], torch.sin(8 * omega))


def test_dtype_and_device_args():
    pe = tv.sincos_pos_embed(tv.PAPER_TUBES, (32, 32, 32), 12, dtype=torch.bfloat16)
    assert pe.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dim"):
        tv.sincos_pos_embed(tv.PAPER_TUBES, (32, 32, 32), 0)
