// Shared declarations of the tubevit::tube_tokens op family: argument
// validation and layout resolution used by every backend, so that CPU and
// CUDA reject the same inputs with the same messages.
//
// Tensor arguments as they cross the dispatcher boundary:
//   x          (B, C, T, H, W), floating dtype, any strides (NCDHW,
//              channels_last_3d and non-contiguous views are read in place).
//   weights    list of n_tubes tensors, weights[i] (d, C, kt_i, kh_i, kw_i),
//              same dtype and device as x (made contiguous internally).
//   biases     empty list (no bias) or n_tubes tensors of shape (d,).
//   tubes      flat int list, 9 ints per tube: kt kh kw st sh sw ot oh ow.
//   pos_embed  optional (N, d), same dtype/device as x, added to the tokens.
//   output     (B, N, d) contiguous, dtype of x; rows [off_i, off_i + n_i)
//              hold tube i's tokens, row-major over its (t, h, w) grid.
//   grad_out   (B, N, d), any strides.
//   patches    empty, or per tube (B, n_i, K_i) with K_i = C*kt*kh*kw ordered
//              (c, kt, kh, kw): the rows the tube's GEMM multiplies with
//              weights[i].reshape(d, K_i)^T (tube_tokens_with_patches).
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "tube_geometry.h"

namespace tubevit {

struct TubeLayout {
  std::vector<TubeGeom> tubes;
  int64_t batch = 0;
  int64_t channels = 0;
  int64_t size[3] = {0, 0, 0};  // T, H, W
  int64_t num_tokens = 0;       // N
  int64_t dim = 0;              // d
};

// Parses `tubes` (9 ints per tube) against an input of (C, T, H, W).
// Checks tube parameters (kernel, stride >= 1, offset >= 0) and that every
// tube yields at least one token; the messages name the tube and the size.
TubeLayout resolve_layout(at::IntArrayRef tubes, int64_t channels,
                          const int64_t* size_thw);

// Full validation of the forward arguments (see the table above).
TubeLayout check_forward_args(const at::Tensor& x, at::TensorList weights,
                              at::TensorList biases, at::IntArrayRef tubes,
                              const c10::optional<at::Tensor>& pos_embed);

// Validation of the backward arguments; grad_out must be (B, N, d).
TubeLayout check_backward_args(const at::Tensor& grad_out, const at::Tensor& x,
                               at::TensorList weights, at::IntArrayRef tubes);

// Validation of the optional saved patches of tube_tokens_backward: empty,
// or one (B, n_i, K_i) tensor per tube with x's dtype and device.
void check_patches(at::TensorList patches, const at::Tensor& x, const TubeLayout& L);

}  // namespace tubevit
