// Host emulator of the Hopper forward kernel (hopper_forward.cu),
// as the test-only op tubevit_testing::tube_tokens_hopper_emulated. It runs
// the kernel's tile functions (hopper_tiles.h, the code the GPU
// compiles) in the kernel's order: the persistent schedule of a grid of
// `grid` CTAs, every producer thread's chunks per K step (source offsets
// from its column walk, chunk widths, zero fill), an fp32 product in place of
// wgmma (16-bit inputs are exact in fp32; fp32/fp64 inputs are multiplied as
// given), the epilogue's row table, bias and position embedding, staging
// tile and 16-byte store chunks. It checks what the hardware would not
// report: every element of a stage written by exactly one chunk, every
// cp.async chunk contiguous-and-aligned as its width needs (V elements at a
// multiple of V * element size) and inside its tensor, every output element
// stored once. The
// output starts as NaN, so an element no tile writes fails the comparison.
// What it cannot check is the hardware side (swizzled layouts, descriptors,
// mbarriers, proxy fences), which the CUDA tests and compute-sanitizer check
// on a GPU. Slow by design (plain loops).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "hopper_tiles.h"
#include "../tube_tokens.h"
#include "../testing/dx_emulation.h"
#include "dx_writer_emulation.h"
#include "../testing/tensor_extent.h"
#include "hopper_layouts.h"

namespace tubevit {
namespace {

using namespace hopper;

// A chunk of v elements from base[src] stays inside the `extent` elements the tensor reaches.
void check_inside(int64_t src, int v, int64_t extent, const char* what) {
  TORCH_CHECK(src < 0 || src + v <= extent, "a chunk of ", what, " reads past its tensor: elements [", src, ", ",
              src + v, ") of ", extent);
}

// One operand's kStages stages as the kernel's shared memory holds them:
// element (row, k) of stage s at offset Layout{}(row, k, s), with CuTe the
// 128-byte-swizzled layout the kernel declares (hopper_layouts.h;
// 2-byte elements). put() takes one producer chunk of v elements along k
// (K-major operands) or along the rows (MN-major) and checks what cp.async
// needs: the v elements contiguous in shared memory, their start 2v-byte
// aligned (the buffer starts 1024-byte aligned); finish() that every element
// of the stage was written exactly once, and copies the stage out row-major
// for the product.
template <int Rows, class Layout, typename acc_t>
class Stages {
 public:
  Stages() : mem_(size_t(Rows) * BK * kStages), hits_(size_t(Rows) * BK), dense_(size_t(Rows) * BK) {}
  void begin(int stage) {
    stage_ = stage;
    std::fill(hits_.begin(), hits_.end(), 0);
  }
  void put(int row, int k, int v, bool along_rows, const acc_t* vals) {
    TORCH_CHECK((along_rows ? row : k) % v == 0, "a ", v, "-element chunk at (", row, ", ", k, ") not aligned to its width");
    const int64_t base = off(row, k);
    TORCH_CHECK(base % v == 0, "a ", v, "-element chunk at shared-memory element ", base, " is not ", 2 * v,
                "-byte aligned");
    for (int e = 0; e < v; ++e) {
      const int r = along_rows ? row + e : row, kk = along_rows ? k : k + e;
      TORCH_CHECK(r < Rows && kk < BK, "a chunk past the stage tile at (", r, ", ", kk, ")");
      TORCH_CHECK(off(r, kk) == base + e, "a ", v, "-element chunk at (", row, ", ", k,
                  ") is not contiguous in shared memory");
      ++hits_[r * BK + kk];
      mem_[base + e] = vals[e];
    }
  }
  // the stage, row-major (row * BK + k), after checking every element was written once
  const std::vector<acc_t>& finish(const char* what) {
    for (int r = 0; r < Rows; ++r)
      for (int k = 0; k < BK; ++k) {
        TORCH_CHECK(hits_[r * BK + k] == 1, what, " stage element (", r, ", ", k, ") written ", hits_[r * BK + k],
                    " times");
        dense_[r * BK + k] = mem_[off(r, k)];
      }
    return dense_;
  }

