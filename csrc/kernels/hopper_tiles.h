// Tile logic of the Hopper (sm_90a, wgmma) forward kernel, host + device:
// cuda/hopper_forward.cu compiles it into the kernel and
// testing/hopper_emulation.cpp runs it on the CPU, tile by tile, with a plain
// GEMM in place of wgmma, so the CPU test suite checks every index of the
// kernel (tile list, row and column offsets, epilogue row map, edge masks).
//
// The problem: tube i is a GEMM P_i (M_i x K_i) * W_i^T (K_i x d), M_i = B * n_i
// rows (tokens of all samples, flattened: no per-sample padding of row
// tiles), K_i = C * kt * kh * kw, written into rows [off_i, off_i + n_i) of
// each sample's (N, d) block of the output. One launch covers every tube:
// a flat list of (tube, row tile, column tile), column tiles fastest, so
// consecutive CTAs read the same gathered rows of x from L2.
#pragma once

#include <cstdint>

#include "common.h"

namespace tubevit {
namespace hopper {

// CTA tile: BM token rows x BN output channels, K in steps of BK (one
// 128-byte swizzle row of 16-bit elements).
constexpr int BM = 128, BN = 128, BK = 64;

struct Tube {
  TubeGeom g;
  const void* w;        // (d, K) row-major, input dtype
  const void* bias;     // (d,) input dtype, or null
  int64_t rows;         // M_i = B * n_i
  int64_t tiles_before; // tiles of the tubes before this one
  int64_t m_tiles;      // ceil(M_i / BM)
};

struct Params {
  const void* x;
  Strides5 xs;          // elements
  const void* pe;       // (N, d) contiguous, input dtype, or null
  void* out;            // (B, N, d) contiguous
  Tube t[kMaxTubes];
  int n_tubes;
  int64_t N, d, n_tiles;
  int64_t n_col_tiles;  // ceil(d / BN)
};

struct TileCoord {
  int tube;
  int64_t m0, n0;  // first row (of the tube's M_i) and first output channel
};

// The CTA's tile: tile = blockIdx.x (0 <= tile < p.n_tiles).
TUBEVIT_HD TileCoord locate_tile(const Params& p, int64_t tile) {
  int i = 0;
  while (i + 1 < p.n_tubes && tile >= p.t[i + 1].tiles_before) ++i;
  const int64_t local = tile - p.t[i].tiles_before;
  return {i, (local / p.n_col_tiles) * BM, (local % p.n_col_tiles) * BN};
}

// Element offset in x of row r's patch origin (token r % n_i of sample
// r / n_i), or -1 past the tube's last row (zero-filled in the tile).
TUBEVIT_HD int64_t row_origin(const Params& p, const Tube& t, int64_t r) {
  if (r >= t.rows) return -1;
  const int64_t n = t.g.num_tokens;
  return (r / n) * p.xs.b + token_origin_offset(t.g, r % n, p.xs.t, p.xs.h, p.xs.w);
}

// Element offset of patch column k from a row's origin, (c, kt, kh, kw)
// order like weight.reshape(d, K), or -1 past K_i (zero-filled).
TUBEVIT_HD int64_t column_offset(const Params& p, const Tube& t, int64_t k) {
  if (k >= t.g.patch_size) return -1;
  return patch_column_offset(t.g, k, p.xs.c, p.xs.t, p.xs.h, p.xs.w);
}

// Output row (of the (B * N, d) view) of tube row r, or -1 past the last row.
TUBEVIT_HD int64_t output_row(const Params& p, const Tube& t, int64_t r) {
  if (r >= t.rows) return -1;
  const int64_t n = t.g.num_tokens;
  return (r / n) * p.N + t.g.token_offset + r % n;
}

// Host: the parameters for layout L (pointers filled by the caller).
inline Params make_params(const TubeLayout& L) {
  TORCH_CHECK(L.tubes.size() <= size_t(kMaxTubes), "the Hopper kernel takes at most ", kMaxTubes, " tubes, got ",
              L.tubes.size());
  Params p{};
  p.n_tubes = static_cast<int>(L.tubes.size());
  p.N = L.num_tokens;
  p.d = L.dim;
  p.n_col_tiles = (L.dim + BN - 1) / BN;
  int64_t tiles = 0;
  for (int i = 0; i < p.n_tubes; ++i) {
    Tube& t = p.t[i];
    t.g = L.tubes[i];
    t.rows = L.batch * t.g.num_tokens;
    t.m_tiles = (t.rows + BM - 1) / BM;
    t.tiles_before = tiles;
    tiles += t.m_tiles * p.n_col_tiles;
  }
  p.n_tiles = tiles;
  return p;
}

// Host: make_params(L) with the pointers of one call: x (any strides), weights /
// biases contiguous (biases empty: none), pe contiguous (N, d) or undefined, out
// (B, N, d) contiguous.
inline Params make_params(const TubeLayout& L, const at::Tensor& x, const std::vector<at::Tensor>& weights,
                          const std::vector<at::Tensor>& biases, const at::Tensor& pe, at::Tensor& out) {
  Params p = make_params(L);
  p.x = x.const_data_ptr();
  p.xs = strides_of(x);
  p.pe = pe.defined() ? pe.const_data_ptr() : nullptr;
  p.out = out.mutable_data_ptr();
  for (int i = 0; i < p.n_tubes; ++i) {
    p.t[i].w = weights[i].const_data_ptr();
    p.t[i].bias = biases.empty() ? nullptr : biases[i].const_data_ptr();
  }
  return p;
}

}  // namespace hopper
}  // namespace tubevit
