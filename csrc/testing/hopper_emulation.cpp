// Host emulator of the Hopper forward kernel (cuda/hopper/hopper_forward.cu),
// as the test-only op tubevit_testing::tube_tokens_hopper_emulated. It runs
// the kernel's tile functions (kernels/hopper_tiles.h, the code the GPU
// compiles) in the kernel's order: the persistent schedule of a grid of
// `grid` CTAs, every producer thread's chunks per K step (source offsets
// from its column walk, chunk widths, zero fill), an fp32 product in place of
// wgmma (16-bit inputs are exact in fp32; fp32/fp64 inputs are multiplied as
// given), the epilogue's row table, bias and position embedding, staging
// tile and 16-byte store chunks. It checks what the hardware would not
// report: every element of a stage written by exactly one chunk, every
// cp.async chunk contiguous-and-aligned as its width needs (V elements at a
// multiple of V * element size), every output element stored once. The
// output starts as NaN, so an element no tile writes fails the comparison.
// What it cannot check is the hardware side (swizzled layouts, descriptors,
// mbarriers, proxy fences), which the CUDA tests and compute-sanitizer check
// on a GPU. Slow by design (plain loops).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "../kernels/hopper_tiles.h"
#include "../tube_tokens.h"

namespace tubevit {
namespace {

using namespace hopper;

template <typename scalar_t>
void emulate(const Params& p, int64_t grid, int64_t batch) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const scalar_t* x = static_cast<const scalar_t*>(p.x);
  const scalar_t* pe = static_cast<const scalar_t*>(p.pe);
  scalar_t* out = static_cast<scalar_t*>(p.out);
  const int64_t d = p.d;
  std::vector<acc_t> a(BM * BK), b(BN * BK), acc(BM * BN);
  std::vector<int> a_hits(BM * BK), b_hits(BN * BK);
  std::vector<scalar_t> staged(BM * kStagePitch);
  std::vector<RowInfo> rows(BM);
  std::vector<int64_t> row_org(kProducerThreads);
  std::vector<ColumnWalker> walk(kProducerThreads);
  std::vector<uint8_t> stored(batch * p.N * d, 0);
  // one chunk of v elements, contiguous from base[src], into tile[row][col..]; src < 0: zeros
  auto chunk = [&](const scalar_t* base, std::vector<acc_t>& tile, std::vector<int>& hits, int row, int col,
                   int64_t src, int v) {
    TORCH_CHECK(col % v == 0, "chunk at column ", col, " not aligned to its width ", v);
    if (src >= 0 && v > 1)
      TORCH_CHECK(reinterpret_cast<uintptr_t>(base + src) % (v * sizeof(scalar_t)) == 0, "a ", v,
                  "-element cp.async chunk from a misaligned address (offset ", src, ")");
    for (int e = 0; e < v; ++e) {
      tile[row * BK + col + e] = src >= 0 ? static_cast<acc_t>(base[src + e]) : acc_t(0);
      ++hits[row * BK + col + e];
    }
  };
  for (int64_t cta = 0; cta < grid; ++cta) {
    for (int64_t j = 0;; ++j) {
      const int64_t tile = scheduled_tile(p, cta, grid, j);
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
      for (int64_t k0 = 0; k0 < K; k0 += BK) {
        std::fill(a_hits.begin(), a_hits.end(), 0);
        std::fill(b_hits.begin(), b_hits.end(), 0);
        for (int t = 0; t < kProducerThreads; ++t) {
          with_width(tube.va, [&](auto va) {
            a_step<decltype(va)::value>(p, tube, t, row_org[t], walk[t], [&](int m, int kk, int64_t src, int v) {
              chunk(x, a, a_hits, m, kk, src, v);
            });
          });
          with_width(tube.vb, [&](auto vb) {
            b_step<decltype(vb)::value>(p, tube, t, tc.n0, k0, [&](int n, int kk, int64_t src, int v) {
              chunk(w, b, b_hits, n, kk, src, v);
            });
          });
        }
        for (int i = 0; i < BM * BK; ++i)
          TORCH_CHECK(a_hits[i] == 1 && b_hits[i] == 1, "stage element ", i, " written ", a_hits[i], " (A) / ",
                      b_hits[i], " (B) times");
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
                                  [&] { emulate<scalar_t>(p, grid, L.batch); });
  return out;
}

// The chunk widths (elements per copy of A, of B) the kernel would use for
// each tube of this call, in the op's tube order.
std::vector<int64_t> hopper_widths_cpu(const at::Tensor& x, at::TensorList weights, at::IntArrayRef tubes) {
  const TubeLayout L = check_forward_args(x, weights, {}, tubes, c10::nullopt);
  int order[kMaxTubes];
  make_params(L, order);
  const std::vector<at::Tensor> w = contiguous_all(weights);
  at::Tensor out = at::empty({0}, x.options());
  const Params p = make_params(L, x, w, {}, at::Tensor(), out);
  std::vector<int64_t> r(2 * p.n_tubes);
  for (int i = 0; i < p.n_tubes; ++i) {
    r[2 * order[i]] = p.t[i].va;
    r[2 * order[i] + 1] = p.t[i].vb;
  }
  return r;
}

}  // namespace

TORCH_LIBRARY_IMPL(tubevit_testing, CPU, m) {
  m.impl("tube_tokens_hopper_emulated", &hopper_emulated_cpu);
  m.impl("hopper_chunk_widths", &hopper_widths_cpu);
}

}  // namespace tubevit