 private:
  int64_t off(int r, int k) const { return static_cast<int64_t>(Layout{}(r, k, stage_)); }
  std::vector<acc_t> mem_;
  std::vector<int> hits_;
  std::vector<acc_t> dense_;
  int stage_ = 0;
};

using L16 = cutlass::bfloat16_t;  // the layouts of fp16 and bf16 are the same (2-byte elements)
template <typename acc_t> using FwdA = Stages<BM, layouts::ForwardA<L16>, acc_t>;
template <typename acc_t> using FwdB = Stages<BN, layouts::ForwardB<L16>, acc_t>;
using DwStA = Stages<BM, layouts::DwA<L16>, float>;
using DwStB = Stages<BN, layouts::DwB<L16>, float>;
using DpStA = Stages<BM, layouts::DpA<L16>, float>;
using DpStB = Stages<BN, layouts::DpB<L16>, float>;

template <typename scalar_t>
void emulate(const Params& p, int64_t grid, int64_t batch, int64_t x_extent) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const scalar_t* x = static_cast<const scalar_t*>(p.x);
  const scalar_t* pe = static_cast<const scalar_t*>(p.pe);
  scalar_t* out = static_cast<scalar_t*>(p.out);
  const int64_t d = p.d;
  std::vector<acc_t> acc(BM * BN);
  FwdA<acc_t> sa;
  FwdB<acc_t> sb;
  int64_t step = 0;  // the CTA's pipeline position: stage = step % kStages
  std::vector<scalar_t> staged(BM * kStagePitch);
  std::vector<RowInfo> rows(BM);
  std::vector<int64_t> row_org(kProducerThreads);
  std::vector<ColumnWalker> walk(kProducerThreads);
  std::vector<uint8_t> stored(batch * p.N * d, 0);
  // one chunk of v elements, contiguous from base[src], into the stage at (row, col..); src < 0: zeros
  auto chunk = [&](const scalar_t* base, int64_t extent, auto& stage, int row, int col, int64_t src, int v) {
    check_inside(src, v, extent, base == x ? "x" : "a weight");
    if (src >= 0 && v > 1)
      TORCH_CHECK(reinterpret_cast<uintptr_t>(base + src) % (v * sizeof(scalar_t)) == 0, "a ", v,
                  "-element cp.async chunk from a misaligned address (offset ", src, ")");
    acc_t vals[8];
    for (int e = 0; e < v; ++e) vals[e] = src >= 0 ? static_cast<acc_t>(base[src + e]) : acc_t(0);
    stage.put(row, col, v, /*along_rows=*/false, vals);
  };
  for (int64_t cta = 0; cta < grid; ++cta) {
    for (int64_t j = 0;; ++j) {
      const int64_t tile = scheduled_tile(p.n_tiles, cta, grid, j);
      if (tile < 0) break;
      const TileCoord tc = locate_tile(p, tile);
      const Tube& tube = p.t[tc.tube];
      const scalar_t* w = static_cast<const scalar_t*>(tube.w);
      const int64_t K = tube.g.patch_size;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int t = 0; t < kProducerThreads; ++t) {
        row_org[t] = row_origin(p, tube, tc.m0 + t);
        walk[t].start(p, tube, 0);
      }
      for (int64_t k0 = 0; k0 < K; k0 += BK, ++step) {
        sa.begin(int(step % kStages));
        sb.begin(int(step % kStages));
        for (int t = 0; t < kProducerThreads; ++t) {
          with_width(tube.va, [&](auto va) {
            a_step<decltype(va)::value>(p, tube, t, row_org[t], walk[t], [&](int m, int kk, int64_t src, int v) {
              chunk(x, x_extent, sa, m, kk, src, v);
            });
          });
          with_width(tube.vb, [&](auto vb) {
            b_step<decltype(vb)::value>(p, tube, t, tc.n0, k0, [&](int n, int kk, int64_t src, int v) {
              chunk(w, d * K, sb, n, kk, src, v);
            });
          });
        }
        const std::vector<acc_t>& a = sa.finish("A");
        const std::vector<acc_t>& b = sb.finish("B");
        for (int m = 0; m < BM; ++m)
          for (int n = 0; n < BN; ++n) {
            acc_t s = acc[m * BN + n];
            for (int kk = 0; kk < BK; ++kk) s += a[m * BK + kk] * b[n * BK + kk];
            acc[m * BN + n] = s;
          }
      }
      // epilogue
      for (int m = 0; m < BM; ++m) rows[m] = row_info(p, tube, tc.m0 + m);
      const scalar_t* bias = static_cast<const scalar_t*>(tube.bias);
      for (int m = 0; m < BM; ++m)
        for (int n = 0; n < BN; ++n) {
          const int64_t c = tc.n0 + n;
          acc_t v = acc[m * BN + n];
          if (c < d) {
            if (bias != nullptr) v += static_cast<acc_t>(bias[c]);
            if (pe != nullptr && rows[m].pe_row >= 0) v += static_cast<acc_t>(pe[rows[m].pe_row * d + c]);
          }
          staged[m * kStagePitch + n] = static_cast<scalar_t>(v);
        }
      for (int ct = 0; ct < kConsumerThreads; ++ct)
        for (int q = ct; q < BM * BN / kOutChunk; q += kConsumerThreads) {
          const Chunk ch = store_chunk(q);
          const int64_t orow = rows[ch.row].out_row, c = tc.n0 + ch.col;
          if (orow < 0 || c >= d) continue;
          const int64_t at = orow * d + c;
          TORCH_CHECK(at % kOutChunk == 0 && (ch.row * kStagePitch + ch.col) % kOutChunk == 0,
                      "a 16-byte store chunk not aligned");
          for (int e = 0; e < kOutChunk; ++e) {
            TORCH_CHECK(!stored[at + e], "output element ", at + e, " stored twice");
            stored[at + e] = 1;
            out[at + e] = staged[ch.row * kStagePitch + ch.col + e];
          }
        }
    }
  }
}

