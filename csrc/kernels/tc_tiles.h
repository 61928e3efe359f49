// Tile logic of the tensor-core kernels (cuda/tube_tokens_tc.cu), written
// once for the GPU and for a host emulator (testing/tc_emulation.cpp).
//
// Why: so that the CPU test suite checks the kernels' index arithmetic on
// every change, with or without a GPU. Everything in them except the WMMA
// fragment calls and the barriers is a function of (block, thread) defined
// here: which tube / sample / tokens / channels a block owns, which input
// voxel, weight or gradient element each thread stages into which shared-
// memory slot, which staged sub-blocks each warp multiplies (the pointer
// offsets, strides and leading dimensions handed to WMMA), and where each
// accumulator lands in the output. The emulator runs these same functions
// on the CPU, block by block and thread by thread, with a plain-C++ MMA of
// WMMA's documented semantics in place of the fragments, so the tests
// (python_tests/test_tc_emulation.py) check the kernels' index arithmetic
// and boundary masks without a GPU.
//
// Shared-memory layouts (elements; a block has kThreads threads, 4 warps):
//   forward: As[BM tokens][LDS] (A = patches, row-major, K along a row),
//            Bs[BN channels][LDS] (B = W^T read column-major: Bs[n][k]),
//            Cs[BM][LDC] fp32 (accumulators, aliasing As/Bs after the MMAs)
//   dW:      As[DM tokens][LDA2] (A = G^T read column-major; As[BM channels j][LDA2]
//            where !kDwTokenMajorA), Bs[DM tokens][LDB2] (B = P,
//            row-major), Cs as above.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include <ATen/Dispatch.h>

#include "common.h"
#include "tube_geometry.h"
#include "tube_tokens.h"

