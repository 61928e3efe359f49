// CUDA backend of tubevit::tube_tokens and tubevit::tube_tokens_backward
// (and of tubevit::tube_tokens_naive*). Three paths, chosen per call
// (choose_path; forward and backward separately):
//   * the GEMM path (gemm_path.h): our gather of every tube's patches in one
//     launch, cuBLAS GEMMs through ATen, one placement launch adding bias and
//     position embedding; backward: one launch copying the gradient rows out,
//     the same gather, cuBLAS for dW and dP, then our deterministic dX
//     gather (or, opt-in, the per-tube scatter). Taken for large problems,
//     for the fp32 forward at any size (exact fp32 unless TF32 matmuls are
//     on), and wherever the tensor-core kernels do not apply;
//   * the handwritten tensor-core implicit-GEMM kernels (tube_tokens_tc.cu;
//     sm_80+, fp16 / bf16, fp32 as TF32 while torch.backends.cudnn.allow_tf32):
//     one kernel per pass, fastest for small problems (host overhead);
//   * the correctness-first kernels of naive_kernels.h, run here as
//     grid-stride kernels (one thread per output element): fp64, anything
//     the others do not take, TUBEVIT_CUDA_TC=0 — and the op
//     tubevit::tube_tokens_naive every fast path is tested against.
// The bias gradient has its own reduction kernel (bias_grad_cuda.cu) on
// every path but the naive one's own op.
//
// Every launch: on the current stream, under a device guard, checked, and
// skipped when empty (a zero-sized grid is an invalid launch).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#include "../gemm_path.h"
#include "../naive_kernels.h"
#include "bias_grad_cuda.h"
#include "tube_tokens_tc.h"

namespace tubevit {
namespace {

constexpr int kThreads = 256;

template <class F>
__global__ void __launch_bounds__(kThreads) grid_stride_kernel(int64_t n, F f) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    f(i);
  }
}

struct CudaLauncher {
  template <class F>
  static void run(int64_t n, const F& f) {
    if (n <= 0) return;
    // Grid-stride loops cover the rest; the cap keeps the grid well in range.
    const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t(1) << 20);
    grid_stride_kernel<<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(n, f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

// TUBEVIT_CUDA_TC=0 routes the main ops to the naive kernels (to compare or
// to rule the fast paths out). TUBEVIT_CUDA_GEMM picks between the two fast
// paths: 1 = the GEMM path wherever it applies, 0 = never (the handwritten
// tensor-core kernels), unset = by problem size (gemm_by_size). Read per call
// so tests can switch.
bool env_is(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, value) == 0;
}
bool env_off(const char* name) { return env_is(name, "0"); }

enum class Path { Gemm, TensorCore, Naive };

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
  // at most 16 tubes and 32-bit element indices (gemm::make_layout)
  return ok && gemm::make_layout(L, a);
}

// Where both fast paths apply, the choice is by size, in elements of the
// (B, N, d) output, forward and backward separately (they are separate ops
// and share no state). Measured on an H200 (session 6, call 3, paper tubes,
// T = 32, d = 768, bench/NOTES.md): forward, 16-bit: the tensor-core kernel
// wins at B = 1 (0.13 vs 0.16 ms), the GEMM path from B = 4 on (0.15 vs 0.16,
// B = 32: 0.26 vs 0.58 ms); fp32: the GEMM path (exact fp32) is as fast or
// faster at every B than the TF32 kernel, so it always takes fp32. Backward
// (weights), 16-bit: the tensor-core kernels win up to B = 16 (0.47 vs 0.87
// ms; host-side overhead of the GEMM path's extra launches) and tie at B = 32
// (0.72 vs 0.70: the GEMM path from there on, so that B = 32 runs the
// configuration measured end to end); fp32: they win up to B = 16, the GEMM
// path at B = 32 (0.98 vs 1.13 ms).
constexpr int64_t kGemmMinOutputFwd16 = int64_t(1) << 20;  // B >= 3 for the paper tubes at d = 768
constexpr int64_t kGemmMinOutputBwd16 = int64_t(12) << 20;  // B >= 31
constexpr int64_t kGemmMinOutputBwd32 = int64_t(8) << 20;   // B >= 21

