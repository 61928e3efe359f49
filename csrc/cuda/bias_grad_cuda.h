// CUDA bias gradient of tubevit::tube_tokens (bias_grad_cuda.cu), used by
// every CUDA path.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "../tube_tokens.h"

namespace tubevit {
namespace cuda {

// grad: (B, N, d) contiguous, any floating dtype, on the current CUDA device.
// Returns n_tubes tensors (d,) of grad's dtype: db_i = sum of tube i's rows.
// Deterministic (fixed summation order). At most kMaxTubes tubes.
std::vector<at::Tensor> grad_bias(const at::Tensor& grad, const TubeLayout& L);

}  // namespace cuda
}  // namespace tubevit
