// CPU backend of tubevit::tube_tokens and tubevit::tube_tokens_backward.
//
// Each tube is an implicit GEMM: tokens (rows) x patch (K = C*kt*kh*kw)
// times the tube's weight (d x K)^T. Forward, per tube and batch chunk: we
// gather only the voxels the tube reads into a row-major patch workspace (in
// parallel over rows), run ONE BLAS GEMM over all rows of the chunk (large M
// keeps MKL/oneDNN at its best rate), and a parallel epilogue adds the
// position-embedding rows and bias, casts, and writes every row to its place
// in the final (B, N, d) buffer: no padding, no per-tube tensors, no cat.
//
// Training saves the patch matrices (tube_tokens_with_patches) so that the
// backward's dW GEMM reads them instead of gathering again; without them the
// backward recomputes the gather. Either way it reduces dW over all tokens
// of a batch chunk in one GEMM, takes db from the same contiguous gradient rows,
// and scatters dP = G W back into dx in parallel over (b, c) planes, which
// never overlap, so accumulation of overlapping tubes is race-free and
// deterministic. bench/DESIGN.md has the measurements behind these choices.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../kernels/common.h"
#include "../options.h"
#include "../tube_tokens.h"
#include "patch_pool.h"

namespace tubevit {
namespace {

// Upper bound on one patch buffer: batches are processed in chunks so that
// the buffer stays cache- and memory-friendly for long videos / big batches
// (TUBEVIT_CPU_CHUNK_BYTES, csrc/options.h).
int64_t chunk_bytes() { return static_cast<int64_t>(options().cpu_chunk_bytes); }

// Patch workspace reused across calls by the calling thread. A fresh
// multi-megabyte allocation is new pages every call, and first-touch page
// faults cost about as much as the gather itself. Holds at most
// chunk_bytes() (or one sample, if larger) per thread that calls the op.
// 64-byte aligned (c10::alloc_cpu): oneDNN's bf16 GEMM takes a much slower
// path when its A operand is not (the four paper-tube GEMMs at B = 4:
// 3.7-4.1 ms from a 16- or 32-byte aligned buffer vs 2.4 ms from a 64-byte
// aligned one, dev VM); a std::vector only guarantees malloc's 16 bytes.
// Contents are not initialised: every user writes before it reads.
struct Workspace {
  void* ptr = nullptr;
  int64_t bytes = 0;
  Workspace() = default;
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  ~Workspace() { c10::free_cpu(ptr); }
};

template <typename acc_t, int Slot = 0>
acc_t* patch_workspace(int64_t elems) {
  static thread_local Workspace w;
  const int64_t bytes = elems * static_cast<int64_t>(sizeof(acc_t));
  if (w.bytes < bytes) {
    c10::free_cpu(w.ptr);  // free first: never hold both
    w.ptr = nullptr;
    w.bytes = 0;
    w.ptr = c10::alloc_cpu(static_cast<size_t>(bytes));  // throws on failure
    w.bytes = bytes;
  }
  return static_cast<acc_t*>(w.ptr);
}

// Samples per chunk so that neither the patch rows (n x K) nor the GEMM
// result rows (n x d) of a chunk exceed chunk_bytes().
int64_t batch_chunk(const TubeGeom& g, int64_t batch, size_t elem_size, int64_t dim) {
  const int64_t per_sample =
      std::max<int64_t>(1, g.num_tokens * std::max(g.patch_size, dim) * int64_t(elem_size));
  return std::max<int64_t>(1, std::min<int64_t>(batch, chunk_bytes() / per_sample));
}

// Weight i (d, C, kt, kh, kw) as the (d, K) matrix its GEMMs read, in dtype
// dt: a view when it already is one (one tensor op instead of reshape + to,
// which matters when the GEMMs are tiny and the call's cost is its host
// code, bench/host_overhead.py).
at::Tensor weight_matrix(const at::Tensor& w, int64_t d, int64_t K, at::ScalarType dt) {
  if (w.scalar_type() == dt && w.is_contiguous()) return w.as_strided({d, K}, {K, 1});
  return w.reshape({d, K}).to(dt);
}

// Strided view of one input sample; strides in elements.
template <typename scalar_t>
struct InputView {
  const scalar_t* data;
  Strides5 s;
};

template <typename scalar_t>
InputView<scalar_t> input_view(const at::Tensor& x) {
  return {x.const_data_ptr<scalar_t>(), strides_of(x)};
}

// Pointer to the first voxel read by token `tok` of tube `g` in sample b.
template <typename scalar_t>
const scalar_t* token_origin(const InputView<scalar_t>& v, const TubeGeom& g,
                             int64_t b, int64_t tok) {
  return v.data + b * v.s.b + token_origin_offset(g, tok, v.s.t, v.s.h, v.s.w);
}

// Input offset (elements) of every patch row (c, kt, kh) relative to the
// token's first voxel; a patch is channels * kt * kh rows of kw voxels.
template <typename scalar_t>
std::vector<int64_t> patch_row_offsets(const InputView<scalar_t>& v, const TubeGeom& g,
                                       int64_t channels) {
  std::vector<int64_t> off;
  off.reserve(channels * g.k[0] * g.k[1]);
  for (int64_t c = 0; c < channels; ++c)
    for (int64_t a = 0; a < g.k[0]; ++a)
      for (int64_t h = 0; h < g.k[1]; ++h) off.push_back(c * v.s.c + a * v.s.t + h * v.s.h);
  return off;
}

// KW > 0: rows of exactly KW unit-stride voxels, a fixed-size copy the
// compiler turns into a few vector moves (memcpy of 16-64 bytes through a
// call was the gather's main cost). KW == 0: any width, any stride.
template <int KW, typename scalar_t, typename acc_t>
void gather_rows(const InputView<scalar_t>& v, const TubeGeom& g, const int64_t* row_off,
                 int64_t rows, int64_t b0, int64_t nb, acc_t* dst) {
  const int64_t n = g.num_tokens, K = g.patch_size, kw = g.k[2], sW = v.s.w;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1));
  at::parallel_for(0, nb * n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* src0 = token_origin(v, g, b0 + r / n, r % n);
      acc_t* out = dst + r * K;
      // Prefetch the rows of the token after next: the gather reads short
      // runs scattered over the video and was bound by load latency (with
      // cold inputs: 2.4 -> 1.5 ms per paper-tube forward at B = 4; the
      // distance, 1 to 6 tokens, barely matters).
      if (r + 2 < end) {
        const scalar_t* next = token_origin(v, g, b0 + (r + 2) / n, (r + 2) % n);
        for (int64_t q = 0; q < rows; ++q) __builtin_prefetch(next + row_off[q]);
      }
      for (int64_t q = 0; q < rows; ++q) {
        const scalar_t* src = src0 + row_off[q];
        if constexpr (KW > 0) {
          for (int w = 0; w < KW; ++w) out[w] = static_cast<acc_t>(src[w]);
          out += KW;
        } else {
          for (int64_t w = 0; w < kw; ++w) out[w] = static_cast<acc_t>(src[w * sW]);
          out += kw;
        }
      }
    }
  });
}