namespace tubevit {
namespace tc {

// The kernels' tuning constants, in one place (the host emulator compiles
// the same values, so the tests cover them). The values, and the
// alternatives measured on an H200 before they were chosen, are in
// bench/DESIGN.md ("Tensor-core kernels").
struct Traits {
  // reduction depth of one staged step (BK, and DM for dW): 32 or 64
  static constexpr int kDepth = 64;
  // blocks per SM the compiler must fit (__launch_bounds__ of the forward and
  // dW kernels): 4 caps them at 128 registers (kernel time at B = 32, bf16:
  // 0.76 ms against 1.18 ms uncapped)
  static constexpr int kMinBlocks = 4;
  // dW stages its A tile (G^T, channels j x tokens m) token-major, As[m][j],
  // copied along j in 16/8/4-byte chunks (grad rows are contiguous in j) and
  // read by the tensor cores as a column-major A; the transposing copy it
  // replaced made dW 2.7x slower per FLOP than the forward
  static constexpr bool kDwTokenMajorA = true;
};
static_assert(Traits::kDepth == 32 || Traits::kDepth == 64, "Traits::kDepth: 32 or 64");
constexpr bool kDwTokenMajorA = Traits::kDwTokenMajorA;
constexpr int BM = 64, BN = 64, BK = Traits::kDepth;
constexpr int kWarps = 4, kThreads = 32 * kWarps;
constexpr int LDS = BK + 8;   // padded staging row (elements) to spread banks
constexpr int LDC = BN + 4;   // padded fp32 accumulator row
constexpr int DM = Traits::kDepth;  // dW: tokens per reduction step
constexpr int LDA2 = (kDwTokenMajorA ? BM : DM) + 8;  // dW: As[m][j] or As[j][m]
constexpr int kDwARows = kDwTokenMajorA ? DM : BM;     // dW: rows of As
constexpr int LDB2 = BN + 8;  // dW: Bs[m][k]

// Depth of one MMA: 16 for fp16/bf16 (WMMA 16x16x16), 8 for fp32 as TF32
// (WMMA 16x16x8).
template <typename T>
struct MmaDepth {
  static constexpr int value = 16;
};
template <>
struct MmaDepth<float> {
  static constexpr int value = 8;
};

struct Params {
  TubeGeom g[kMaxTubes];
  const void* w[kMaxTubes];             // (d, K) row-major, scalar_t
  const void* bias[kMaxTubes];          // (d,) or nullptr
  int vec_x[kMaxTubes];                 // elements per patch-gather access (gather_vec)
  int vec_w[kMaxTubes];                 // elements per weight-tile access (weight_vec)
  int64_t tiles_before[kMaxTubes + 1];  // prefix over tubes of B * ceil(n_i / BM)
  int n_tubes;
  int64_t B, N, d;
  Strides5 xs;  // x strides (elements)
};

struct ParamsDW {
  TubeGeom g[kMaxTubes];
  void* dw[kMaxTubes];                  // (d, K) row-major, scalar_t
  int vec_x[kMaxTubes];                 // elements per patch-gather access (gather_vec)
  int vec_g;                              // elements per grad-row access (kDwTokenMajorA)
  int64_t tiles_before[kMaxTubes + 1];  // prefix of ceil(d/BM) * ceil(K_i/BN)
  int n_tubes;
  int64_t B, N, d;
  Strides5 xs;
};

// One warp's MMA step: acc[a][c] += A(a) * B(c), A(a) = the 16 x depth block
// at As + a_off + a * a_step (row-major, leading dim lda), B(c) = the
// depth x 16 block at Bs + b_off + c * b_step (leading dim ldb; layout fixed
// per kernel: column-major in the forward, row-major in dW).
struct MmaArgs {
  int a_off, a_step, lda, b_off, b_step, ldb;
};

// V contiguous elements in one access where the host proved it legal (see
// gather_vec / weight_vec): BYTES (4, 8 or 16) copied from src, or zeros
// when src is null. On the GPU a single load/store instead of V scalar ones
// (ASYNC: a cp.async into shared memory that completes at the kernel's next
// cp.async wait, for the two-stage pipelines; zeros are
// a plain store); on the host a memcpy / memset.
template <int BYTES, bool ASYNC = false>
TUBEVIT_HD void put_bytes(void* dst, const void* src) {
  static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "2-byte chunks are the scalar path");
#if defined(__CUDA_ARCH__)
  using T = typename std::conditional<BYTES == 16, uint4,
                                      typename std::conditional<BYTES == 8, uint2, unsigned int>::type>::type;
#if __CUDA_ARCH__ >= 800
  if constexpr (ASYNC) {
    if (src != nullptr) {
      const unsigned saddr = static_cast<unsigned>(__cvta_generic_to_shared(dst));
      asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(saddr), "l"(src), "n"(BYTES) : "memory");
    } else {
      *static_cast<T*>(dst) = T{};
    }
    return;
  }
#endif
  *static_cast<T*>(dst) = src != nullptr ? *static_cast<const T*>(src) : T{};
#else
  // the emulators check what the GPU needs: both addresses aligned to the width
  TORCH_CHECK(reinterpret_cast<uintptr_t>(dst) % BYTES == 0 &&
                  (src == nullptr || reinterpret_cast<uintptr_t>(src) % BYTES == 0),
              "a ", BYTES, "-byte copy between misaligned addresses");
  if (src != nullptr) check_host_read(src, BYTES);
  if (src != nullptr) std::memcpy(dst, src, BYTES);
  else std::memset(dst, 0, BYTES);
#endif
}

// Stages a ROWS x COLS tile from the (row, column) offsets row_base / koff
// (-1 = outside: zero) into dst[r * ld + kk], V columns per access. V divides
// kw, COLS and every offset involved (gather_vec), so an access never leaves
// a run of kw contiguous voxels.
template <int V, int ROWS, int COLS, int LD, bool ASYNC, typename scalar_t>
TUBEVIT_HD void gather_tile_v(const scalar_t* x, const int64_t* row_base, const int64_t* koff, int tid,
                              scalar_t* dst) {
  constexpr int kChunks = COLS / V;
  for (int e = tid; e < ROWS * kChunks; e += kThreads) {
    const int r = e / kChunks, kk = (e % kChunks) * V;
    const int64_t base = row_base[r], off = koff[kk];
    put_bytes<V * int(sizeof(scalar_t)), ASYNC>(dst + r * LD + kk,
                                                base >= 0 && off >= 0 ? x + base + off : nullptr);
  }
}

