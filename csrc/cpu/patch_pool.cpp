// See patch_pool.h for why this exists.
#include "patch_pool.h"

#include "../options.h"

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <cstring>
#include <map>
#include <mutex>
#include <unordered_map>

namespace tubevit {
namespace {

struct Pool {
  std::mutex mu;
  std::multimap<size_t, void*> blocks;     // free blocks by size in bytes
  std::unordered_map<void*, size_t> live;  // handed-out blocks -> their size
  size_t cached = 0;
};

// Never destroyed: a tensor's deleter may run during static destruction.
Pool& pool() {
  static Pool* p = new Pool();
  return *p;
}

size_t cache_limit() { return options().cpu_patch_cache_bytes; }

void* acquire(size_t bytes) {
  Pool& p = pool();
  {
    std::lock_guard<std::mutex> lock(p.mu);
    // Best fit, wasting at most a quarter of the block.
    const auto it = p.blocks.lower_bound(bytes);
    if (it != p.blocks.end() && it->first <= bytes + bytes / 4) {
      void* ptr = it->second;
      p.cached -= it->first;
      p.live.emplace(ptr, it->first);
      p.blocks.erase(it);
      return ptr;
    }
  }
  void* ptr = c10::alloc_cpu(bytes);  // 64-byte aligned, throws on failure
  std::lock_guard<std::mutex> lock(p.mu);
  p.live.emplace(ptr, bytes);
  return ptr;
}

// The deleter of every block handed out (a plain function pointer, as
// c10::DataPtr wants; the size is looked up, so the context is the pointer).
void release(void* ptr) {
  if (ptr == nullptr) return;
  Pool& p = pool();
  {
    std::lock_guard<std::mutex> lock(p.mu);
    const auto it = p.live.find(ptr);
    TORCH_INTERNAL_ASSERT(it != p.live.end(), "tubevit patch pool: releasing a block it did not hand out");
    const size_t bytes = it->second;
    p.live.erase(it);
    if (p.cached + bytes <= cache_limit()) {
      p.blocks.emplace(bytes, ptr);
      p.cached += bytes;
      return;
    }
  }
  c10::free_cpu(ptr);
}

struct PoolAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t bytes) override {
    if (bytes == 0) return {nullptr, nullptr, &release, c10::Device(c10::DeviceType::CPU)};
    void* ptr = acquire(bytes);
    return {ptr, ptr, &release, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &release; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    if (count > 0) std::memcpy(dest, src, count);
  }
};

PoolAllocator& allocator() {
  static PoolAllocator* a = new PoolAllocator();  // never destroyed, as the pool
  return *a;
}

}  // namespace

at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  TORCH_INTERNAL_ASSERT(options.device().is_cpu());
  return at::detail::empty_generic(sizes, &allocator(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), c10::nullopt);
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
