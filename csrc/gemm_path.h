// The GEMM path of tubevit::tube_tokens on CUDA: our own single-pass gather
// of each tube's patch matrix, then the vendor GEMM (cuBLAS through ATen's
// mm / addmm), then one pass that adds the position embedding while writing
// the tube's rows into their place in the (B, N, d) token buffer.
//
// Why a vendor GEMM: on an H200 (session 5, bench/NOTES.md) the handwritten
// implicit-GEMM kernels reached 35-50 TFLOP/s in bf16 while unfold + cuBLAS
// ran its GEMMs at ~115 TFLOP/s effective: a GEMM at cuBLAS's rate on
// Hopper needs wgmma/TMA pipelines we cannot tune without far more GPU
// time than a session gets. The parts that are ours are the ones where
// PyTorch-level code loses time: the gather (one pass over exactly the voxels
// a tube reads, any input strides, no unfold views or copies), the bias in
// the GEMM's epilogue, and the position embedding fused into the single copy
// into the final buffer (no cat, no padding, no separate PE pass). The CPU
// backend (cpu/tube_tokens_cpu.cpp) has the same structure around MKL.
//
// Everything here except the kernels' launch is device-agnostic ATen code,
// templated on a Launcher (see naive_kernels.h), so cpu/gemm_path_cpu.cpp runs
// the very same orchestration and gather functor on the CPU as the test op
// tubevit::tube_tokens_gemm_path{,_dw} (python_tests/test_gemm_path.py).
//
// Layouts (all row-major, contiguous):
//   P_i   (B * n_i, K_i), K ordered (c, kt, kh, kw) like weights[i].reshape(d, K_i)
//   G_i   (B * n_i, d): tube i's rows of the output gradient
//   dP_i  (B * n_i, K_i) = G_i W_i, fp32 (the input gradient's gather reads it)
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <vector>

#include "naive_kernels.h"
#include "tube_tokens.h"

namespace tubevit {
namespace gemm {

// Row r of tube g's patch matrix, in runs of kw voxels: r enumerates
// (b, tok, c, kt, kh) row-major, so P[r * kw + w] is column
// ((c * kt + a) * kh + h) * kw + w of token (b, tok) — P row-major (B n, K).
// One thread per run amortises the index arithmetic over kw elements.
template <typename scalar_t>
struct GatherRuns {
  const scalar_t* x;
  naive::Strides5 xs;
  TubeGeom g;
  int64_t C;
  scalar_t* p;

