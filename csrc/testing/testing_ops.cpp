// Schemas of the test-only ops (namespace tubevit_testing): the CUDA
// kernels' logic run on the CPU (and, for the naive kernels, on CUDA too),
// so that CPU-only CI checks the GPU code's index arithmetic against the
// fp64 reference. The prototype's test ops are defined with its emulators
// (csrc/prototype/hopper_emulation.cpp). Not part of the public op surface; a build with
// TUBEVIT_TESTING_OPS=0 (setup.py) / -DTUBEVIT_TESTING_OPS=OFF (CMake)
// leaves this folder out. Fake kernels: tubevit_ext/testing.py.
#include <torch/library.h>

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
  // The CUDA backend's GEMM path (kernels/gemm_path.h: gather, GEMM, PE placement)
  // run on the CPU with ATen's CPU GEMMs: the forward output, the weight
  // gradients and the input gradient (dP by the GEMMs, then the gather).
  // Test-only, CPU-only, not differentiable.
  m.def(
      "tube_tokens_gemm_path(Tensor x, Tensor[] weights, Tensor[] biases, int[] tubes, "
      "Tensor? pos_embed) -> Tensor");
  m.def("tube_tokens_gemm_path_dw(Tensor grad_out, Tensor x, Tensor[] weights, int[] tubes) -> Tensor[]");
  m.def("tube_tokens_gemm_path_dx(Tensor grad_out, Tensor x, Tensor[] weights, int[] tubes) -> Tensor");
  // dx from a given dP workspace (fp32, make_dp_layout's blocks) by the gather: on CUDA the kernel,
  // on the CPU its emulation. grad_out only fixes the layout.
  m.def("dx_from_dp(Tensor grad_out, Tensor x, Tensor[] weights, int[] tubes, Tensor dp) -> Tensor");
}
