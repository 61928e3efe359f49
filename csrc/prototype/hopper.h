// The prototype's host API (csrc/prototype/README.md): the sm_90a wgmma
// kernels through CuTe (the forward, hopper_forward.cu; the weight and bias
// gradients, hopper_grad_weight.cu; the input gradient's dP,
// hopper_grad_input.cu) and the dx writer (dx_writer.cu). Built only with
// TUBEVIT_PROTOTYPE=1 (setup.py) / -DTUBEVIT_PROTOTYPE=ON (CMake), which
// defines TUBEVIT_WITH_PROTOTYPE; taken only under TUBEVIT_CUDA_PATH=hopper
// (csrc/options.h, the planner in csrc/cuda_plan.h). Their tile logic runs
// on the CPU (hopper_emulation.cpp, test_hopper_prototype.py).
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "../tube_tokens.h"

namespace tubevit {
namespace hopper {

// Whether the kernel takes this call: built with sm_90a code, an sm_90 GPU
// with the shared memory a CTA needs, fp16 / bf16, at most kMaxTubes tubes,
// d a multiple of 8 (the epilogue's 16-byte stores). Any strides and tube
// geometry: chunk widths follow from them (hopper_tiles.h).
bool supported(const at::Tensor& x, const TubeLayout& L);

// x (B, C, T, H, W) fp16 / bf16, any strides; weights (d, C, kt, kh, kw)
// and biases (d,) contiguous, x's dtype (biases empty: none); pe (N, d)
// contiguous or undefined; out (B, N, d) contiguous, 16-byte aligned,
// written completely. On the current stream; x's device must be current.
void forward(const at::Tensor& x, const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& biases,
             const at::Tensor& pe, const TubeLayout& L, at::Tensor& out);

// Whether the weight / bias gradient kernels take this call (the same
// conditions as the forward's).
bool grad_weight_supported(const at::Tensor& x, const TubeLayout& L);

// dws: (d, C, kt, kh, kw) contiguous in x's dtype, allocated by the caller,
// written completely; dbs (when not null) replaced by the (d,) bias
// gradients. grad_out (B, N, d) any strides (made contiguous and 16-byte
// aligned here). Deterministic: fp32 partials per token split, summed in
// split order.
void grad_weight(const at::Tensor& x, const at::Tensor& grad_out, const TubeLayout& L, std::vector<at::Tensor>& dws,
                 std::vector<at::Tensor>* dbs);

// Whether the input-gradient kernels take this call (the same conditions).
bool grad_input_supported(const at::Tensor& x, const TubeLayout& L);

// dP = G_i W_i for every tube (fp32, the workspace of make_dp_layout(L),
// which dx::from_dp turns into dx). grad_out (B, N, d) any strides (made
// contiguous and 16-byte aligned here), fp16 / bf16; weights (d, C, kt, kh,
// kw) contiguous in its dtype. Every element written exactly once.
at::Tensor grad_dp(const at::Tensor& grad_out, const std::vector<at::Tensor>& weights, const TubeLayout& L);

}  // namespace hopper

namespace dx {
// dx (B, C, T, H, W) contiguous in x's dtype from the dP workspace of
// make_dp_layout(L) (contiguous fp32) by the writer: the gather's sums in the
// gather's order (the same bits as dx::from_dp), one 16-byte store per 8
// voxels where W % 8 == 0. On the current stream.
at::Tensor write_from_dp(const at::Tensor& x, const at::Tensor& dp, const TubeLayout& L);
}  // namespace dx
}  // namespace tubevit