at::Tensor hopper_emulated_cpu(const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                               at::IntArrayRef tubes, const c10::optional<at::Tensor>& pos_embed, int64_t grid) {
  const TubeLayout L = check_forward_args(x, weights, biases, tubes, pos_embed);
  TORCH_CHECK_VALUE(L.dim % kOutChunk == 0, "the Hopper kernel takes d % ", kOutChunk, " == 0, got d = ", L.dim);
  TORCH_CHECK_VALUE(grid >= 1, "grid must be >= 1, got ", grid);
  at::Tensor out = at::full({L.batch, L.num_tokens, L.dim}, std::numeric_limits<double>::quiet_NaN(), x.options());
  const std::vector<at::Tensor> w = contiguous_all(weights), b = contiguous_all(biases);
  at::Tensor pe;
  if (pos_embed.has_value() && pos_embed->defined()) pe = pos_embed->contiguous();
  const Params p = make_params(L, x, w, b, pe, out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tube_tokens_hopper_emulated",
                                  [&] { emulate<scalar_t>(p, grid, L.batch, extent_of(x)); });
  return out;
}

// The chunk widths (elements per copy of A, of B) the kernel would use for
// each tube of this call, in the op's tube order.
std::vector<int64_t> hopper_widths_cpu(const at::Tensor& x, at::TensorList weights, at::IntArrayRef tubes) {
  const TubeLayout L = check_forward_args(x, weights, {}, tubes, c10::nullopt);
  const std::vector<at::Tensor> w = contiguous_all(weights);
  at::Tensor out = at::empty({0}, x.options());
  const Params p = make_params(L, x, w, {}, at::Tensor(), out);
  std::vector<int64_t> r(2 * p.n_tubes);
  for (int i = 0; i < p.n_tubes; ++i) {
    r[2 * p.t[i].op_index] = p.t[i].va;
    r[2 * p.t[i].op_index + 1] = p.t[i].vb;
  }
  return r;
}

