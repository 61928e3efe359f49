// Tensor-core forward (see tube_tokens_tc.cu). Arguments as in
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

// Whether the tensor-core kernels handle this call: sm_80+, at most 16 tubes,
// fp16 / bf16, or fp32 while torch.backends.cudnn.allow_tf32 is on.
bool supported(const at::Tensor& x, const TubeLayout& L);

void forward(const at::Tensor& x, const std::vector<at::Tensor>& w, const std::vector<at::Tensor>& bias,
             const at::Tensor& pe, const TubeLayout& L, at::Tensor& out);

// The input gradient in two steps. grad_dp: dP = G W for every tube on
// tensor cores, fp32; grad (B, N, d) and w contiguous. dp_offsets: where
// tube i's (B n_i, K_i) block of dP starts (row-major), dp_elems elements in
// all. grad_input_from_dp: the input gradient (B, C, T, H, W) contiguous,
// dtype of x, every voxel gathering the dP entries that cover it
// (deterministic), for dP from grad_dp or from cuBLAS (the GEMM path); at
// most 16 tubes, fp16 / bf16 / fp32 x, no sm_80 requirement (no tensor
// cores). The opt-in per-tube scatter (gemm_path.h) also reads this dP.
at::Tensor grad_dp(const at::Tensor& x, const at::Tensor& grad, const std::vector<at::Tensor>& w,
                   const TubeLayout& L);
std::vector<int64_t> dp_offsets(const TubeLayout& L, int64_t* dp_elems);
at::Tensor grad_input_from_dp(const at::Tensor& x, const at::Tensor& dp, const TubeLayout& L);

// dws[i] (d, C, kt, kh, kw) contiguous, fully overwritten; grad (B, N, d)
// contiguous; same dtype and device as x (any strides).
void grad_weight(const at::Tensor& x, const at::Tensor& grad, const TubeLayout& L,
                 std::vector<at::Tensor>& dws);

}  // namespace tc
}  // namespace tubevit