// Fills rows [0, nb * n) of `dst` (row-major, K = patch_size columns, K laid
// out (c, kt, kh, kw) like weight.reshape(d, K)) with the patches of samples
// b0 .. b0 + nb - 1, converting to acc_t.
template <typename scalar_t, typename acc_t>
void gather_patches(const InputView<scalar_t>& v, const TubeGeom& g,
                    int64_t channels, int64_t b0, int64_t nb, acc_t* dst) {
  const std::vector<int64_t> off = patch_row_offsets(v, g, channels);
  const int64_t rows = static_cast<int64_t>(off.size());
  const int64_t kw = v.s.w == 1 ? g.k[2] : 0;
#define TUBEVIT_GATHER_CASE(KW) \
  case KW:                      \
    return gather_rows<KW, scalar_t, acc_t>(v, g, off.data(), rows, b0, nb, dst);
  switch (kw) {
    TUBEVIT_GATHER_CASE(1)
    TUBEVIT_GATHER_CASE(2)
    TUBEVIT_GATHER_CASE(4)
    TUBEVIT_GATHER_CASE(8)
    TUBEVIT_GATHER_CASE(12)
    TUBEVIT_GATHER_CASE(16)
    TUBEVIT_GATHER_CASE(32)
    default:
      return gather_rows<0, scalar_t, acc_t>(v, g, off.data(), rows, b0, nb, dst);
  }
#undef TUBEVIT_GATHER_CASE
}