// ASYNC: vector accesses as cp.async (see put_bytes); the one-element path
// stays synchronous (cp.async moves at least 4 bytes).
template <int ROWS, int COLS, int LD, bool ASYNC = false, typename scalar_t>
TUBEVIT_HD void gather_tile(const scalar_t* x, const int64_t* row_base, const int64_t* koff, int vec, int tid,
                            scalar_t* dst) {
  constexpr int kMaxV = 16 / int(sizeof(scalar_t));
  if constexpr (kMaxV >= 8) {
    if (vec == 8) return gather_tile_v<8, ROWS, COLS, LD, ASYNC>(x, row_base, koff, tid, dst);
  }
  if (vec == 4 && 4 * sizeof(scalar_t) <= 16)
    return gather_tile_v<4, ROWS, COLS, LD, ASYNC>(x, row_base, koff, tid, dst);
  if constexpr (sizeof(scalar_t) == 2) {
    if (vec == 2) return gather_tile_v<2, ROWS, COLS, LD, ASYNC>(x, row_base, koff, tid, dst);
  }
  for (int e = tid; e < ROWS * COLS; e += kThreads) {  // one element per access
    const int r = e / COLS, kk = e % COLS;
    const int64_t base = row_base[r], off = koff[kk];
    dst[r * LD + kk] = base >= 0 && off >= 0 ? x[base + off] : scalar_t(0.0f);
  }
}

// The dtypes the tensor-core kernels take (fp32 as TF32); the kernels'
// launchers and the emulator dispatch through this one list.
#define TUBEVIT_DISPATCH_TC_TYPES TUBEVIT_DISPATCH_HALF_BF16_FLOAT

// Every grid here is a prefix sum over tubes of their tile counts: the tube
// that owns `tile`, by a linear scan (at most kMaxTubes entries).
TUBEVIT_HD int tube_of_tile(const int64_t* tiles_before, int n_tubes, int64_t tile) {
  int i = 0;
  while (i + 1 < n_tubes && tile >= tiles_before[i + 1]) ++i;
  return i;
}

// For the dW and dX grids: tube i has ceil(rows / BM) x ceil(K_i / BN) tiles,
// patch-column blocks fastest; returns the tile's first row and column.
struct RowColTile {
  int i;
  int64_t r0, c0;
};

TUBEVIT_HD RowColTile row_col_tile(const int64_t* tiles_before, int n_tubes, const TubeGeom* g, int64_t tile) {
  const int i = tube_of_tile(tiles_before, n_tubes, tile);
  const int64_t k_tiles = (g[i].patch_size + BN - 1) / BN;
  const int64_t local = tile - tiles_before[i];
  return {i, (local / k_tiles) * BM, (local % k_tiles) * BN};
}

// ------------------------------------------------------------------ forward
struct FwdLoc {
  int i;                // tube
  int64_t b, m0, n0;    // sample, first token, first output channel
};

// Grid: tiles_before[n_tubes] token tiles x ceil(d / BN) channel tiles, one
// dimension, channel tile fastest: the blocks that gather the same patches
// run together, so the input is read from DRAM about once rather than once
// per channel tile (token tile fastest made ncu show 1.3 TB/s of DRAM
// traffic, ~4x the input, on an H200).
TUBEVIT_HD int64_t fwd_blocks(const Params& p) {
  return p.tiles_before[p.n_tubes] * ((p.d + BN - 1) / BN);
}

TUBEVIT_HD FwdLoc fwd_locate(const Params& p, int64_t blk) {
  const int64_t n_tiles = (p.d + BN - 1) / BN;
  const int64_t tile = blk / n_tiles, channel_tile = blk % n_tiles;
  const int i = tube_of_tile(p.tiles_before, p.n_tubes, tile);
  const int64_t m_tiles = (p.g[i].num_tokens + BM - 1) / BM;
  const int64_t local = tile - p.tiles_before[i];
  return {i, local / m_tiles, (local % m_tiles) * BM, channel_tile * BN};
}

// row_base[r]: input offset of token m0 + r's first voxel, -1 past the tube.
TUBEVIT_HD void fwd_row_base(const Params& p, const FwdLoc& l, int tid, int64_t* row_base) {
  const TubeGeom& g = p.g[l.i];
  for (int r = tid; r < BM; r += kThreads) {
    const int64_t tok = l.m0 + r;
    row_base[r] = tok < g.num_tokens ? l.b * p.xs.b + token_origin_offset(g, tok, p.xs.t, p.xs.h, p.xs.w) : -1;
  }
}

// koff[kk]: input offset of patch column k0 + kk, -1 past K. Thread kk < BK
// owns column kk of every step and walks it through K with a cursor: the
// (c, kt, kh, kw) decomposition costs four 64-bit divisions (done once per
// block here), a step is a mixed-radix add with carries.
struct ColCursor {
  int64_t c, kt, kh, kw;
};

TUBEVIT_HD ColCursor col_cursor(const TubeGeom& g, int64_t k) {
  const int64_t r = k / g.k[2], r2 = r / g.k[1];
  return {r2 / g.k[0], r2 % g.k[0], r % g.k[1], k % g.k[2]};
}

