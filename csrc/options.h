// Runtime switches of the library, read from the environment once (on first
// use) and kept in one struct; no other file calls getenv. Documented here
// and in the README's "Switches" section.
//
//   TUBEVIT_CUDA_PATH           auto (default) | gemm | tc | naive | hopper:
//                               overrides the CUDA planner's choice of
//                               kernels (csrc/cuda_plan.h, where the table of
//                               what each value does is). hopper asks for the
//                               prototype's sm_90a kernels (csrc/prototype/),
//                               which only a TUBEVIT_PROTOTYPE=1 build has;
//                               elsewhere it plans as auto.
//   TUBEVIT_CPU_CHUNK_BYTES     bytes: the CPU kernels process a batch in
//                               chunks whose patch (or GEMM result) rows stay
//                               under this (at least one sample per chunk).
//                               Default 32 MiB; the tests set it tiny to drive
//                               the cross-chunk accumulation paths.
//   TUBEVIT_CPU_PATCH_CACHE_MB  MiB of freed CPU patch buffers kept for reuse
//                               (cpu/patch_pool.h). Default 256; 0 turns the
//                               cache off.
//
// tubevit_ext.reload_options() (python) / reload_options() (C++) reads them
// again, for tests and benchmarks that change them in-process; it must not
// run while ops run on other threads.
#pragma once

#include <cstddef>

namespace tubevit {

enum class CudaPath { Auto, Gemm, TensorCore, Naive, Hopper };

struct Options {
  CudaPath cuda_path = CudaPath::Auto;
  long long cpu_chunk_bytes = 32ll << 20;
  size_t cpu_patch_cache_bytes = size_t(256) << 20;
};

// The switches as read from the environment (first call) or by the last
// reload_options(). Raises ValueError naming the variable for a value it
// does not know.
const Options& options();
void reload_options();

}  // namespace tubevit