// dx[b] += scatter of dP rows (nb * n rows of K) for samples b0 .. b0+nb-1.
// dx is contiguous (B, C, T, H, W) in acc_t. Parallel over (b, c) planes:
// a plane is written by exactly one thread, in a fixed token order.
template <typename src_t, typename acc_t>
void scatter_patches(const src_t* dP, const TubeGeom& g, int64_t channels,
                     int64_t b0, int64_t nb, acc_t* dx, const int64_t* size) {
  const int64_t n = g.num_tokens, K = g.patch_size;
  const int64_t T = size[0], H = size[1], W = size[2];
  const int64_t sH = W, sT = H * W, sC = T * H * W, sB = channels * sC;
  const int64_t kt = g.k[0], kh = g.k[1], kw = g.k[2];
  const int64_t kplane = kt * kh * kw;
  at::parallel_for(0, nb * channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bc = begin; bc < end; ++bc) {
      const int64_t bl = bc / channels, c = bc % channels;
      acc_t* plane = dx + (b0 + bl) * sB + c * sC;
      for (int64_t tok = 0; tok < n; ++tok) {
        const int64_t iw = tok % g.n[2];
        const int64_t ih = (tok / g.n[2]) % g.n[1];
        const int64_t it = tok / (g.n[2] * g.n[1]);
        acc_t* dst0 = plane + (g.o[0] + g.s[0] * it) * sT +
                      (g.o[1] + g.s[1] * ih) * sH + (g.o[2] + g.s[2] * iw);
        const src_t* src = dP + (bl * n + tok) * K + c * kplane;
        for (int64_t a = 0; a < kt; ++a) {
          for (int64_t h = 0; h < kh; ++h) {
            acc_t* dst = dst0 + a * sT + h * sH;
            for (int64_t w = 0; w < kw; ++w) dst[w] += static_cast<acc_t>(src[w]);
            src += kw;
          }
        }
      }
    }
  });
}

// Copies the gradient rows of one tube's batch chunk (samples b0 ..
// b0 + nb - 1) from grad (B, N, d) into dst (nb * n, d) row-major: rows of
// d contiguous elements, so a memcpy each (libc's is vectorised for the
// CPU it runs on; the extension is built for baseline x86-64).
template <typename gemm_t>
void copy_grad_rows(const gemm_t* grad, const TubeGeom& g, const TubeLayout& L, int64_t b0,
                    int64_t nb, gemm_t* dst) {
  const int64_t n = g.num_tokens, d = L.dim;
  at::parallel_for(0, nb * n, std::max<int64_t>(1, 16384 / d), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const gemm_t* src = grad + ((b0 + r / n) * L.num_tokens + g.token_offset + r % n) * d;
      std::memcpy(dst + r * d, src, sizeof(gemm_t) * d);
    }
  });
}

// bf16 <-> fp32 on the raw bits, branch-free so that the compiler
// vectorises the epilogue below (c10::BFloat16's conversions are scalar and
// branchy, and the extension is built for baseline x86-64). Rounding is
// c10's: nearest-even, NaN -> 0x7FC0.
inline float bf16_bits_to_float(uint16_t b) {
  const uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint16_t float_to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint32_t rounded = (u + UINT32_C(0x7FFF) + ((u >> 16) & 1u)) >> 16;
  return (u & UINT32_C(0x7FFFFFFF)) > UINT32_C(0x7F800000) ? uint16_t(0x7FC0) : uint16_t(rounded);
}

