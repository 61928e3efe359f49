// CUDA backend of tubevit::tube_tokens and tubevit::tube_tokens_backward.
// Each call asks the planner (csrc/cuda_plan.h) which kernels to run,
// forward and backward separately, and runs them; all are deterministic:
//   * the GEMM path (kernels/gemm_path.h): our gather of every tube's
//     patches in one launch, cuBLAS GEMMs through ATen, one placement launch
//     adding bias and position embedding; backward: one launch copying the
//     gradient rows out, the same gather, cuBLAS for dW and dP;
//   * the tensor-core implicit-GEMM kernels (tube_tokens_tc.cu; sm_80+,
//     fp16 / bf16, fp32 as TF32 while torch.backends.cudnn.allow_tf32): one
//     kernel per pass, fastest for small problems (fewer launches);
//   * the correctness-first kernels of kernels/naive_kernels.h as grid-stride
//     kernels (one thread per output element, fp32 summed in fp64): fp64,
//     and whatever the others do not take;
//   * in a TUBEVIT_PROTOTYPE=1 build under TUBEVIT_CUDA_PATH=hopper, the
//     prototype's sm_90a kernels (csrc/prototype/hopper.h).
// The backward of the fast paths: dP = G W (cuBLAS or tensor cores), then
// dx from dP by the gather (grad_input_cuda.cu); dW from G and x; db by its
// own reduction (bias_grad_cuda.cu).
//
// Every launch: on the current stream, under a device guard, checked, and
// skipped when empty (a zero-sized grid is an invalid launch).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../cuda_plan.h"
#include "../kernels/gemm_path.h"
#include "../kernels/naive_kernels.h"
#include "../options.h"
#include "bias_grad_cuda.h"
#include "cuda_launcher.cuh"
#include "grad_input_cuda.h"
#include "tube_tokens_tc.h"
#ifdef TUBEVIT_WITH_PROTOTYPE
#include "../prototype/hopper.h"
#endif

