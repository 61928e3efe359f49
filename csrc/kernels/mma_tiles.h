// Tile logic of the sm_80+ forward and weight-gradient kernels built on
// ldmatrix + mma.sync (cuda/tube_tokens_mma.cu), written once for the GPU
// and for the host emulator (testing/mma_emulation.cpp), like
// kernels/tc_tiles.h is for the WMMA kernels. The forward first; dW (same
// warp layout, operands read by ldmatrix.trans) below it.
//
// What it changes against the WMMA forward (tube_tokens_tc2_kernel), each a
// measured cost of that kernel (bench/DESIGN.md):
//   - token tiles are flattened across samples (a tile is 128 consecutive
//     rows of tube i's B * n_i tokens): no tile padded at every sample's end
//     (paper tubes, B = 32: 4,224 WMMA tiles of 64 rows held 31 % padding);
//   - 128 x 128 block tiles, 8 warps of 64 x 32: each gathered A tile feeds 128
//     channels (d = 768: 6 channel tiles, not 12), each warp's k16 step is
//     6 ldmatrix.x4 for 16 mma.sync (WMMA: 16 generic 32-bit loads for 8);
//   - fragments by ldmatrix from shared addresses (LDSM), mma.sync
//     m16n8k16 with fp32 accumulators kept in registers through the
//     epilogue (no fp32 tile in shared memory);
//   - 3 shared-memory stages of 32-deep K steps with cp.async and
//     wait_group(stages - 2): two steps' copies in flight during the MMAs;
//     the stage is picked by offset arithmetic (no pointer tables: the WMMA
//     kernel's `As[cur]` went to local memory);
//   - 32-bit index math in the main loop: per-row input offsets computed
//     once per tile, each thread's patch column advanced by a mixed-radix
//     cursor of 32-bit digits (the host admits a call only when every input
//     and output offset fits in int32; otherwise the WMMA kernel runs).
// fp16 and bf16 (ldmatrix moves 16-bit elements); fp32 stays on the WMMA
// kernel (as TF32) or the GEMM path.
//
// Shared memory (elements of scalar_t), per stage s of kStages, at
// s * kStageElems: As[BM tokens][LDS] (A = patches, K along a row), then
// Bs[BN channels][LDS] (B = W, K along a row: mma's column-major B).
// LDS = BK + 8 = 40 elements (80 bytes): the eight 16-byte rows one
// ldmatrix phase reads start at 80 r bytes, banks 20 r mod 32 = {0, 20, 8,
// 28, 16, 4, 24, 12}: disjoint groups of four, no bank conflict (the
// emulator checks every phase).
#pragma once

#include <cstdint>
#include <type_traits>

#include "tc_tiles.h"

