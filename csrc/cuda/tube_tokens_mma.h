// The sm_80+ ldmatrix + mma.sync forward and weight gradient (tube_tokens_mma.cu; tile logic
// kernels/mma_tiles.h). Arguments as in tube_tokens.h: `w` and `bias`
// contiguous, `pe` contiguous (N, d) or undefined, `out` contiguous
// (B, N, d), all fp16 or all bf16 on one GPU; x any strides.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "../tube_tokens.h"

namespace tubevit {
namespace mma {

// fp16 / bf16, sm_80+, at most kMaxTubes tubes, and every input, weight,
// output and position-embedding offset below 2^31 (the kernel indexes in
// int32).
bool supported(const at::Tensor& x, const TubeLayout& L);

void forward(const at::Tensor& x, const std::vector<at::Tensor>& w, const std::vector<at::Tensor>& bias,
             const at::Tensor& pe, const TubeLayout& L, at::Tensor& out);

// The weight gradient by the same machinery (kernels/mma_tiles.h, dW):
// where supported() holds, d is a multiple of 8 and grad 16-byte aligned.
bool grad_weight_supported(const at::Tensor& x, const at::Tensor& grad, const TubeLayout& L);

// dws[i] (d, C, kt, kh, kw) contiguous, fully overwritten; grad (B, N, d)
// contiguous; same dtype and device as x (any strides). Deterministic: the
// token splits are summed in a fixed order by a second launch.
void grad_weight(const at::Tensor& x, const at::Tensor& grad, const TubeLayout& L, std::vector<at::Tensor>& dws);

}  // namespace mma
}  // namespace tubevit