// One bf16 output row of the epilogue: dst = bf16(src + pe + bias), pe and
// bias optional. Cloned per instruction set and picked at load time (ifunc);
// on the dev VM its share of a bf16 training step's CPU samples fell from
// 4.0 % (generic loop) to 2.6 %, the rest being the memory traffic.
__attribute__((target_clones("avx512f", "avx2", "default"))) void bf16_epilogue_row(
    const uint16_t* src, const uint16_t* pe, const float* bias, uint16_t* dst, int64_t d) {
  if (pe != nullptr && bias != nullptr) {
    for (int64_t j = 0; j < d; ++j)
      dst[j] = float_to_bf16_bits(bf16_bits_to_float(src[j]) + bf16_bits_to_float(pe[j]) + bias[j]);
  } else if (pe != nullptr) {
    for (int64_t j = 0; j < d; ++j) dst[j] = float_to_bf16_bits(bf16_bits_to_float(src[j]) + bf16_bits_to_float(pe[j]));
  } else if (bias != nullptr) {
    for (int64_t j = 0; j < d; ++j) dst[j] = float_to_bf16_bits(bf16_bits_to_float(src[j]) + bias[j]);
  } else {
    for (int64_t j = 0; j < d; ++j) dst[j] = src[j];
  }
}

// out[b, off + t, :] = cast(tmp[r, :] + pe[t, :] + bias) for the rows
// r = (b - b0) * n + t of one chunk; pe (this tube's n x d rows, in the
// input dtype) and bias (fp32) may each be absent. The GEMM result is still
// in cache, so this pass is cheap; it replaces a copy of bias/pe into the
// output (beta = 1) plus a cat, and reads pe in place (no per-call n x d
// temporary).
template <typename scalar_t, typename res_t, typename acc_t>
void store_rows(const res_t* tmp, const scalar_t* pe, const acc_t* bias, const TubeGeom& g,
                const TubeLayout& L, int64_t b0, int64_t nb, scalar_t* out) {
  const int64_t n = g.num_tokens, d = L.dim;
  at::parallel_for(0, nb * n, std::max<int64_t>(1, 4096 / d), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = b0 + r / n, t = r % n;
      scalar_t* dst = out + (b * L.num_tokens + g.token_offset + t) * d;
      const res_t* src = tmp + r * d;
      const scalar_t* pr = pe == nullptr ? nullptr : pe + t * d;
      if constexpr (std::is_same<scalar_t, at::BFloat16>::value && std::is_same<res_t, at::BFloat16>::value &&
                    std::is_same<acc_t, float>::value) {
        bf16_epilogue_row(reinterpret_cast<const uint16_t*>(src), reinterpret_cast<const uint16_t*>(pr), bias,
                          reinterpret_cast<uint16_t*>(dst), d);
        continue;
      }
      // one loop per case keeps each inner loop branch-free (vectorisable)
      if (pr != nullptr && bias != nullptr) {
        for (int64_t j = 0; j < d; ++j)
          dst[j] = static_cast<scalar_t>(static_cast<acc_t>(src[j]) + static_cast<acc_t>(pr[j]) + bias[j]);
      } else if (pr != nullptr) {
        for (int64_t j = 0; j < d; ++j)
          dst[j] = static_cast<scalar_t>(static_cast<acc_t>(src[j]) + static_cast<acc_t>(pr[j]));
      } else if (bias != nullptr) {
        for (int64_t j = 0; j < d; ++j) dst[j] = static_cast<scalar_t>(static_cast<acc_t>(src[j]) + bias[j]);
      } else {
        for (int64_t j = 0; j < d; ++j) dst[j] = static_cast<scalar_t>(static_cast<acc_t>(src[j]));
      }
    }
  });
}

