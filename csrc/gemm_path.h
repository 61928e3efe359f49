// The GEMM path of tubevit::tube_tokens on CUDA: one launch of our gather
// writes every tube's patch matrix, the vendor GEMM (cuBLAS through ATen's
// mm) multiplies each with its weight, and one launch of our placement adds
// bias and position embedding while writing every tube's rows to their place
// in the (B, N, d) token buffer. The backward mirrors it: one launch copies
// every tube's rows of the output gradient out, the same gather, cuBLAS for
// dW and for dP, then the dX gather of tube_tokens_tc.cu (or, opt-in, the
// per-tube scatter at the end of this file).
//
// Why a vendor GEMM: on an H200 (session 5, bench/NOTES.md) the handwritten
// implicit-GEMM kernels reached 35-50 TFLOP/s in bf16 while unfold + cuBLAS
// ran its GEMMs at ~115 TFLOP/s effective, and cuBLAS alone runs these
// shapes at ~500 TFLOP/s (session 6): a GEMM at cuBLAS's rate on Hopper needs
// wgmma/TMA pipelines we cannot tune without far more GPU time than a
// session gets. The parts that are ours are the ones where PyTorch-level
// code loses time: the gather (one pass over exactly the voxels the tubes
// read, any input strides, no unfold views or copies), and bias + position
// embedding fused into the single placement pass (no cat, no padding, no
// separate PE pass). Launch counts matter as much as bandwidth here: at
// small batches the forward is bound by host-side launch overhead, so every
// pass covers all tubes in one launch. The CPU backend
// (cpu/tube_tokens_cpu.cpp) has the same structure around MKL.
//
// Everything here except the launches is device-agnostic ATen code,
// templated on a Launcher (see naive_kernels.h), so cpu/gemm_path_cpu.cpp
// runs the very same orchestration and functors on the CPU as the test ops
// tubevit::tube_tokens_gemm_path{,_dw,_dx} (python_tests/test_gemm_path.py).
//
// Workspaces (all row-major, contiguous, tubes concatenated in order):
//   P    tube i's (B * n_i, K_i) block at element B * pk_before_i, where
//        pk_before_i = sum_{j<i} n_j K_j; K ordered (c, kt, kh, kw) like
//        weights[i].reshape(d, K_i)
//   Y/G  tube i's (B * n_i, d) block at element B * off_i * d (off_i = the
//        tube's token offset): the GEMM results of the forward, the rows of
//        the output gradient in the backward
//   dP   (B * n_i, K_i) = G_i W_i in fp32, laid out as tc::dp_offsets says
//        (the same as P's blocks)
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "naive_kernels.h"
#include "tube_tokens.h"