bool gemm_by_size(const at::Tensor& x, const TubeLayout& L, bool backward) {
  const int64_t elems = L.batch * L.num_tokens * L.dim;
  const bool fp32 = x.scalar_type() == at::kFloat;
  if (!backward) return fp32 || elems >= kGemmMinOutputFwd16;
  return elems >= (fp32 ? kGemmMinOutputBwd32 : kGemmMinOutputBwd16);
}

Path choose_path(const at::Tensor& x, const TubeLayout& L, bool backward, gemm::Layout* a) {
  if (env_off("TUBEVIT_CUDA_TC")) return Path::Naive;
  const bool tc_ok = tc::supported(x, L);
  bool want_gemm = !env_off("TUBEVIT_CUDA_GEMM");
  if (want_gemm && tc_ok && !env_is("TUBEVIT_CUDA_GEMM", "1")) want_gemm = gemm_by_size(x, L, backward);
  if (want_gemm && gemm_supported(x, L, a)) return Path::Gemm;
  if (tc_ok) return Path::TensorCore;
  // neither size nor switch matters where the tensor-core kernels do not apply
  // (pre-sm_80, fp32 without TF32 convolutions): the GEMM path beats naive
  if (!env_off("TUBEVIT_CUDA_GEMM") && gemm_supported(x, L, a)) return Path::Gemm;
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
    gemm::forward<CudaLauncher>(x, naive::contiguous_all(weights), naive::contiguous_all(biases), pe, L, a, out);
  } else {
    tc::forward(x, naive::contiguous_all(weights), naive::contiguous_all(biases), pe, L, out);
  }
  return out;
}

// The input gradient from dP (fp32, tube i's block at tc::dp_offsets(L)[i],
// computed by cuBLAS or on tensor cores): the per-tube scatter where opted in
// and it applies (not yet run on a GPU), else the gather of tube_tokens_tc.cu.
at::Tensor grad_input_from_dp(const at::Tensor& x, const at::Tensor& dp, const TubeLayout& L) {
  if (gemm::dx_scatter_enabled()) {
    int64_t dp_elems = 0;
    const std::vector<int64_t> dp_off = tc::dp_offsets(L, &dp_elems);
    at::Tensor dx;
    if (gemm::grad_input_scatter<CudaLauncher>(dp, dp_off, L, &dx, x.options())) return dx;
  }
  return tc::grad_input_from_dp(x, dp, L);
}

