// The dx writer (prototype; csrc/prototype/README.md): the input gradient
// from dP (kernels/common.h: ParamsDX) with the gather's sums in the
// gather's order (kernels/grad_input.h), so the same bits, and what makes
// the gather instruction-bound taken out. The Hopper input gradient's second
// step (dx_writer.cu); run thread by thread on the CPU by
// tubevit_testing::dx_writer_from_dp (hopper_emulation.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "../kernels/grad_input.h"

namespace tubevit {
namespace dx {

// The writer: the gather's
// sums, in the gather's order (tubes in list order, then it, ih, iw: the
// same bits), with what made the gather instruction-bound taken out. A
// thread owns kWriterVec consecutive voxels of one row and writes them with
// one 16-byte store (fp16 / bf16; two for fp32) where W % 8 == 0, zeros
// included, so dx is written once, densely (the pass's floor is that write:
// 308 MB at B = 32 for the paper tubes). A block keeps one column tile for
// its whole life (blockIdx.x) and computes its columns' covering ranges once;
// it then strides over (b, c, t, row-tile) tiles (blockIdx.y), computing the
// t range and the rows' h ranges per tile (n_tubes * (1 + rows) entries,
// against the gather's n_tubes * (1 + 32 + 64) per 2,048 voxels). Per voxel
// and tube that leaves a shared-memory range read and, where the tube covers
// it, one load and add per covering token.
constexpr int kWriterThreads = 256, kWriterVec = 8;

// The tile shape for a row length W: cpr chunks of kWriterVec voxels per
// row (enough for W, at most 32), rows = kWriterThreads / cpr rows per tile.
struct DxWriter {
  int cpr, rows, cols;    // cols = cpr * kWriterVec
  int n_tubes;
  int64_t col_tiles;      // ceil(W / cols)
  int64_t h_tiles;        // ceil(H / rows)
  int64_t tiles;          // B * C * T * h_tiles: the row tiles blockIdx.y strides over
  bool vector;            // W % kWriterVec == 0: every full chunk is 16-byte aligned (dx from at::empty)
};

inline DxWriter make_dx_writer(const TubeLayout& L) {
  DxWriter s{};
  const int64_t W = L.size[2];
  const int64_t chunks = (W + kWriterVec - 1) / kWriterVec;
  s.cpr = static_cast<int>(chunks < 32 ? (chunks < 1 ? 1 : chunks) : 32);
  s.rows = kWriterThreads / s.cpr;
  s.cols = s.cpr * kWriterVec;
  s.n_tubes = static_cast<int>(L.tubes.size());
  s.col_tiles = (W + s.cols - 1) / s.cols;
  s.h_tiles = (L.size[1] + s.rows - 1) / s.rows;
  s.tiles = L.batch * L.channels * L.size[0] * s.h_tiles;
  s.vector = W % kWriterVec == 0;
  return s;
}

// The block's shared table, int32 pairs [lo, hi] (empty when lo > hi):
// t ranges (n_tubes), h ranges (n_tubes x rows), w ranges (n_tubes x cols).
TUBEVIT_HD int dx_writer_table_ints(const DxWriter& s) { return 2 * s.n_tubes * (1 + s.rows + s.cols); }
// rows + cols = 256 / cpr + 8 cpr is largest at cpr = 1 or 32 (264): the table then fits the 48 KiB of
// shared memory a launch gets without opting in
static_assert(2 * kMaxTubes * (1 + kWriterThreads + kWriterVec) * 4 <= 48 * 1024, "writer table > 48 KiB");
TUBEVIT_HD int32_t* dx_writer_t(const DxWriter&, int32_t* tb, int i) { return tb + 2 * i; }
TUBEVIT_HD int32_t* dx_writer_h(const DxWriter& s, int32_t* tb, int i, int r) {
  return tb + 2 * (s.n_tubes + i * s.rows + r);
}
TUBEVIT_HD int32_t* dx_writer_w(const DxWriter& s, int32_t* tb, int i, int q) {
  return tb + 2 * (s.n_tubes * (1 + s.rows) + i * s.cols + q);
}

TUBEVIT_HD void dx_writer_range(int64_t pos, const TubeGeom& g, int axis, int32_t* out) {
  int64_t lo, hi;
  axis_covering(pos, g.k[axis], g.s[axis], g.o[axis], g.n[axis], &lo, &hi);
  if (lo > hi) lo = 1, hi = 0;
  out[0] = static_cast<int32_t>(lo);
  out[1] = static_cast<int32_t>(hi);
}

// Thread tid's share of the column table of column tile `ct` (once per block).
TUBEVIT_HD void dx_writer_fill_w(const ParamsDX& p, const DxWriter& s, int64_t ct, int tid, int32_t* tb) {
  for (int e = tid; e < s.n_tubes * s.cols; e += kWriterThreads) {
    const int i = e / s.cols, q = e % s.cols;
    dx_writer_range(ct * s.cols + q, p.g[i], 2, dx_writer_w(s, tb, i, q));
  }
}

struct DxWriterTile {
  int64_t b, c, t, h0;
};
TUBEVIT_HD DxWriterTile dx_writer_tile(const DxWriter& s, int64_t C, int64_t T, int64_t tile) {
  DxWriterTile tl;
  tl.h0 = (tile % s.h_tiles) * s.rows;
  tile /= s.h_tiles;
  tl.t = tile % T;
  tile /= T;
  tl.c = tile % C;
  tl.b = tile / C;
  return tl;
}

// Thread tid's share of the tile's t and h ranges (between two barriers).
TUBEVIT_HD void dx_writer_fill_th(const ParamsDX& p, const DxWriter& s, const DxWriterTile& tl, int tid,
                                  int32_t* tb) {
  for (int e = tid; e < s.n_tubes * (1 + s.rows); e += kWriterThreads) {
    const int i = e / (1 + s.rows), r = e % (1 + s.rows);
    if (r == 0)
      dx_writer_range(tl.t, p.g[i], 0, dx_writer_t(s, tb, i));
    else
      dx_writer_range(tl.h0 + r - 1, p.g[i], 1, dx_writer_h(s, tb, i, r - 1));
  }
}

// Thread tid's chunk of the tile: row h0 + tid / cpr, voxels w .. w + 7 with
// w = ct * cols + (tid % cpr) * kWriterVec; store(offset, values, count)
// writes `count` (<= kWriterVec) values at element `offset` of dx
// (B, C, T, H, W) contiguous, one 16-byte store when count == kWriterVec and
// s.vector. Threads past rows * cpr, and rows or columns past the input,
// store nothing.
template <class Store>
TUBEVIT_HD void dx_writer_chunk(const ParamsDX& p, const DxWriter& s, const float* dp, int64_t C,
                                const int64_t* size, int64_t ct, const DxWriterTile& tl, int tid, int32_t* tb,
                                const Store& store) {
  const int64_t T = size[0], H = size[1], W = size[2];
  const int r = tid / s.cpr, q = (tid % s.cpr) * kWriterVec;
  const int64_t h = tl.h0 + r, w = ct * s.cols + q;
  if (r >= s.rows || h >= H || w >= W) return;
  float acc[kWriterVec];
  TUBEVIT_UNROLL
  for (int v = 0; v < kWriterVec; ++v) acc[v] = 0.f;
  for (int i = 0; i < p.n_tubes; ++i) {
    const int32_t* tr = dx_writer_t(s, tb, i);
    const int32_t* hr = dx_writer_h(s, tb, i, r);
    if (tr[0] > tr[1] || hr[0] > hr[1]) continue;
    const TubeGeom& g = p.g[i];
    const float* dpi = dp + p.dp_offset[i] + tl.b * g.num_tokens * g.patch_size;
    // entry (token (it, ih, iw), column (c, t, h, w) - window origin) at
    // base(it, ih) + iw * (K - s_w) + w: the token's row start plus its column
    const int64_t step = g.patch_size - g.s[2];
    TUBEVIT_NO_UNROLL
    for (int32_t it = tr[0]; it <= tr[1]; ++it)
      TUBEVIT_NO_UNROLL
      for (int32_t ih = hr[0]; ih <= hr[1]; ++ih) {
        const int64_t base = (int64_t(it) * g.n[1] + ih) * g.n[2] * g.patch_size +
                             ((tl.c * g.k[0] + (tl.t - g.o[0] - g.s[0] * it)) * g.k[1] +
                              (h - g.o[1] - g.s[1] * ih)) * g.k[2] - g.o[2];
        TUBEVIT_UNROLL
        for (int v = 0; v < kWriterVec; ++v) {
          const int32_t* wr = dx_writer_w(s, tb, i, q + v);
          TUBEVIT_NO_UNROLL
          for (int32_t iw = wr[0]; iw <= wr[1]; ++iw) acc[v] += dpi[base + iw * step + w + v];
        }
      }
  }
  const int64_t left = W - w;
  store((((tl.b * C + tl.c) * T + tl.t) * H + h) * W + w, acc, left < kWriterVec ? int(left) : kWriterVec);
}

}  // namespace dx
}  // namespace tubevit
