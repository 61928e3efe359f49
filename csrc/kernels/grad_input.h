// The input gradient from dP (kernels/common.h: ParamsDX, the fp32 dP_i =
// G_i W_i blocks that cuBLAS or the tensor-core dP kernel wrote): every
// voxel of dx receives the dP entries of the tokens whose windows cover it.
// Two forms, both deterministic (fixed summation order, no atomics):
//   * the gather (default): one pass over every voxel of dx, tubes summed in
//     fp32 in list order, one rounding; run by cuda/grad_input_cuda.cu and,
//     thread by thread, by the host emulator (testing/tc_emulation.cpp);
//   * the per-tube scatter (opt-in): one pass per tube over the voxels it
//     covers, templated on a launcher (the CPU test op runs the same
//     functor).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <cstdint>
#include <vector>

#include "common.h"
#include "tube_geometry.h"
#include "tube_tokens.h"

namespace tubevit {
namespace dx {

// The gather: dx in tiles of one (b, c, t) and GH x GW voxels (h, w), one
// block each (kGatherThreads threads). Why tiles: a per-voxel gather that
// finds its covering tokens with 64-bit divisions took 8 ms at B = 32 on an
// H200 (ncu: compute-bound on the index math, ~29 divisions per voxel; this
// form takes 2.0 ms, bench/DESIGN.md). Here the covering token ranges along t (per block) and along h and
// w (per tile row / column) are computed once per block into shared memory;
// a voxel then reads its ranges and sums the dP entries with multiply-adds.
// Ranges are [lo, hi] token indices along one axis, empty when lo > hi.
constexpr int GH = 32, GW = 64, kGatherThreads = 256;

struct DxGatherTables {
  int64_t t[kMaxTubes][2];
  int64_t h[kMaxTubes][GH][2];
  int64_t w[kMaxTubes][GW][2];
};

// Tile `blk` of the grid: (b, c, t) plane index and the tile's first (h, w).
struct DxTile {
  int64_t b, c, t, h0, w0;
};

TUBEVIT_HD int64_t dx_gather_tiles(int64_t B, int64_t C, const int64_t* size) {
  return B * C * size[0] * ((size[1] + GH - 1) / GH) * ((size[2] + GW - 1) / GW);
}

TUBEVIT_HD DxTile dx_gather_tile(int64_t C, const int64_t* size, int64_t blk) {
  const int64_t th = (size[1] + GH - 1) / GH, tw = (size[2] + GW - 1) / GW;
  DxTile tl;
  tl.w0 = (blk % tw) * GW;
  blk /= tw;
  tl.h0 = (blk % th) * GH;
  blk /= th;
  tl.t = blk % size[0];
  blk /= size[0];
  tl.c = blk % C;
  tl.b = blk / C;
  return tl;
}

// Thread tid's share of the tables (before the barrier).
TUBEVIT_HD void dx_gather_fill_tables(const ParamsDX& p, const DxTile& tl, int tid, DxGatherTables& tb) {
  const int n = p.n_tubes;
  for (int e = tid; e < n * (1 + GH + GW); e += kGatherThreads) {
    const int i = e / (1 + GH + GW), r = e % (1 + GH + GW);
    const TubeGeom& g = p.g[i];
    if (r == 0) {
      axis_covering(tl.t, g.k[0], g.s[0], g.o[0], g.n[0], &tb.t[i][0], &tb.t[i][1]);
    } else if (r <= GH) {
      axis_covering(tl.h0 + r - 1, g.k[1], g.s[1], g.o[1], g.n[1], &tb.h[i][r - 1][0], &tb.h[i][r - 1][1]);
    } else {
      const int q = r - 1 - GH;
      axis_covering(tl.w0 + q, g.k[2], g.s[2], g.o[2], g.n[2], &tb.w[i][q][0], &tb.w[i][q][1]);
    }
  }
}

// Thread tid's voxels of the tile (after the barrier): column w0 + tid % GW,
// rows h0 + tid / GW + k * (kGatherThreads / GW). dx contiguous (B, C, T, H, W).
template <typename scalar_t>
TUBEVIT_HD void dx_gather_voxels(const ParamsDX& p, const float* dp, int64_t C, const int64_t* size,
                                 const DxTile& tl, int tid, const DxGatherTables& tb, scalar_t* dx) {
  const int64_t T = size[0], H = size[1], W = size[2];
  const int q = tid % GW;
  const int64_t w = tl.w0 + q;
  if (w >= W) return;
  for (int r = tid / GW; r < GH && tl.h0 + r < H; r += kGatherThreads / GW) {
    const int64_t h = tl.h0 + r;
    float acc = 0.0f;
    for (int i = 0; i < p.n_tubes; ++i) {
      const TubeGeom& g = p.g[i];
      const int64_t t0 = tb.t[i][0], t1 = tb.t[i][1], h0 = tb.h[i][r][0], h1 = tb.h[i][r][1];
      const int64_t w0 = tb.w[i][q][0], w1 = tb.w[i][q][1];
      if (t0 > t1 || h0 > h1 || w0 > w1) continue;
      const float* dpi = dp + p.dp_offset[i] + tl.b * g.num_tokens * g.patch_size;
      for (int64_t it = t0; it <= t1; ++it)
        for (int64_t ih = h0; ih <= h1; ++ih) {
          const int64_t tok_row = (it * g.n[1] + ih) * g.n[2];
          const int64_t k_row = ((tl.c * g.k[0] + (tl.t - g.o[0] - g.s[0] * it)) * g.k[1] +
                                 (h - g.o[1] - g.s[1] * ih)) * g.k[2];
          for (int64_t iw = w0; iw <= w1; ++iw)
            acc += dpi[(tok_row + iw) * g.patch_size + k_row + (w - g.o[2] - g.s[2] * iw)];
        }
    }
    dx[(((tl.b * C + tl.c) * T + tl.t) * H + h) * W + w] = static_cast<scalar_t>(acc);
  }
}

// The writer (opt-in, TUBEVIT_DX_PASS=writer, until a GPU run has timed it;
// always the Hopper dP kernel's second step; cuda/grad_input_cuda.cu): the gather's
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

// The scatter (opt-in: TUBEVIT_DX_PASS=scatter, csrc/options.h):
// dx = sum over tubes of col2im(dP_i), one launch per tube over the voxels
// that tube covers (its windows' union: n*k positions per axis where
// windows do not overlap, the spanned range where they do), each voxel
// summing its covering tokens' dP entries in fp32 and adding that once to dx
// (one rounding per tube, as PyTorch's autograd sums per-convolution input
// gradients). Tubes run one after another and every voxel of a tube has one
// thread: deterministic, no atomics. Work is proportional to the covered
// voxels (~19 % of a paper-tube input) plus one zero fill, where the gather
// above visits every voxel for every tube (2.0 ms at B = 32 on the H200, the
// largest kernel of a step with input gradients). Its logic runs on the CPU
// as tubevit_testing::tube_tokens_gemm_path_dx; it stays opt-in until a GPU
// run has checked and timed it.

// Covered positions along one axis: windows o + s*j + [0, k), j < n.
TUBEVIT_HD int64_t covered_count(int64_t k, int64_t s, int64_t n) {
  return n <= 0 ? 0 : (s >= k ? n * k : s * (n - 1) + k);
}

// The u-th covered position on one axis and the range [*lo, *hi] of grid
// indices whose windows cover it.
TUBEVIT_HD int64_t covered_position(int64_t u, int64_t k, int64_t s, int64_t o, int64_t n, int64_t* lo,
                                    int64_t* hi) {
  if (s >= k) {  // disjoint windows: exactly one
    const int64_t j = u / k;
    *lo = *hi = j;
    return o + s * j + (u - j * k);
  }
  const int64_t pos = o + u;
  axis_covering(pos, k, s, o, n, lo, hi);
  return pos;
}

template <typename scalar_t>
struct DxScatterElem {
  using acc_t = at::opmath_type<scalar_t>;
  TubeGeom g;
  FastDiv cw, ch, ct, C;  // covered positions per axis (w, h, t), channels
  const float* dp;    // this tube's (B n, K) block of dP
  scalar_t* dx;       // (B, C, T, H, W) contiguous
  int64_t T, H, W;