// gemm_t: the type the GEMM operands are gathered in. opmath (fp32 for
// half/bf16) in general; bf16 itself where oneDNN has fast bf16 GEMMs
// (AVX512-BF16 / AMX: ~5x the fp32 rate on the dev VM), with fp32
// accumulation inside the GEMM and bias/pe added in fp32 by the epilogue.
//
// saved != nullptr: also return every tube's patch matrix (B, n, K) in the
// input dtype. The gather then writes there instead of into the workspace
// (and the GEMM reads it in place when gemm_t is the input dtype), so the
// result is bitwise the same as without saving.
template <typename scalar_t, typename gemm_t>
void forward_impl(const at::Tensor& x, at::TensorList weights,
                  at::TensorList biases, const c10::optional<at::Tensor>& pos_embed,
                  const TubeLayout& L, at::Tensor& out, std::vector<at::Tensor>* saved) {
  constexpr bool same_t = std::is_same<gemm_t, scalar_t>::value;
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc_opts = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const auto gemm_opts = x.options().dtype(c10::CppTypeToScalarType<gemm_t>::value);
  const auto v = input_view<scalar_t>(x);
  const bool has_pe = pos_embed.has_value() && pos_embed->defined();
  const at::Tensor pe = has_pe ? pos_embed->contiguous() : at::Tensor();
  // Two workspaces for all tubes: patches (rows x K) and the GEMM result
  // (rows x d); each tube's batch chunk is one GEMM with M = chunk * n rows,
  // which keeps BLAS at its large-matrix rate (per-sample GEMMs, M = n, ran
  // ~15% slower here).
  int64_t p_elems = 0, r_elems = 0;
  for (const auto& g : L.tubes) {
    const int64_t rows = batch_chunk(g, L.batch, sizeof(gemm_t), L.dim) * g.num_tokens;
    p_elems = std::max(p_elems, rows * g.patch_size);
    r_elems = std::max(r_elems, rows * L.dim);
  }
  // Saving patches of the GEMM dtype: the GEMM reads them in place.
  gemm_t* pbuf = saved != nullptr && same_t ? nullptr : patch_workspace<gemm_t, 0>(p_elems);
  gemm_t* rbuf = patch_workspace<gemm_t, 1>(r_elems);
  for (size_t i = 0; i < L.tubes.size(); ++i) {
    const TubeGeom& g = L.tubes[i];
    const int64_t n = g.num_tokens, K = g.patch_size;
    // (K, d) view of the weight; BLAS reads the transpose without a copy.
    const at::Tensor wt = weight_matrix(weights[i], L.dim, K, c10::CppTypeToScalarType<gemm_t>::value).t();
    // Epilogue operands: this tube's pe rows (read in place) and the bias (fp32).
    const scalar_t* pe_rows = has_pe ? pe.const_data_ptr<scalar_t>() + g.token_offset * L.dim : nullptr;
    at::Tensor bias;
    if (!biases.empty())
      bias = biases[i].scalar_type() == c10::CppTypeToScalarType<acc_t>::value && biases[i].is_contiguous()
                 ? biases[i]
                 : biases[i].to(acc_opts.dtype()).contiguous();
    const int64_t chunk = batch_chunk(g, L.batch, sizeof(gemm_t), L.dim);
    if (saved != nullptr) saved->push_back(pooled_empty({L.batch, n, K}, x.options()));
    for (int64_t b0 = 0; b0 < L.batch; b0 += chunk) {
      const int64_t nb = std::min(chunk, L.batch - b0);
      at::Tensor p = pbuf == nullptr ? at::Tensor() : at::from_blob(pbuf, {nb * n, K}, gemm_opts);
      if (saved == nullptr) {
        gather_patches<scalar_t, gemm_t>(v, g, L.channels, b0, nb, pbuf);
      } else {
        const at::Tensor keep = saved->back().view({L.batch * n, K}).narrow(0, b0 * n, nb * n);
        gather_patches<scalar_t, scalar_t>(v, g, L.channels, b0, nb, keep.mutable_data_ptr<scalar_t>());
        if (same_t) p = keep;
        else p.copy_(keep);
      }
      at::Tensor res = at::from_blob(rbuf, {nb * n, L.dim}, gemm_opts);
      at::mm_out(res, p, wt);
      store_rows<scalar_t, gemm_t, acc_t>(rbuf, pe_rows, bias.defined() ? bias.const_data_ptr<acc_t>() : nullptr,
                                          g, L, b0, nb, out.mutable_data_ptr<scalar_t>());
    }
  }
}