// The weight / bias gradient kernels (dw_kernel, dw_reduce_kernel): every
// CTA of a `grid`-CTA persistent launch with its producer threads' chunks
// (G rows in 16-byte chunks, patch entries through the column table), each
// stage element written once, fp32 partials per split (each written once;
// the workspace starts as NaN), db partials from the A tiles of column tile
// 0, then the reduction pass in its element order. Every chunk's source lies
// inside its tensor.
template <typename scalar_t>
void emulate_dw(const DwParams& p, int64_t grid, int64_t x_extent, int64_t g_extent) {
  const scalar_t* x = static_cast<const scalar_t*>(p.x);
  const scalar_t* g = static_cast<const scalar_t*>(p.g);
  std::vector<float> acc(BM * BN), db_acc(BM);
  DwStA sa;
  DwStB sb;
  int64_t step = 0;
  std::vector<int64_t> col_tab(BN);
  std::vector<uint8_t> ws_done(p.ws_elems, 0), db_done(p.db_elems, 0);
  auto aligned = [](const scalar_t* ptr, int v) {
    return reinterpret_cast<uintptr_t>(ptr) % (v * sizeof(scalar_t)) == 0;
  };
  for (int64_t cta = 0; cta < grid; ++cta) {
    for (int64_t j = 0;; ++j) {
      const int64_t tile = scheduled_tile(p.n_tiles, cta, grid, j);
      if (tile < 0) break;
      const DwTile tc = locate_dw_tile(p, tile);
      const DwTube& tube = p.t[tc.tube];
      const int64_t K = tube.g.patch_size, d = p.d;
      for (int c = 0; c < BN; ++c) col_tab[c] = dw_column(p, tube, tc.c0, c);
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(db_acc.begin(), db_acc.end(), 0.f);
      const bool do_db = dw_tile_sums_db(p, tc);
      for (int64_t k0 = tc.r0; k0 < tc.r1; k0 += BK, ++step) {
        sa.begin(int(step % kStages));
        sb.begin(int(step % kStages));
        float vals[8];
        for (int t = 0; t < kProducerThreads; ++t) {
          dw_a_step(p, tube, tc, t, k0, [&](int m, int tok, int64_t src) {
            TORCH_CHECK(src < 0 || aligned(g + src, 8), "a misaligned 16-byte G chunk");
            check_inside(src, 8, g_extent, "G");
            for (int e = 0; e < 8; ++e) vals[e] = src >= 0 ? static_cast<float>(g[src + e]) : 0.f;
            sa.put(m, tok, 8, /*along_rows=*/true, vals);
          });
          with_width(tube.vb, [&](auto vb) {
            dw_b_step<decltype(vb)::value>(p, tube, tc, t, k0, col_tab.data(), [&](int n, int tok, int64_t src, int v) {
              TORCH_CHECK(src < 0 || v == 1 || aligned(x + src, v), "a misaligned ", v, "-element patch chunk");
              check_inside(src, v, x_extent, "x");
              for (int e = 0; e < v; ++e) vals[e] = src >= 0 ? static_cast<float>(x[src + e]) : 0.f;
              sb.put(n, tok, v, /*along_rows=*/true, vals);
            });
          });
        }
        const std::vector<float>& a = sa.finish("dW A");
        const std::vector<float>& b = sb.finish("dW B");
        for (int m = 0; m < BM; ++m) {
          for (int n = 0; n < BN; ++n) {
            float s = acc[m * BN + n];
            for (int kk = 0; kk < BK; ++kk) s += a[m * BK + kk] * b[n * BK + kk];
            acc[m * BN + n] = s;
          }
          if (do_db)
            for (int kk = 0; kk < BK; ++kk) db_acc[m] += a[m * BK + kk];
        }
      }
      for (int m = 0; m < BM; ++m)
        for (int n = 0; n < BN; ++n) {
          const int64_t row = tc.n0 + m, col = tc.c0 + n;
          if (row >= d || col >= K) continue;
          const int64_t at = tube.ws_offset + tc.split * d * K + row * K + col;
          TORCH_CHECK(!ws_done[at], "dW partial ", at, " written twice");
          ws_done[at] = 1;
          p.ws[at] = acc[m * BN + n];
        }
      if (do_db)
        for (int m = 0; m < BM; ++m)
          if (tc.n0 + m < d) {
            const int64_t at = tube.db_offset + tc.split * d + tc.n0 + m;
            TORCH_CHECK(!db_done[at], "db partial ", at, " written twice");
            db_done[at] = 1;
            p.ws_db[at] = db_acc[m];
          }
    }
  }
  const int64_t total = dw_reduce_total(p);
  for (int64_t e = 0; e < total; ++e) {
    const DwEntry en = dw_entry(p, e);
    const float v = dw_sum(p, en);
    const DwTube& t = p.t[en.tube];
    static_cast<scalar_t*>(en.bias ? t.db : t.dw)[en.index] = static_cast<scalar_t>(v);
  }
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> hopper_dw_emulated_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, at::TensorList weights, at::IntArrayRef tubes, bool bias,
    int64_t grid, int64_t target) {
  const TubeLayout L = check_backward_args(grad_out, x, weights, tubes);
  TORCH_CHECK_VALUE(L.dim % 8 == 0, "the Hopper kernels take d % 8 == 0, got d = ", L.dim);
  TORCH_CHECK_VALUE(grid >= 1 && target >= 1, "grid and target must be >= 1, got ", grid, ", ", target);
  TORCH_CHECK_TYPE(x.scalar_type() != at::kDouble, "the dW emulator keeps fp32 partials: fp16, bf16 or fp32");
  const at::Tensor grad = aligned_rows(grad_out);  // 16-byte G chunks
  std::vector<at::Tensor> dws, dbs;
  for (const auto& w : weights) dws.push_back(at::full(w.sizes(), std::numeric_limits<double>::quiet_NaN(), x.options()));
  if (bias)
    for (size_t i = 0; i < weights.size(); ++i) dbs.push_back(at::full({L.dim}, std::numeric_limits<double>::quiet_NaN(), x.options()));
  DwParams p = make_dw_params(L, target);
  at::Tensor ws = at::full({p.ws_elems}, std::numeric_limits<float>::quiet_NaN(), x.options().dtype(at::kFloat));
  at::Tensor ws_db = at::full({p.db_elems}, std::numeric_limits<float>::quiet_NaN(), x.options().dtype(at::kFloat));
  bind_dw(p, x, grad, dws, dbs, ws.mutable_data_ptr<float>(), ws_db.mutable_data_ptr<float>());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tube_tokens_hopper_dw_emulated",
                                  [&] { emulate_dw<scalar_t>(p, grid, extent_of(x), grad.numel()); });
  return {dws, dbs};
}