namespace tubevit {
namespace mma {

constexpr int BM = 128, BN = 128, BK = 32, kStages = 3;
constexpr int kWarpsM = 2, kWarpsN = 4, kWarps = kWarpsM * kWarpsN, kThreads = 32 * kWarps;
constexpr int WM = BM / kWarpsM, WN = BN / kWarpsN;  // a warp's tile: 64 x 32
constexpr int MT = WM / 16, NT = WN / 8;             // m16 x n8 MMAs per warp and k16 step: 4 x 4
constexpr int LDS = BK + 8;
constexpr int kStageElems = (BM + BN) * LDS;
static_assert(NT % 2 == 0, "B fragments come in pairs of n8 tiles (one ldmatrix.x4)");
static_assert(BK % 16 == 0 && (LDS * 2) % 16 == 0, "16-byte ldmatrix rows and cp.async chunks");

// Every offset the kernel forms (x, W, pe, out) fits in int32: the host
// checks it (fits_int32) before choosing this kernel.
struct Params {
  TubeGeom g[kMaxTubes];
  const void* w[kMaxTubes];     // (d, K_i) row-major, scalar_t
  const void* bias[kMaxTubes];  // (d,) or nullptr
  int vec_x[kMaxTubes];         // elements per patch-gather copy (tc::gather_vec: 8, 4, 2 or 1)
  int vec_w[kMaxTubes];         // elements per weight copy (tc::weight_vec)
  int order[kMaxTubes];             // tubes by decreasing K_i (ties: list order): the grid's tube order
  int tiles_before[kMaxTubes + 1];  // prefix over order[] of ceil(B n_i / BM) (row tiles)
  int n_tubes, B, N, d;
  int n_tiles;  // channel tiles: ceil(d / BN)
  int xs[5];    // x strides (elements)
};

// Grid: every (row tile, channel tile), channel tile fastest so the blocks
// that gather the same patch rows run together and share them through L2;
// the tubes with the longest K first, so the short blocks fill the last wave
// (paper tubes: K = 1728 and 1536 before the two of 768).
TUBEVIT_HD int64_t blocks(const Params& p) { return int64_t(p.tiles_before[p.n_tubes]) * p.n_tiles; }

struct Loc {
  int i;       // tube
  int m0, n0;  // first row of the tube's B * n_i flattened tokens, first channel
};

TUBEVIT_HD Loc locate(const Params& p, int blk) {
  const int tile = blk / p.n_tiles, ct = blk % p.n_tiles;
  int q = 0;
  while (q + 1 < p.n_tubes && tile >= p.tiles_before[q + 1]) ++q;
  return {p.order[q], (tile - p.tiles_before[q]) * BM, ct * BN};
}

// Per-row tables of a tile, written once by the block (thread r for row r):
// x_row[r]: x offset of row m0 + r's first voxel; out_row[r]: its row of
// the (B * N, d) output; pe_row[r]: its row of pe (N, d). -1 past B * n_i.
struct RowTables {
  int* x_row;
  int* out_row;
  int* pe_row;
};

TUBEVIT_HD void row_tables(const Params& p, const Loc& l, int tid, const RowTables& t) {
  const TubeGeom& g = p.g[l.i];
  const int n = static_cast<int>(g.num_tokens);
  for (int r = tid; r < BM; r += kThreads) {
    const int m = l.m0 + r;
    if (m < p.B * n) {
      const int b = m / n, tok = m % n;
      t.x_row[r] = b * p.xs[0] + static_cast<int>(token_origin_offset(g, tok, p.xs[2], p.xs[3], p.xs[4]));
      t.pe_row[r] = static_cast<int>(g.token_offset) + tok;
      t.out_row[r] = b * p.N + t.pe_row[r];
    } else {
      t.x_row[r] = t.out_row[r] = t.pe_row[r] = -1;
    }
  }
}

// A producer thread's patch column: it always copies the chunk at column
// kk = (tid mod BK / V) * V of a step, i.e. column k = s * BK + kk at step s,
// for rows tid / (BK / V) + j * (kThreads / (BK / V)). The column's input
// offset comes from 32-bit (c, kt, kh, kw) digits advanced by BK per step
// (one carry per digit: every digit of BK's decomposition is below its
// radix), so the main loop does no division.
struct ACursor {
  int k;               // this thread's column at the next step
  int c, kt, kh, kw;   // its digits
  int sc, skt, skh, skw;  // BK as digits
};

TUBEVIT_HD ACursor a_cursor(const Params& p, const Loc& l, int tid) {
  const TubeGeom& g = p.g[l.i];
  const int V = p.vec_x[l.i];
  const int kk = (tid % (BK / V)) * V;
  const int k0 = static_cast<int>(g.k[0]), k1 = static_cast<int>(g.k[1]), k2 = static_cast<int>(g.k[2]);
  ACursor a;
  a.k = kk;
  a.kw = kk % k2;
  a.kh = (kk / k2) % k1;
  a.kt = (kk / k2 / k1) % k0;
  a.c = kk / k2 / k1 / k0;
  a.skw = BK % k2;
  a.skh = (BK / k2) % k1;
  a.skt = (BK / k2 / k1) % k0;
  a.sc = BK / k2 / k1 / k0;
  return a;
}

// The input offset of the cursor's column (-1 past K), then one step on.
TUBEVIT_HD int a_cursor_next(const Params& p, const Loc& l, ACursor& a) {
  const TubeGeom& g = p.g[l.i];
  const int off = a.k < static_cast<int>(g.patch_size)
                      ? a.c * p.xs[1] + a.kt * p.xs[2] + a.kh * p.xs[3] + a.kw * p.xs[4]
                      : -1;
  const int k0 = static_cast<int>(g.k[0]), k1 = static_cast<int>(g.k[1]), k2 = static_cast<int>(g.k[2]);
  a.k += BK;
  a.kw += a.skw;
  int carry = a.kw >= k2;
  a.kw -= carry * k2;
  a.kh += a.skh + carry;
  carry = a.kh >= k1;
  a.kh -= carry * k1;
  a.kt += a.skt + carry;
  carry = a.kt >= k0;
  a.kt -= carry * k0;
  a.c += a.sc + carry;
  return off;
}

// f(std::integral_constant<int, V>{}) for the gather width v (8, 4, 2, else
// 1): the kernels instantiate their tile body once per width and pick one
// per block (a runtime width inside the main loop cost ptxas spills).
template <class F>
TUBEVIT_HD void with_width(int v, const F& f) {
  switch (v) {
    case 8: f(std::integral_constant<int, 8>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    default: f(std::integral_constant<int, 1>{}); break;
  }
}

// One element copy (V = 1: cp.async moves at least 4 bytes, so a plain
// load and store), else put_bytes (a cp.async of 2V bytes on the GPU, zeros
// where src is null).
template <int V, typename scalar_t>
TUBEVIT_HD void put_chunk(scalar_t* dst, const scalar_t* src) {
  if constexpr (V == 1) {
#if !defined(__CUDA_ARCH__)
    if (src != nullptr) check_host_read(src, sizeof(scalar_t));
#endif
    *dst = src != nullptr ? *src : scalar_t(0.0f);
  } else {
    tc::put_bytes<V * int(sizeof(scalar_t)), true>(dst, src);
  }
}

// Stage step s's A tile: As[r][kk..kk+V) = x[x_row[r] + koff ..], zero past
// the tube's rows or past K (V divides kw and hence K: a chunk never
// straddles either bound). koff: this thread's column offset for the step.
template <int V, typename scalar_t>
TUBEVIT_HD void fill_a(const scalar_t* x, const int* x_row, int koff, int tid, scalar_t* As) {
  constexpr int kChunksPerRow = BK / V, kRowsPerPass = kThreads / kChunksPerRow;
  static_assert(kThreads % kChunksPerRow == 0 && BM % kRowsPerPass == 0, "whole passes");
  const int kk = (tid % kChunksPerRow) * V, r0 = tid / kChunksPerRow;
  TUBEVIT_UNROLL
  for (int j = 0; j < BM / kRowsPerPass; ++j) {
    const int r = r0 + j * kRowsPerPass;
    const int base = x_row[r];
    put_chunk<V>(As + r * LDS + kk, base >= 0 && koff >= 0 ? x + base + koff : nullptr);
  }
}

// Stage step s's B tile: Bs[n][kk..kk+V) = W[n0 + n, k0 + kk ..], zero past
// d or K (V divides K).
template <int V, typename scalar_t>
TUBEVIT_HD void fill_b(const Params& p, const Loc& l, int k0, int tid, scalar_t* Bs) {
  constexpr int kChunksPerRow = BK / V, kRowsPerPass = kThreads / kChunksPerRow;
  static_assert(kThreads % kChunksPerRow == 0 && BN % kRowsPerPass == 0, "whole passes");
  const int K = static_cast<int>(p.g[l.i].patch_size);
  const scalar_t* w = static_cast<const scalar_t*>(p.w[l.i]);
  const int kk = (tid % kChunksPerRow) * V, k = k0 + kk;
  TUBEVIT_UNROLL
  for (int j = 0; j < BN / kRowsPerPass; ++j) {
    const int n = tid / kChunksPerRow + j * kRowsPerPass, col = l.n0 + n;
    put_chunk<V>(Bs + n * LDS + kk, col < p.d && k < K ? w + col * K + k : nullptr);
  }
}

// Issues step s (its copies land in `stage`), A in chunks of VA elements
// (the block's p.vec_x[i]: the kernel is instantiated per width so each
// instance holds one gather loop). The A column offset comes from the
// thread's cursor, which steps must therefore issue in order.
template <int VA, typename scalar_t>
TUBEVIT_HD void issue_step(const Params& p, const Loc& l, const scalar_t* x, const int* x_row, ACursor& a, int s,
                           int tid, scalar_t* stage) {
  fill_a<VA>(x, x_row, a_cursor_next(p, l, a), tid, stage);
  scalar_t* Bs = stage + BM * LDS;
  switch (p.vec_w[l.i]) {  // uniform per block
    case 8:
      if constexpr (sizeof(scalar_t) == 2) fill_b<8>(p, l, s * BK, tid, Bs);
      break;
    case 4: fill_b<4>(p, l, s * BK, tid, Bs); break;
    case 2: fill_b<2>(p, l, s * BK, tid, Bs); break;
    default: fill_b<1>(p, l, s * BK, tid, Bs); break;
  }
}

// The main loop's stage counters (run_stages): step s is multiplied from
// stage `read` while step s + kStages - 1 is issued into stage `write`, the
// stage step s - 1 was multiplied from.
struct StageRing {
  int read = 0, write = kStages - 1;
  TUBEVIT_HD void advance() {
    read = read + 1 == kStages ? 0 : read + 1;
    write = write + 1 == kStages ? 0 : write + 1;
  }
};

// The main loop's schedule, one definition for the kernels and the emulator
// (kStages = 3): steps 0 .. kStages - 2 are issued before the loop; at step
// s, top() (the kernel: wait for this thread's copies of step s, i.e. all
// but the newest group, then a barrier that makes everyone's visible and
// tells that every warp is done with step s - 1), step s + kStages - 1 is
// issued into the stage step s - 1 was multiplied from, and step s is
// multiplied. commit() follows every issue point, empty or not, so "all but
// the newest group" always means step s. issue(s, stage) copies step s into
// stage `stage`; compute(stage) multiplies it.
template <class Issue, class Commit, class Top, class Compute>
TUBEVIT_HD void run_stages(int steps, const Issue& issue, const Commit& commit, const Top& top,
                           const Compute& compute) {
  TUBEVIT_UNROLL
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < steps) issue(s, s);
    commit();
  }
  StageRing ring;
  for (int s = 0; s < steps; ++s) {
    top();
    if (s + kStages - 1 < steps) issue(s + kStages - 1, ring.write);
    commit();
    compute(ring.read);
    ring.advance();
  }
}

// ldmatrix.x4 row addresses (elements from the stage's start) of lane
// `lane` of warp `warp`, k16 step ks:
//  A, m16 tile mt: lanes 0-15 rows 0-15 at column 0, lanes 16-31 rows 0-15
//    at column 8: matrices (rows 0-7, k 0-7), (8-15, 0-7), (0-7, 8-15),
//    (8-15, 8-15) = mma's a0..a3 registers.
//  B, n8 tiles 2 np and 2 np + 1: lane l reads channel row (l / 16) * 8 +
//    l % 8 at column ((l / 8) % 2) * 8: matrices (n 0-7, k 0-7), (n 0-7,
//    k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15) = b0, b1 of tile 2 np, then
//    b0, b1 of tile 2 np + 1.
TUBEVIT_HD int a_frag_offset(int warp, int lane, int mt, int ks) {
  const int row = (warp / kWarpsN) * WM + mt * 16 + (lane & 15);
  return row * LDS + ks * 16 + (lane >> 4) * 8;
}

TUBEVIT_HD int b_frag_offset(int warp, int lane, int np, int ks) {
  const int n = (warp % kWarpsN) * WN + np * 16 + (lane >> 4) * 8 + (lane & 7);
  return BM * LDS + n * LDS + ks * 16 + ((lane >> 3) & 1) * 8;
}

// Where accumulator pair `half` (0: c0, c1; 1: c2, c3) of MMA tile (mt, nt)
// of lane `lane` sits in the block tile: row, and the first of its two
// adjacent columns.
struct AccPos {
  int r, n;
};

TUBEVIT_HD AccPos acc_pos(int warp, int lane, int mt, int nt, int half) {
  return {(warp / kWarpsN) * WM + mt * 16 + (lane >> 2) + 8 * half, (warp % kWarpsN) * WN + nt * 8 + (lane & 3) * 2};
}

// f(r, n, mt, nt, half) for each accumulator pair of lane `lane` of warp
// `warp` (acc_pos), in the kernels' epilogue order.
template <class F>
TUBEVIT_HD void for_each_acc_pair(int warp, int lane, const F& f) {
  TUBEVIT_UNROLL
  for (int mt = 0; mt < MT; ++mt)
    TUBEVIT_UNROLL
    for (int nt = 0; nt < NT; ++nt)
      TUBEVIT_UNROLL
      for (int half = 0; half < 2; ++half) {
        const AccPos q = acc_pos(warp, lane, mt, nt, half);
        f(q.r, q.n, mt, nt, half);
      }
}

// out[out_row[r], n0 + n + u] = cast(v_u + bias + pe) for u = 0, 1 where the
// row and column exist: one 4-byte store where both do and d is even (the
// pair then starts at an even element), else element by element.
template <typename scalar_t>
TUBEVIT_HD void store_pair(const Params& p, const Loc& l, const RowTables& t, int r, int n, float v0, float v1,
                           const scalar_t* pe, scalar_t* out) {
  const int orow = t.out_row[r];
  const int col = l.n0 + n;
  if (orow < 0 || col >= p.d) return;
  const scalar_t* bias = static_cast<const scalar_t*>(p.bias[l.i]);
  const bool both = col + 1 < p.d;
  float v[2] = {v0, v1};
  TUBEVIT_UNROLL
  for (int u = 0; u < 2; ++u) {
    if (u == 1 && !both) break;
    if (bias != nullptr) v[u] += static_cast<float>(bias[col + u]);
    if (pe != nullptr) v[u] += static_cast<float>(pe[t.pe_row[r] * p.d + col + u]);
  }
  scalar_t* dst = out + orow * p.d + col;
  if (both && p.d % 2 == 0) {
    Vec<scalar_t, 2> pair;
    pair.v[0] = static_cast<scalar_t>(v[0]);
    pair.v[1] = static_cast<scalar_t>(v[1]);
    store_vec<scalar_t, 2>(dst, pair);
  } else {
    dst[0] = static_cast<scalar_t>(v[0]);
    if (both) dst[1] = static_cast<scalar_t>(v[1]);
  }
}

// ------------------------------------------------- weight gradient (dW)
// dW_i (d x K_i) = G_i^T P_i over the M_i = B n_i tokens of tube i (G_i: the
// tube's rows of the output gradient, P_i its patch rows), on the same warp
// layout: block tiles of BM channels j x BN patch columns c, warp tiles of
// 64 j x 32 c, reduced over BK tokens per step through kStages cp.async
// stages. Each tube's token range is split S_i ways so the grid has several
// blocks per SM (paper tubes at B = 32 have 228 unsplit tiles, under two
// per SM); with S_i > 1 each block writes fp32 partials and a second launch
// sums them in split order and casts (dw_reduce): deterministic, no atomics.
//
// Stage: Ga[BK tokens][LDW] (G rows, channels contiguous: 16-byte copies, d a
// multiple of 8), then Pb[BK tokens][LDW] (patch rows, columns contiguous:
// the forward's gather widths along kw). Both are read transposed by
// ldmatrix.trans: A = G^T (row j, column m) and B = P (row m, column c).
// LDW = BM + 8 = 136 elements (272 bytes): the eight rows of a phase start
// at banks 4 r mod 32, disjoint.
constexpr int LDW = BM + 8;
constexpr int kDwStageElems = 2 * BK * LDW;
constexpr int kMinSplitSteps = 8;  // a split reduces at least this many token steps
static_assert(BM == BN, "the dW tile shares the forward's warp layout");

struct DwParams {
  TubeGeom g[kMaxTubes];
  void* dw[kMaxTubes];  // (d, K_i) row-major, scalar_t
  FastDiv n_div[kMaxTubes], n2_div[kMaxTubes], n1_div[kMaxTubes];  // n_i, its grid's W and H extents
  int vec_x[kMaxTubes];            // patch-gather copy width (tc::gather_vec)
  int c_tiles[kMaxTubes];          // ceil(K_i / BN)
  int splits[kMaxTubes];           // S_i
  int steps_per_split[kMaxTubes];  // token steps per split (the last may have fewer)
  int ws_offset[kMaxTubes];        // tube i's (S_i, d, K_i) fp32 partials; -1 when S_i = 1
  int reduce_before[kMaxTubes + 1];  // prefix of d K_i over tubes with S_i > 1 (dw_reduce's range)
  int tiles_before[kMaxTubes + 1];   // prefix of S_i * c_tiles * j_tiles
  int n_tubes, B, N, d, j_tiles;
  int xs[5];
};

static_assert(sizeof(Params) <= 4096 && sizeof(DwParams) <= 4096, "kernel parameters: at most 4 KiB");

TUBEVIT_HD int64_t dw_blocks(const DwParams& p) { return p.tiles_before[p.n_tubes]; }

struct DwLoc {
  int i, split;
  int j0, c0;          // first channel, first patch column
  int m_begin, m_end;  // the split's tokens of the tube's B n_i
};

// Tubes in list order, then splits, then column tiles, channel tiles fastest
// (the blocks that gather the same patch columns run together).
TUBEVIT_HD DwLoc dw_locate(const DwParams& p, int blk) {
  int i = 0;
  while (i + 1 < p.n_tubes && blk >= p.tiles_before[i + 1]) ++i;
  const int local = blk - p.tiles_before[i];
  const int jt = local % p.j_tiles, rest = local / p.j_tiles;
  const int ct = rest % p.c_tiles[i], split = rest / p.c_tiles[i];
  const int M = p.B * static_cast<int>(p.g[i].num_tokens);
  const int m_begin = split * p.steps_per_split[i] * BK;
  const int m_end = m_begin + p.steps_per_split[i] * BK < M ? m_begin + p.steps_per_split[i] * BK : M;
  return {i, split, jt * BM, ct * BN, m_begin, m_end};
}

TUBEVIT_HD int dw_steps(const DwLoc& l) { return l.m_end > l.m_begin ? (l.m_end - l.m_begin + BK - 1) / BK : 0; }

// The block's patch columns: koff[c] = input offset of column c0 + c
// relative to a token's first voxel, -1 past K (thread c, once per block).
TUBEVIT_HD void dw_koff(const DwParams& p, const DwLoc& l, int tid, int* koff) {
  const TubeGeom& g = p.g[l.i];
  for (int c = tid; c < BN; c += kThreads) {
    const int k = l.c0 + c;
    koff[c] = k < static_cast<int>(g.patch_size)
                  ? static_cast<int>(patch_column_offset(g, k, p.xs[1], p.xs[2], p.xs[3], p.xs[4]))
                  : -1;
  }
}

// Token m of tube i (of its B n_i): its first voxel's input offset and its
// row of the (B N, d) gradient; token_origin_offset's arithmetic with the
// divisions as multiply-shifts.
struct TokenRows {
  int x_row, g_row;
};

TUBEVIT_HD TokenRows token_rows(const DwParams& p, int i, int m) {
  const TubeGeom& g = p.g[i];
  uint32_t b, r, it;
  const uint32_t tok = p.n_div[i].divmod(static_cast<uint32_t>(m), &b);
  const uint32_t iw = p.n2_div[i].divmod(tok, &r);
  const uint32_t ih = p.n1_div[i].divmod(r, &it);
  const int t = static_cast<int>(g.o[0] + g.s[0] * int(it)), h = static_cast<int>(g.o[1] + g.s[1] * int(ih)),
            w = static_cast<int>(g.o[2] + g.s[2] * int(iw));
  return {int(b) * p.xs[0] + t * p.xs[2] + h * p.xs[3] + w * p.xs[4],
          int(b) * p.N + static_cast<int>(g.token_offset) + int(tok)};
}

// Issues step s of the block's split: Ga rows from grad (16-byte copies, zero
// past the split's tokens or past d) and Pb rows gathered from x in chunks
// of VX columns (zero past the tokens or K). With VX = 8 both tiles use the
// same (row, 8-wide chunk) per copy, so a thread computes each token's rows
// once for both.
template <int VX, typename scalar_t>
TUBEVIT_HD void issue_dw_step(const DwParams& p, const DwLoc& l, const scalar_t* x, const scalar_t* grad,
                              const int* koff, int s, int tid, scalar_t* stage) {
  constexpr int kG = BM / 8;  // 16-byte chunks per Ga row
  scalar_t* Ga = stage;
  scalar_t* Pb = stage + BK * LDW;
  const int m0 = l.m_begin + s * BK;
  TUBEVIT_UNROLL
  for (int pass = 0; pass < BK * kG / kThreads; ++pass) {
    const int e = tid + pass * kThreads, mm = e / kG, jj = (e % kG) * 8, m = m0 + mm;
    const bool row_ok = m < l.m_end;
    const TokenRows rows = row_ok ? token_rows(p, l.i, m) : TokenRows{-1, -1};
    tc::put_bytes<16, true>(Ga + mm * LDW + jj,
                            row_ok && l.j0 + jj < p.d ? grad + rows.g_row * p.d + l.j0 + jj : nullptr);
    if constexpr (VX == 8) {
      const int off = koff[jj];
      put_chunk<8>(Pb + mm * LDW + jj, row_ok && off >= 0 ? x + rows.x_row + off : nullptr);
    }
  }
  if constexpr (VX != 8) {
    constexpr int kChunksPerRow = BN / VX;
    TUBEVIT_UNROLL
    for (int pass = 0; pass < BK * kChunksPerRow / kThreads; ++pass) {
      const int e = tid + pass * kThreads, mm = e / kChunksPerRow, cc = (e % kChunksPerRow) * VX, m = m0 + mm;
      const int off = koff[cc];
      const bool ok = m < l.m_end && off >= 0;
      put_chunk<VX>(Pb + mm * LDW + cc, ok ? x + token_rows(p, l.i, m).x_row + off : nullptr);
    }
  }
}

// ldmatrix.x4.trans row addresses (elements from the stage's start), lane
// `lane` of warp `warp`, k16 step ks. ldmatrix.trans hands lane l, from
// matrix q, the elements at stored (row 2 (l % 4) + e, column l / 4): the
// transposed block, which is mma's fragment of an operand stored with its
// reduction index (tokens) along the rows.
//  A = G^T, m16 tile mt: matrices (j 0-7, m 0-7), (j 8-15, m 0-7),
//    (j 0-7, m 8-15), (j 8-15, m 8-15) = a0..a3: lane l gives token row
//    ks 16 + (l / 16) 8 + l % 8 at channel ((l / 8) % 2) 8.
//  B = P, n8 tiles 2 np and 2 np + 1: matrices (c 0-7, m 0-7), (c 0-7,
//    m 8-15), (c 8-15, m 0-7), (c 8-15, m 8-15): lane l gives token row
//    ks 16 + ((l / 8) % 2) 8 + l % 8 at column (l / 16) 8.
TUBEVIT_HD int dw_a_frag_offset(int warp, int lane, int mt, int ks) {
  const int m = ks * 16 + (lane >> 4) * 8 + (lane & 7);
  return m * LDW + (warp / kWarpsN) * WM + mt * 16 + ((lane >> 3) & 1) * 8;
}

TUBEVIT_HD int dw_b_frag_offset(int warp, int lane, int np, int ks) {
  const int m = ks * 16 + ((lane >> 3) & 1) * 8 + (lane & 7);
  return BK * LDW + m * LDW + (warp % kWarpsN) * WN + np * 16 + (lane >> 4) * 8;
}

// Accumulator pair (v0, v1) at block-tile (r, n) = dW[j0 + r, c0 + n .. + 1]:
// cast into dW (S_i = 1) or fp32 into the split's partials; one 4- / 8-byte
// store where both columns exist and K is even, else element by element.
template <typename scalar_t>
TUBEVIT_HD void dw_store_pair(const DwParams& p, const DwLoc& l, float* ws, int r, int n, float v0, float v1) {
  const int j = l.j0 + r, c = l.c0 + n, K = static_cast<int>(p.g[l.i].patch_size);
  if (j >= p.d || c >= K) return;
  const bool both = c + 1 < K, pair = both && K % 2 == 0;
  if (p.splits[l.i] == 1) {
    scalar_t* dst = static_cast<scalar_t*>(p.dw[l.i]) + j * K + c;
    if (pair) {
      Vec<scalar_t, 2> v;
      v.v[0] = static_cast<scalar_t>(v0);
      v.v[1] = static_cast<scalar_t>(v1);
      store_vec<scalar_t, 2>(dst, v);
    } else {
      dst[0] = static_cast<scalar_t>(v0);
      if (both) dst[1] = static_cast<scalar_t>(v1);
    }
  } else {
    float* dst = ws + p.ws_offset[l.i] + (l.split * p.d + j) * K + c;
    if (pair) {
      Vec<float, 2> v;
      v.v[0] = v0;
      v.v[1] = v1;
      store_vec<float, 2>(dst, v);
    } else {
      dst[0] = v0;
      if (both) dst[1] = v1;
    }
  }
}

// The second launch where any S_i > 1: element e of reduce_before's range
// (tube i, entry (j, k)) = cast(sum over splits in order of the partials).
template <typename scalar_t>
TUBEVIT_HD void dw_reduce(const DwParams& p, const float* ws, int e) {
  int i = 0;
  while (e >= p.reduce_before[i + 1]) ++i;  // tubes with S_i = 1 have empty ranges
  const int idx = e - p.reduce_before[i], dk = p.d * static_cast<int>(p.g[i].patch_size);
  float sum = 0.0f;
  for (int sp = 0; sp < p.splits[i]; ++sp) sum += ws[p.ws_offset[i] + sp * dk + idx];
  static_cast<scalar_t*>(p.dw[i])[idx] = static_cast<scalar_t>(sum);
}

// ------------------------------------------------------------- host side
// Whether every offset the kernel forms fits in int32: the input's extent
// (x strides times sizes), the weights' (d K_i), the output's (B N d) and
// pe's (N d).
inline bool fits_int32(const TubeLayout& L, const int64_t* x_sizes, const int64_t* xs) {
  constexpr int64_t kMax = (int64_t(1) << 31) - 1;
  int64_t extent = 1;
  for (int a = 0; a < 5; ++a) extent += (x_sizes[a] - 1) * xs[a];
  if (extent > kMax || L.batch * L.num_tokens * L.dim > kMax) return false;
  for (const TubeGeom& g : L.tubes)
    if (L.dim * g.patch_size > kMax || L.batch * g.num_tokens > kMax) return false;
  return true;
}

// The fields Params and DwParams share: tube count, batch, tokens per sample, d and x's strides, in
// int32 (fits_int32 admitted the call).
template <class P>
inline void set_call_shape(P& p, const TubeLayout& L, const int64_t* xs) {
  p.n_tubes = static_cast<int>(L.tubes.size());
  p.B = static_cast<int>(L.batch);
  p.N = static_cast<int>(L.num_tokens);
  p.d = static_cast<int>(L.dim);
  for (int a = 0; a < 5; ++a) p.xs[a] = static_cast<int>(xs[a]);
}

inline Params make_params(const TubeLayout& L, const int64_t* xs, const void* x, int64_t elem_size,
                          const void* const* w, const void* const* bias) {
  Params p{};
  set_call_shape(p, L, xs);
  p.n_tiles = (p.d + BN - 1) / BN;
  for (int i = 0; i < p.n_tubes; ++i) {
    const TubeGeom& g = L.tubes[i];
    p.g[i] = g;
    p.w[i] = w[i];
    p.bias[i] = bias == nullptr ? nullptr : bias[i];
    p.vec_x[i] = tc::gather_vec(g, xs, x, elem_size);
    p.vec_w[i] = tc::weight_vec(g.patch_size, w[i], elem_size);
    // insertion into order[], stable: decreasing K, list order among equals
    int q = i;
    while (q > 0 && L.tubes[p.order[q - 1]].patch_size < g.patch_size) {
      p.order[q] = p.order[q - 1];
      --q;
    }
    p.order[q] = i;
  }
  p.tiles_before[0] = 0;
  for (int q = 0; q < p.n_tubes; ++q)
    p.tiles_before[q + 1] =
        p.tiles_before[q] + static_cast<int>((L.batch * L.tubes[p.order[q]].num_tokens + BM - 1) / BM);
  return p;
}

// dW needs, besides fits_int32: d a multiple of 8 and grad 16-byte aligned
// (its rows copied 16 bytes at a time), and the partials' workspace in int32
// range (checked by make_dw_params).
inline bool dw_takes(const TubeLayout& L, const void* grad) {
  return L.dim % 8 == 0 && reinterpret_cast<uintptr_t>(grad) % 16 == 0;
}

// target: the tile count the splits aim at (the launcher: 4 per SM); the
// workspace size (fp32 elements) goes to *ws_elems.
inline DwParams make_dw_params(const TubeLayout& L, const int64_t* xs, const void* x, int64_t elem_size,
                               void* const* dw, int64_t target, int64_t* ws_elems) {
  DwParams p{};
  set_call_shape(p, L, xs);
  p.j_tiles = (p.d + BM - 1) / BM;
  int64_t unsplit = 0;
  for (const TubeGeom& g : L.tubes) unsplit += p.j_tiles * ((g.patch_size + BN - 1) / BN);
  const int64_t want = unsplit > 0 ? (target + unsplit - 1) / unsplit : 1;  // splits per tube asked for
  int64_t ws = 0, reduce = 0;
  p.tiles_before[0] = p.reduce_before[0] = 0;
  for (int i = 0; i < p.n_tubes; ++i) {
    const TubeGeom& g = L.tubes[i];
    p.g[i] = g;
    p.dw[i] = dw[i];
    p.n_div[i] = FastDiv(static_cast<uint32_t>(g.num_tokens > 0 ? g.num_tokens : 1));
    p.n2_div[i] = FastDiv(static_cast<uint32_t>(g.n[2] > 0 ? g.n[2] : 1));
    p.n1_div[i] = FastDiv(static_cast<uint32_t>(g.n[1] > 0 ? g.n[1] : 1));
    p.vec_x[i] = tc::gather_vec(g, xs, x, elem_size);
    p.c_tiles[i] = static_cast<int>((g.patch_size + BN - 1) / BN);
    const int64_t steps = (L.batch * g.num_tokens + BK - 1) / BK;
    int64_t s = want < steps / kMinSplitSteps ? want : steps / kMinSplitSteps;
    if (s < 1) s = 1;
    const int64_t per = steps > 0 ? (steps + s - 1) / s : 0;
    s = per > 0 ? (steps + per - 1) / per : 1;  // no empty split
    p.splits[i] = static_cast<int>(s);
    p.steps_per_split[i] = static_cast<int>(per);
    p.ws_offset[i] = s > 1 ? static_cast<int>(ws) : -1;
    if (s > 1) ws += s * L.dim * g.patch_size;
    reduce += s > 1 ? L.dim * g.patch_size : 0;
    p.reduce_before[i + 1] = static_cast<int>(reduce);
    p.tiles_before[i + 1] = p.tiles_before[i] + static_cast<int>(s * p.c_tiles[i] * p.j_tiles);
  }
  TORCH_CHECK(ws < (int64_t(1) << 31), "tube_tokens_backward (mma dW): partials workspace too large (", ws,
              " elements)");
  *ws_elems = ws;
  return p;
}

template <typename scalar_t>
constexpr int dw_smem_bytes() {
  return kStages * kDwStageElems * int(sizeof(scalar_t));
}

// Dynamic shared memory: the stages (the row tables are static).
template <typename scalar_t>
constexpr int smem_bytes() {
  return kStages * kStageElems * int(sizeof(scalar_t));
}

}  // namespace mma
}  // namespace tubevit
