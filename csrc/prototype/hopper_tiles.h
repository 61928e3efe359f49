// Tile logic of the Hopper (sm_90a, wgmma) forward kernel, host + device:
// hopper_forward.cu compiles it into the kernel and
// hopper_emulation.cpp runs it on the CPU, CTA by CTA and thread by
// thread, with a plain GEMM in place of wgmma, so the CPU test suite checks
// every index of the kernel (tile schedule, producer chunks and their source
// offsets, zero fill, epilogue row tables and 16-byte store chunks).
//
// The problem: tube i is a GEMM P_i (M_i x K_i) * W_i^T (K_i x d), M_i = B * n_i
// rows (tokens of all samples, flattened: no per-sample padding of row
// tiles), K_i = C * kt * kh * kw, written into rows [off_i, off_i + n_i) of
// each sample's (N, d) block of the output. One persistent launch covers
// every tube: a flat list of (tube, row tile, column tile), tubes by
// decreasing K (the longest tiles first, the short ones fill the last
// wave), column tiles fastest (CTAs running at the same time read the same
// gathered rows of x from L2); CTA c takes tiles c, c + G, c + 2G, ...
//
// Per CTA (kThreads = 384): warpgroup 0 produces, warpgroups 1 and 2 consume.
// Producer thread t stages row t of the A tile (the patch row of token
// m0 + t) and row t of the B tile (W_i row n0 + t) for each K step, in
// chunks of V elements: V = 8 / 4 / 2 as 16 / 8 / 4-byte cp.async (zero-
// filled where the row or the column is out of range), V = 1 as plain
// loads and shared stores. The consumers run wgmma on the stage and write
// the tile: bias and position embedding added in fp32, cast, staged in
// shared memory, then 16-byte stores into the tube's rows of (B, N, d).
#pragma once

#include <cstdint>
#include <type_traits>
#include <utility>

#include "../kernels/common.h"

namespace tubevit {
namespace hopper {

// CTA tile: BM token rows x BN output channels, K in steps of BK (one
// 128-byte swizzle row of 16-bit elements); kStages K steps in flight.
constexpr int BM = 128, BN = 128, BK = 64, kStages = 4;
constexpr int kProducerThreads = 128;            // one warpgroup: one A row and one B row each
constexpr int kConsumerThreads = 256;            // two warpgroups, 64 rows of the tile each
constexpr int kThreads = kProducerThreads + kConsumerThreads;
constexpr int kOutChunk = 8;                     // elements per 16-byte epilogue store
constexpr int kStagePitch = BN + 8;              // staged output row, padded: conflict-free pairs
static_assert(BM == kProducerThreads && BN == kProducerThreads, "one A row and one B row per producer thread");
static_assert(BM * BN % (kConsumerThreads * kOutChunk) == 0, "whole store chunks per consumer thread");

struct Tube {
  TubeGeom g;
  const void* w;         // (d, K) row-major, input dtype
  const void* bias;      // (d,) input dtype, or null
  int64_t rows;          // M_i = B * n_i
  int64_t tiles_before;  // tiles of the tubes before this one in the tile list
  int64_t m_tiles;       // ceil(M_i / BM)
  int va, vb;            // elements per copy of A (x) and of B (W): 8, 4, 2 (cp.async) or 1
  int op_index;          // this tube's index in the op's tube list
};

struct Params {
  const void* x;
  Strides5 xs;           // elements
  const void* pe;        // (N, d) contiguous, input dtype, or null
  void* out;             // (B, N, d) contiguous
  Tube t[kMaxTubes];     // in tile-list order (decreasing K), not the op's tube order
  int n_tubes;
  int64_t N, d, n_tiles;
  int64_t n_col_tiles;   // ceil(d / BN)
};

struct TileCoord {
  int tube;              // index into Params::t
  int64_t m0, n0;        // first row (of the tube's M_i) and first output channel
};

// Tile `tile` of the list (0 <= tile < p.n_tiles).
TUBEVIT_HD TileCoord locate_tile(const Params& p, int64_t tile) {
  int i = 0;
  while (i + 1 < p.n_tubes && tile >= p.t[i + 1].tiles_before) ++i;
  const int64_t local = tile - p.t[i].tiles_before;
  return {i, (local / p.n_col_tiles) * BM, (local % p.n_col_tiles) * BN};
}

// The persistent schedule: the j-th of `n_tiles` tiles for CTA `cta` in a
// grid of `grid` CTAs, or -1 past the last.
TUBEVIT_HD int64_t scheduled_tile(int64_t n_tiles, int64_t cta, int64_t grid, int64_t j) {
  const int64_t tile = cta + j * grid;
  return tile < n_tiles ? tile : -1;
}

// Element offset in x of row r's patch origin (token r % n_i of sample
// r / n_i), or -1 past the tube's last row (zero-filled in the tile).
TUBEVIT_HD int64_t row_origin(const Params& p, const Tube& t, int64_t r) {
  if (r >= t.rows) return -1;
  const int64_t n = t.g.num_tokens;
  return (r / n) * p.xs.b + token_origin_offset(t.g, r % n, p.xs.t, p.xs.h, p.xs.w);
}

// A producer thread's walk along its patch row: column k's position in
// (c, kt, kh, kw) order (like weight.reshape(d, K)) and its element offset
// from the row's origin, advanced by V columns at a time without divisions.
// V divides kw (Tube::va), so a step never crosses a kw run.
struct ColumnWalker {
  int64_t k, off;
  int64_t kw, kh, kt;

