// The GEMM path of tubevit::tube_tokens on CUDA: one launch of our gather
// writes every tube's patch matrix, the vendor GEMM (cuBLAS through ATen's
// mm) multiplies each with its weight, and one launch of our placement adds
// bias and position embedding while writing every tube's rows to their place
// in the (B, N, d) token buffer. The backward mirrors it: one launch copies
// every tube's rows of the output gradient out, the same gather, cuBLAS for
// dW and for dP; the input gradient from dP is kernels/grad_input.h.
//
// Why a vendor GEMM: on an H200 (bench/DESIGN.md) the handwritten WMMA
// implicit-GEMM kernels reach 35-50 TFLOP/s in bf16 while cuBLAS runs these
// shapes at ~500 TFLOP/s; a GEMM at cuBLAS's rate on Hopper needs
// wgmma/TMA pipelines. The parts that are ours are the ones where PyTorch-level
// code loses time: the gather (one pass over exactly the voxels the tubes
// read, any input strides, no unfold views or copies), and bias + position
// embedding fused into the single placement pass (no cat, no padding, no
// separate PE pass). Launch counts matter as much as bandwidth here: at
// small batches the forward is bound by host-side launch overhead, so every
// pass covers all tubes in one launch. The CPU backend
// (cpu/tube_tokens_cpu.cpp) has the same structure around MKL.
//
// Everything here except the launches is device-agnostic ATen code,
// templated on a Launcher (see naive_kernels.h), so testing/gemm_path_cpu.cpp
// runs the very same orchestration and functors on the CPU as the test ops
// tubevit_testing::tube_tokens_gemm_path{,_dw,_dx} (python_tests/test_gemm_path.py).
//
// Workspaces (all row-major, contiguous, tubes concatenated in order):
//   P    tube i's (B * n_i, K_i) block at element B * pk_before_i, where
//        pk_before_i = sum_{j<i} n_j K_j; K ordered (c, kt, kh, kw) like
//        weights[i].reshape(d, K_i)
//   Y/G  tube i's (B * n_i, d) block at element B * off_i * d (off_i = the
//        tube's token offset): the GEMM results of the forward, the rows of
//        the output gradient in the backward
//   dP   (B * n_i, K_i) = G_i W_i in fp32, laid out as make_dp_layout
//        (kernels/common.h) says: the same blocks as P
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common.h"
#include "tube_tokens.h"

