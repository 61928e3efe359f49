// Host emulation of the dP -> dx gather of kernels/grad_input.h
// (tube_dx_gather_kernel), block by block and thread by thread between the
// kernel's barriers. Used by the tensor-core and prototype emulators and by
// tubevit_testing::dx_from_dp on the CPU. Range tables start poisoned
// as empty ranges, so an entry no thread fills reads as a missing term.
#pragma once

#include <ATen/ATen.h>

#include <limits>


#include "../kernels/grad_input.h"

namespace tubevit {
namespace dx {

// The test ops' common part (tubevit_testing::dx_from_dp and the prototype's dx_writer_from_dp on
// the CPU): the layout of this call, dp checked against it (contiguous fp32 of make_dp_layout's
// size), x fp16 / bf16 / fp32, and dx (B, C, T, H, W) poisoned with NaN so an element no thread
// writes fails a comparison. Returns dx; *p gets the dP layout.
inline at::Tensor dx_test_output(const TubeLayout& L, const at::Tensor& x, const at::Tensor& dp, ParamsDX* p) {
  int64_t dp_elems = 0;
  *p = make_dp_layout(L, nullptr, &dp_elems);
  TORCH_CHECK_VALUE(dp.scalar_type() == at::kFloat && dp.is_contiguous() && dp.numel() == dp_elems,
                    "dp must be a contiguous fp32 tensor of ", dp_elems, " elements, got ", dp.scalar_type(),
                    " with ", dp.numel());
  const auto t = x.scalar_type();
  TORCH_CHECK_TYPE(t == at::kHalf || t == at::kBFloat16 || t == at::kFloat, "x must be fp16, bf16 or fp32, got ",
                   t);
  return at::full({L.batch, L.channels, L.size[0], L.size[1], L.size[2]}, std::numeric_limits<double>::quiet_NaN(),
                  x.options());
}

template <typename scalar_t>
void emulate_gather(const ParamsDX& p, const float* dp, const TubeLayout& L, scalar_t* out) {
  const int64_t tiles = dx_gather_tiles(L.batch, L.channels, L.size);
  DxGatherTables tb;
  for (int64_t blk = 0; blk < tiles; ++blk) {
    const DxTile tl = dx_gather_tile(L.channels, L.size, blk);
    for (int i = 0; i < kMaxTubes; ++i) {
      tb.t[i][0] = 1, tb.t[i][1] = 0;
      for (auto& r : tb.h[i]) r[0] = 1, r[1] = 0;
      for (auto& r : tb.w[i]) r[0] = 1, r[1] = 0;
    }
    for (int t = 0; t < kGatherThreads; ++t) dx_gather_fill_tables(p, tl, t, tb);
    for (int t = 0; t < kGatherThreads; ++t) dx_gather_voxels<scalar_t>(p, dp, L.channels, L.size, tl, t, tb, out);
  }
}

}  // namespace dx
}  // namespace tubevit
