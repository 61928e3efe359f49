// Tensor-core kernels (see tube_tokens_tc.cu), for the calls the planner
// (csrc/cuda_plan.h) sends them: sm_80+, at most kMaxTubes tubes, fp16 /
// bf16, or fp32 while torch.backends.cudnn.allow_tf32 is on. Arguments as in
// tube_tokens.h; `w` and `bias` contiguous, `pe` contiguous (N, d) or
// undefined, `out` contiguous (B, N, d), all fp16, all bf16 or all fp32 (run
// as TF32) on one GPU.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "../tube_tokens.h"

namespace tubevit {
namespace tc {

// torch.backends.cudnn.allow_tf32 (the switch PyTorch's convolutions follow).
bool tf32_conv_allowed();
// torch.backends.cuda.matmul.allow_tf32 / set_float32_matmul_precision: whether
// ATen's fp32 GEMMs (the GEMM path's) may run below fp32 precision.
bool tf32_matmul_allowed();

void forward(const at::Tensor& x, const std::vector<at::Tensor>& w, const std::vector<at::Tensor>& bias,
             const at::Tensor& pe, const TubeLayout& L, at::Tensor& out);

// dP = G W for every tube on tensor cores, fp32, in the layout of
// make_dp_layout (kernels/common.h); grad (B, N, d) and w contiguous. The
// input gradient from it: dx::from_dp (cuda/grad_input_cuda.h).
at::Tensor grad_dp(const at::Tensor& x, const at::Tensor& grad, const std::vector<at::Tensor>& w,
                   const TubeLayout& L);

// dws[i] (d, C, kt, kh, kw) contiguous, fully overwritten; grad (B, N, d)
// contiguous; same dtype and device as x (any strides).
void grad_weight(const at::Tensor& x, const at::Tensor& grad, const TubeLayout& L,
                 std::vector<at::Tensor>& dws);

}  // namespace tc
}  // namespace tubevit
