// The `tubevit_ext._C` Python module. Importing it loads this shared library,
// whose static initialisers register the tubevit:: ops with the dispatcher
// (the pytorch/extension-cpp "stub _C" pattern). It also exposes two small
// helpers used by the tests and by tubevit_ext.geometry; the C++ library
// built by CMakeLists.txt leaves this file out, so it has no Python
// dependency.
#include <torch/extension.h>

#include <vector>

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

bool hopper_compiled() {
#if defined(TUBEVIT_WITH_HOPPER) && defined(TUBEVIT_HOPPER_SM90A)
  return true;
#else
  return false;
#endif
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
  m.def("_hopper_compiled", &hopper_compiled,
        "whether the sm_90a wgmma forward (TUBEVIT_CUDA_PATH=hopper) was built in");
  m.def("_testing_ops_compiled", &testing_ops_compiled,
        "whether the test-only ops (torch.ops.tubevit_testing) were built in");
  m.def("_reload_options", &tubevit::reload_options,
        "read the TUBEVIT_* switches of csrc/options.h from the environment again");
  m.def("_patch_cache_bytes", &tubevit::patch_pool_cached_bytes,
        "bytes of freed CPU patch buffers kept for reuse");
  m.def("_empty_patch_cache", &tubevit::patch_pool_empty,
        "return the cached CPU patch buffers to the system");
}