  TUBEVIT_HD void start(const Params& p, const Tube& t, int64_t k0) {
    k = k0;
    kw = k0 % t.g.k[2];
    const int64_t r = k0 / t.g.k[2];
    kh = r % t.g.k[1];
    const int64_t r2 = r / t.g.k[1];
    kt = r2 % t.g.k[0];
    off = patch_column_offset(t.g, k0, p.xs.c, p.xs.t, p.xs.h, p.xs.w);
  }
  TUBEVIT_HD void advance(const Params& p, const Tube& t, int v) {
    k += v;
    kw += v;
    off += v * p.xs.w;
    if (kw < t.g.k[2]) return;
    kw = 0;
    off += p.xs.h - t.g.k[2] * p.xs.w;
    if (++kh < t.g.k[1]) return;
    kh = 0;
    off += p.xs.t - t.g.k[1] * p.xs.h;
    if (++kt < t.g.k[0]) return;
    kt = 0;
    off += p.xs.c - t.g.k[0] * p.xs.t;
  }
};

// Producer thread `t`'s chunks of one K step (columns k0 .. k0 + BK - 1):
// copy(tile_row, tile_col, src, V), src the element offset of the chunk in
// x (A) or in W_i (B), or -1 where the chunk is zero-filled. `walk` is at
// column k0 on entry and at k0 + BK on return.
template <int V, class Copy>
TUBEVIT_HD void a_step(const Params& p, const Tube& tube, int t, int64_t row_org, ColumnWalker& walk,
                       const Copy& copy) {
  static_assert(BK % V == 0, "whole chunks per K step");
  for (int j = 0; j < BK; j += V) {
    const bool ok = row_org >= 0 && walk.k < tube.g.patch_size;
    copy(t, j, ok ? row_org + walk.off : int64_t(-1), V);
    walk.advance(p, tube, V);
  }
}

template <int V, class Copy>
TUBEVIT_HD void b_step(const Params& p, const Tube& tube, int t, int64_t n0, int64_t k0, const Copy& copy) {
  static_assert(BK % V == 0, "whole chunks per K step");
  const int64_t n = n0 + t, K = tube.g.patch_size;
  for (int j = 0; j < BK; j += V) {
    const bool ok = n < p.d && k0 + j < K;
    copy(t, j, ok ? n * K + k0 + j : int64_t(-1), V);
  }
}

template <int V>
using IntConst = std::integral_constant<int, V>;

// Calls f(IntConst<V>{}) for a chunk width V in {8, 4, 2, 1}.
template <class F>
TUBEVIT_HD void with_width(int v, const F& f) {
  switch (v) {
    case 8: f(IntConst<8>{}); break;
    case 4: f(IntConst<4>{}); break;
    case 2: f(IntConst<2>{}); break;
    default: f(IntConst<1>{}); break;
  }
}

// The epilogue's per-row table (consumer thread m < BM fills row m): the
// output row of tile row m in the (B * N, d) view and its position-
// embedding row, or -1 past the tube's last row.
struct RowInfo {
  int64_t out_row, pe_row;
};
TUBEVIT_HD RowInfo row_info(const Params& p, const Tube& t, int64_t r) {
  if (r >= t.rows) return {-1, -1};
  const int64_t n = t.g.num_tokens, tok = r % n;
  return {(r / n) * p.N + t.g.token_offset + tok, t.g.token_offset + tok};
}

// Store chunk q (0 <= q < BM * BN / kOutChunk) of the staged tile: its row
// and first column in the tile. Consumer thread ct stores chunks
// ct, ct + kConsumerThreads, ...; eight consecutive threads cover one
// 128-byte run of a row (conflict-free shared reads, full sectors).
struct Chunk {
  int row, col;
};
TUBEVIT_HD Chunk store_chunk(int q) { return {q / (BN / kOutChunk), (q % (BN / kOutChunk)) * kOutChunk}; }

// Host: elements per copy (8, 4, 2 or 1) of tube g's A chunks: the largest V
// that divides kw, the w offset and stride, every other stride of x and the
// alignment of x's data (in elements), with x's w stride 1; else 1.
inline int a_width(const TubeGeom& g, const Strides5& xs, int64_t x_align_elems) {
  if (xs.w != 1) return 1;
  for (int v : {8, 4, 2}) {
    const bool ok = g.k[2] % v == 0 && g.o[2] % v == 0 && g.s[2] % v == 0 && xs.h % v == 0 && xs.t % v == 0 &&
                    xs.c % v == 0 && xs.b % v == 0 && x_align_elems % v == 0;
    if (ok) return v;
  }
  return 1;
}

// Host: elements per copy of W_i's rows (K_i elements each, contiguous).
inline int b_width(int64_t K, int64_t w_align_elems) {
  for (int v : {8, 4, 2})
    if (K % v == 0 && w_align_elems % v == 0) return v;
  return 1;
}

// Host: the largest power of two (up to 8) dividing the address of p, in
// elements of `elem` bytes.
inline int64_t align_elems(const void* ptr, int64_t elem) {
  const auto a = reinterpret_cast<uintptr_t>(ptr);
  int64_t v = 8;
  while (v > 1 && a % uintptr_t(v * elem) != 0) v /= 2;
  return v;
}

// Host: the (B, N, d) output gradient as the dW and dP producers read it:
// contiguous and 16-byte aligned (their G chunks are 16-byte cp.async).
inline at::Tensor aligned_rows(const at::Tensor& grad_out) {
  at::Tensor g = grad_out.contiguous();
  return reinterpret_cast<uintptr_t>(g.const_data_ptr()) % 16 != 0 ? g.clone() : g;
}

// Host: a parameter block P (Params, DwParams, DpParams) for layout L with
// the fields they share (tube count, N, d) set, after checking the tube count
// against the fixed arrays.
template <class P>
inline P params_for(const TubeLayout& L) {
  TORCH_CHECK(L.tubes.size() <= size_t(kMaxTubes), "the Hopper kernels take at most ", kMaxTubes, " tubes, got ",
              L.tubes.size());
  P p{};
  p.n_tubes = static_cast<int>(L.tubes.size());
  p.N = L.num_tokens;
  p.d = L.dim;
  return p;
}

// Host: the parameters for layout L without pointers: the tile list, tubes
// by decreasing K (stable; Tube::op_index keeps the op's order).
inline Params make_params(const TubeLayout& L) {
  Params p = params_for<Params>(L);
  p.n_col_tiles = (L.dim + BN - 1) / BN;
  int order[kMaxTubes];
  for (int i = 0; i < p.n_tubes; ++i) order[i] = i;
  // insertion sort: stable, at most kMaxTubes entries
  for (int i = 1; i < p.n_tubes; ++i)
    for (int j = i; j > 0 && L.tubes[order[j]].patch_size > L.tubes[order[j - 1]].patch_size; --j)
      std::swap(order[j], order[j - 1]);
  int64_t tiles = 0;
  for (int i = 0; i < p.n_tubes; ++i) {
    Tube& t = p.t[i];
    t.op_index = order[i];
    t.g = L.tubes[order[i]];
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
// (B, N, d) contiguous; chunk widths from the strides and alignments.
inline Params make_params(const TubeLayout& L, const at::Tensor& x, const std::vector<at::Tensor>& weights,
                          const std::vector<at::Tensor>& biases, const at::Tensor& pe, at::Tensor& out) {
  Params p = make_params(L);
  p.x = x.const_data_ptr();
  p.xs = strides_of(x);
  p.pe = pe.defined() ? pe.const_data_ptr() : nullptr;
  p.out = out.mutable_data_ptr();
  const int64_t elem = x.element_size();
  const int64_t x_align = align_elems(p.x, elem);
  for (int i = 0; i < p.n_tubes; ++i) {
    Tube& t = p.t[i];
    t.w = weights[t.op_index].const_data_ptr();
    t.bias = biases.empty() ? nullptr : biases[t.op_index].const_data_ptr();
    t.va = a_width(t.g, p.xs, x_align);
    t.vb = b_width(t.g.patch_size, align_elems(t.w, elem));
  }
  return p;
}

// ---------------------------------------------------------------------------
// Weight and bias gradient: dW_i (d x K_i) = G_i^T P_i, db_i = column sums of
// G_i, reduced over the M_i = B * n_i token rows of tube i (G_i: the tube's
// rows of the (B, N, d) output gradient, P_i: its patch matrix). Same
// skeleton as the forward: a CTA tile is BM channels (A = G_i^T, channel-
// contiguous: MN-major) x BN patch columns (B = P_i, gathered from x, column-
// contiguous along kw runs: MN-major), reduced over BK tokens per step. The
// token range is split for parallelism: split s of tube i covers K steps
// [s * steps_per_split, (s + 1) * steps_per_split); each (tube, split,
// column tile, channel tile) writes an fp32 partial, and one reduction pass
// sums the splits in order (deterministic) and casts. db rides along: the
// CTAs of column tile 0 sum their A tiles' rows.

struct DwTube {
  TubeGeom g;
  int64_t rows;             // M_i
  int64_t steps;            // ceil(M_i / BK)
  int64_t splits;           // S_i
  int64_t steps_per_split;  // K steps per split (the last may have fewer)
  int64_t k_tiles;          // ceil(K_i / BN)
  int64_t tiles_before;     // tiles of the tubes before this one
  int64_t ws_offset;        // first fp32 partial of this tube in the workspace: S_i blocks of d * K_i
  int64_t db_offset;        // first db partial: S_i blocks of d
  int64_t dw_before;        // entries of dW_j, j < i (the reduction's element order)
  int vb;                   // elements per copy of B (x), as the forward's A
  void* dw;                 // (d, K_i) contiguous, x's dtype
  void* db;                 // (d,) x's dtype, or null
};

struct DwParams {
  const void* x;
  Strides5 xs;
  const void* g;            // (B, N, d) contiguous, 16-byte aligned
  float* ws;                // partials
  float* ws_db;             // db partials (db_elems floats; null when there are none)
  int with_db;              // db asked for (its reduction runs even with no partials: B = 0 gives zeros)
  DwTube t[kMaxTubes];      // in the op's tube order
  int n_tubes;
  int64_t N, d, n_tiles;
  int64_t d_tiles;          // ceil(d / BM)
  int64_t ws_elems, db_elems;
  int64_t dw_total;         // sum of d * K_i
};

struct DwTile {
  int tube;
  int64_t split;
  int64_t n0;               // first channel (row of dW)
  int64_t c0;               // first patch column
  int64_t r0, r1;           // token rows [r0, r1) of this split
};

// Tile `tile`: tubes in order, then splits, then column tiles, channel tiles
// fastest (CTAs running together gather the same patch columns).
TUBEVIT_HD DwTile locate_dw_tile(const DwParams& p, int64_t tile) {
  int i = 0;
  while (i + 1 < p.n_tubes && tile >= p.t[i + 1].tiles_before) ++i;
  const DwTube& t = p.t[i];
  int64_t local = tile - t.tiles_before;
  const int64_t dt = local % p.d_tiles;
  local /= p.d_tiles;
  const int64_t ct = local % t.k_tiles, split = local / t.k_tiles;
  const int64_t r0 = split * t.steps_per_split * BK;
  const int64_t r1 = r0 + t.steps_per_split * BK < t.rows ? r0 + t.steps_per_split * BK : t.rows;
  return {i, split, dt * BM, ct * BN, r0, r1};
}

// Whether tile tc also sums its G rows into db partials (column tile 0 of
// each (tube, split, channel tile), when db is asked for).
TUBEVIT_HD bool dw_tile_sums_db(const DwParams& p, const DwTile& tc) { return p.with_db && tc.c0 == 0; }

// Elements of the reduction pass: every dW entry, then every db entry when asked for.
TUBEVIT_HD int64_t dw_reduce_total(const DwParams& p) { return p.dw_total + (p.with_db ? p.n_tubes * p.d : 0); }

// Producer thread t's A chunks (G rows) of one K step starting at token row
// k0 of the tile: token j = t / 2, channels (t % 2) * 64 .. + 63 in chunks of
// 8 (16 bytes); copy(tile_channel, token, src) with src the element offset in
// G or -1 (zeros).
template <class Copy>
TUBEVIT_HD void dw_a_step(const DwParams& p, const DwTube& tube, const DwTile& tc, int t, int64_t k0,
                          const Copy& copy) {
  const int j = t / 2;
  const int64_t r = k0 + j;
  const int64_t n = tube.g.num_tokens;
  const int64_t orow = r < tc.r1 ? (r / n) * p.N + tube.g.token_offset + r % n : -1;
  for (int c = 0; c < 64; c += 8) {
    const int m = (t % 2) * 64 + c;
    const bool ok = orow >= 0 && tc.n0 + m < p.d;
    copy(m, j, ok ? orow * p.d + tc.n0 + m : int64_t(-1));
  }
}

// Producer thread t's B chunks (patch entries from x) of one K step: token
// j = t % 64, columns (t / 64) * 64 .. + 63 of the tile in chunks of V, their
// offsets from the tile's column table (col_off[c]: offset of column c0 + c
// from a patch origin, or -1 past K_i); copy(tile_column, token, src, V).
template <int V, class Copy>
TUBEVIT_HD void dw_b_step(const DwParams& p, const DwTube& tube, const DwTile& tc, int t, int64_t k0,
                          const int64_t* col_off, const Copy& copy) {
  const int j = t % 64, half = t / 64;
  const int64_t r = k0 + j;
  int64_t org = -1;
  if (r < tc.r1) {
    const int64_t n = tube.g.num_tokens;
    org = (r / n) * p.xs.b + token_origin_offset(tube.g, r % n, p.xs.t, p.xs.h, p.xs.w);
  }
  for (int c = 0; c < 64; c += V) {
    const int col = half * 64 + c;
    const int64_t co = col_off[col];
    copy(col, j, (org >= 0 && co >= 0) ? org + co : int64_t(-1), V);
  }
}

// Column table entry c of a tile (filled by producer thread c).
TUBEVIT_HD int64_t dw_column(const DwParams& p, const DwTube& t, int64_t c0, int c) {
  const int64_t k = c0 + c;
  return k < t.g.patch_size ? patch_column_offset(t.g, k, p.xs.c, p.xs.t, p.xs.h, p.xs.w) : -1;
}

// The reduction pass, element e of dW (0 <= e < dw_total: tube by tube, each
// (d, K_i) row-major) then of db (dw_total <= e < dw_total + n_tubes * d when
// db is asked for): which tensor and entry, and the sum of its splits' fp32
// partials in split order.
struct DwEntry {
  int tube;
  bool bias;
  int64_t index;  // into dW_i (row-major) or db_i
};
TUBEVIT_HD DwEntry dw_entry(const DwParams& p, int64_t e) {
  if (e >= p.dw_total) return {int((e - p.dw_total) / p.d), true, (e - p.dw_total) % p.d};
  int i = 0;
  while (i + 1 < p.n_tubes && e >= p.t[i + 1].dw_before) ++i;
  return {i, false, e - p.t[i].dw_before};
}
TUBEVIT_HD float dw_sum(const DwParams& p, const DwEntry& en) {
  const DwTube& t = p.t[en.tube];
  float s = 0.f;
  if (en.bias) {
    for (int64_t sp = 0; sp < t.splits; ++sp) s += p.ws_db[t.db_offset + sp * p.d + en.index];
  } else {
    const int64_t block = p.d * t.g.patch_size;
    for (int64_t sp = 0; sp < t.splits; ++sp) s += p.ws[t.ws_offset + sp * block + en.index];
  }
  return s;
}

// Host: split counts so that the tiles number about `target` (a few per
// SM), each split at least kMinSplitSteps K steps.
constexpr int64_t kMinSplitSteps = 8;
inline DwParams make_dw_params(const TubeLayout& L, int64_t target) {
  DwParams p = params_for<DwParams>(L);
  p.d_tiles = (L.dim + BM - 1) / BM;
  double work = 0;
  for (const auto& g : L.tubes)
    work += double((g.patch_size + BN - 1) / BN) * double((L.batch * g.num_tokens + BK - 1) / BK);
  int64_t tiles = 0, ws = 0, db = 0, dw = 0;
  for (int i = 0; i < p.n_tubes; ++i) {
    DwTube& t = p.t[i];
    t.g = L.tubes[i];
    t.dw_before = dw;
    dw += L.dim * t.g.patch_size;
    t.rows = L.batch * t.g.num_tokens;
    t.steps = (t.rows + BK - 1) / BK;
    t.k_tiles = (t.g.patch_size + BN - 1) / BN;
    // this tube's share of `target` tiles, in proportion to its work, over its unsplit tiles
    const double share = work > 0 ? double(target) * double(t.k_tiles) * double(t.steps) / work : 1.0;
    int64_t s = static_cast<int64_t>(share / double(t.k_tiles * p.d_tiles) + 0.5);
    const int64_t most = t.steps / kMinSplitSteps;  // splits of at least kMinSplitSteps
    s = s > most ? most : s;
    s = s < 1 ? 1 : s;
    t.steps_per_split = t.steps > 0 ? (t.steps + s - 1) / s : 1;
    t.splits = t.steps > 0 ? (t.steps + t.steps_per_split - 1) / t.steps_per_split : 0;
    t.tiles_before = tiles;
    tiles += t.splits * t.k_tiles * p.d_tiles;
    t.ws_offset = ws;
    ws += t.splits * L.dim * t.g.patch_size;
    t.db_offset = db;
    db += t.splits * L.dim;
  }
  p.n_tiles = tiles;
  p.ws_elems = ws;
  p.db_elems = db;
  p.dw_total = dw;
  return p;
}

// Host: the pointers of one call into p (from make_dw_params, whose sizes
// the workspaces follow): x (any strides), grad (B, N, d) contiguous and
// 16-byte aligned, dws / dbs (dbs empty: no db) contiguous in x's dtype, ws
// (ws_elems floats) and ws_db (db_elems floats; unused without db).
inline void bind_dw(DwParams& p, const at::Tensor& x, const at::Tensor& grad, const std::vector<at::Tensor>& dws,
                    const std::vector<at::Tensor>& dbs, float* ws, float* ws_db) {
  p.x = x.const_data_ptr();
  p.xs = strides_of(x);
  p.g = grad.const_data_ptr();
  p.ws = ws;
  p.with_db = !dbs.empty();
  p.ws_db = p.with_db ? ws_db : nullptr;
  const int64_t x_align = align_elems(p.x, x.element_size());
  for (int i = 0; i < p.n_tubes; ++i) {
    DwTube& t = p.t[i];
    t.vb = a_width(t.g, p.xs, x_align);
    t.dw = dws[i].mutable_data_ptr();
    t.db = dbs.empty() ? nullptr : dbs[i].mutable_data_ptr();
  }
}

// ---------------------------------------------------------------------------
// Input gradient, step 1: dP_i (M_i x K_i, fp32) = G_i W_i, in the dP
// workspace of make_dp_layout (kernels/common.h), which the writer of
// kernels/grad_input.h turns into dx. The forward's skeleton with the roles
// of the operands exchanged: a CTA tile is BM token rows (A = G_i, channel-
// contiguous: K-major, copied as 16-byte chunks) x BN patch columns (B = W_i
// read as (column, channel), column-contiguous: MN-major), reduced over BK
// channels per step (d / BK steps for every tile: no split, no ordering by
// K). Tiles: tubes in order, row tiles, column tiles fastest (CTAs running
// together read the same G rows). Each dP element is written once, by the
// consumer thread holding it, as an fp32 store (a warp's stores fill whole
// 32-byte sectors).

struct DpTube {
  TubeGeom g;
  const void* w;          // (d, K_i) row-major, input dtype
  int64_t rows;           // M_i = B * n_i
  int64_t k_tiles;        // ceil(K_i / BN)
  int64_t tiles_before;   // tiles of the tubes before this one
  int64_t dp_offset;      // tube i's block of dP (make_dp_layout)
  int vb;                 // elements per copy of W_i's rows (b_width)
};

struct DpParams {
  const void* g;          // (B, N, d) contiguous, 16-byte aligned
  float* dp;              // the dP workspace
  DpTube t[kMaxTubes];    // in the op's tube order
  int n_tubes;
  int64_t N, d, n_tiles, dp_elems;
};

struct DpTile {
  int tube;
  int64_t m0, c0;         // first token row (of M_i) and first patch column
};

TUBEVIT_HD DpTile locate_dp_tile(const DpParams& p, int64_t tile) {
  int i = 0;
  while (i + 1 < p.n_tubes && tile >= p.t[i + 1].tiles_before) ++i;
  const DpTube& t = p.t[i];
  const int64_t local = tile - t.tiles_before;
  return {i, (local / t.k_tiles) * BM, (local % t.k_tiles) * BN};
}

// Row r of tube t's G_i: its row in the (B * N, d) gradient, or -1 past M_i.
TUBEVIT_HD int64_t dp_grad_row(const DpParams& p, const DpTube& t, int64_t r) {
  if (r >= t.rows) return -1;
  const int64_t n = t.g.num_tokens;
  return (r / n) * p.N + t.g.token_offset + r % n;
}

// Producer thread t's A chunks of one K step (channels k0 .. k0 + BK - 1):
// row t of the tile (gradient row grow, -1: zeros), 8 chunks of 8 channels;
// copy(tile_row, tile_channel, src) with src the element offset in G or -1.
template <class Copy>
TUBEVIT_HD void dp_a_step(const DpParams& p, int t, int64_t grow, int64_t k0, const Copy& copy) {
  for (int c = 0; c < BK; c += 8) {
    const bool ok = grow >= 0 && k0 + c < p.d;
    copy(t, c, ok ? grow * p.d + k0 + c : int64_t(-1));
  }
}

// Producer thread t's B chunks: channel k0 + t / 2 of W_i, patch columns
// c0 + (t % 2) * 64 .. + 63 in chunks of V (V divides K_i: a chunk is all
// inside or all past the row); copy(tile_column, tile_channel, src, V) with
// src the element offset in W_i or -1.
template <int V, class Copy>
TUBEVIT_HD void dp_b_step(const DpParams& p, const DpTube& tube, const DpTile& tc, int t, int64_t k0,
                          const Copy& copy) {
  static_assert(64 % V == 0, "whole chunks per half row");
  const int j = t / 2, half = t % 2;
  const int64_t ch = k0 + j, K = tube.g.patch_size;
  for (int c = 0; c < 64; c += V) {
    const int col = half * 64 + c;
    const bool ok = ch < p.d && tc.c0 + col < K;
    copy(col, j, ok ? ch * K + tc.c0 + col : int64_t(-1), V);
  }
}

// Element offset in dP of tile entry (m, n), or -1 past the tube's rows or columns.
TUBEVIT_HD int64_t dp_entry(const DpTube& t, const DpTile& tc, int m, int n) {
  const int64_t r = tc.m0 + m, col = tc.c0 + n;
  return (r < t.rows && col < t.g.patch_size) ? t.dp_offset + r * t.g.patch_size + col : -1;
}

// Host: the tile list for layout L (pointers unset), writing the dP
// workspace of make_dp_layout (its block offsets and size).
inline DpParams make_dp_params(const TubeLayout& L) {
  DpParams p = params_for<DpParams>(L);
  const ParamsDX layout = make_dp_layout(L, nullptr, &p.dp_elems);
  int64_t tiles = 0;
  for (int i = 0; i < p.n_tubes; ++i) {
    DpTube& t = p.t[i];
    t.g = L.tubes[i];
    t.rows = L.batch * t.g.num_tokens;
    t.k_tiles = (t.g.patch_size + BN - 1) / BN;
    t.tiles_before = tiles;
    tiles += ((t.rows + BM - 1) / BM) * t.k_tiles;
    t.dp_offset = layout.dp_offset[i];
  }
  p.n_tiles = tiles;
  return p;
}

// Host: the pointers of one call: grad (B, N, d) contiguous and 16-byte
// aligned, weights contiguous in its dtype, dp (dp_elems floats).
inline void bind_dp(DpParams& p, const at::Tensor& grad, const std::vector<at::Tensor>& weights, float* dp) {
  p.g = grad.const_data_ptr();
  p.dp = dp;
  const int64_t elem = grad.element_size();
  for (int i = 0; i < p.n_tubes; ++i) {
    DpTube& t = p.t[i];
    t.w = weights[i].const_data_ptr();
    t.vb = b_width(t.g.patch_size, align_elems(t.w, elem));
  }
}

}  // namespace hopper
}  // namespace tubevit
