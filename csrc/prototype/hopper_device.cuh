// Device and launch helpers shared by the Hopper kernels (hopper_forward.cu,
// hopper_grad_weight.cu, hopper_grad_input.cu): torch -> CuTe 16-bit types, the producers' chunk
// copy, named barriers, the fp16 / bf16 dispatch, the shared-memory traits and the consumers' mainloop. The operand
// layouts and wgmma atoms: hopper_layouts.h.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cute/tensor.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/numeric_types.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include <cstdint>

#include "hopper_layouts.h"
#include "hopper_tiles.h"
#include "../cuda/cuda_launcher.cuh"

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

// One CTA's shared memory: kStages stages of the A and B operand tiles in
// layouts SmemA / SmemB (1024-byte aligned: the swizzle repeats every 1024
// bytes), what the kernel keeps besides (Extra), and the pipeline's barriers.
struct NoExtra {};
template <typename T, class SmemA_, class SmemB_, class Extra = NoExtra>
struct StageTraits {
  using SmemA = SmemA_;
  using SmemB = SmemB_;
  using Pipeline = cutlass::PipelineAsync<kStages>;
  struct Shared {
    alignas(1024) T a[cute::cosize_v<SmemA>];
    alignas(1024) T b[cute::cosize_v<SmemB>];
    Extra extra;
    typename Pipeline::SharedStorage pipe;
  };
  static constexpr size_t kSmemBytes = sizeof(Shared) + 1024;  // + the alignment of aligned_shared
};

// A consumer warpgroup's mainloop over `steps` pipeline stages (the
// protocol of CUTLASS's cp.async GMMA mainloop): wait for the stage, issue
// its wgmma (fragments tCrA / tCrB of (.., stage)), run per_stage(stage)
// while it runs (dW: the bias sums), then wait until only this step's wgmma
// is in flight and release the previous step's stage; the last stage is
// released after the final wait. acc is cleared by the caller.
template <class Pipeline, class State, class Mma, class FragA, class FragB, class Acc, class PerStage>
__device__ __forceinline__ void mma_stages(Pipeline& pipe, State& read, State& release, int64_t steps, const Mma& mma,
                                           const FragA& tCrA, const FragB& tCrB, Acc& acc,
                                           const PerStage& per_stage) {
  using namespace cute;
  for (int64_t k = 0; k < steps; ++k) {
    pipe.consumer_wait(read);
    const int stage = read.index();
    warpgroup_fence_operand(acc);
    warpgroup_arrive();
    gemm(mma, tCrA(_, _, _, stage), tCrB(_, _, _, stage), acc);
    warpgroup_commit_batch();
    per_stage(stage);
    warpgroup_wait<1>();  // the previous step's wgmma has read its stage
    warpgroup_fence_operand(acc);
    if (k > 0) {
      pipe.consumer_release(release);
      ++release;
    }
    ++read;
  }
  warpgroup_wait<0>();
  warpgroup_fence_operand(acc);
  if (steps > 0) {
    pipe.consumer_release(release);
    ++release;
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

// Whether a Hopper kernel whose CTA needs `smem` bytes of shared memory takes
// this call: built with sm_90a code, an sm_90 GPU that offers that much,
// fp16 / bf16, at most kMaxTubes tubes, d a multiple of 8 (the 16-byte
// chunks of output and gradient rows).
inline bool kernel_takes(const at::Tensor& x, const TubeLayout& L, size_t smem) {
#if defined(TUBEVIT_HOPPER_SM90A)
  const auto* prop = at::cuda::getDeviceProperties(x.device().index());
  const auto t = x.scalar_type();
  return prop->major == 9 && prop->minor == 0 && (t == at::kHalf || t == at::kBFloat16) &&
         L.tubes.size() <= size_t(kMaxTubes) && L.dim % 8 == 0 && prop->sharedMemPerBlockOptin >= smem;
#else
  (void)x;
  (void)L;
  (void)smem;
  return false;
#endif
}

// The CTA's stage pipeline over shared storage s (warpgroup 0 produces, the
// others consume), its barriers initialised by warp 0 and published to every
// thread before any waits on them.
template <class Traits>
__device__ __forceinline__ typename Traits::Pipeline start_pipeline(typename Traits::Shared& s, int warpgroup) {
  using Pipeline = typename Traits::Pipeline;
  Pipeline pipe(s.pipe, pipeline_params<Pipeline>(warpgroup, kProducerThreads, kConsumerThreads));
  __syncthreads();
  return pipe;
}

}  // namespace hopper
}  // namespace tubevit