  TUBEVIT_HD void operator()(int64_t r) const {
    int64_t q = r;
    const int64_t h = q % g.k[1];
    q /= g.k[1];
    const int64_t a = q % g.k[0];
    q /= g.k[0];
    const int64_t c = q % C;
    q /= C;
    const int64_t tok = q % g.num_tokens;
    const int64_t b = q / g.num_tokens;
    const scalar_t* src = x + b * xs.b + token_origin_offset(g, tok, xs.t, xs.h, xs.w) + c * xs.c + a * xs.t +
                          h * xs.h;
    scalar_t* dst = p + r * g.k[2];
    for (int64_t w = 0; w < g.k[2]; ++w) dst[w] = src[w * xs.w];
  }
};

// P_i (B * n_i, K_i) in x's dtype, gathered from x (any strides).
template <class Launcher>
at::Tensor gather_patches(const at::Tensor& x, const TubeLayout& L, const TubeGeom& g) {
  at::Tensor p = at::empty({L.batch * g.num_tokens, g.patch_size}, x.options());
  const int64_t runs = L.batch * g.num_tokens * L.channels * g.k[0] * g.k[1];
  if (runs == 0) return p;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "tube_tokens_gather", [&] {
    Launcher::run(runs, GatherRuns<scalar_t>{x.const_data_ptr<scalar_t>(), naive::strides_of(x), g, L.channels,
                                             p.mutable_data_ptr<scalar_t>()});
  });
  return p;
}

// G_i (B * n_i, d): tube i's rows of grad (B, N, d) contiguous; a view when
// there is one tube, else a copy (rows of one tube are not evenly strided
// across samples, and one GEMM over all B * n_i rows beats B small ones).
inline at::Tensor tube_grad_rows(const at::Tensor& grad, const TubeLayout& L, size_t i) {
  const TubeGeom& g = L.tubes[i];
  if (L.tubes.size() == 1) return grad.view({L.batch * g.num_tokens, L.dim});
  return grad.narrow(1, g.token_offset, g.num_tokens).reshape({L.batch * g.num_tokens, L.dim});
}

// out (B, N, d) contiguous, fully written. w[i] and bias[i] contiguous, bias
// empty or one (d,) per tube, pe contiguous (N, d) or undefined.
template <class Launcher>
void forward(const at::Tensor& x, const std::vector<at::Tensor>& w, const std::vector<at::Tensor>& bias,
             const at::Tensor& pe, const TubeLayout& L, at::Tensor& out) {
  const int64_t d = L.dim;
  const bool one_tube = L.tubes.size() == 1;
  int64_t max_rows = 0;
  for (const auto& g : L.tubes) max_rows = std::max(max_rows, L.batch * g.num_tokens);
  // the GEMM's result rows of one tube, reused by every tube (several tubes
  // only: one tube's rows are the whole output, written in place)
  at::Tensor y_buf = one_tube ? at::Tensor() : at::empty({max_rows * d}, out.options());
  for (size_t i = 0; i < L.tubes.size(); ++i) {
    const TubeGeom& g = L.tubes[i];
    const int64_t rows = L.batch * g.num_tokens;
    const at::Tensor p = gather_patches<Launcher>(x, L, g);
    const at::Tensor wt = w[i].view({d, g.patch_size}).t();
    at::Tensor y = one_tube ? out.view({rows, d}) : y_buf.narrow(0, 0, rows * d).view({rows, d});
    if (bias.empty()) {
      at::mm_out(y, p, wt);
    } else {
      at::addmm_out(y, bias[i], p, wt);  // bias in the GEMM's epilogue where the library fuses it
    }
    if (one_tube) {
      if (pe.defined()) out.add_(pe);  // (N, d) broadcast over B, in place
      continue;
    }
    at::Tensor dst = out.narrow(1, g.token_offset, g.num_tokens);
    const at::Tensor src = y.view({L.batch, g.num_tokens, d});
    if (pe.defined()) {
      at::add_out(dst, src, pe.narrow(0, g.token_offset, g.num_tokens));  // PE fused into the placement
    } else {
      dst.copy_(src);
    }
  }
}

// dw_i (d, C, kt, kh, kw) contiguous, fully overwritten with G_i^T P_i
// (the GEMM accumulates in fp32 for half / bf16 inputs); g_rows = G_i from
// tube_grad_rows, so that a backward that also needs dP copies it once.
template <class Launcher>
void grad_weight_tube(const at::Tensor& x, const at::Tensor& g_rows, const TubeLayout& L, size_t i,
                      at::Tensor& dw_i) {
  const TubeGeom& g = L.tubes[i];
  at::Tensor dw = dw_i.view({L.dim, g.patch_size});
  if (L.batch * g.num_tokens == 0) {
    dw.zero_();
    return;
  }
  at::mm_out(dw, g_rows.t(), gather_patches<Launcher>(x, L, g));
}

// All tubes' weight gradients; grad (B, N, d) contiguous.
template <class Launcher>
void grad_weight(const at::Tensor& x, const at::Tensor& grad, const TubeLayout& L, std::vector<at::Tensor>& dws) {
  for (size_t i = 0; i < L.tubes.size(); ++i) grad_weight_tube<Launcher>(x, tube_grad_rows(grad, L, i), L, i, dws[i]);
}

}  // namespace gemm
}  // namespace tubevit
