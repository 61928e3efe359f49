// The input gradient of tubevit::tube_tokens_backward on CUDA from dP
// (grad_input_cuda.cu; kernels in kernels/grad_input.h).
#pragma once

#include <ATen/core/Tensor.h>

#include "../tube_tokens.h"

namespace tubevit {
namespace dx {

// dp: contiguous fp32, the dP workspace of make_dp_layout(L) (tube i's
// (B n_i, K_i) block of G_i W_i at its dp_offset). Returns dx (B, C, T, H, W)
// contiguous in x's dtype (fp16 / bf16 / fp32), on x's device, by the gather
// (deterministic: every voxel sums its covering tokens' entries in a fixed
// order). At most kMaxTubes tubes.
at::Tensor from_dp(const at::Tensor& x, const at::Tensor& dp, const TubeLayout& L);

}  // namespace dx
}  // namespace tubevit