struct FwdCols {
  ColCursor cur, step;  // this thread's column, and BK as digits
  int64_t k;            // this thread's column index
};

TUBEVIT_HD FwdCols fwd_cols_init(const Params& p, const FwdLoc& l, int tid) {
  const TubeGeom& g = p.g[l.i];
  return {col_cursor(g, tid), col_cursor(g, BK), tid};
}

// Publishes this step's offset (threads tid < BK) and moves to the next step.
TUBEVIT_HD void fwd_koff(const Params& p, const FwdLoc& l, FwdCols& cols, int tid, int64_t* koff) {
  if (tid >= BK) return;
  const TubeGeom& g = p.g[l.i];
  ColCursor& c = cols.cur;
  koff[tid] = cols.k < g.patch_size ? c.c * p.xs.c + c.kt * p.xs.t + c.kh * p.xs.h + c.kw * p.xs.w : -1;
  // Every digit of cur and step is below its radix, so one carry per digit.
  cols.k += BK;
  c.kw += cols.step.kw;
  int64_t carry = c.kw >= g.k[2];
  c.kw -= carry * g.k[2];
  c.kh += cols.step.kh + carry;
  carry = c.kh >= g.k[1];
  c.kh -= carry * g.k[1];
  c.kt += cols.step.kt + carry;
  carry = c.kt >= g.k[0];
  c.kt -= carry * g.k[0];
  c.c += cols.step.c + carry;
}

// A tile: As[r][kk] = x[row_base[r] + koff[kk]], zero outside the tube / K.
template <bool ASYNC = false, typename scalar_t>
TUBEVIT_HD void fwd_fill_a(const Params& p, const FwdLoc& l, const scalar_t* x, const int64_t* row_base,
                           const int64_t* koff, int tid, scalar_t* As) {
  gather_tile<BM, BK, LDS, ASYNC>(x, row_base, koff, p.vec_x[l.i], tid, As);
}

// B tile: Bs[n][kk] = W[n0 + n, k0 + kk] (contiguous along k), zero outside.
template <int V, bool ASYNC, typename scalar_t>
TUBEVIT_HD void fwd_fill_b_v(const Params& p, const FwdLoc& l, int64_t k0, int tid, scalar_t* Bs) {
  const int64_t K = p.g[l.i].patch_size;
  const scalar_t* w = static_cast<const scalar_t*>(p.w[l.i]);
  constexpr int kChunks = BK / V;
  for (int e = tid; e < BN * kChunks; e += kThreads) {
    const int n = e / kChunks, kk = (e % kChunks) * V;
    const int64_t k = k0 + kk, col = l.n0 + n;
    // V divides K: a chunk is wholly inside or wholly past the row
    put_bytes<V * int(sizeof(scalar_t)), ASYNC>(Bs + n * LDS + kk,
                                                col < p.d && k < K ? w + col * K + k : nullptr);
  }
}

template <bool ASYNC = false, typename scalar_t>
TUBEVIT_HD void fwd_fill_b(const Params& p, const FwdLoc& l, int64_t k0, int tid, scalar_t* Bs) {
  const int vec = p.vec_w[l.i];
  if constexpr (sizeof(scalar_t) == 2) {
    if (vec == 8) return fwd_fill_b_v<8, ASYNC>(p, l, k0, tid, Bs);
    if (vec == 2) return fwd_fill_b_v<2, ASYNC>(p, l, k0, tid, Bs);
  }
  if (vec == 4 && 4 * sizeof(scalar_t) <= 16) return fwd_fill_b_v<4, ASYNC>(p, l, k0, tid, Bs);
  const int64_t K = p.g[l.i].patch_size;
  const scalar_t* w = static_cast<const scalar_t*>(p.w[l.i]);
  for (int e = tid; e < BN * BK; e += kThreads) {
    const int n = e / BK, kk = e % BK;
    const int64_t k = k0 + kk, col = l.n0 + n;
    Bs[n * LDS + kk] = (col < p.d && k < K) ? w[col * K + k] : scalar_t(0.0f);
  }
}

// Warp w owns rows [wm, wm + 32) x columns [wn, wn + 32) of the block tile.
TUBEVIT_HD MmaArgs fwd_mma_args(int warp, int ks) {
  const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;
  // B staged as Bs[n][k]: column-major K x N; 16 columns apart = 16 rows
  return {wm * LDS + ks, 16 * LDS, LDS, wn * LDS + ks, 16 * LDS, LDS};
}

