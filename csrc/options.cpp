#include "options.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <mutex>
#include <string>

namespace tubevit {
namespace {

Options g_options;
std::once_flag g_once;

bool read_flag(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return false;
  const std::string s(v);
  TORCH_CHECK_VALUE(s == "0" || s == "1", name, " must be 0 or 1, got '", s, "'");
  return s == "1";
}

Options read_env() {
  Options o;
  const char* p = std::getenv("TUBEVIT_CUDA_PATH");
  const std::string path = p == nullptr ? "" : p;
  if (path.empty() || path == "auto") o.cuda_path = CudaPath::Auto;
  else if (path == "gemm") o.cuda_path = CudaPath::Gemm;
  else if (path == "tc") o.cuda_path = CudaPath::TensorCore;
  else if (path == "naive") o.cuda_path = CudaPath::Naive;
  else if (path == "hopper") o.cuda_path = CudaPath::Hopper;
  else TORCH_CHECK_VALUE(false, "TUBEVIT_CUDA_PATH must be one of auto, gemm, tc, naive, hopper; got '", path, "'");
  o.gemm_gather_vec = read_flag("TUBEVIT_GEMM_GATHER_VEC");
  const char* dxp = std::getenv("TUBEVIT_DX_PASS");
  const std::string dx = dxp == nullptr ? "" : dxp;
  if (dx.empty() || dx == "gather") o.dx_pass = DxPass::Gather;
  else if (dx == "scatter") o.dx_pass = DxPass::Scatter;
  else if (dx == "writer") o.dx_pass = DxPass::Writer;
  else TORCH_CHECK_VALUE(false, "TUBEVIT_DX_PASS must be one of gather, scatter, writer; got '", dx, "'");
  o.tc_mma = read_flag("TUBEVIT_TC_MMA");
  const char* c = std::getenv("TUBEVIT_CPU_CHUNK_BYTES");
  if (c != nullptr && *c != '\0') {
    char* end = nullptr;
    const long long b = std::strtoll(c, &end, 10);
    TORCH_CHECK_VALUE(*end == '\0' && b > 0, "TUBEVIT_CPU_CHUNK_BYTES must be a positive integer, got '", c, "'");
    o.cpu_chunk_bytes = b;
  }
  return o;
}

}  // namespace

const Options& options() {
  std::call_once(g_once, [] { g_options = read_env(); });
  return g_options;
}

void reload_options() {
  options();  // the first read, if it has not happened
  g_options = read_env();
}

}  // namespace tubevit
