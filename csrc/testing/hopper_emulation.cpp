// Host emulator of the Hopper forward kernel (cuda/hopper/hopper_forward.cu),
// as the test-only op tubevit_testing::tube_tokens_hopper_emulated. It runs
// the kernel's tile functions (kernels/hopper_tiles.h, the code the GPU
// compiles) tile by tile in the kernel's order: the row-origin and column-
// offset tables, the zero-filled A and B tiles, an fp32 product in place of
// wgmma (16-bit inputs are exact in fp32; fp32/fp64 inputs are multiplied as
// given), the epilogue's bias, position embedding and row map. The output
// starts as NaN, so an element no tile writes fails the comparison. What it
// cannot check is the hardware side (swizzled layouts, descriptors, proxy
// fences), which the CUDA tests and compute-sanitizer check on a GPU. Slow by
// design (plain loops).
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
void emulate(const Params& p) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const scalar_t* x = static_cast<const scalar_t*>(p.x);
  const scalar_t* pe = static_cast<const scalar_t*>(p.pe);
  scalar_t* out = static_cast<scalar_t*>(p.out);
  std::vector<int64_t> row_org(BM), col_off(BK);
  std::vector<acc_t> a(BM * BK), b(BN * BK), acc(BM * BN);
  for (int64_t tile = 0; tile < p.n_tiles; ++tile) {
    const TileCoord tc = locate_tile(p, tile);
    const Tube& tube = p.t[tc.tube];
    const scalar_t* w = static_cast<const scalar_t*>(tube.w);
    const int64_t K = tube.g.patch_size, d = p.d;
    std::fill(acc.begin(), acc.end(), acc_t(0));
    for (int m = 0; m < BM; ++m) row_org[m] = row_origin(p, tube, tc.m0 + m);
    for (int64_t k0 = 0; k0 < K; k0 += BK) {
      for (int kk = 0; kk < BK; ++kk) col_off[kk] = column_offset(p, tube, k0 + kk);
      for (int t = 0; t < BM; ++t) {  // thread t stages row t of A and of B
        const int64_t wrow = tc.n0 + t;
        for (int kk = 0; kk < BK; ++kk) {
          const int64_t co = col_off[kk];
          a[t * BK + kk] = (row_org[t] >= 0 && co >= 0) ? static_cast<acc_t>(x[row_org[t] + co]) : acc_t(0);
          b[t * BK + kk] = (wrow < d && co >= 0) ? static_cast<acc_t>(w[wrow * K + k0 + kk]) : acc_t(0);
        }
      }
      for (int m = 0; m < BM; ++m)
        for (int n = 0; n < BN; ++n) {
          acc_t s = acc[m * BN + n];
          for (int kk = 0; kk < BK; ++kk) s += a[m * BK + kk] * b[n * BK + kk];
          acc[m * BN + n] = s;
        }
    }
    const scalar_t* bias = static_cast<const scalar_t*>(tube.bias);
    for (int m = 0; m < BM; ++m)
      for (int n = 0; n < BN; ++n) {
        const int64_t r = tc.m0 + m, c = tc.n0 + n;
        const int64_t orow = output_row(p, tube, r);
        if (orow < 0 || c >= d) continue;
        acc_t v = acc[m * BN + n];
        if (bias != nullptr) v += static_cast<acc_t>(bias[c]);
        if (pe != nullptr) v += static_cast<acc_t>(pe[(tube.g.token_offset + r % tube.g.num_tokens) * d + c]);
        out[orow * d + c] = static_cast<scalar_t>(v);
      }
  }
}

at::Tensor hopper_emulated_cpu(const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                               at::IntArrayRef tubes, const c10::optional<at::Tensor>& pos_embed) {
  const TubeLayout L = check_forward_args(x, weights, biases, tubes, pos_embed);
  at::Tensor out = at::full({L.batch, L.num_tokens, L.dim}, std::numeric_limits<double>::quiet_NaN(), x.options());
  const std::vector<at::Tensor> w = contiguous_all(weights), b = contiguous_all(biases);
  at::Tensor pe;
  if (pos_embed.has_value() && pos_embed->defined()) pe = pos_embed->contiguous();
  const Params p = make_params(L, x, w, b, pe, out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tube_tokens_hopper_emulated",
                                  [&] { emulate<scalar_t>(p); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tubevit_testing, CPU, m) {
  m.impl("tube_tokens_hopper_emulated", &hopper_emulated_cpu);
}

}  // namespace tubevit