// Where accumulator block (a, c) of warp w is stored in Cs (row-major, LDC);
// all three kernels split their 64 x 64 block tile the same way (warp w owns
// rows [32 (w / 2), +32) x columns [32 (w % 2), +32)).
TUBEVIT_HD int acc_offset(int warp, int a, int c) {
  const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;
  return (wm + 16 * a) * LDC + wn + 16 * c;
}

// out[b, off_i + tok, col] = cast(Cs + bias + pe) for the block's valid part.
template <typename scalar_t>
TUBEVIT_HD void fwd_epilogue(const Params& p, const FwdLoc& l, const float* Cs, const scalar_t* pe, int tid,
                             scalar_t* out) {
  const TubeGeom& g = p.g[l.i];
  const scalar_t* bias = static_cast<const scalar_t*>(p.bias[l.i]);
  for (int e = tid; e < BM * BN; e += kThreads) {
    const int r = e / BN, n = e % BN;
    const int64_t tok = l.m0 + r, col = l.n0 + n;
    if (tok >= g.num_tokens || col >= p.d) continue;
    float v = Cs[r * LDC + n];
    if (bias != nullptr) v += static_cast<float>(bias[col]);
    const int64_t row = g.token_offset + tok;
    if (pe != nullptr) v += static_cast<float>(pe[row * p.d + col]);
    out[(l.b * p.N + row) * p.d + col] = static_cast<scalar_t>(v);
  }
}

// --------------------------------------------------- weight gradient (dW)
// dW_i (d x K_i) = G_i^T (d x M_i) * P_i (M_i x K_i), M_i = B * n_i tokens;
// one launch for all tubes, tiles of (tube, BM channels j, BN columns k), the
// reduction over M in steps of DM tokens, fixed order, no atomics.
struct DwLoc {
  int i;
  int64_t j0, c0;  // first output channel, first patch column
};

// Channel tile (j) fastest: the ceil(d / BM) blocks that gather the same
// patch columns from x run together and share them through L2.
TUBEVIT_HD DwLoc dw_locate(const ParamsDW& p, int64_t tile) {
  const int i = tube_of_tile(p.tiles_before, p.n_tubes, tile);
  const int64_t j_tiles = (p.d + BM - 1) / BM;
  const int64_t local = tile - p.tiles_before[i];
  return {i, (local % j_tiles) * BM, (local / j_tiles) * BN};
}

// The block's patch columns are fixed: koff[kk] for c0 + kk, once per block.
TUBEVIT_HD void dw_koff(const ParamsDW& p, const DwLoc& l, int tid, int64_t* koff) {
  const TubeGeom& g = p.g[l.i];
  for (int kk = tid; kk < BN; kk += kThreads) {
    const int64_t k = l.c0 + kk;
    koff[kk] = k < g.patch_size ? patch_column_offset(g, k, p.xs.c, p.xs.t, p.xs.h, p.xs.w) : -1;
  }
}

// For the step's tokens m0 + r: their first voxel's input offset and their
// row in grad (B, N, d); -1 past M.
TUBEVIT_HD void dw_rows(const ParamsDW& p, const DwLoc& l, int64_t m0, int tid, int64_t* row_base,
                        int64_t* grad_row) {
  const TubeGeom& g = p.g[l.i];
  const int64_t n = g.num_tokens, M = p.B * n;
  for (int r = tid; r < DM; r += kThreads) {
    const int64_t m = m0 + r;
    if (m < M) {
      const int64_t b = m / n, tok = m % n;
      row_base[r] = b * p.xs.b + token_origin_offset(g, tok, p.xs.t, p.xs.h, p.xs.w);
      grad_row[r] = b * p.N + g.token_offset + tok;
    } else {
      row_base[r] = -1;
      grad_row[r] = -1;
    }
  }
}

// A = G^T tile: As[j][mm] = grad[grad_row[mm], j0 + j] (reads coalesced along j).
template <typename scalar_t>
TUBEVIT_HD void dw_fill_a_transposed(const ParamsDW& p, const DwLoc& l, const scalar_t* grad,
                                     const int64_t* grad_row, int tid, scalar_t* As) {
  for (int e = tid; e < BM * DM; e += kThreads) {
    const int mm = e / BM, j = e % BM;
    const int64_t gr = grad_row[mm], col = l.j0 + j;
    As[j * LDA2 + mm] = (gr >= 0 && col < p.d) ? grad[gr * p.d + col] : scalar_t(0.0f);
  }
}

