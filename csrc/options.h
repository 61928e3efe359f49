// Runtime switches of the library, read from the environment once (on first
// use) and kept in one struct. The only place they are documented besides
// the README's "Switches" section.
//
//   TUBEVIT_CUDA_PATH        auto (default) | gemm | tc | naive | hopper:
//                            which CUDA path the ops take
//                            (cuda/tube_tokens_cuda.cu, choose_path). auto
//                            picks by problem size; a forced path that does
//                            not apply to a call falls back as choose_path
//                            documents. hopper: the sm_90a wgmma forward,
//                            weight / bias gradients and input gradient
//                            (cuda/hopper/: dP by wgmma, then the dx
//                            writer of kernels/grad_input.h) where built and
//                            applicable, auto otherwise.
//   TUBEVIT_GEMM_GATHER_VEC  1: the GEMM path gathers V patch columns per
//                            thread (gemm::GatherVecElem). Default 0.
//   TUBEVIT_DX_SCATTER       1: the input gradient by per-tube scatter
//                            (dx::DxScatterElem) instead of the gather, on
//                            both fast CUDA paths. Default 0.
//   TUBEVIT_TC_MMA           1: the tensor-core forward and weight gradient
//                            of fp16 / bf16 (wherever the tc path runs) by
//                            the ldmatrix + mma.sync kernels
//                            (cuda/tube_tokens_mma.cu: 128 x 128 tiles, the
//                            forward's flattened across samples, three
//                            cp.async stages) where they apply
//                            (mma::supported, mma::grad_weight_supported),
//                            the WMMA kernels otherwise. Default 0.
//   TUBEVIT_CPU_CHUNK_BYTES  bytes: the CPU kernels process a batch in
//                            chunks whose patch (or GEMM result) rows stay
//                            under this (at least one sample per chunk).
//                            Default 32 MiB; the tests set it tiny to drive
//                            the cross-chunk accumulation paths.
//
// tubevit_ext.reload_options() (python) / reload_options() (C++) reads them
// again, for tests and benchmarks that change them in-process; it must not
// run while ops run on other threads.
#pragma once

namespace tubevit {

enum class CudaPath { Auto, Gemm, TensorCore, Naive, Hopper };

struct Options {
  CudaPath cuda_path = CudaPath::Auto;
  bool gemm_gather_vec = false;
  bool dx_scatter = false;
  bool tc_mma = false;
  long long cpu_chunk_bytes = 32ll << 20;
};

// The switches as read from the environment (first call) or by the last
// reload_options(). Raises ValueError naming the variable for a value it
// does not know.
const Options& options();
void reload_options();

}  // namespace tubevit
