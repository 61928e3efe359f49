// Device and launch helpers shared by the Hopper kernels (hopper_forward.cu,
// hopper_grad_weight.cu, hopper_grad_input.cu): torch -> CuTe 16-bit types, the producers' chunk
// copy, named barriers, the dynamic shared-memory opt-in and the fp16 / bf16
// dispatch. The operand layouts and wgmma atoms: kernels/hopper_layouts.h.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>

#include <cute/tensor.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/numeric_types.h>

#include <cstdint>
#include <mutex>

#include "../../kernels/hopper_layouts.h"
#include "../../kernels/hopper_tiles.h"

namespace tubevit {
namespace hopper {

// torch's 16-bit types and CuTe's share the bit layout; the kernels use CuTe's.
template <typename torch_t> struct CuteType;
template <> struct CuteType<at::Half> { using type = cutlass::half_t; };
template <> struct CuteType<at::BFloat16> { using type = cutlass::bfloat16_t; };

// f(T{}) with T the CuTe type of x's dtype (fp16 or bf16; callers check).
template <class F>
void dispatch_16bit(at::ScalarType t, const F& f) {
  switch (t) {
    case at::kHalf: f(cutlass::half_t{}); break;
    case at::kBFloat16: f(cutlass::bfloat16_t{}); break;
    default: TORCH_CHECK(false, "the Hopper kernels take fp16 or bf16, got ", t);
  }
}

// bar.sync on named barrier kId (0 is __syncthreads') among kCount threads:
// one warpgroup's or the consumers' barrier while the others run on.
template <int kId, int kCount>
__device__ __forceinline__ void named_sync() {
  asm volatile("bar.sync %0, %1;\n" ::"n"(kId), "n"(kCount) : "memory");
}

// One chunk of V elements from base[src] (src < 0: zeros) to shared dst: a
// zero-filling cp.async of 2V bytes (V = 8, 4, 2), or a plain load and
// shared store (V = 1; the caller fences before handing the stage over).
template <int V, typename T>
__device__ __forceinline__ void copy_chunk(T* dst, const T* base, int64_t src) {
  if constexpr (V == 1) {
    *dst = src >= 0 ? base[src] : T(0.f);
  } else {
    constexpr int kBytes = V * int(sizeof(T));
    const uint32_t d = cute::cast_smem_ptr_to_uint(dst);
    const T* g = src >= 0 ? base + src : base;  // not read when zero-filled
    const int n = src >= 0 ? kBytes : 0;
    if constexpr (kBytes == 16) {
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(g), "r"(n) : "memory");
    } else {
      asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(d), "l"(g), "n"(kBytes), "r"(n)
                   : "memory");
    }
  }
}

// Parameters of a warp-specialized CTA's stage pipeline (a CUTLASS
// PipelineAsync): warpgroup 0 produces, the others consume; warp 0
// initialises the barriers, which the caller's __syncthreads() then publishes.
template <class Pipeline>
__device__ __forceinline__ typename Pipeline::Params pipeline_params(int warpgroup, int producers, int consumers) {
  typename Pipeline::Params pp;
  pp.role = warpgroup == 0 ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
  pp.producer_arv_count = producers;
  pp.consumer_arv_count = consumers;
  pp.initializing_warp = 0;
  return pp;
}

// The CTA's shared storage: the dynamic allocation's start rounded up to
// 1024 bytes (the 128-byte swizzle repeats every 1024 bytes and is applied to
// address bits); launches ask for sizeof(Shared) + 1024.
template <class Shared>
__device__ __forceinline__ Shared& aligned_shared(char* raw) {
  return *reinterpret_cast<Shared*>((reinterpret_cast<uintptr_t>(raw) + 1023) & ~uintptr_t(1023));
}

// Raises `kernel`'s dynamic shared-memory limit to `bytes`, once per device;
// Tag: a type unique to the kernel instantiation.
template <class Tag>
void allow_smem(const void* kernel, size_t bytes, int device) {
  static std::once_flag flags[64];
  std::call_once(flags[device % 64], [&] {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
  });
}

}  // namespace hopper
}  // namespace tubevit
