// See patch_pool.h for why this exists.
#include "patch_pool.h"

#include <ATen/ATen.h>
#include <c10/core/impl/alloc_cpu.h>

#include <cstdlib>
#include <map>
#include <mutex>

namespace tubevit {
namespace {

struct Pool {
  std::mutex mu;
  std::multimap<size_t, void*> blocks;  // free blocks by size in bytes
  size_t cached = 0;
};

// Never destroyed: a tensor's deleter may run during static destruction.
Pool& pool() {
  static Pool* p = new Pool();
  return *p;
}

size_t cache_limit() {
  const char* v = std::getenv("TUBEVIT_CPU_PATCH_CACHE_MB");
  if (v != nullptr) {
    const long long mb = std::atoll(v);
    if (mb >= 0) return static_cast<size_t>(mb) << 20;
  }
  return size_t(256) << 20;
}

void release(void* ptr, size_t bytes) {
  Pool& p = pool();
  {
    std::lock_guard<std::mutex> lock(p.mu);
    if (p.cached + bytes <= cache_limit()) {
      p.blocks.emplace(bytes, ptr);
      p.cached += bytes;
      return;
    }
  }
  c10::free_cpu(ptr);
}

}  // namespace

at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  const size_t bytes = static_cast<size_t>(numel) * options.dtype().itemsize();
  if (bytes == 0) return at::empty(sizes, options);
  void* ptr = nullptr;
  size_t got = 0;
  {
    Pool& p = pool();
    std::lock_guard<std::mutex> lock(p.mu);
    // Best fit, wasting at most a quarter of the block.
    const auto it = p.blocks.lower_bound(bytes);
    if (it != p.blocks.end() && it->first <= bytes + bytes / 4) {
      ptr = it->second;
      got = it->first;
      p.cached -= got;
      p.blocks.erase(it);
    }
  }
  if (ptr == nullptr) {
    ptr = c10::alloc_cpu(bytes);  // 64-byte aligned, throws on failure
    got = bytes;
  }
  return at::from_blob(ptr, sizes, [got](void* q) { release(q, got); }, options);
}

int64_t patch_pool_cached_bytes() {
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mu);
  return static_cast<int64_t>(p.cached);
}

void patch_pool_empty() {
  std::multimap<size_t, void*> blocks;
  {
    Pool& p = pool();
    std::lock_guard<std::mutex> lock(p.mu);
    blocks.swap(p.blocks);
    p.cached = 0;
  }
  for (const auto& b : blocks) c10::free_cpu(b.second);
}

}  // namespace tubevit