// gemm_t as in forward_impl; accumulation across batch chunks and of dx
// is in opmath (fp32) either way.
// patches: empty (gather from x) or the checked (B, n_i, K_i) patch
// matrices of the forward, read chunk by chunk exactly where the gather
// would have written, so dW is bitwise the same either way — except for
// 16-bit GEMMs, which read saved patches in one whole-batch chunk (below).
template <typename scalar_t, typename gemm_t>
void backward_impl(const at::Tensor& grad_out, const at::Tensor& x,
                   at::TensorList weights, at::TensorList patches, const TubeLayout& L, bool need_dx,
                   bool need_dw, bool need_db, at::Tensor& dx,
                   std::vector<at::Tensor>& dws, std::vector<at::Tensor>& dbs) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  const auto gemm_dtype = c10::CppTypeToScalarType<gemm_t>::value;
  const auto v = input_view<scalar_t>(x);
  const at::Tensor grad = grad_out.to(gemm_dtype).contiguous();  // (B, N, d)
  const gemm_t* grad_ptr = grad.const_data_ptr<gemm_t>();
  // The input gradient (and its fp32 accumulator for 16-bit inputs) comes
  // from the pool: as large as the video, fresh pages every step cost ~10x
  // the zero fill itself (patch_pool.h).
  const std::vector<int64_t> x_sizes{L.batch, L.channels, L.size[0], L.size[1], L.size[2]};
  at::Tensor dx_acc;
  if (need_dx) dx_acc = pooled_empty(x_sizes, x.options().dtype(acc_dtype)).zero_();
  for (size_t i = 0; i < L.tubes.size(); ++i) {
    const TubeGeom& g = L.tubes[i];
    const int64_t n = g.num_tokens, K = g.patch_size;
    const at::Tensor w = weight_matrix(weights[i], L.dim, K, gemm_dtype);
    // Accumulators start at the first chunk's result (no zero fill of d x K);
    // zeros only when there is no chunk at all (batch 0).
    at::Tensor dw_acc;
    if (L.batch == 0 && need_dw) dw_acc = at::zeros({L.dim, K}, w.options().dtype(acc_dtype));
    at::Tensor db_acc;
    if (L.batch == 0 && need_db) db_acc = at::zeros({L.dim}, w.options().dtype(acc_dtype));
    const bool read_saved = !patches.empty() && std::is_same<gemm_t, scalar_t>::value;
    // 16-bit GEMMs reading saved patches: one chunk, i.e. ONE dW GEMM over
    // the whole batch. Chunk by chunk, every partial dW would come back
    // rounded to 16 bits and be converted and added in fp32 — a d x K pass
    // per chunk that made bf16 training up to 1.6x slower than unfold_gemm
    // for big tubes (8x32x32, K = 24576; bench/DESIGN.md) — while the single
    // GEMM accumulates in fp32 inside oneDNN and rounds once. The saved
    // patches bound nothing here; the gradient rows (and dP) of the whole
    // batch then live in pooled temporaries rather than in the thread-local
    // workspaces, which would keep their size.
    const bool whole_batch = read_saved && need_dw && !std::is_same<gemm_t, acc_t>::value;
    const int64_t chunk = whole_batch ? L.batch : batch_chunk(g, L.batch, sizeof(gemm_t), L.dim);
    const at::Tensor saved_i = need_dw && !patches.empty() ? patches[i].contiguous() : at::Tensor();
    gemm_t* buf = need_dw && !read_saved ? patch_workspace<gemm_t>(chunk * n * K) : nullptr;
    // Gradient rows and dP: thread-local like the patch buffer (a fresh
    // allocation per call costs more in page faults than the copy itself),
    // or pooled whole-batch temporaries.
    at::Tensor whole_g, whole_dp;
    if (whole_batch) {
      whole_g = pooled_empty({chunk * n, L.dim}, w.options());
      if (need_dx) whole_dp = pooled_empty({chunk * n, K}, w.options());
    }
    gemm_t* gbuf = whole_batch ? whole_g.mutable_data_ptr<gemm_t>() : patch_workspace<gemm_t, 2>(chunk * n * L.dim);
    gemm_t* dpbuf = !need_dx ? nullptr
                    : whole_batch ? whole_dp.mutable_data_ptr<gemm_t>()
                                  : patch_workspace<gemm_t, 3>(chunk * n * K);
    for (int64_t b0 = 0; b0 < L.batch; b0 += chunk) {
      const int64_t nb = std::min(chunk, L.batch - b0);
      // (nb * n, d) contiguous copy of the tube's gradient rows: the dW GEMM
      // then reduces over all tokens of the chunk at once, and db is a
      // contiguous column sum.
      copy_grad_rows<gemm_t>(grad_ptr, g, L, b0, nb, gbuf);
      const at::Tensor gc = at::from_blob(gbuf, {nb * n, L.dim}, w.options());
      if (need_db) {
        // 16-bit rows: ATen's sum accumulates them in fp32 internally, but
        // asking it for an fp32 result first copies all rows to fp32 (1.5 ms
        // of a 9.4 ms bf16 training step at B = 4); its 16-bit result is
        // rounded once, like the returned gradient (extra rounding only
        // between batch chunks).
        const at::Tensor s = std::is_same<gemm_t, acc_t>::value ? at::sum(gc, {0}, false, acc_dtype)
                                                                : at::sum(gc, {0}).to(acc_dtype);
        if (db_acc.defined()) db_acc.add_(s);
        else db_acc = s;
      }
      if (need_dw) {
        at::Tensor p = read_saved ? at::Tensor() : at::from_blob(buf, {nb * n, K}, w.options());
        if (patches.empty()) {
          gather_patches<scalar_t, gemm_t>(v, g, L.channels, b0, nb, buf);
        } else {
          const at::Tensor keep = saved_i.view({L.batch * n, K}).narrow(0, b0 * n, nb * n);
          if (std::is_same<gemm_t, scalar_t>::value) p = keep;
          else p.copy_(keep);
        }
        if (std::is_same<gemm_t, acc_t>::value || nb == L.batch) {
          // fp32 GEMM, or a low-precision one covering the whole batch
          // (the common case): its result is the gradient, no conversions
          if (dw_acc.defined()) dw_acc.addmm_(gc.t(), p);
          else dw_acc = at::mm(gc.t(), p);
        } else {  // low-precision GEMM over several chunks: summed in fp32
          // (fp32 += 16-bit converts on the fly: no d x K fp32 temporary)
          const at::Tensor part = at::mm(gc.t(), p);
          if (dw_acc.defined()) dw_acc.add_(part);
          else dw_acc = part.to(acc_dtype);
        }
      }
      if (need_dx) {
        at::Tensor dP = at::from_blob(dpbuf, {nb * n, K}, w.options());
        at::mm_out(dP, gc, w);
        scatter_patches<gemm_t, acc_t>(dP.const_data_ptr<gemm_t>(), g, L.channels, b0, nb,
                                       dx_acc.data_ptr<acc_t>(), L.size);
      }
    }
    if (need_dw) dws.push_back(dw_acc.view(weights[i].sizes()).to(x.scalar_type()));
    if (need_db) dbs.push_back(db_acc.to(x.scalar_type()));
  }
  if (need_dx) {
    if (dx_acc.scalar_type() == x.scalar_type()) {
      dx = dx_acc;
    } else {
      dx = pooled_empty(x_sizes, x.options());
      dx.copy_(dx_acc);
    }
  }
}

