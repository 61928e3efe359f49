#include "options.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <mutex>
#include <string>

namespace tubevit {
namespace {

Options g_options;
std::once_flag g_once;

std::string read(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr ? std::string() : std::string(v);
}

// A whole-string integer >= min_value, or the default when unset.
long long read_int(const char* name, long long min_value, long long fallback) {
  const std::string s = read(name);
  if (s.empty()) return fallback;
  char* end = nullptr;
  const long long v = std::strtoll(s.c_str(), &end, 10);
  TORCH_CHECK_VALUE(*end == '\0' && v >= min_value, name, " must be an integer >= ", min_value, ", got '", s, "'");
  return v;
}

Options read_env() {
  Options o;
  const std::string path = read("TUBEVIT_CUDA_PATH");
  if (path.empty() || path == "auto") o.cuda_path = CudaPath::Auto;
  else if (path == "gemm") o.cuda_path = CudaPath::Gemm;
  else if (path == "tc") o.cuda_path = CudaPath::TensorCore;
  else if (path == "naive") o.cuda_path = CudaPath::Naive;
  else if (path == "hopper") o.cuda_path = CudaPath::Hopper;
  else TORCH_CHECK_VALUE(false, "TUBEVIT_CUDA_PATH must be one of auto, gemm, tc, naive, hopper; got '", path, "'");
  o.cpu_chunk_bytes = read_int("TUBEVIT_CPU_CHUNK_BYTES", 1, o.cpu_chunk_bytes);
  o.cpu_patch_cache_bytes =
      static_cast<size_t>(read_int("TUBEVIT_CPU_PATCH_CACHE_MB", 0, static_cast<long long>(o.cpu_patch_cache_bytes >> 20)))
      << 20;
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
