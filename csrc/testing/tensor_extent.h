// What the host emulators need to know about a tensor's storage.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace tubevit {

// Elements of t's storage a view can reach: 1 + sum (size - 1) * stride (0 if empty).
inline int64_t extent_of(const at::Tensor& t) {
  if (t.numel() == 0) return 0;
  int64_t e = 1;
  for (int64_t i = 0; i < t.dim(); ++i) e += (t.size(i) - 1) * t.stride(i);
  return e;
}

}  // namespace tubevit