namespace tubevit {
namespace gemm {

// Per tube, what the element functors need: the divisors of the index
// decomposition and the geometry. Passed by value (kernel parameter space).
struct TubeIdx {
  FastDiv K, kw, kh, kt, n, nw, nh;  // patch size, kernel, tokens, grid
  int64_t o[3], s[3];
  int64_t p_start;    // first element of this tube in P (all tubes)
  int64_t y_start;    // first element of this tube's block in Y / G
  int64_t token_offset;
  int64_t num_tokens;
};

struct Layout {
  TubeIdx t[kMaxTubes];
  int n_tubes;
  int64_t p_elems;  // B * sum n_i K_i
  int64_t B, N, d;
};

// Host side: the layout of P and Y for L, or false when an index does not
// fit the 32-bit arithmetic (then the caller takes another path).
inline bool make_layout(const TubeLayout& L, Layout* out) {
  Layout a{};
  a.n_tubes = static_cast<int>(L.tubes.size());
  if (a.n_tubes > kMaxTubes) return false;
  a.B = L.batch;
  a.N = L.num_tokens;
  a.d = L.dim;
  constexpr int64_t kMax = (int64_t(1) << 31) - 1;
  int64_t p = 0;
  for (int i = 0; i < a.n_tubes; ++i) {
    const TubeGeom& g = L.tubes[i];
    const int64_t elems = L.batch * g.num_tokens * g.patch_size;
    if (elems > kMax || g.patch_size > kMax || g.num_tokens > kMax) return false;
    TubeIdx& t = a.t[i];
    t.K = FastDiv(static_cast<uint32_t>(g.patch_size));
    t.kw = FastDiv(static_cast<uint32_t>(g.k[2]));
    t.kh = FastDiv(static_cast<uint32_t>(g.k[1]));
    t.kt = FastDiv(static_cast<uint32_t>(g.k[0]));
    t.n = FastDiv(static_cast<uint32_t>(g.num_tokens));
    t.nw = FastDiv(static_cast<uint32_t>(g.n[2]));
    t.nh = FastDiv(static_cast<uint32_t>(g.n[1]));
    for (int ax = 0; ax < 3; ++ax) {
      t.o[ax] = g.o[ax];
      t.s[ax] = g.s[ax];
    }
    t.p_start = p;
    t.y_start = L.batch * g.token_offset * L.dim;
    t.token_offset = g.token_offset;
    t.num_tokens = g.num_tokens;
    p += elems;
  }
  a.p_elems = p;
  // the placement's element index, (b * N + token) * d + j, must fit too
  if (L.dim > kMax || L.batch * L.num_tokens > kMax / L.dim) return false;
  *out = a;
  return true;
}

// Offset in x (elements) of the voxel that element e of the P workspace
// (all tubes) copies: the tube whose block holds e, then e's (b, tok) row
// and (c, kt, kh, kw) column, seven multiply-shift divisions.
TUBEVIT_HD int64_t gather_source(const Layout& a, const Strides5& xs, int64_t e) {
  int i = 0;
  while (i + 1 < a.n_tubes && e >= a.t[i + 1].p_start) ++i;
  const TubeIdx& t = a.t[i];
  uint32_t row, q, q2, c, b, t2, it;
  const uint32_t k = t.K.divmod(static_cast<uint32_t>(e - t.p_start), &row);
  const uint32_t w = t.kw.divmod(k, &q);
  const uint32_t h = t.kh.divmod(q, &q2);
  const uint32_t da = t.kt.divmod(q2, &c);
  const uint32_t tok = t.n.divmod(row, &b);
  const uint32_t iw = t.nw.divmod(tok, &t2);
  const uint32_t ih = t.nh.divmod(t2, &it);
  return b * xs.b + c * xs.c + (t.o[0] + t.s[0] * it + da) * xs.t + (t.o[1] + t.s[1] * ih + h) * xs.h +
         (t.o[2] + t.s[2] * iw + w) * xs.w;
}

// P[e] for every element e of the P workspace (all tubes): one thread per
// element, so that a warp's stores are contiguous; reads are contiguous
// along each kw run of x (unit W stride).
template <typename scalar_t>
struct GatherElem {
  const scalar_t* x;
  Strides5 xs;
  Layout a;
  scalar_t* p;

  TUBEVIT_HD void operator()(int64_t e) const {
    const int64_t off = gather_source(a, xs, e);
    p[e] = x[off];
  }
};

// Row (b, token) of the (B, N, d) token buffer <-> its row in tube i's
// block of the Y / G workspace, V channels per call (d % V == 0):
//   forward  (TO_TOKENS): out[b, token, j] = Y_i[b, tok, j] + bias_i[j] + pe[token, j]
//            in opmath (fp32 for half / bf16, one rounding at the store);
//   backward (!TO_TOKENS): G_i[b, tok, j] = grad[b, token, j].
// Element index: ((b * N + token) * d + j) / V, i.e. contiguous over the
// token buffer (the side whose rows are not split by tubes).
template <typename scalar_t, int V, bool TO_TOKENS>
struct PlaceElem {
  using acc_t = at::opmath_type<scalar_t>;
  Layout a;
  FastDiv dv, N;             // d / V, and N
  const scalar_t* src;       // Y (forward) or grad (backward)
  scalar_t* dst;             // out (forward) or G (backward)
  const scalar_t* bias[kMaxTubes];  // forward, per tube (d,) or nullptr
  const scalar_t* pe;        // forward, (N, d) or nullptr