namespace tubevit {
namespace gemm {

constexpr int kMaxTubes = naive::kMaxTubes;

// Unsigned 32-bit division by a divisor fixed at launch time, as a multiply
// and a shift (Granlund & Montgomery; ATen's IntDivider is the same idea):
// integer division is a ~20-instruction routine on the GPU, and the gather
// divides seven times per element. Exact for n < 2^32 and 1 <= d < 2^31.
struct FastDiv {
  uint32_t d = 1, magic = 0, shift = 0;
  FastDiv() = default;
  explicit FastDiv(uint32_t divisor) : d(divisor) {
    while (shift < 32 && (uint64_t(1) << shift) < divisor) ++shift;
    magic = static_cast<uint32_t>(((uint64_t(1) << 32) * ((uint64_t(1) << shift) - divisor)) / divisor + 1);
  }
  TUBEVIT_HD uint32_t div(uint32_t n) const {
#if defined(__CUDA_ARCH__)
    const uint32_t t = __umulhi(n, magic);
#else
    const uint32_t t = static_cast<uint32_t>((uint64_t(n) * magic) >> 32);
#endif
    return static_cast<uint32_t>((uint64_t(t) + n) >> shift);
  }
  // q = n / d, returns n - q * d
  TUBEVIT_HD uint32_t divmod(uint32_t n, uint32_t* q) const {
    *q = div(n);
    return n - *q * d;
  }
};

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
TUBEVIT_HD int64_t gather_source(const Layout& a, const naive::Strides5& xs, int64_t e) {
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
  naive::Strides5 xs;
  Layout a;
  scalar_t* p;

  TUBEVIT_HD void operator()(int64_t e) const {
    const int64_t off = gather_source(a, xs, e);
    p[e] = x[off];
  }
};

// V contiguous elements, aligned for one access of their size (callers keep
// V * sizeof(scalar_t) <= 16).
template <typename scalar_t, int V>
struct alignas(V * sizeof(scalar_t)) Vec {
  scalar_t v[V];
};

// V elements from src to dst: one 16-, 8- or 4-byte access on the GPU (both
// sides aligned to that size: callers check, see vec_width and
// gather_vec_width), element by element for other sizes; memcpy on the host.
template <typename scalar_t, int V>
TUBEVIT_HD void copy_run(scalar_t* dst, const scalar_t* src) {
#if defined(__CUDA_ARCH__)
  constexpr int kBytes = V * int(sizeof(scalar_t));
  if constexpr (kBytes == 16) {
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
  } else if constexpr (kBytes == 8) {
    *reinterpret_cast<uint2*>(dst) = *reinterpret_cast<const uint2*>(src);
  } else if constexpr (kBytes == 4) {
    *reinterpret_cast<unsigned*>(dst) = *reinterpret_cast<const unsigned*>(src);
  } else {
    for (int u = 0; u < V; ++u) dst[u] = src[u];
  }
#else
  std::memcpy(dst, src, V * sizeof(scalar_t));
#endif
}

template <typename scalar_t, int V>
TUBEVIT_HD Vec<scalar_t, V> load_vec(const scalar_t* src) {
  Vec<scalar_t, V> r;
  copy_run<scalar_t, V>(r.v, src);
  return r;
}

template <typename scalar_t, int V>
TUBEVIT_HD void store_vec(scalar_t* dst, const Vec<scalar_t, V>& r) {
  copy_run<scalar_t, V>(dst, r.v);
}

// GatherElem with V consecutive patch columns per call (one V-wide store;
// READ_VEC: one V-wide load too). Index: element / V of the P workspace.
// Legal when V divides every tube's kw (a V-run never leaves a kw-run, and V
// divides every K_i and block start); READ_VEC when x's W stride is 1 and
// the base pointer, the other strides and every run's first voxel
// (o_w + s_w * iw + w) are multiples of V — gather_vec_width checks both.
// Written in session 6 after its device time was spent: CPU-tested (the
// same functor in the host loop), NOT YET RUN on a GPU; opt-in with
// TUBEVIT_GEMM_GATHER_VEC=1 until it has been (the scalar GatherElem took
// 134 us of a 0.26 ms bf16 forward at B = 32 on the H200: one thread per
// 2-byte element is bound by instruction issue, not by bandwidth).
template <typename scalar_t, int V, bool READ_VEC>
struct GatherVecElem {
  const scalar_t* x;
  naive::Strides5 xs;
  Layout a;
  scalar_t* p;

