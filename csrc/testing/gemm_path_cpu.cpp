// The CUDA backend's GEMM path (kernels/gemm_path.h) run on the CPU: the same gather
// functor in a host loop and the same ATen orchestration (views, GEMMs, the
// position-embedding placement), registered as the test ops
// tubevit_testing::tube_tokens_gemm_path (forward), tube_tokens_gemm_path_dw
// (weight gradients) and tube_tokens_gemm_path_dx (input gradient: dP by
// the GEMMs, then the gather), checked against the Conv3d reference by
// python_tests/test_gemm_path.py. Not used by the library itself: the CPU
// backend proper is tube_tokens_cpu.cpp.
#include <torch/library.h>

#include "../kernels/gemm_path.h"
#include "../kernels/grad_input.h"
#include "cpu_launcher.h"
#include "dx_emulation.h"

namespace tubevit {
namespace {

// The GEMM path's layout, or an error where the CUDA backend would take
// another path (too many tubes, indices beyond 32 bits).
gemm::Layout checked_layout(const TubeLayout& L, const char* op) {
  gemm::Layout a;
  TORCH_CHECK(gemm::make_layout(L, &a), op, ": at most ", kMaxTubes, " tubes and 32-bit element indices");
  return a;
}

at::Tensor gemm_path_cpu(const at::Tensor& x, at::TensorList weights, at::TensorList biases, at::IntArrayRef tubes,
                         const c10::optional<at::Tensor>& pos_embed) {
  const TubeLayout L = check_forward_args(x, weights, biases, tubes, pos_embed);
  at::Tensor out = at::empty({L.batch, L.num_tokens, L.dim}, x.options());
  if (out.numel() == 0) return out;
  at::Tensor pe;
  if (pos_embed.has_value() && pos_embed->defined()) pe = pos_embed->contiguous();
  const gemm::Layout a = checked_layout(L, "tube_tokens_gemm_path");
  gemm::forward<CpuLauncher>(x, contiguous_all(weights), contiguous_all(biases), pe, L, a, out);
  return out;
}

std::vector<at::Tensor> gemm_path_dw_cpu(const at::Tensor& grad_out, const at::Tensor& x, at::TensorList weights,
                                         at::IntArrayRef tubes) {
  const TubeLayout L = check_backward_args(grad_out, x, weights, tubes);
  std::vector<at::Tensor> dws;
  for (const auto& w : weights) dws.push_back(at::empty(w.sizes(), x.options()));
  const gemm::Layout a = checked_layout(L, "tube_tokens_gemm_path_dw");
  gemm::grad_weight<CpuLauncher>(x, gemm::grad_rows<CpuLauncher>(grad_out.contiguous(), a), L, a, dws);
  return dws;
}

// dP_i = G_i W_i in fp32 (the CUDA path's cuBLAS GEMMs, here ATen's CPU
// ones on fp32 copies), then the gather of kernels/grad_input.h as its
// kernel runs.
at::Tensor gemm_path_dx_cpu(const at::Tensor& grad_out, const at::Tensor& x, at::TensorList weights,
                            at::IntArrayRef tubes) {
  const TubeLayout L = check_backward_args(grad_out, x, weights, tubes);
  const gemm::Layout a = checked_layout(L, "tube_tokens_gemm_path_dx");
  const at::Tensor g = gemm::grad_rows<CpuLauncher>(grad_out.contiguous(), a);
  int64_t dp_elems = 0;
  const ParamsDX p = make_dp_layout(L, nullptr, &dp_elems);
  at::Tensor dp = at::empty({dp_elems}, x.options().dtype(at::kFloat));
  for (int i = 0; i < a.n_tubes; ++i) {
    const TubeGeom& tg = L.tubes[i];
    const int64_t rows = L.batch * tg.num_tokens;
    if (rows == 0) continue;
    at::Tensor dp_i = gemm::block(dp, p.dp_offset[i], rows, tg.patch_size);
    at::mm_out(dp_i, gemm::block(g, a.t[i].y_start, rows, L.dim).to(at::kFloat),
               weights[i].reshape({L.dim, tg.patch_size}).to(at::kFloat));
  }
  at::Tensor dx = at::empty({L.batch, L.channels, L.size[0], L.size[1], L.size[2]}, x.options());
  if (dx.numel() == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "tube_tokens_gemm_path_dx", [&] {
    dx::emulate_gather<scalar_t>(p, dp.const_data_ptr<float>(), L, dx.mutable_data_ptr<scalar_t>());
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(tubevit_testing, CPU, m) {
  m.impl("tube_tokens_gemm_path", &gemm_path_cpu);
  m.impl("tube_tokens_gemm_path_dw", &gemm_path_dw_cpu);
  m.impl("tube_tokens_gemm_path_dx", &gemm_path_dx_cpu);
}

}  // namespace tubevit
