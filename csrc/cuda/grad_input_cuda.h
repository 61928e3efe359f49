// The input gradient of tubevit::tube_tokens_backward on CUDA from dP
// (grad_input_cuda.cu; kernels in kernels/grad_input.h).
#pragma once

#include <ATen/core/Tensor.h>

#include "../options.h"
#include "../tube_tokens.h"

namespace tubevit {
namespace dx {

// DxPass (options.h): the pass that turns dP into dx (kernels/grad_input.h):
// the gather, the per-tube scatter, or the writer (the gather's sums, one
// 16-byte store per 8 voxels). Gather and writer give the same bits.

// dp: contiguous fp32, the dP workspace of make_dp_layout(L) (tube i's
// (B n_i, K_i) block of G_i W_i at its dp_offset). Returns dx (B, C, T, H, W)
// contiguous in x's dtype (fp16 / bf16 / fp32), on x's device, by `pass`
// (the scatter falls back to the gather where its 32-bit indices do not
// fit). At most kMaxTubes tubes.
at::Tensor from_dp(const at::Tensor& x, const at::Tensor& dp, const TubeLayout& L, DxPass pass);

// The pass the switches choose (csrc/options.h: TUBEVIT_DX_PASS, default
// the gather).
DxPass default_pass();

}  // namespace dx
}  // namespace tubevit
