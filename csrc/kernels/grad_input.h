// The input gradient from dP (kernels/common.h: ParamsDX, the fp32 dP_i =
// G_i W_i blocks that cuBLAS or the tensor-core dP kernel wrote): every
// voxel of dx receives the dP entries of the tokens whose windows cover it.
// The gather: one pass over every voxel of dx, tubes summed in fp32 in
// list order, one rounding (deterministic: fixed order, no atomics); run by
// cuda/grad_input_cuda.cu and, thread by thread, by the host emulator
// (testing/dx_emulation.h).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

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

}  // namespace dx
}  // namespace tubevit