// The split counts the kernel would use: [splits_0, steps_per_split_0, ...].
std::vector<int64_t> hopper_dw_splits_cpu(const at::Tensor& grad_out, const at::Tensor& x, at::TensorList weights,
                                          at::IntArrayRef tubes, int64_t target) {
  const TubeLayout L = check_backward_args(grad_out, x, weights, tubes);
  const DwParams p = make_dw_params(L, target);
  std::vector<int64_t> r;
  for (int i = 0; i < p.n_tubes; ++i) {
    r.push_back(p.t[i].splits);
    r.push_back(p.t[i].steps_per_split);
  }
  return r;
}

// The input-gradient kernels: dp_kernel (every CTA of a `grid`-CTA
// persistent launch, its producer threads' chunks of G rows and W_i rows, each
// stage element written once, every chunk inside its tensor and aligned for
// its width, an fp32 product for wgmma, each dP element stored once into a
// NaN-poisoned workspace), then the writer (or, writer = false, the gather)
// on that dP, as their kernels run it.
template <typename scalar_t>
void emulate_dp(const DpParams& p, int64_t grid, int64_t g_extent) {
  const scalar_t* g = static_cast<const scalar_t*>(p.g);
  std::vector<float> acc(BM * BN);
  DpStA sa;
  DpStB sb;
  int64_t step_count = 0;
  std::vector<int64_t> grow(kProducerThreads);
  std::vector<uint8_t> done(p.dp_elems, 0);
  auto aligned = [](const scalar_t* ptr, int v) {
    return reinterpret_cast<uintptr_t>(ptr) % (v * sizeof(scalar_t)) == 0;
  };
  const int64_t steps = (p.d + BK - 1) / BK;
  for (int64_t cta = 0; cta < grid; ++cta) {
    for (int64_t j = 0;; ++j) {
      const int64_t tile = scheduled_tile(p.n_tiles, cta, grid, j);
      if (tile < 0) break;
      const DpTile tc = locate_dp_tile(p, tile);
      const DpTube& tube = p.t[tc.tube];
      const scalar_t* w = static_cast<const scalar_t*>(tube.w);
      const int64_t K = tube.g.patch_size;
      for (int t = 0; t < kProducerThreads; ++t) grow[t] = dp_grad_row(p, tube, tc.m0 + t);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t k = 0; k < steps; ++k, ++step_count) {
        sa.begin(int(step_count % kStages));
        sb.begin(int(step_count % kStages));
        float vals[8];
        for (int t = 0; t < kProducerThreads; ++t) {
          dp_a_step(p, t, grow[t], k * BK, [&](int m, int c, int64_t src) {
            TORCH_CHECK(src < 0 || aligned(g + src, 8), "a misaligned 16-byte G chunk");
            check_inside(src, 8, g_extent, "G");
            for (int e = 0; e < 8; ++e) vals[e] = src >= 0 ? static_cast<float>(g[src + e]) : 0.f;
            sa.put(m, c, 8, /*along_rows=*/false, vals);
          });
          with_width(tube.vb, [&](auto vb) {
            dp_b_step<decltype(vb)::value>(p, tube, tc, t, k * BK, [&](int n, int c, int64_t src, int v) {
              TORCH_CHECK(src < 0 || v == 1 || aligned(w + src, v), "a misaligned ", v, "-element W chunk");
              check_inside(src, v, p.d * K, "a weight");
              for (int e = 0; e < v; ++e) vals[e] = src >= 0 ? static_cast<float>(w[src + e]) : 0.f;
              sb.put(n, c, v, /*along_rows=*/true, vals);
            });
          });
        }
        const std::vector<float>& a = sa.finish("dP A");
        const std::vector<float>& b = sb.finish("dP B");
        for (int m = 0; m < BM; ++m)
          for (int n = 0; n < BN; ++n) {
            float s = acc[m * BN + n];
            for (int kk = 0; kk < BK; ++kk) s += a[m * BK + kk] * b[n * BK + kk];
            acc[m * BN + n] = s;
          }
      }
      for (int m = 0; m < BM; ++m)
        for (int n = 0; n < BN; ++n) {
          const int64_t e = dp_entry(tube, tc, m, n);
          if (e < 0) continue;
          TORCH_CHECK(e < p.dp_elems && !done[e], "dP element ", e, " written twice or out of range");
          done[e] = 1;
          p.dp[e] = acc[m * BN + n];
        }
    }
  }
  const auto missed = std::count(done.begin(), done.end(), uint8_t(0));
  TORCH_CHECK(missed == 0, missed, " dP elements no tile wrote");
}