// kDwTokenMajorA: As[mm][j] = grad[grad_row[mm], j0 + j], V channels
// per access (V divides d and j0, grad aligned: a chunk is wholly inside or
// wholly past the row).
template <int V, bool ASYNC, typename scalar_t>
TUBEVIT_HD void dw_fill_a_rows_v(const ParamsDW& p, const DwLoc& l, const scalar_t* grad, const int64_t* grad_row,
                                 int tid, scalar_t* As) {
  constexpr int kChunks = BM / V;
  for (int e = tid; e < DM * kChunks; e += kThreads) {
    const int mm = e / kChunks, j = (e % kChunks) * V;
    const int64_t gr = grad_row[mm], col = l.j0 + j;
    put_bytes<V * int(sizeof(scalar_t)), ASYNC>(As + mm * LDA2 + j,
                                                gr >= 0 && col < p.d ? grad + gr * p.d + col : nullptr);
  }
}

// ASYNC (2-stage dW): vector copies as cp.async; the scalar paths stay synchronous.
template <bool ASYNC = false, typename scalar_t>
TUBEVIT_HD void dw_fill_a(const ParamsDW& p, const DwLoc& l, const scalar_t* grad, const int64_t* grad_row,
                          int tid, scalar_t* As) {
  if constexpr (!kDwTokenMajorA) {
    dw_fill_a_transposed(p, l, grad, grad_row, tid, As);
  } else {
    const int vec = p.vec_g;
    if constexpr (sizeof(scalar_t) == 2) {
      if (vec == 8) return dw_fill_a_rows_v<8, ASYNC>(p, l, grad, grad_row, tid, As);
      if (vec == 2) return dw_fill_a_rows_v<2, ASYNC>(p, l, grad, grad_row, tid, As);
    }
    if (vec == 4 && 4 * sizeof(scalar_t) <= 16)
      return dw_fill_a_rows_v<4, ASYNC>(p, l, grad, grad_row, tid, As);
    for (int e = tid; e < DM * BM; e += kThreads) {  // one element per access
      const int mm = e / BM, j = e % BM;
      const int64_t gr = grad_row[mm], col = l.j0 + j;
      As[mm * LDA2 + j] = (gr >= 0 && col < p.d) ? grad[gr * p.d + col] : scalar_t(0.0f);
    }
  }
}

// B = P tile: Bs[mm][kk] = x[row_base[mm] + koff[kk]].
template <bool ASYNC = false, typename scalar_t>
TUBEVIT_HD void dw_fill_b(const ParamsDW& p, const DwLoc& l, const scalar_t* x, const int64_t* row_base,
                          const int64_t* koff, int tid, scalar_t* Bs) {
  gather_tile<DM, BN, LDB2, ASYNC>(x, row_base, koff, p.vec_x[l.i], tid, Bs);
}

TUBEVIT_HD MmaArgs dw_mma_args(int warp, int ks) {
  const int wj = (warp / 2) * 32, wk = (warp % 2) * 32;
  // B staged as Bs[m][k]: row-major; 16 columns apart = 16 elements.
  // A: As[j][m] row-major (16 rows of j apart = 16 * LDA2), or with
  // kDwTokenMajorA: As[m][j], i.e. A column-major (16 rows apart = 16).
  if (kDwTokenMajorA) return {ks * LDA2 + wj, 16, LDA2, ks * LDB2 + wk, 16, LDB2};
  return {wj * LDA2 + ks, 16 * LDA2, LDA2, ks * LDB2 + wk, 16, LDB2};
}

template <typename scalar_t>
TUBEVIT_HD void dw_epilogue(const ParamsDW& p, const DwLoc& l, const float* Cs, int tid) {
  const int64_t K = p.g[l.i].patch_size;
  scalar_t* dw = static_cast<scalar_t*>(p.dw[l.i]);
  for (int e = tid; e < BM * BN; e += kThreads) {
    const int j = e / BN, kk = e % BN;
    const int64_t row = l.j0 + j, col = l.c0 + kk;
    if (row < p.d && col < K) dw[row * K + col] = static_cast<scalar_t>(Cs[j * LDC + kk]);
  }
}

// ------------------------------------------------- input gradient, dP step
// dP_i (M_i x K_i) = G_i (M_i x d) * W_i (d x K_i), M_i = B * n_i, on tensor
// cores into the fp32 dP workspace (kernels/common.h: ParamsDX), one launch,
// tiles of (tube, BM tokens, BN patch columns), reduction over d in steps of
// BK. The dX step that reads dP is kernels/grad_input.h.
struct DxLoc {
  int i;
  int64_t m0, c0;  // first token (of the B * n_i), first patch column
};

