// Host emulation of the dP -> dx gather of kernels/grad_input.h
// (tube_dx_gather_kernel), block by block and thread by thread between the
// kernel's barriers. Used by the tensor-core and prototype emulators and by
// tubevit_testing::dx_from_dp on the CPU. Range tables start poisoned
// as empty ranges, so an entry no thread fills reads as a missing term.
#pragma once

#include <ATen/ATen.h>


#include "../kernels/grad_input.h"

namespace tubevit {
namespace dx {

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