at::Tensor hopper_dx_emulated_cpu(const at::Tensor& grad_out, const at::Tensor& x, at::TensorList weights,
                                  at::IntArrayRef tubes, int64_t grid, bool writer) {
  const TubeLayout L = check_backward_args(grad_out, x, weights, tubes);
  TORCH_CHECK_VALUE(L.dim % 8 == 0, "the Hopper kernels take d % 8 == 0, got d = ", L.dim);
  TORCH_CHECK_VALUE(grid >= 1, "grid must be >= 1, got ", grid);
  TORCH_CHECK_TYPE(x.scalar_type() != at::kDouble, "the dX emulator keeps fp32 dP: fp16, bf16 or fp32");
  const at::Tensor grad = aligned_rows(grad_out);  // 16-byte G chunks
  const std::vector<at::Tensor> w = contiguous_all(weights);
  DpParams p = make_dp_params(L);
  int64_t dp_elems = 0;
  const ParamsDX px = make_dp_layout(L, nullptr, &dp_elems);  // what the writer / gather read
  at::Tensor dp = at::full({p.dp_elems}, std::numeric_limits<float>::quiet_NaN(), x.options().dtype(at::kFloat));
  bind_dp(p, grad, w, dp.mutable_data_ptr<float>());
  at::Tensor dx = at::full({L.batch, L.channels, L.size[0], L.size[1], L.size[2]},
                           std::numeric_limits<double>::quiet_NaN(), x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tube_tokens_hopper_dx_emulated", [&] {
    emulate_dp<scalar_t>(p, grid, grad.numel());
    if (writer)
      dx::emulate_writer<scalar_t>(px, dp.const_data_ptr<float>(), L, dx.mutable_data_ptr<scalar_t>(), 3);
    else
      dx::emulate_gather<scalar_t>(px, dp.const_data_ptr<float>(), L, dx.mutable_data_ptr<scalar_t>());
  });
  return dx;
}


