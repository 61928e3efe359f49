// CUDA backend of tubevit::tube_tokens and tubevit::tube_tokens_backward.
// Three paths, chosen per call by choose_path (forward and backward
// separately), all deterministic:
//   * the GEMM path (kernels/gemm_path.h): our gather of every tube's
//     patches in one launch, cuBLAS GEMMs through ATen, one placement launch
//     adding bias and position embedding; backward: one launch copying the
//     gradient rows out, the same gather, cuBLAS for dW and dP. Taken for
//     large problems, for the fp32 forward at any size (exact fp32 unless
//     TF32 matmuls are on), and wherever the tensor-core kernels do not apply;
//   * the handwritten tensor-core implicit-GEMM kernels (tube_tokens_tc.cu;
//     sm_80+, fp16 / bf16, fp32 as TF32 while torch.backends.cudnn.allow_tf32):
//     one kernel per pass, fastest for small problems (fewer launches); the
//     forward and weight gradient of fp16 / bf16 by the ldmatrix + mma.sync
//     kernels (tube_tokens_mma.cu) under TUBEVIT_TC_MMA=1;
//   * the correctness-first kernels of kernels/naive_kernels.h as grid-stride
//     kernels (one thread per output element, fp32 summed in fp64): fp64,
//     and whatever the others do not take.
// The backward of the fast paths: dP = G W (cuBLAS or tensor cores), then
// dx from dP (grad_input_cuda.cu); dW from G and x; db by its own reduction
// (bias_grad_cuda.cu) on every path.
//
// Every launch: on the current stream, under a device guard, checked, and
// skipped when empty (a zero-sized grid is an invalid launch).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../kernels/gemm_path.h"
#include "../kernels/naive_kernels.h"
#include "../options.h"
#include "bias_grad_cuda.h"
#include "cuda_launcher.cuh"
#include "grad_input_cuda.h"
#include "tube_tokens_mma.h"
#include "tube_tokens_tc.h"
#ifdef TUBEVIT_WITH_HOPPER
#include "hopper_forward.h"
#endif

