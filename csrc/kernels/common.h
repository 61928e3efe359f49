// Helpers every kernel family uses (the naive per-element kernels, the GEMM
// path, the tensor-core kernels, the input-gradient kernels, the bias
// gradient), defined once. Host + device where marked TUBEVIT_HD; the CPU
// test ops run the same code.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "tube_geometry.h"
#include "tube_tokens.h"

// Unroll the next loop in device code (its trip count a constant): keeps
// small per-thread arrays in registers. Host compilers are left to choose.
// TUBEVIT_NO_UNROLL keeps a loop rolled (one that usually runs 0 or 1 times,
// where unrolled copies would only cost registers).
#if defined(__CUDA_ARCH__)
#define TUBEVIT_UNROLL _Pragma("unroll")
#define TUBEVIT_NO_UNROLL _Pragma("unroll 1")
#else
#define TUBEVIT_UNROLL
#define TUBEVIT_NO_UNROLL
#endif

namespace tubevit {

// Every kernel takes its per-tube geometry and pointers by value in fixed
// arrays (CUDA kernel parameter space: under 4 KiB at 16 tubes), so one
// launch covers all tubes. A call with more tubes takes the path that has no
// such limit (the CPU backend) or raises, naming the limit.
constexpr int kMaxTubes = 16;

// Input strides in elements: x is read in place, whatever its layout.
struct Strides5 {
  int64_t b, c, t, h, w;
};

inline Strides5 strides_of(const at::Tensor& x) {
  return {x.stride(0), x.stride(1), x.stride(2), x.stride(3), x.stride(4)};
}

inline std::vector<at::Tensor> contiguous_all(at::TensorList ts) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(t.contiguous());
  return out;
}

// fp16, bf16 and fp32: the dtypes of the tensor-core kernels (fp32 as TF32)
// and of the input-gradient kernels that read their fp32 dP.
#define TUBEVIT_DISPATCH_HALF_BF16_FLOAT(TYPE, NAME, ...)                 \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__))

// Unsigned 32-bit division by a divisor fixed at launch time, as a multiply
// and a shift (Granlund & Montgomery; ATen's IntDivider is the same idea):
// integer division is a ~20-instruction routine on the GPU, and the GEMM
// path's gather divides seven times per element. Exact for n < 2^32 and
// 1 <= d < 2^31.
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

#if !defined(__CUDA_ARCH__)
// Host emulations of the kernels: the byte ranges their device reads may
// touch, registered by an emulator for the tensors it hands the tile code
// (HostReadScope); the host builds of the copy helpers check every source
// against them. None registered: unchecked.
inline std::vector<std::pair<uintptr_t, uintptr_t>>& host_read_ranges() {
  static thread_local std::vector<std::pair<uintptr_t, uintptr_t>> ranges;
  return ranges;
}

inline void check_host_read(const void* src, size_t bytes) {
  const auto& ranges = host_read_ranges();
  if (ranges.empty()) return;
  const uintptr_t a = reinterpret_cast<uintptr_t>(src);
  for (const auto& r : ranges)
    if (a >= r.first && a + bytes <= r.second) return;
  TORCH_CHECK(false, "a ", bytes, "-byte read outside every tensor the kernel was given");
}

// Registers [begin, end) byte ranges for the scope's lifetime.
class HostReadScope {
 public:
  explicit HostReadScope(std::vector<std::pair<uintptr_t, uintptr_t>> ranges) {
    host_read_ranges() = std::move(ranges);
  }
  ~HostReadScope() { host_read_ranges().clear(); }
  HostReadScope(const HostReadScope&) = delete;
  HostReadScope& operator=(const HostReadScope&) = delete;
};
#endif

// V contiguous elements, aligned for one access of their size (callers keep
// V * sizeof(scalar_t) <= 16).
template <typename scalar_t, int V>
struct alignas(V * sizeof(scalar_t)) Vec {
  scalar_t v[V];
};

// V elements from src to dst: one 16-, 8- or 4-byte access on the GPU (both
// sides aligned to that size: callers check, see gemm::vec_width and
// gemm::gather_vec_width), element by element for other sizes; memcpy on
// the host.
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
  // the host emulations check what the GPU needs: both sides aligned to a one-access width
  constexpr int kBytes = V * int(sizeof(scalar_t));
  if constexpr (kBytes == 4 || kBytes == 8 || kBytes == 16) {
    TORCH_CHECK(reinterpret_cast<uintptr_t>(dst) % kBytes == 0 && reinterpret_cast<uintptr_t>(src) % kBytes == 0,
                "a ", kBytes, "-byte access between misaligned addresses");
  }
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

// The dP workspace of the input gradient, dP_i = G_i W_i (fp32), written by
// cuBLAS (GEMM path) or the tensor-core dP kernel and read by the dX gather
// or scatter (kernels/grad_input.h): tube i's (B n_i, K_i) block, row-major,
// starts at element dp_offset[i] = B * sum_{j<i} n_j K_j (the same blocks as
// the GEMM path's patch workspace P). tiles_before is the tensor-core dP
// kernel's grid (tc::make_dx_params fills it; zero elsewhere).
struct ParamsDX {
  TubeGeom g[kMaxTubes];
  const void* w[kMaxTubes];             // (d, K) row-major, scalar_t
  int64_t dp_offset[kMaxTubes];         // first element of tube i's (B n_i x K_i) block of dP
  int64_t tiles_before[kMaxTubes + 1];  // prefix of ceil(B n_i / BM) * ceil(K_i / BN)
  int n_tubes;
  int64_t B, N, d;
};

// The dP layout for L (weights w, may be null where only the layout is
// read); *dp_elems receives the workspace size in fp32 elements.
inline ParamsDX make_dp_layout(const TubeLayout& L, const void* const* w, int64_t* dp_elems) {
  TORCH_CHECK(L.tubes.size() <= size_t(kMaxTubes), "the input-gradient kernels take at most ", kMaxTubes,
              " tubes, got ", L.tubes.size());
  ParamsDX p{};
  p.n_tubes = static_cast<int>(L.tubes.size());
  p.B = L.batch;
  p.N = L.num_tokens;
  p.d = L.dim;
  int64_t off = 0;
  for (int i = 0; i < p.n_tubes; ++i) {
    const TubeGeom& g = L.tubes[i];
    p.g[i] = g;
    p.w[i] = w == nullptr ? nullptr : w[i];
    p.dp_offset[i] = off;
    off += L.batch * g.num_tokens * g.patch_size;
  }
  *dp_elems = off;
  return p;
}

}  // namespace tubevit