  TUBEVIT_HD void operator()(int64_t e) const {
    uint32_t row, b;
    const uint32_t jv = dv.divmod(static_cast<uint32_t>(e), &row);
    const uint32_t token = N.divmod(row, &b);
    int i = 0;
    while (i + 1 < a.n_tubes && int64_t(token) >= a.t[i + 1].token_offset) ++i;
    const TubeIdx& t = a.t[i];
    const int64_t j = int64_t(jv) * V;
    const int64_t tok_row = (int64_t(row) * a.d) + j;  // (b, token) row of the token buffer
    const int64_t blk_row = t.y_start + (int64_t(b) * t.num_tokens + (token - t.token_offset)) * a.d + j;
    if constexpr (TO_TOKENS) {
      const Vec<scalar_t, V> y = load_vec<scalar_t, V>(src + blk_row);
      acc_t acc[V];
      for (int u = 0; u < V; ++u) acc[u] = static_cast<acc_t>(y.v[u]);
      if (bias[i] != nullptr) {
        const Vec<scalar_t, V> bv = load_vec<scalar_t, V>(bias[i] + j);
        for (int u = 0; u < V; ++u) acc[u] += static_cast<acc_t>(bv.v[u]);
      }
      if (pe != nullptr) {
        const Vec<scalar_t, V> pv = load_vec<scalar_t, V>(pe + int64_t(token) * a.d + j);
        for (int u = 0; u < V; ++u) acc[u] += static_cast<acc_t>(pv.v[u]);
      }
      Vec<scalar_t, V> o;
      for (int u = 0; u < V; ++u) o.v[u] = static_cast<scalar_t>(acc[u]);
      store_vec<scalar_t, V>(dst + tok_row, o);
    } else {
      store_vec<scalar_t, V>(dst + blk_row, load_vec<scalar_t, V>(src + tok_row));
    }
  }
};

// Widest V (8, 4, 2 or 1 elements, at most 16 bytes) that divides d and the
// pointers' alignment, so that every V-run is one aligned access.
template <typename scalar_t>
int vec_width(int64_t d, const std::vector<const void*>& ptrs) {
  for (int v = std::min(8, int(16 / sizeof(scalar_t))); v > 1; v /= 2) {
    bool ok = d % v == 0;
    for (const void* p : ptrs)
      ok = ok && (p == nullptr || reinterpret_cast<uintptr_t>(p) % (v * sizeof(scalar_t)) == 0);
    if (ok) return v;
  }
  return 1;
}

template <class Launcher, typename scalar_t, bool TO_TOKENS>
void place(const Layout& a, const at::Tensor& src, at::Tensor& dst, const std::vector<at::Tensor>& bias,
           const at::Tensor& pe) {
  PlaceElem<scalar_t, 1, TO_TOKENS> f{};
  f.a = a;
  f.N = FastDiv(static_cast<uint32_t>(a.N));
  f.src = src.const_data_ptr<scalar_t>();
  f.dst = dst.mutable_data_ptr<scalar_t>();
  std::vector<const void*> ptrs = {f.src, f.dst};
  for (int i = 0; i < a.n_tubes; ++i) {
    f.bias[i] = bias.empty() ? nullptr : bias[i].const_data_ptr<scalar_t>();
    ptrs.push_back(f.bias[i]);
  }
  f.pe = pe.defined() ? pe.const_data_ptr<scalar_t>() : nullptr;
  ptrs.push_back(f.pe);
  const int v = vec_width<scalar_t>(a.d, ptrs);
  const int64_t n = a.B * a.N * a.d / v;
  if (n == 0) return;
  auto run = [&](auto width) {
    constexpr int V = decltype(width)::value;
    PlaceElem<scalar_t, V, TO_TOKENS> g{};
    g.a = f.a;
    g.dv = FastDiv(static_cast<uint32_t>(a.d / V));
    g.N = f.N;
    g.src = f.src;
    g.dst = f.dst;
    for (int i = 0; i < a.n_tubes; ++i) g.bias[i] = f.bias[i];
    g.pe = f.pe;
    Launcher::run(n, g);
  };
  if (v == 8) run(std::integral_constant<int, 8>());
  else if (v == 4) run(std::integral_constant<int, 4>());
  else if (v == 2) run(std::integral_constant<int, 2>());
  else run(std::integral_constant<int, 1>());
}

// The P workspace (all tubes) in x's dtype, gathered from x (any strides).
template <class Launcher>
at::Tensor gather_patches(const at::Tensor& x, const TubeLayout& L, const Layout& a) {
  at::Tensor p = at::empty({a.p_elems}, x.options());
  if (a.p_elems == 0) return p;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "tube_tokens_gather", [&] {
    Launcher::run(a.p_elems,
                  GatherElem<scalar_t>{x.const_data_ptr<scalar_t>(), strides_of(x), a, p.mutable_data_ptr<scalar_t>()});
  });
  return p;
}

// Tube i's (rows, cols) block of a tubes-concatenated workspace.
inline at::Tensor block(const at::Tensor& ws, int64_t start, int64_t rows, int64_t cols) {
  return ws.narrow(0, start, rows * cols).view({rows, cols});
}

// out (B, N, d) contiguous, fully written. w[i] and bias[i] contiguous, bias
// empty or one (d,) per tube, pe contiguous (N, d) or undefined. `a` from
// make_layout(L).
template <class Launcher>
void forward(const at::Tensor& x, const std::vector<at::Tensor>& w, const std::vector<at::Tensor>& bias,
             const at::Tensor& pe, const TubeLayout& L, const Layout& a, at::Tensor& out) {
  const int64_t d = L.dim;
  const at::Tensor p = gather_patches<Launcher>(x, L, a);
  // the GEMMs' results, tube after tube; then one placement pass adds bias
  // and PE and writes every row to its place in out
  const at::Tensor y = at::empty({L.batch * L.num_tokens * d}, out.options());
  for (int i = 0; i < a.n_tubes; ++i) {
    const TubeGeom& g = L.tubes[i];
    const int64_t rows = L.batch * g.num_tokens;
    at::Tensor yi = block(y, a.t[i].y_start, rows, d);
    at::mm_out(yi, block(p, a.t[i].p_start, rows, g.patch_size), w[i].view({d, g.patch_size}).t());
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "tube_tokens_place",
                                  [&] { place<Launcher, scalar_t, true>(a, y, out, bias, pe); });
}

// G (the Y layout) from grad (B, N, d) contiguous: one copy pass for all
// tubes (one tube: grad itself, its rows are already in that order).
template <class Launcher>
at::Tensor grad_rows(const at::Tensor& grad, const Layout& a) {
  if (a.n_tubes == 1) return grad.view({-1});
  at::Tensor g = at::empty({a.B * a.N * a.d}, grad.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "tube_tokens_grad_rows",
                                  [&] { place<Launcher, scalar_t, false>(a, grad, g, {}, at::Tensor()); });
  return g;
}

// dws[i] (d, C, kt, kh, kw) contiguous, fully overwritten with G_i^T P_i
// (the GEMM accumulates in fp32 for half / bf16 inputs). g from grad_rows.
template <class Launcher>
void grad_weight(const at::Tensor& x, const at::Tensor& g, const TubeLayout& L, const Layout& a,
                 std::vector<at::Tensor>& dws) {
  const at::Tensor p = gather_patches<Launcher>(x, L, a);
  for (int i = 0; i < a.n_tubes; ++i) {
    const TubeGeom& tg = L.tubes[i];
    const int64_t rows = L.batch * tg.num_tokens;
    at::Tensor dw = dws[i].view({L.dim, tg.patch_size});
    if (rows == 0) {
      dw.zero_();
      continue;
    }
    at::mm_out(dw, block(g, a.t[i].y_start, rows, L.dim).t(), block(p, a.t[i].p_start, rows, tg.patch_size));
  }
}

}  // namespace gemm
}  // namespace tubevit
