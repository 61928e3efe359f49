// Host emulation of the dx writer (dx_writer.h, tube_dx_writer_kernel),
// block by block and thread by thread between the kernel's barriers, for the
// prototype's emulators and tubevit_testing::dx_writer_from_dp. Range tables
// start poisoned as empty ranges, so an entry no thread fills reads as a
// missing term; the stores are checked (each dx element once, every full
// chunk at an offset a 16-byte store takes, partial chunks only at a row's
// end).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <vector>

#include "dx_writer.h"

namespace tubevit {
namespace dx {

// `grid_y` blocks per column tile (each striding over the row tiles as the
// kernel's blockIdx.y does: the column table filled once per block, the t / h
// ranges per tile).
template <typename scalar_t>
void emulate_writer(const ParamsDX& p, const float* dp, const TubeLayout& L, scalar_t* out, int64_t grid_y) {
  const DxWriter s = make_dx_writer(L);
  const int64_t numel = L.batch * L.channels * L.size[0] * L.size[1] * L.size[2];
  std::vector<uint8_t> hits(numel, 0);
  std::vector<int32_t> tb(dx_writer_table_ints(s));
  const int64_t W = L.size[2];
  const auto store = [&](int64_t off, const float* v, int count) {
    TORCH_CHECK(count >= 1 && count <= kWriterVec && off >= 0 && off + count <= numel, "writer store of ", count,
                " elements at ", off, " outside dx (", numel, " elements)");
    if (count == kWriterVec && s.vector) {
      TORCH_CHECK(off % kWriterVec == 0, "a 16-byte writer store at element ", off, " is misaligned");
    } else {
      TORCH_CHECK(count == kWriterVec || (off % W) + count == W, "a partial writer chunk (", count,
                  " elements at ", off, ") that does not end its row");
    }
    for (int u = 0; u < count; ++u) {
      TORCH_CHECK(!hits[off + u], "dx element ", off + u, " written twice");
      hits[off + u] = 1;
      out[off + u] = static_cast<scalar_t>(v[u]);
    }
  };
  const int64_t gy = std::max<int64_t>(1, std::min<int64_t>(grid_y, s.tiles));
  for (int64_t ct = 0; ct < s.col_tiles; ++ct)
    for (int64_t by = 0; by < gy; ++by) {
      for (size_t e = 0; e < tb.size(); e += 2) tb[e] = 1, tb[e + 1] = 0;
      for (int t = 0; t < kWriterThreads; ++t) dx_writer_fill_w(p, s, ct, t, tb.data());
      for (int64_t tile = by; tile < s.tiles; tile += gy) {
        const DxWriterTile tl = dx_writer_tile(s, L.channels, L.size[0], tile);
        for (int t = 0; t < kWriterThreads; ++t) dx_writer_fill_th(p, s, tl, t, tb.data());
        for (int t = 0; t < kWriterThreads; ++t)
          dx_writer_chunk(p, s, dp, L.channels, L.size, ct, tl, t, tb.data(), store);
      }
    }
  const auto missed = std::count(hits.begin(), hits.end(), uint8_t(0));
  TORCH_CHECK(missed == 0, missed, " dx elements the writer never stored");
}

}  // namespace dx
}  // namespace tubevit