// tubevit_testing::dx_writer_from_dp on the CPU: the writer's emulation on a given dP.
at::Tensor dx_writer_from_dp_cpu(const at::Tensor& grad_out, const at::Tensor& x, at::TensorList weights,
                                 at::IntArrayRef tubes, const at::Tensor& dp) {
  const TubeLayout L = check_backward_args(grad_out, x, weights, tubes);
  ParamsDX p;
  at::Tensor dx = dx::dx_test_output(L, x, dp, &p);
  const auto t = x.scalar_type();
  if (dx.numel() == 0) return dx;
  TUBEVIT_DISPATCH_HALF_BF16_FLOAT(t, "dx_writer_from_dp", [&] {
    dx::emulate_writer<scalar_t>(p, dp.const_data_ptr<float>(), L, dx.mutable_data_ptr<scalar_t>(), 2);
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tubevit_testing, m) {
  // The Hopper forward kernel's tile code (hopper_tiles.h) run on the CPU with a
  // plain product for wgmma (this file). Test-only, CPU-only, not
  // differentiable.
  m.def(
      "tube_tokens_hopper_emulated(Tensor x, Tensor[] weights, Tensor[] biases, int[] tubes, "
      "Tensor? pos_embed, int grid=132) -> Tensor");
  // [va_0, vb_0, va_1, vb_1, ...]: the elements per copy of A and of B the Hopper kernel
  // uses for each tube of this call (8 / 4 / 2: 16 / 8 / 4-byte cp.async, 1: plain loads).
  m.def("hopper_chunk_widths(Tensor x, Tensor[] weights, int[] tubes) -> int[]");
  // The Hopper weight / bias gradient kernels' tile code and reduction on the CPU: (dW list,
  // db list, empty without bias); `target`: the tile count the splits aim at (the kernel: 4 per SM).
  m.def(
      "tube_tokens_hopper_dw_emulated(Tensor grad_out, Tensor x, Tensor[] weights, int[] tubes, bool bias, "
      "int grid=132, int target=528) -> (Tensor[], Tensor[])");
  // [splits_0, steps_per_split_0, splits_1, ...] for a call with this target.
  m.def("hopper_dw_splits(Tensor grad_out, Tensor x, Tensor[] weights, int[] tubes, int target) -> int[]");
  // The Hopper input-gradient kernels on the CPU: dP by the dP kernel's tile code, then dx by the
  // writer (writer = false: by the gather, on the same dP).
  m.def(
      "tube_tokens_hopper_dx_emulated(Tensor grad_out, Tensor x, Tensor[] weights, int[] tubes, int grid=132, "
      "bool writer=True) -> Tensor");
  // dx from a given dP workspace (fp32, make_dp_layout's blocks) by the writer (dx_writer.h): on
  // CUDA the kernel, on the CPU its emulation. grad_out only fixes the layout.
  m.def("dx_writer_from_dp(Tensor grad_out, Tensor x, Tensor[] weights, int[] tubes, Tensor dp) -> Tensor");
}

TORCH_LIBRARY_IMPL(tubevit_testing, CPU, m) {
  m.impl("tube_tokens_hopper_emulated", &hopper_emulated_cpu);
  m.impl("hopper_chunk_widths", &hopper_widths_cpu);
  m.impl("tube_tokens_hopper_dw_emulated", &hopper_dw_emulated_cpu);
  m.impl("hopper_dw_splits", &hopper_dw_splits_cpu);
  m.impl("tube_tokens_hopper_dx_emulated", &hopper_dx_emulated_cpu);
  m.impl("dx_writer_from_dp", &dx_writer_from_dp_cpu);
}

}  // namespace tubevit
