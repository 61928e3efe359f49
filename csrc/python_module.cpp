// The `tubevit_ext._C` Python module. Importing it loads this shared library,
// whose static initialisers register the tubevit:: ops with the dispatcher
// (the pytorch/extension-cpp "stub _C" pattern). It also exposes small
// helpers used by the tests and by tubevit_ext.geometry; the C++ library
// built by CMakeLists.txt leaves this file out, so it has no Python
// dependency.
#include <torch/extension.h>

#include <string>
#include <utility>
#include <vector>

#include "cuda_plan.h"
#include "tube_geometry.h"
#include "tube_tokens.h"
#include "cpu/patch_pool.h"
#include "options.h"

namespace {

// Per tube: nt, nh, nw, token_offset (after the checks of resolve_layout).
// Lets python_tests/test_geometry.py assert that tubevit_ext/geometry.py and
// tube_geometry.h agree.
std::vector<int64_t> token_layout(const std::vector<int64_t>& tubes, int64_t T,
                                  int64_t H, int64_t W) {
  const int64_t size[3] = {T, H, W};
  const tubevit::TubeLayout L = tubevit::resolve_layout(tubes, 1, size);
  std::vector<int64_t> out;
  for (const auto& g : L.tubes) {
    out.insert(out.end(), {g.n[0], g.n[1], g.n[2], g.token_offset});
  }
  return out;
}

bool testing_ops_compiled() {
#ifdef TUBEVIT_WITH_TESTING_OPS
  return true;
#else
  return false;
#endif
}

bool prototype_compiled() {
#ifdef TUBEVIT_WITH_PROTOTYPE
  return true;
#else
  return false;
#endif
}

// The planner on a described call: (forward, grad_weight, grad_input) kernel
// family names; dtype by name (float16, bfloat16, float32, float64).
// `override` is a TUBEVIT_CUDA_PATH value; "" means the
// switch as read (csrc/options.h).
std::vector<std::string> cuda_plan(const std::string& dtype, int64_t batch, int64_t num_tokens, int64_t dim,
                                   int64_t n_tubes, int64_t sm_major, bool tf32_conv, bool tf32_matmul,
                                   bool gemm_fits, bool hopper_forward, bool hopper_grad_weight,
                                   bool hopper_grad_input, const std::string& override_path) {
  using tubevit::CudaPath;
  CudaPath want = tubevit::options().cuda_path;
  if (!override_path.empty()) {
    const std::pair<const char*, CudaPath> names[] = {{"auto", CudaPath::Auto}, {"gemm", CudaPath::Gemm},
                                                      {"tc", CudaPath::TensorCore}, {"naive", CudaPath::Naive},
                                                      {"hopper", CudaPath::Hopper}};
    bool found = false;
    for (const auto& [name, path] : names)
      if (override_path == name) want = path, found = true;
    TORCH_CHECK_VALUE(found, "override must be one of auto, gemm, tc, naive, hopper; got '", override_path, "'");
  }
  tubevit::PlanProblem p;
  if (dtype == "float16") p.dtype = at::kHalf;
  else if (dtype == "bfloat16") p.dtype = at::kBFloat16;
  else if (dtype == "float32") p.dtype = at::kFloat;
  else if (dtype == "float64") p.dtype = at::kDouble;
  else TORCH_CHECK_VALUE(false, "dtype must be float16, bfloat16, float32 or float64; got '", dtype, "'");
  p.batch = batch;
  p.num_tokens = num_tokens;
  p.dim = dim;
  p.n_tubes = static_cast<int>(n_tubes);
  p.sm_major = static_cast<int>(sm_major);
  p.tf32_conv = tf32_conv;
  p.tf32_matmul = tf32_matmul;
  p.gemm_fits = gemm_fits;
  p.hopper_forward = hopper_forward;
  p.hopper_grad_weight = hopper_grad_weight;
  p.hopper_grad_input = hopper_grad_input;
  const tubevit::Plan plan = tubevit::plan_cuda(p, want);
  return {tubevit::kernels_name(plan.forward), tubevit::kernels_name(plan.grad_weight),
          tubevit::kernels_name(plan.grad_input)};
}

bool cuda_compiled() {
#ifdef TUBEVIT_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "tubevit_ext native library (ops live in torch.ops.tubevit)";
  m.def("_token_layout", &token_layout,
        "per tube (nt, nh, nw, token_offset), flattened, from the C++ geometry");
  m.def("_cuda_compiled", &cuda_compiled, "whether the CUDA kernels were built in");
  m.def("_prototype_compiled", &prototype_compiled,
        "whether the prototype (csrc/prototype/: sm_90a wgmma kernels, TUBEVIT_CUDA_PATH=hopper) was built in");
  m.def("_cuda_plan", &cuda_plan,
        "the CUDA planner's kernels (forward, grad_weight, grad_input) for a described call (csrc/cuda_plan.h)",
        py::arg("dtype"), py::arg("batch"), py::arg("num_tokens"), py::arg("dim"), py::arg("n_tubes"),
        py::arg("sm_major"), py::arg("tf32_conv"), py::arg("tf32_matmul"), py::arg("gemm_fits"),
        py::arg("hopper_forward") = false, py::arg("hopper_grad_weight") = false,
        py::arg("hopper_grad_input") = false, py::arg("override") = "");
  m.def("_testing_ops_compiled", &testing_ops_compiled,
        "whether the test-only ops (torch.ops.tubevit_testing) were built in");
  m.def("_reload_options", &tubevit::reload_options,
        "read the TUBEVIT_* switches of csrc/options.h from the environment again");
  m.def("_patch_cache_bytes", &tubevit::patch_pool_cached_bytes,
        "bytes of freed CPU patch buffers kept for reuse");
  m.def("_empty_patch_cache", &tubevit::patch_pool_empty,
        "return the cached CPU patch buffers to the system");
}