// Whether bf16 GEMMs run natively (oneDNN with AVX512-BF16 / AMX). Without
// them ATen's bf16 matmul can be slower than fp32, so bf16 inputs are then
// gathered into fp32 instead. Asked once, through the dispatcher, from the
// op torch itself uses for this question.
bool fast_bf16_gemm() {
  static const bool ok = [] {
    if (!at::globalContext().userEnabledMkldnn()) return false;
    const auto op = c10::Dispatcher::singleton().findSchema({"mkldnn::_is_mkldnn_bf16_supported", ""});
    return op.has_value() && op->typed<bool()>().call();
  }();
  return ok;
}

void forward_dispatch(const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                      const c10::optional<at::Tensor>& pos_embed, const TubeLayout& L,
                      at::Tensor& out, std::vector<at::Tensor>* saved) {
  if (x.scalar_type() == at::kBFloat16 && fast_bf16_gemm()) {
    forward_impl<at::BFloat16, at::BFloat16>(x, weights, biases, pos_embed, L, out, saved);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                  "tube_tokens_cpu", [&] {
    forward_impl<scalar_t, at::opmath_type<scalar_t>>(x, weights, biases, pos_embed, L, out, saved);
  });
}

at::Tensor tube_tokens_cpu(const at::Tensor& x, at::TensorList weights,
                           at::TensorList biases, at::IntArrayRef tubes,
                           const c10::optional<at::Tensor>& pos_embed) {
  const TubeLayout L = check_forward_args(x, weights, biases, tubes, pos_embed);
  // From the pool: above glibc's largest mmap threshold (32 MiB: B = 32 at
  // d = 768) a fresh output is fresh pages every call, ~9 % of the forward.
  at::Tensor out = pooled_empty({L.batch, L.num_tokens, L.dim}, x.options());
  if (out.numel() == 0) return out;
  forward_dispatch(x, weights, biases, pos_embed, L, out, nullptr);
  return out;
}