// The GEMM path's backward: G (every tube's rows of grad) copied out in one
// pass, dW_i = G_i^T P_i and dP_i = G_i W_i (fp32 result, the workspace the
// dX gather reads) on cuBLAS.
void gemm_backward(const at::Tensor& x, const at::Tensor& grad, const std::vector<at::Tensor>& w,
                   const TubeLayout& L, const gemm::Layout& a, bool need_dx, bool need_dw, at::Tensor& dx,
                   std::vector<at::Tensor>& dws) {
  const at::Tensor g = gemm::grad_rows<CudaLauncher>(grad, a);
  if (need_dw) {
    for (const auto& wi : w) dws.push_back(at::empty(wi.sizes(), x.options()));
    gemm::grad_weight<CudaLauncher>(x, g, L, a, dws);
  }
  if (!need_dx) return;
  int64_t dp_elems = 0;
  const std::vector<int64_t> dp_off = tc::dp_offsets(L, &dp_elems);
  at::Tensor dp = at::empty({dp_elems}, x.options().dtype(at::kFloat));
  for (int i = 0; i < a.n_tubes; ++i) {
    const TubeGeom& tg = L.tubes[i];
    const int64_t rows = L.batch * tg.num_tokens;
    if (rows == 0) continue;
    at::Tensor dp_i = gemm::block(dp, dp_off[i], rows, tg.patch_size);
    const at::Tensor g_i = gemm::block(g, a.t[i].y_start, rows, L.dim);
    const at::Tensor w_i = w[i].view({L.dim, tg.patch_size});
    if (x.scalar_type() == at::kFloat) {
      at::mm_out(dp_i, g_i, w_i);
    } else {
      at::mm_out(dp_i, g_i, w_i, at::kFloat);  // half / bf16 operands, fp32 result
    }
  }
  dx = grad_input_from_dp(x, dp, L);
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> tube_tokens_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, at::TensorList weights, at::IntArrayRef tubes,
    std::array<bool, 3> output_mask) {
  const c10::cuda::CUDAGuard guard(x.device());
  const TubeLayout L = check_backward_args(grad_out, x, weights, tubes);
  const at::Tensor grad = grad_out.contiguous();
  std::vector<at::Tensor> dbs;
  if (output_mask[2]) dbs = cuda::grad_bias(grad, L);
  if (!output_mask[0] && !output_mask[1]) return {at::empty({0}, x.options()), {}, dbs};
  gemm::Layout a;
  const Path path = choose_path(x, L, /*backward=*/true, &a);
  if (path == Path::Gemm) {
    at::Tensor dx = at::empty({0}, x.options());
    std::vector<at::Tensor> dws;
    gemm_backward(x, grad, naive::contiguous_all(weights), L, a, output_mask[0], output_mask[1], dx, dws);
    return {dx, dws, dbs};
  }
  if (path == Path::TensorCore) {
    at::Tensor dx = at::empty({0}, x.options());
    // dP on tensor cores, then the scatter or the gather
    if (output_mask[0]) dx = grad_input_from_dp(x, tc::grad_dp(x, grad, naive::contiguous_all(weights), L), L);
    std::vector<at::Tensor> dws;
    if (output_mask[1]) {
      for (const auto& w : weights) dws.push_back(at::empty(w.sizes(), x.options()));
      tc::grad_weight(x, grad, L, dws);
    }
    return {dx, dws, dbs};
  }
  auto r = naive::backward<CudaLauncher>(grad, x, weights, tubes, {output_mask[0], output_mask[1], false});
  return {std::get<0>(r), std::get<1>(r), dbs};
}

}  // namespace

TORCH_LIBRARY_IMPL(tubevit, CUDA, m) {
  m.impl("tube_tokens", &tube_tokens_cuda);
  // The kernels gather patches on the fly, so saved patches are only
  // validated (the same contract as on CPU) and not read.
  m.impl("tube_tokens_backward", [](const at::Tensor& grad_out, const at::Tensor& x,
                                    at::TensorList weights, at::TensorList patches,
                                    at::IntArrayRef tubes, std::array<bool, 3> output_mask) {
    if (!patches.empty()) check_patches(patches, x, check_backward_args(grad_out, x, weights, tubes));
    return tube_tokens_backward_cuda(grad_out, x, weights, tubes, output_mask);
  });
  m.impl("tube_tokens_naive", [](const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                                  at::IntArrayRef tubes, const c10::optional<at::Tensor>& pos_embed) {
    const c10::cuda::CUDAGuard guard(x.device());
    return naive::forward<CudaLauncher>(x, weights, biases, tubes, pos_embed);
  });
  // Always the naive kernels (db included), whatever TUBEVIT_CUDA_TC says:
  // they are what the fast paths are checked against.
  m.impl("tube_tokens_naive_backward", [](const at::Tensor& grad_out, const at::Tensor& x,
                                           at::TensorList weights, at::IntArrayRef tubes,
                                           std::array<bool, 3> output_mask) {
    const c10::cuda::CUDAGuard guard(x.device());
    return naive::backward<CudaLauncher>(grad_out, x, weights, tubes, output_mask);
  });
}

}  // namespace tubevit
