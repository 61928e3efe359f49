// C++ smoke test of the CMake build: calls tubevit::tube_tokens through the
// dispatcher, as a libtorch user would, and compares it with per-tube
// at::conv3d + flatten + cat; then the weight gradients of
// tube_tokens_backward (with and without the patches tube_tokens_with_patches
// saves) against conv3d's backward. Exit code 0 on success.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <tuple>
#include <vector>

#include "tube_tokens.h"

int main() {
  // The paper's tubes (kt kh kw st sh sw ot oh ow).
  const std::vector<int64_t> tubes = {8, 8, 8, 16, 32, 32, 0, 0, 0,  16, 4, 4, 6, 32, 32, 4, 8, 8,
                                      4, 12, 12, 16, 32, 32, 0, 16, 16, 1, 16, 16, 32, 16, 16, 0, 0, 0};
  const int64_t size[3] = {32, 224, 224};
  const int64_t n = tubevit::resolve_layout(tubes, 3, size).num_tokens;
  if (n != 539) {
    std::fprintf(stderr, "expected 539 tokens, got %lld\n", static_cast<long long>(n));
    return 1;
  }
  at::manual_seed(0);
  const int64_t d = 10;
  at::Tensor x = at::randn({2, 3, 20, 40, 36}, at::kDouble);
  std::vector<at::Tensor> w, b, ref;
  for (size_t i = 0; i < tubes.size() / 9; ++i) {
    const int64_t* p = tubes.data() + 9 * i;
    w.push_back(at::randn({d, 3, p[0], p[1], p[2]}, at::kDouble));
    b.push_back(at::randn({d}, at::kDouble));
    at::Tensor xs = x.slice(2, p[6]).slice(3, p[7]).slice(4, p[8]);
    ref.push_back(at::conv3d(xs, w.back(), b.back(), {p[3], p[4], p[5]}).flatten(2).transpose(1, 2));
  }
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("tubevit::tube_tokens", "")
                .typed<at::Tensor(const at::Tensor&, at::TensorList, at::TensorList,
                                  at::IntArrayRef, const std::optional<at::Tensor>&)>();
  at::Tensor out = op.call(x, w, b, tubes, std::nullopt);
  const double err = (out - at::cat(ref, 1)).abs().max().item<double>();
  std::printf("tubevit_smoke: tokens %s, max |fused - conv3d| = %.3g\n",
              c10::str(out.sizes()).c_str(), err);
  if (!(err < 1e-10)) return 1;

  // Weight gradients: the training path (patches saved by the forward) and
  // the recomputing one must agree bitwise, and match conv3d's backward.
  auto fwd_save = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("tubevit::tube_tokens_with_patches", "")
                      .typed<std::tuple<at::Tensor, std::vector<at::Tensor>>(
                          const at::Tensor&, at::TensorList, at::TensorList, at::IntArrayRef,
                          const std::optional<at::Tensor>&)>();
  auto bwd = c10::Dispatcher::singleton()
                 .findSchemaOrThrow("tubevit::tube_tokens_backward", "")
                 .typed<std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>(
                     const at::Tensor&, const at::Tensor&, at::TensorList, at::TensorList, at::IntArrayRef,
                     std::array<bool, 3>)>();
  const std::vector<at::Tensor> patches = std::get<1>(fwd_save.call(x, w, b, tubes, std::nullopt));
  const at::Tensor grad = at::randn(out.sizes(), at::kDouble);
  const auto saved = std::get<1>(bwd.call(grad, x, w, patches, tubes, {false, true, false}));
  const auto recomputed = std::get<1>(bwd.call(grad, x, w, {}, tubes, {false, true, false}));
  double dw_err = 0.0;
  int64_t row = 0;
  for (size_t i = 0; i < w.size(); ++i) {
    if (!at::equal(saved[i], recomputed[i])) {
      std::fprintf(stderr, "dW[%zu] differs between saved and recomputed patches\n", i);
      return 1;
    }
    const int64_t* p = tubes.data() + 9 * i;
    at::Tensor xs = x.slice(2, p[6]).slice(3, p[7]).slice(4, p[8]);
    const auto n_i = ref[i].size(1);
    // this tube's rows of grad as conv3d's (B, d, nt, nh, nw) output gradient
    at::Tensor gi = grad.narrow(1, row, n_i).transpose(1, 2).reshape({x.size(0), d, -1});
    row += n_i;
    const at::Tensor conv_out = at::conv3d(xs, w[i], {}, {p[3], p[4], p[5]});
    gi = gi.reshape(conv_out.sizes());
    const auto want = std::get<1>(at::convolution_backward(gi, xs, w[i], std::nullopt, {p[3], p[4], p[5]},
                                                           {0, 0, 0}, {1, 1, 1}, false, {0, 0, 0}, 1,
                                                           {false, true, false}));
    dw_err = std::max(dw_err, (saved[i] - want).abs().max().item<double>());
  }
  std::printf("tubevit_smoke: max |dW - conv3d backward| = %.3g (saved and recomputed patches equal)\n", dw_err);
  return dw_err < 1e-9 ? 0 : 1;
}