std::tuple<at::Tensor, std::vector<at::Tensor>> tube_tokens_with_patches_cpu(
    const at::Tensor& x, at::TensorList weights, at::TensorList biases, at::IntArrayRef tubes,
    const c10::optional<at::Tensor>& pos_embed) {
  const TubeLayout L = check_forward_args(x, weights, biases, tubes, pos_embed);
  at::Tensor out = pooled_empty({L.batch, L.num_tokens, L.dim}, x.options());  // as above
  std::vector<at::Tensor> patches;
  if (out.numel() == 0) {  // nothing to gather; the shapes still hold
    for (const auto& g : L.tubes) patches.push_back(at::empty({L.batch, g.num_tokens, g.patch_size}, x.options()));
    return {out, patches};
  }
  forward_dispatch(x, weights, biases, pos_embed, L, out, &patches);
  return {out, patches};
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>
tube_tokens_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                         at::TensorList weights, at::TensorList patches, at::IntArrayRef tubes,
                         std::array<bool, 3> output_mask) {
  const TubeLayout L = check_backward_args(grad_out, x, weights, tubes);
  check_patches(patches, x, L);
  at::Tensor dx = at::empty({0}, x.options());
  std::vector<at::Tensor> dws, dbs;
  if (x.scalar_type() == at::kBFloat16 && fast_bf16_gemm()) {
    backward_impl<at::BFloat16, at::BFloat16>(grad_out, x, weights, patches, L, output_mask[0], output_mask[1],
                                              output_mask[2], dx, dws, dbs);
    return {dx, dws, dbs};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                  "tube_tokens_backward_cpu", [&] {
    backward_impl<scalar_t, at::opmath_type<scalar_t>>(grad_out, x, weights, patches, L, output_mask[0],
                                                        output_mask[1], output_mask[2], dx, dws, dbs);
  });
  return {dx, dws, dbs};
}

}  // namespace

TORCH_LIBRARY_IMPL(tubevit, CPU, m) {
  m.impl("tube_tokens", &tube_tokens_cpu);
  m.impl("tube_tokens_backward", &tube_tokens_backward_cpu);
  m.impl("tube_tokens_with_patches", &tube_tokens_with_patches_cpu);
}

}  // namespace tubevit