TUBEVIT_HD DxLoc dx_locate(const ParamsDX& p, int64_t tile) {
  const RowColTile t = row_col_tile(p.tiles_before, p.n_tubes, p.g, tile);
  return {t.i, t.r0, t.c0};
}

// grad_row[r]: row of grad (B, N, d) of token m0 + r, -1 past M.
TUBEVIT_HD void dx_rows(const ParamsDX& p, const DxLoc& l, int tid, int64_t* grad_row) {
  const TubeGeom& g = p.g[l.i];
  const int64_t n = g.num_tokens;
  for (int r = tid; r < BM; r += kThreads) {
    const int64_t m = l.m0 + r;
    grad_row[r] = m < p.B * n ? (m / n) * p.N + g.token_offset + m % n : -1;
  }
}

// A = G tile: As[r][kk] = grad[grad_row[r], j0 + kk] (row-major, contiguous along d).
template <typename scalar_t>
TUBEVIT_HD void dx_fill_a(const ParamsDX& p, const scalar_t* grad, const int64_t* grad_row, int64_t j0, int tid,
                          scalar_t* As) {
  for (int e = tid; e < BM * BK; e += kThreads) {
    const int r = e / BK, kk = e % BK;
    const int64_t gr = grad_row[r], j = j0 + kk;
    As[r * LDS + kk] = gr >= 0 && j < p.d ? grad[gr * p.d + j] : scalar_t(0.0f);
  }
}

// B = W tile: Bs[kk][n] = W[j0 + kk, c0 + n] (row-major, contiguous along K).
template <typename scalar_t>
TUBEVIT_HD void dx_fill_b(const ParamsDX& p, const DxLoc& l, int64_t j0, int tid, scalar_t* Bs) {
  const int64_t K = p.g[l.i].patch_size;
  const scalar_t* w = static_cast<const scalar_t*>(p.w[l.i]);
  for (int e = tid; e < BK * BN; e += kThreads) {
    const int kk = e / BN, n = e % BN;
    const int64_t j = j0 + kk, col = l.c0 + n;
    Bs[kk * LDB2 + n] = j < p.d && col < K ? w[j * K + col] : scalar_t(0.0f);
  }
}

TUBEVIT_HD MmaArgs dx_mma_args(int warp, int ks) {
  const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;
  // B staged as Bs[j][k]: row-major; 16 columns apart = 16 elements
  return {wm * LDS + ks, 16 * LDS, LDS, ks * LDB2 + wn, 16, LDB2};
}

// dP[dp_offset_i + m * K + col] = Cs (fp32, not rounded to the input dtype).
TUBEVIT_HD void dx_epilogue(const ParamsDX& p, const DxLoc& l, const float* Cs, int tid, float* dp) {
  const TubeGeom& g = p.g[l.i];
  const int64_t K = g.patch_size, M = p.B * g.num_tokens;
  for (int e = tid; e < BM * BN; e += kThreads) {
    const int r = e / BN, n = e % BN;
    const int64_t m = l.m0 + r, col = l.c0 + n;
    if (m < M && col < K) dp[p.dp_offset[l.i] + m * K + col] = Cs[r * LDC + n];
  }
}

// ------------------------------------------------------------- host side
// Widest access (elements, at most 16 bytes) for gathering tube g's patches
// from x: the kw-runs must be unit-stride and start at multiples of V for
// every token, channel and row (offset, stride and all of x's strides
// divisible by V, x aligned to V elements), and V must divide kw.
// Shared-memory rows (LDS, LDB2) and the tile widths are multiples of 8.
inline int gather_vec(const TubeGeom& g, const int64_t* xs, const void* x, int64_t elem_size) {
  if (xs[4] != 1) return 1;
  for (int v = int(16 / elem_size); v > 1; v /= 2) {
    bool ok = g.k[2] % v == 0 && g.o[2] % v == 0 && g.s[2] % v == 0 &&
              reinterpret_cast<uintptr_t>(x) % uintptr_t(v * elem_size) == 0;
    for (int a = 0; a < 4; ++a) ok = ok && xs[a] % v == 0;
    if (ok) return v;
  }
  return 1;
}

