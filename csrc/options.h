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
//   TUBEVIT_DX_PASS          gather (default) | scatter | writer: the pass
//                            that turns dP into the input gradient on both
//                            fast CUDA paths (cuda/grad_input_cuda.cu):
//                            the gather, the per-tube scatter
//                            (dx::DxScatterElem), or the writer (the
//                            gather's sums in the gather's order, 16-byte
//                            stores: the same bits). The Hopper path's
//                            input gradient always takes the writer.
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

// The dP -> dx pass (kernels/grad_input.h); numbered as the test op
// tubevit_testing::dx_from_dp's dx_pass argument.
enum class DxPass { Gather = 0, Scatter = 1, Writer = 2 };

struct Options {
  CudaPath cuda_path = CudaPath::Auto;
  bool gemm_gather_vec = false;
  DxPass dx_pass = DxPass::Gather;
  bool tc_mma = false;
  long long cpu_chunk_bytes = 32ll << 20;
};

// The switches as read from the environment (first call) or by the last
// reload_options(). Raises ValueError naming the variable for a value it
// does not know.
const Options& options();
void reload_options();

}  // namespace tubevit
