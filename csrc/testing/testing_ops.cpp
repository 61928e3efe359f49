// Schemas of the test-only ops (namespace tubevit_testing): the CUDA
// kernels' logic run on the CPU (and, for the naive kernels, on CUDA too),
// so that CPU-only CI checks the GPU code's index arithmetic against the
// fp64 reference. Not part of the public op surface; a build with
// TUBEVIT_TESTING_OPS=0 (setup.py) / -DTUBEVIT_TESTING_OPS=OFF (CMake)
// leaves this folder out. Fake kernels: tubevit_ext/testing.py.
#include <torch/library.h>

namespace tubevit {
bool hopper_swizzle_checked();  // testing/hopper_emulation.cpp
}

TORCH_LIBRARY(tubevit_testing, m) {
  // The same contract, always computed by the per-element kernels of
  // kernels/naive_kernels.h (on CPU: the CUDA kernels' code run in a host loop).
  // For testing the GPU kernels' logic; not differentiable.
  m.def(
      "tube_tokens_naive(Tensor x, Tensor[] weights, Tensor[] biases, int[] tubes, "
      "Tensor? pos_embed) -> Tensor");
  m.def(
      "tube_tokens_naive_backward(Tensor grad_out, Tensor x, Tensor[] weights, "
      "int[] tubes, bool[3] output_mask) -> (Tensor, Tensor[], Tensor[])");
  // The tensor-core kernels' tile code (kernels/tc_tiles.h) run on the CPU with an
  // emulated MMA (testing/tc_emulation.cpp): the forward output and the weight
  // and input gradients those kernels compute, for fp16, bf16 and fp32-as-TF32.
  // Test-only, CPU-only, not differentiable.
  m.def(
      "tube_tokens_tc_emulated(Tensor x, Tensor[] weights, Tensor[] biases, int[] tubes, "
      "Tensor? pos_embed) -> Tensor");
  m.def("tube_tokens_tc_emulated_dw(Tensor grad_out, Tensor x, Tensor[] weights, int[] tubes) -> Tensor[]");
  m.def("tube_tokens_tc_emulated_dx(Tensor grad_out, Tensor x, Tensor[] weights, int[] tubes) -> Tensor");
  // The ldmatrix + mma.sync forward's tile code (kernels/mma_tiles.h) run on the CPU
  // with ldmatrix and mma.sync emulated from their PTX fragment layouts
  // (testing/mma_emulation.cpp), fp16 and bf16. Test-only, CPU-only, not differentiable.
  m.def(
      "tube_tokens_mma_emulated(Tensor x, Tensor[] weights, Tensor[] biases, int[] tubes, "
      "Tensor? pos_embed) -> Tensor");
  // The mma weight gradient the same way (ldmatrix.trans; `target`: the tile count its token splits
  // aim at, the kernel's 4 per SM), and its split plan [splits_0, steps_per_split_0, splits_1, ...].
  m.def(
      "tube_tokens_mma_emulated_dw(Tensor grad_out, Tensor x, Tensor[] weights, int[] tubes, int target=528) "
      "-> Tensor[]");
  m.def("mma_dw_splits(Tensor grad_out, Tensor x, Tensor[] weights, int[] tubes, int target) -> int[]");
  // The CUDA backend's GEMM path (kernels/gemm_path.h: gather, GEMM, PE placement)
  // run on the CPU with ATen's CPU GEMMs: the forward output, the weight
  // gradients and the input gradient by the per-tube scatter (opt-in on
  // CUDA). Test-only, CPU-only, not differentiable.
  m.def(
      "tube_tokens_gemm_path(Tensor x, Tensor[] weights, Tensor[] biases, int[] tubes, "
      "Tensor? pos_embed) -> Tensor");
  m.def("tube_tokens_gemm_path_dw(Tensor grad_out, Tensor x, Tensor[] weights, int[] tubes) -> Tensor[]");
  m.def("tube_tokens_gemm_path_dx(Tensor grad_out, Tensor x, Tensor[] weights, int[] tubes) -> Tensor");
  // The Hopper forward kernel's tile code (kernels/hopper_tiles.h) run on the CPU with a
  // plain product for wgmma (testing/hopper_emulation.cpp). Test-only, CPU-only, not
  // differentiable.
  m.def(
      "tube_tokens_hopper_emulated(Tensor x, Tensor[] weights, Tensor[] biases, int[] tubes, "
      "Tensor? pos_embed, int grid=132) -> Tensor");
  // [va_0, vb_0, va_1, vb_1, ...]: the elements per copy of A and of B the Hopper kernel
  // uses for each tube of this call (8 / 4 / 2: 16 / 8 / 4-byte cp.async, 1: plain loads).
  m.def("hopper_chunk_widths(Tensor x, Tensor[] weights, int[] tubes) -> int[]");
  // The Hopper weight / bias gradient kernels' tile code and reduction on the CPU: (dW list,
  // db list, empty without bias); `target`: the tile count the splits aim at (the kernel: 4 per SM).
  m.def(
      "tube_tokens_hopper_dw_emulated(Tensor grad_out, Tensor x, Tensor[] weights, int[] tubes, bool bias, "
      "int grid=132, int target=528) -> (Tensor[], Tensor[])");
  // [splits_0, steps_per_split_0, splits_1, ...] for a call with this target.
  m.def("hopper_dw_splits(Tensor grad_out, Tensor x, Tensor[] weights, int[] tubes, int target) -> int[]");
  // Whether the Hopper emulators place stage elements through the kernels' CuTe layouts
  // (kernels/hopper_layouts.h: a build with the CUTLASS/CuTe headers), checking the swizzled
  // addresses of every producer chunk; false: plain row-major stages.
  m.def("hopper_swizzle_checked() -> bool", &tubevit::hopper_swizzle_checked);
  // The Hopper input-gradient kernels on the CPU: dP by the dP kernel's tile code, then dx by the
  // writer (writer = false: by the gather, on the same dP).
  m.def(
      "tube_tokens_hopper_dx_emulated(Tensor grad_out, Tensor x, Tensor[] weights, int[] tubes, int grid=132, "
      "bool writer=True) -> Tensor");
  // dx from a given dP workspace (fp32, make_dp_layout's blocks) by one pass (dx_pass): 0 the gather, 1 the
  // per-tube scatter, 2 the writer; on CUDA the kernels, on the CPU their emulation (the scatter:
  // its functor on the CPU launcher). grad_out only fixes the layout.
  m.def("dx_from_dp(Tensor grad_out, Tensor x, Tensor[] weights, int[] tubes, Tensor dp, int dx_pass) -> Tensor");
}