  TUBEVIT_HD void operator()(int64_t ev) const {
    const int64_t e = ev * V;
    const int64_t off = gather_source(a, xs, e);
    if constexpr (READ_VEC) {
      store_vec<scalar_t, V>(p + e, load_vec<scalar_t, V>(x + off));
    } else {
      Vec<scalar_t, V> r;
      for (int u = 0; u < V; ++u) r.v[u] = x[off + u * xs.w];
      store_vec<scalar_t, V>(p + e, r);
    }
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

// TUBEVIT_GEMM_GATHER_VEC=1 selects GatherVecElem where it applies (read per
// call, so tests can switch; off by default until measured on a GPU).
inline bool gather_vec_enabled() {
  const char* v = std::getenv("TUBEVIT_GEMM_GATHER_VEC");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

// Widest V (8, 4 or 2 elements, at most 16 bytes) dividing every tube's kw,
// or 1; *read_vec: whether the V-runs of x can be loaded as one access too.
template <typename scalar_t>
int gather_vec_width(const at::Tensor& x, const TubeLayout& L, bool* read_vec) {
  int v = std::min(8, int(16 / sizeof(scalar_t)));
  for (; v > 1; v /= 2) {
    bool ok = true;
    for (const auto& g : L.tubes) ok = ok && g.k[2] % v == 0;
    if (ok) break;
  }
  bool rv = v > 1 && x.stride(4) == 1 &&
            reinterpret_cast<uintptr_t>(x.const_data_ptr()) % (v * sizeof(scalar_t)) == 0;
  for (int ax = 0; ax < 4 && rv; ++ax) rv = x.stride(ax) % v == 0;
  for (const auto& g : L.tubes) rv = rv && g.o[2] % v == 0 && g.s[2] % v == 0;
  *read_vec = rv;
  return v;
}

// The P workspace (all tubes) in x's dtype, gathered from x (any strides).
template <class Launcher>
at::Tensor gather_patches(const at::Tensor& x, const TubeLayout& L, const Layout& a) {
  at::Tensor p = at::empty({a.p_elems}, x.options());
  if (a.p_elems == 0) return p;
  const bool vec = gather_vec_enabled();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "tube_tokens_gather", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* pp = p.mutable_data_ptr<scalar_t>();
    bool read_vec = false;
    const int v = vec ? gather_vec_width<scalar_t>(x, L, &read_vec) : 1;
    auto run = [&](auto width, auto rv) {
      constexpr int V = decltype(width)::value;
      constexpr bool R = decltype(rv)::value;
      Launcher::run(a.p_elems / V, GatherVecElem<scalar_t, V, R>{xp, naive::strides_of(x), a, pp});
    };
    using T = std::true_type;
    using F = std::false_type;
    if (v == 8) {
      read_vec ? run(std::integral_constant<int, 8>(), T()) : run(std::integral_constant<int, 8>(), F());
    } else if (v == 4) {
      read_vec ? run(std::integral_constant<int, 4>(), T()) : run(std::integral_constant<int, 4>(), F());
    } else if (v == 2) {
      read_vec ? run(std::integral_constant<int, 2>(), T()) : run(std::integral_constant<int, 2>(), F());
    } else {
      Launcher::run(a.p_elems, GatherElem<scalar_t>{xp, naive::strides_of(x), a, pp});
    }
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

// ---- input gradient by per-tube scatter (opt-in, not yet run on a GPU) ----
//
// dx = sum over tubes of col2im(dP_i), one launch per tube over the voxels
// that tube covers (its windows' union: n*k positions per axis where
// windows do not overlap, the spanned range where they do), each voxel
// summing its covering tokens' dP entries in fp32 and adding that once to dx
// (one rounding per tube, as PyTorch's autograd sums per-convolution input
// gradients). Tubes run one after another and every voxel of a tube has one
// thread: deterministic, no atomics. Work is proportional to the covered
// voxels (~19 % of a paper-tube input) plus one zero fill, where the gather
// of tube_tokens_tc.cu visits every voxel for every tube (2.0 ms at B = 32
// on the H200, the largest kernel of a step with input gradients). Written
// in session 6 without a GPU: CPU-tested (tube_tokens_gemm_path_dx), opt-in
// with TUBEVIT_DX_SCATTER=1 on both fast paths (the tensor-core path computes
// dP on tensor cores first, tc::grad_dp).
inline bool dx_scatter_enabled() {
  const char* v = std::getenv("TUBEVIT_DX_SCATTER");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

// Covered positions along one axis: windows o + s*j + [0, k), j < n.
TUBEVIT_HD int64_t covered_count(int64_t k, int64_t s, int64_t n) {
  return n <= 0 ? 0 : (s >= k ? n * k : s * (n - 1) + k);
}

// The u-th covered position on one axis and the range [*lo, *hi] of grid
// indices whose windows cover it.
TUBEVIT_HD int64_t covered_position(int64_t u, int64_t k, int64_t s, int64_t o, int64_t n, int64_t* lo,
                                    int64_t* hi) {
  if (s >= k) {  // disjoint windows: exactly one
    const int64_t j = u / k;
    *lo = *hi = j;
    return o + s * j + (u - j * k);
  }
  const int64_t pos = o + u;
  axis_covering(pos, k, s, o, n, lo, hi);
  return pos;
}

template <typename scalar_t>
struct DxScatterElem {
  using acc_t = at::opmath_type<scalar_t>;
  TubeGeom g;
  FastDiv cw, ch, ct, C;  // covered positions per axis (w, h, t), channels
  const float* dp;    // this tube's (B n, K) block of dP
  scalar_t* dx;       // (B, C, T, H, W) contiguous
  int64_t T, H, W;

  TUBEVIT_HD void operator()(int64_t e) const {
    uint32_t q, q2, q3, b;
    const uint32_t uw = cw.divmod(static_cast<uint32_t>(e), &q);
    const uint32_t uh = ch.divmod(q, &q2);
    const uint32_t ut = ct.divmod(q2, &q3);
    const uint32_t c = C.divmod(q3, &b);
    int64_t lo[3], hi[3];
    const int64_t t = covered_position(ut, g.k[0], g.s[0], g.o[0], g.n[0], &lo[0], &hi[0]);
    const int64_t h = covered_position(uh, g.k[1], g.s[1], g.o[1], g.n[1], &lo[1], &hi[1]);
    const int64_t w = covered_position(uw, g.k[2], g.s[2], g.o[2], g.n[2], &lo[2], &hi[2]);
    float acc = 0.f;
    for (int64_t it = lo[0]; it <= hi[0]; ++it)
      for (int64_t ih = lo[1]; ih <= hi[1]; ++ih)
        for (int64_t iw = lo[2]; iw <= hi[2]; ++iw) {
          const int64_t tok = (it * g.n[1] + ih) * g.n[2] + iw;
          const int64_t col = ((int64_t(c) * g.k[0] + (t - g.o[0] - g.s[0] * it)) * g.k[1] +
                               (h - g.o[1] - g.s[1] * ih)) * g.k[2] + (w - g.o[2] - g.s[2] * iw);
          acc += dp[(int64_t(b) * g.num_tokens + tok) * g.patch_size + col];
        }
    scalar_t& out = dx[(((int64_t(b) * C.d + c) * T + t) * H + h) * W + w];
    out = static_cast<scalar_t>(static_cast<acc_t>(out) + static_cast<acc_t>(acc));
  }
};

// dx (B, C, T, H, W) contiguous in `opts`' dtype from dP (fp32, tube i's
// block at dp_off[i]); false (dx untouched) when a tube's covered-voxel
// count does not fit 32-bit indices — the caller then uses the gather.
template <class Launcher>
bool grad_input_scatter(const at::Tensor& dp, const std::vector<int64_t>& dp_off, const TubeLayout& L,
                        at::Tensor* dx_out, const at::TensorOptions& opts) {
  constexpr int64_t kMax = (int64_t(1) << 31) - 1;
  std::vector<int64_t> elems;
  for (const auto& g : L.tubes) {
    const int64_t e = L.batch * L.channels * covered_count(g.k[0], g.s[0], g.n[0]) *
                      covered_count(g.k[1], g.s[1], g.n[1]) * covered_count(g.k[2], g.s[2], g.n[2]);
    if (e > kMax || L.channels > kMax) return false;
    elems.push_back(e);
  }
  at::Tensor dx = at::zeros({L.batch, L.channels, L.size[0], L.size[1], L.size[2]}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dx.scalar_type(), "tube_tokens_dx_scatter", [&] {
    for (size_t i = 0; i < L.tubes.size(); ++i) {
      if (elems[i] == 0) continue;
      const TubeGeom& g = L.tubes[i];
      DxScatterElem<scalar_t> f{};
      f.g = g;
      f.cw = FastDiv(static_cast<uint32_t>(covered_count(g.k[2], g.s[2], g.n[2])));
      f.ch = FastDiv(static_cast<uint32_t>(covered_count(g.k[1], g.s[1], g.n[1])));
      f.ct = FastDiv(static_cast<uint32_t>(covered_count(g.k[0], g.s[0], g.n[0])));
      f.C = FastDiv(static_cast<uint32_t>(L.channels));
      f.dp = dp.const_data_ptr<float>() + dp_off[i];
      f.dx = dx.mutable_data_ptr<scalar_t>();
      f.T = L.size[0];
      f.H = L.size[1];
      f.W = L.size[2];
      Launcher::run(elems[i], f);  // tube after tube: their voxels may coincide
    }
  });
  *dx_out = dx;
  return true;
}

}  // namespace gemm
}  // namespace tubevit