// Widest access for the weight tile: rows of K contiguous elements.
inline int weight_vec(int64_t K, const void* w, int64_t elem_size) {
  for (int v = int(16 / elem_size); v > 1; v /= 2)
    if (K % v == 0 && reinterpret_cast<uintptr_t>(w) % uintptr_t(v * elem_size) == 0) return v;
  return 1;
}

// Parameter blocks for layout L (at most kMaxTubes tubes); xs = x's five
// strides in elements. The grid is (fwd_token_tiles, ceil(d / BN)) for the
// forward and (dw_tiles) for dW.
template <typename P>
inline void fill_common(P& p, const TubeLayout& L, const int64_t* xs) {
  p.n_tubes = static_cast<int>(L.tubes.size());
  p.B = L.batch;
  p.N = L.num_tokens;
  p.d = L.dim;
  p.xs = {xs[0], xs[1], xs[2], xs[3], xs[4]};
  p.tiles_before[0] = 0;
  for (int i = 0; i < p.n_tubes; ++i) p.g[i] = L.tubes[i];
}

inline Params make_fwd_params(const TubeLayout& L, const int64_t* xs, const void* x, int64_t elem_size,
                              const void* const* w, const void* const* bias) {
  Params p{};
  fill_common(p, L, xs);
  for (int i = 0; i < p.n_tubes; ++i) {
    p.w[i] = w[i];
    p.bias[i] = bias == nullptr ? nullptr : bias[i];
    p.vec_x[i] = gather_vec(L.tubes[i], xs, x, elem_size);
    p.vec_w[i] = weight_vec(L.tubes[i].patch_size, w[i], elem_size);
    p.tiles_before[i + 1] = p.tiles_before[i] + L.batch * ((L.tubes[i].num_tokens + BM - 1) / BM);
  }
  return p;
}

// grad: the contiguous (B, N, d) output gradient (its address decides vec_g).
inline ParamsDW make_dw_params(const TubeLayout& L, const int64_t* xs, const void* x, int64_t elem_size,
                               const void* grad, void* const* dw) {
  ParamsDW p{};
  fill_common(p, L, xs);
  p.vec_g = weight_vec(L.dim, grad, elem_size);  // rows of d contiguous elements, like a weight row
  for (int i = 0; i < p.n_tubes; ++i) {
    p.dw[i] = dw[i];
    p.vec_x[i] = gather_vec(L.tubes[i], xs, x, elem_size);
    p.tiles_before[i + 1] =
        p.tiles_before[i] + ((L.dim + BM - 1) / BM) * ((L.tubes[i].patch_size + BN - 1) / BN);
  }
  return p;
}

// The dP kernel's parameters: the dP layout (kernels/common.h) plus its
// grid; dp_elems receives the workspace size (elements of fp32).
inline ParamsDX make_dx_params(const TubeLayout& L, const void* const* w, int64_t* dp_elems) {
  ParamsDX p = make_dp_layout(L, w, dp_elems);
  p.tiles_before[0] = 0;
  for (int i = 0; i < p.n_tubes; ++i) {
    const TubeGeom& g = L.tubes[i];
    p.tiles_before[i + 1] =
        p.tiles_before[i] + ((L.batch * g.num_tokens + BM - 1) / BM) * ((g.patch_size + BN - 1) / BN);
  }
  return p;
}

// Shared-memory bytes of the staging tiles and of the fp32 accumulator tile
// (they alias: the accumulators are stored after the last MMA).
template <typename scalar_t>
constexpr int fwd_smem_bytes(int stages = 1) {
  return stages * (BM + BN) * LDS * int(sizeof(scalar_t)) > BM * LDC * int(sizeof(float))
             ? stages * (BM + BN) * LDS * int(sizeof(scalar_t))
             : BM * LDC * int(sizeof(float));
}
template <typename scalar_t>
constexpr int dx_smem_bytes() {
  return (BM * LDS + BK * LDB2) * int(sizeof(scalar_t)) > BM * LDC * int(sizeof(float))
             ? (BM * LDS + BK * LDB2) * int(sizeof(scalar_t))
             : BM * LDC * int(sizeof(float));
}
template <typename scalar_t>
constexpr int dw_smem_bytes(int stages = 1) {
  return stages * (kDwARows * LDA2 + DM * LDB2) * int(sizeof(scalar_t)) > BM * LDC * int(sizeof(float))
             ? stages * (kDwARows * LDA2 + DM * LDB2) * int(sizeof(scalar_t))
             : BM * LDC * int(sizeof(float));
}

}  // namespace tc
}  // namespace tubevit