  TUBEVIT_HD void operator()(int64_t e) const {
    uint32_t q, q2, q3, b;
    const uint32_t uw = cw.divmod(static_cast<uint32_t>(e), &q);
    const uint32_t uh = ch.divmod(q, &q2);
    const uint32_t ut = ct.divmod(q2, &q3);
    const uint32_t c = C.divmod(q3, &b);
    int64_t lo[3], hi[3];
    const int64_t t = covered_position(ut, g.k[0], g.s[0], g.o[0], g.n[0], &lo[0], &hi[0]);
    const int64_t h = covered_position(uh, g.k[1], g.s[1], g.o[1], g.n[1], &lo[1], &hi[1]);
    const int64_t w = covered_position(uw, g.k[2], g.s[2], g.o[2], g.n[2], &lo[2], &hi[2]);
    float acc = 0.f;
    for (int64_t it = lo[0]; it <= hi[0]; ++it)
      for (int64_t ih = lo[1]; ih <= hi[1]; ++ih)
        for (int64_t iw = lo[2]; iw <= hi[2]; ++iw) {
          const int64_t tok = (it * g.n[1] + ih) * g.n[2] + iw;
          const int64_t col = ((int64_t(c) * g.k[0] + (t - g.o[0] - g.s[0] * it)) * g.k[1] +
                               (h - g.o[1] - g.s[1] * ih)) * g.k[2] + (w - g.o[2] - g.s[2] * iw);
          acc += dp[(int64_t(b) * g.num_tokens + tok) * g.patch_size + col];
        }
    scalar_t& out = dx[(((int64_t(b) * C.d + c) * T + t) * H + h) * W + w];
    out = static_cast<scalar_t>(static_cast<acc_t>(out) + static_cast<acc_t>(acc));
  }
};

// dx (B, C, T, H, W) contiguous in `opts`' dtype from dP (fp32, tube i's
// block at dp_off[i]); false (dx untouched) when a tube's covered-voxel
// count does not fit 32-bit indices — the caller then uses the gather.
template <class Launcher>
bool grad_input_scatter(const at::Tensor& dp, const std::vector<int64_t>& dp_off, const TubeLayout& L,
                        at::Tensor* dx_out, const at::TensorOptions& opts) {
  constexpr int64_t kMax = (int64_t(1) << 31) - 1;
  std::vector<int64_t> elems;
  for (const auto& g : L.tubes) {
    const int64_t e = L.batch * L.channels * covered_count(g.k[0], g.s[0], g.n[0]) *
                      covered_count(g.k[1], g.s[1], g.n[1]) * covered_count(g.k[2], g.s[2], g.n[2]);
    if (e > kMax || L.channels > kMax) return false;
    elems.push_back(e);
  }
  at::Tensor dx = at::zeros({L.batch, L.channels, L.size[0], L.size[1], L.size[2]}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dx.scalar_type(), "tube_tokens_dx_scatter", [&] {
    for (size_t i = 0; i < L.tubes.size(); ++i) {
      if (elems[i] == 0) continue;
      const TubeGeom& g = L.tubes[i];
      DxScatterElem<scalar_t> f{};
      f.g = g;
      f.cw = FastDiv(static_cast<uint32_t>(covered_count(g.k[2], g.s[2], g.n[2])));
      f.ch = FastDiv(static_cast<uint32_t>(covered_count(g.k[1], g.s[1], g.n[1])));
      f.ct = FastDiv(static_cast<uint32_t>(covered_count(g.k[0], g.s[0], g.n[0])));
      f.C = FastDiv(static_cast<uint32_t>(L.channels));
      f.dp = dp.const_data_ptr<float>() + dp_off[i];
      f.dx = dx.mutable_data_ptr<scalar_t>();
      f.T = L.size[0];
      f.H = L.size[1];
      f.W = L.size[2];
      Launcher::run(elems[i], f);  // tube after tube: their voxels may coincide
    }
  });
  *dx_out = dx;
  return true;
}

}  // namespace dx
}  // namespace tubevit