namespace tubevit {
namespace {

enum class Path { Gemm, TensorCore, Naive, Hopper };

// The Hopper forward (cuda/hopper/, built where the CUTLASS/CuTe headers
// were found) takes this call.
bool hopper_takes(const at::Tensor& x, const TubeLayout& L) {
#ifdef TUBEVIT_WITH_HOPPER
  return hopper::supported(x, L);
#else
  (void)x;
  (void)L;
  return false;
#endif
}

// The GEMM path's fp32 GEMMs run at PyTorch's matmul precision
// (torch.backends.cuda.matmul.allow_tf32, off by default: exact fp32, which
// cuBLAS runs faster than our TF32 kernels). TF32 is used only where both
// switches allow it; with TF32 matmuls on but TF32 convolutions off the call
// goes to the exact kernels, as Conv3d would.
bool gemm_supported(const at::Tensor& x, const TubeLayout& L, gemm::Layout* a) {
  const auto t = x.scalar_type();
  bool ok = false;
  if (t == at::kHalf) ok = true;
  if (t == at::kBFloat16) ok = at::cuda::getDeviceProperties(x.device().index())->major >= 8;
  if (t == at::kFloat) ok = !tc::tf32_matmul_allowed() || tc::tf32_conv_allowed();
  // at most kMaxTubes tubes and 32-bit element indices (gemm::make_layout)
  return ok && gemm::make_layout(L, a);
}

// Where both fast paths apply, TUBEVIT_CUDA_PATH=auto chooses by size, in
// elements of the (B, N, d) output, forward and backward separately (they
// are separate ops and share no state). Measured on an H200 (paper tubes,
// T = 32, d = 768; bench/DESIGN.md, "CUDA path choice"): forward, 16-bit:
// the tensor-core kernel wins at B = 1 (0.13 vs 0.16 ms), the GEMM path from
// B = 4 on (0.15 vs 0.16, B = 32: 0.26 vs 0.58 ms); fp32: the GEMM path
// (exact fp32) is as fast or faster at every B than the TF32 kernel, so it
// always takes fp32. Backward (weights), 16-bit: the tensor-core kernels win
// up to B = 16 (0.47 vs 0.87 ms: the GEMM path's extra launches) and tie at
// B = 32 (0.72 vs 0.70: the GEMM path from there on, the configuration
// measured end to end at B = 32); fp32: they win up to B = 16, the GEMM path
// at B = 32 (0.98 vs 1.13 ms).
constexpr int64_t kGemmMinOutputFwd16 = int64_t(1) << 20;  // B >= 3 for the paper tubes at d = 768
constexpr int64_t kGemmMinOutputBwd16 = int64_t(12) << 20;  // B >= 31
constexpr int64_t kGemmMinOutputBwd32 = int64_t(8) << 20;   // B >= 21

bool gemm_by_size(const at::Tensor& x, const TubeLayout& L, bool backward) {
  const int64_t elems = L.batch * L.num_tokens * L.dim;
  const bool fp32 = x.scalar_type() == at::kFloat;
  if (!backward) return fp32 || elems >= kGemmMinOutputFwd16;
  return elems >= (fp32 ? kGemmMinOutputBwd32 : kGemmMinOutputBwd16);
}

// TUBEVIT_CUDA_PATH (csrc/options.h): naive always takes the naive kernels;
// gemm takes the GEMM path where it applies, else the tensor-core kernels,
// else naive; tc takes the tensor-core kernels where they apply, else naive;
// auto chooses between the two fast paths by size where both apply, else the
// one that applies (the GEMM path first), else naive; hopper takes the sm_90a
// wgmma forward where hopper::supported() says it applies, auto's choice
// otherwise (the weight, bias and input gradients: the Hopper kernels in
// tube_tokens_backward_cuda where they apply).
Path choose_path(const at::Tensor& x, const TubeLayout& L, bool backward, gemm::Layout* a) {
  const CudaPath want = options().cuda_path;
  if (want == CudaPath::Naive) return Path::Naive;
  // opt-in: the forward only; otherwise (and where it does not apply) auto's choice
  if (want == CudaPath::Hopper && !backward && hopper_takes(x, L)) return Path::Hopper;
  const bool tc_ok = tc::supported(x, L);
  if (want == CudaPath::TensorCore) return tc_ok ? Path::TensorCore : Path::Naive;
  const bool try_gemm = want == CudaPath::Gemm || !tc_ok || gemm_by_size(x, L, backward);
  if (try_gemm && gemm_supported(x, L, a)) return Path::Gemm;
  if (tc_ok) return Path::TensorCore;
  return Path::Naive;
}

at::Tensor tube_tokens_cuda(const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                            at::IntArrayRef tubes, const c10::optional<at::Tensor>& pos_embed) {
  const c10::cuda::CUDAGuard guard(x.device());
  const TubeLayout L = check_forward_args(x, weights, biases, tubes, pos_embed);
  gemm::Layout a;
  const Path path = choose_path(x, L, /*backward=*/false, &a);
  if (path == Path::Naive) return naive::forward<CudaLauncher>(x, weights, biases, tubes, pos_embed);
  at::Tensor out = at::empty({L.batch, L.num_tokens, L.dim}, x.options());
  if (out.numel() == 0) return out;
  at::Tensor pe;
  if (pos_embed.has_value() && pos_embed->defined()) pe = pos_embed->contiguous();
  if (path == Path::Gemm) {
    gemm::forward<CudaLauncher>(x, contiguous_all(weights), contiguous_all(biases), pe, L, a, out);
#ifdef TUBEVIT_WITH_HOPPER
  } else if (path == Path::Hopper) {
    hopper::forward(x, contiguous_all(weights), contiguous_all(biases), pe, L, out);
#endif
  } else if (options().tc_mma && mma::supported(x, L)) {
    mma::forward(x, contiguous_all(weights), contiguous_all(biases), pe, L, out);
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
#ifdef TUBEVIT_WITH_HOPPER
  // opt-in: the Hopper weight / bias gradients (db fused in); the input
  // gradient below as auto chooses
  if (output_mask[1] && options().cuda_path == CudaPath::Hopper && hopper::grad_weight_supported(x, L)) {
    for (const auto& wi : weights) dws.push_back(at::empty(wi.sizes(), x.options()));
    hopper::grad_weight(x, grad, L, dws, output_mask[2] ? &dbs : nullptr);
    output_mask[1] = output_mask[2] = false;
  }
  // opt-in: the Hopper input gradient (dP by wgmma, then the writer)
  if (output_mask[0] && options().cuda_path == CudaPath::Hopper && hopper::grad_input_supported(x, L)) {
    dx = dx::from_dp(x, hopper::grad_dp(grad, contiguous_all(weights), L), L, DxPass::Writer);
    output_mask[0] = false;
  }
#endif
  if (output_mask[2]) dbs = cuda::grad_bias(grad, L);
  if (!output_mask[0] && !output_mask[1]) return {dx, dws, dbs};
  gemm::Layout a;
  const Path path = choose_path(x, L, /*backward=*/true, &a);
  if (path == Path::Naive) {
    auto r = naive::backward<CudaLauncher>(grad, x, weights, tubes, {output_mask[0], output_mask[1], false});
    return {output_mask[0] ? std::get<0>(r) : dx, output_mask[1] ? std::get<1>(r) : dws, dbs};
  }
  const std::vector<at::Tensor> w = contiguous_all(weights);
  if (output_mask[1]) {
    for (const auto& wi : w) dws.push_back(at::empty(wi.sizes(), x.options()));
  }
  if (path == Path::Gemm) {
    const at::Tensor g = gemm::grad_rows<CudaLauncher>(grad, a);  // every tube's rows of G, one launch
    if (output_mask[1]) gemm::grad_weight<CudaLauncher>(x, g, L, a, dws);
    if (output_mask[0]) dx = dx::from_dp(x, gemm_grad_dp(x, g, w, L, a), L, dx::default_pass());
  } else {
    if (output_mask[0]) dx = dx::from_dp(x, tc::grad_dp(x, grad, w, L), L, dx::default_pass());
    if (output_mask[1]) {
      if (options().tc_mma && mma::grad_weight_supported(x, grad, L)) mma::grad_weight(x, grad, L, dws);
      else tc::grad_weight(x, grad, L, dws);
    }
  }
  return {dx, dws, dbs};
}

}  // namespace

TORCH_LIBRARY_IMPL(tubevit, CUDA, m) {
  m.impl("tube_tokens", &tube_tokens_cuda);
  m.impl("tube_tokens_backward", &tube_tokens_backward_cuda);
}

}  // namespace tubevit