namespace tubevit {
namespace {

// The planner's view of this call (gemm::make_layout fills *a where it fits).
Plan plan_call(const at::Tensor& x, const TubeLayout& L, gemm::Layout* a) {
  PlanProblem p;
  p.dtype = x.scalar_type();
  p.batch = L.batch;
  p.num_tokens = L.num_tokens;
  p.dim = L.dim;
  p.n_tubes = static_cast<int>(L.tubes.size());
  p.sm_major = at::cuda::getDeviceProperties(x.device().index())->major;
  p.tf32_conv = tc::tf32_conv_allowed();
  p.tf32_matmul = tc::tf32_matmul_allowed();
  p.gemm_fits = gemm::make_layout(L, a);
#ifdef TUBEVIT_WITH_PROTOTYPE
  if (options().cuda_path == CudaPath::Hopper) {
    p.hopper_forward = hopper::supported(x, L);
    p.hopper_grad_weight = hopper::grad_weight_supported(x, L);
    p.hopper_grad_input = hopper::grad_input_supported(x, L);
  }
#endif
  return plan_cuda(p, options().cuda_path);
}

at::Tensor tube_tokens_cuda(const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                            at::IntArrayRef tubes, const c10::optional<at::Tensor>& pos_embed) {
  const c10::cuda::CUDAGuard guard(x.device());
  const TubeLayout L = check_forward_args(x, weights, biases, tubes, pos_embed);
  gemm::Layout a;
  const Kernels k = plan_call(x, L, &a).forward;
  if (k == Kernels::Naive) return naive::forward<CudaLauncher>(x, weights, biases, tubes, pos_embed);
  at::Tensor out = at::empty({L.batch, L.num_tokens, L.dim}, x.options());
  if (out.numel() == 0) return out;
  at::Tensor pe;
  if (pos_embed.has_value() && pos_embed->defined()) pe = pos_embed->contiguous();
  if (k == Kernels::Gemm) {
    gemm::forward<CudaLauncher>(x, contiguous_all(weights), contiguous_all(biases), pe, L, a, out);
#ifdef TUBEVIT_WITH_PROTOTYPE
  } else if (k == Kernels::Hopper) {
    hopper::forward(x, contiguous_all(weights), contiguous_all(biases), pe, L, out);
#endif
  } else {
    tc::forward(x, contiguous_all(weights), contiguous_all(biases), pe, L, out);
  }
  return out;
}

// dP_i = G_i W_i (fp32) on cuBLAS for every tube, in the layout dx::from_dp
// reads; g from gemm::grad_rows.
at::Tensor gemm_grad_dp(const at::Tensor& x, const at::Tensor& g, const std::vector<at::Tensor>& w,
                        const TubeLayout& L, const gemm::Layout& a) {
  int64_t dp_elems = 0;
  const ParamsDX dl = make_dp_layout(L, nullptr, &dp_elems);
  at::Tensor dp = at::empty({dp_elems}, x.options().dtype(at::kFloat));
  for (int i = 0; i < a.n_tubes; ++i) {
    const TubeGeom& tg = L.tubes[i];
    const int64_t rows = L.batch * tg.num_tokens;
    if (rows == 0) continue;
    at::Tensor dp_i = gemm::block(dp, dl.dp_offset[i], rows, tg.patch_size);
    const at::Tensor g_i = gemm::block(g, a.t[i].y_start, rows, L.dim);
    const at::Tensor w_i = w[i].view({L.dim, tg.patch_size});
    if (x.scalar_type() == at::kFloat) {
      at::mm_out(dp_i, g_i, w_i);
    } else {
      at::mm_out(dp_i, g_i, w_i, at::kFloat);  // half / bf16 operands, fp32 result
    }
  }
  return dp;
}

// grad (B, N, d) contiguous; patches are validated by the caller and not
// read (the kernels gather from x again). dx / dW / db as output_mask asks.
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> tube_tokens_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, at::TensorList weights, at::TensorList patches,
    at::IntArrayRef tubes, std::array<bool, 3> output_mask) {
  const c10::cuda::CUDAGuard guard(x.device());
  const TubeLayout L = check_backward_args(grad_out, x, weights, tubes);
  check_patches(patches, x, L);
  const at::Tensor grad = grad_out.contiguous();
  std::vector<at::Tensor> dbs;
  at::Tensor dx = at::empty({0}, x.options());
  std::vector<at::Tensor> dws;
  if (!output_mask[0] && !output_mask[1] && !output_mask[2]) return {dx, dws, dbs};
  gemm::Layout a;
  const Plan plan = plan_call(x, L, &a);
#ifdef TUBEVIT_WITH_PROTOTYPE
  if (output_mask[1] && plan.grad_weight == Kernels::Hopper) {  // db fused in
    for (const auto& wi : weights) dws.push_back(at::empty(wi.sizes(), x.options()));
    hopper::grad_weight(x, grad, L, dws, output_mask[2] ? &dbs : nullptr);
    output_mask[1] = output_mask[2] = false;
  }
  if (output_mask[0] && plan.grad_input == Kernels::Hopper) {  // dP by wgmma, then the writer
    dx = dx::write_from_dp(x, hopper::grad_dp(grad, contiguous_all(weights), L), L);
    output_mask[0] = false;
  }
#endif
  if (output_mask[2]) dbs = cuda::grad_bias(grad, L);
  if (!output_mask[0] && !output_mask[1]) return {dx, dws, dbs};
  // not Hopper here: grad_weight and grad_input are the same family
  const Kernels k = output_mask[1] ? plan.grad_weight : plan.grad_input;
  if (k == Kernels::Naive) {
    auto r = naive::backward<CudaLauncher>(grad, x, weights, tubes, {output_mask[0], output_mask[1], false});
    return {output_mask[0] ? std::get<0>(r) : dx, output_mask[1] ? std::get<1>(r) : dws, dbs};
  }
  const std::vector<at::Tensor> w = contiguous_all(weights);
  if (output_mask[1]) {
    for (const auto& wi : w) dws.push_back(at::empty(wi.sizes(), x.options()));
  }
  if (k == Kernels::Gemm) {
    const at::Tensor g = gemm::grad_rows<CudaLauncher>(grad, a);  // every tube's rows of G, one launch
    if (output_mask[1]) gemm::grad_weight<CudaLauncher>(x, g, L, a, dws);
    if (output_mask[0]) dx = dx::from_dp(x, gemm_grad_dp(x, g, w, L, a), L);
  } else {
    if (output_mask[0]) dx = dx::from_dp(x, tc::grad_dp(x, grad, w, L), L);
    if (output_mask[1]) tc::grad_weight(x, grad, L, dws);
  }
  return {dx, dws, dbs};
}

}  // namespace

TORCH_LIBRARY_IMPL(tubevit, CUDA, m) {
  m.impl("tube_tokens", &tube_tokens_cuda);
  m.impl("tube_tokens_backward", &tube_tokens_backward_cuda);
}

}  // namespace tubevit
