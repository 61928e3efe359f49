// Tube geometry: the single source of truth for how a sparse tube turns a
// (T, H, W) video into a grid of tokens, shared by the CPU kernels, the CUDA
// kernels and (mirrored formula-for-formula, and cross-checked by
// python_tests/test_geometry.py through `_C._token_layout`) by
// tubevit_ext/geometry.py.
//
// A tube is a strided Conv3d kernel applied to x[:, :, o_t:, o_h:, o_w:] with
// no padding. All triples are in (T, H, W) order.
//
// Conventions fixed here (the paper leaves them open):
//  * positions along an axis of length L: floor((L - o - k) / s) + 1 when
//    L - o - k >= 0, else 0 (the tube does not fit: zero tokens, rejected by
//    input validation with a message naming the tube);
//  * tokens of one tube are laid out row-major over (t, h, w) grid indices,
//    tubes are concatenated in list order ("token offset" = number of tokens
//    of all earlier tubes);
//  * the centre of grid index i on an axis is o + s * i + k / 2 (integer
//    division: the voxel at or just after the geometric centre), the
//    convention of the public TubeViT ports, used by the position embedding.
//
// Everything is int64_t: B * N * d and B * C * T * H * W can pass 2^31 for
// long videos at ViT-H widths.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define TUBEVIT_HD __host__ __device__ __forceinline__
#else
#define TUBEVIT_HD inline
#endif

namespace tubevit {

// Number of flattened ints that describe one tube in the `int[] tubes`
// argument of the ops: kt, kh, kw, st, sh, sw, ot, oh, ow.
constexpr int kTubeInts = 9;

// Number of grid positions along one axis (0 when the kernel does not fit).
TUBEVIT_HD int64_t axis_positions(int64_t length, int64_t kernel,
                                  int64_t stride, int64_t offset) {
  const int64_t span = length - offset - kernel;
  return span < 0 ? 0 : span / stride + 1;
}

// Voxel coordinate (on one axis) of the centre of grid index `i`.
TUBEVIT_HD int64_t axis_centre(int64_t i, int64_t kernel, int64_t stride,
                               int64_t offset) {
  return offset + stride * i + kernel / 2;
}

// Range [*lo, *hi] (inclusive; empty when *lo > *hi) of grid indices on one
// axis whose kernel window covers voxel coordinate `pos`:
//   offset + stride * i <= pos < offset + stride * i + kernel, 0 <= i < n.
// Used by the gather-form input gradient (each input voxel sums over the
// tokens that read it), which needs no atomics and is deterministic.
TUBEVIT_HD void axis_covering(int64_t pos, int64_t kernel, int64_t stride,
                              int64_t offset, int64_t n, int64_t* lo,
                              int64_t* hi) {
  const int64_t rel = pos - offset;
  if (rel < 0 || n <= 0) {
    *lo = 0;
    *hi = -1;
    return;
  }
  // largest i with stride * i <= rel
  int64_t h = rel / stride;
  // smallest i with stride * i + kernel > rel  <=>  i > (rel - kernel) / s
  const int64_t num = rel - kernel + 1;  // need stride * i >= num
  int64_t l = num <= 0 ? 0 : (num + stride - 1) / stride;
  if (h > n - 1) h = n - 1;
  *lo = l;
  *hi = h;
}

// One tube resolved against an input size. Plain old data so that it can be
// copied into a CUDA kernel's parameter space.
struct TubeGeom {
  int64_t k[3];  // kernel (T, H, W)
  int64_t s[3];  // stride
  int64_t o[3];  // offset
  int64_t n[3];  // grid positions per axis
  int64_t num_tokens;    // n[0] * n[1] * n[2]
  int64_t token_offset;  // first row of this tube in the (N, d) token axis
  int64_t patch_size;    // C * k[0] * k[1] * k[2] (the GEMM reduction size)
};

// Input offset (elements, strides sT, sH, sW) of the first voxel token
// `tok` of tube g reads, relative to its sample and channel 0; tokens are
// row-major over (t, h, w).
TUBEVIT_HD int64_t token_origin_offset(const TubeGeom& g, int64_t tok, int64_t sT, int64_t sH,
                                       int64_t sW) {
  const int64_t iw = tok % g.n[2];
  const int64_t ih = (tok / g.n[2]) % g.n[1];
  const int64_t it = tok / (g.n[2] * g.n[1]);
  return (g.o[0] + g.s[0] * it) * sT + (g.o[1] + g.s[1] * ih) * sH + (g.o[2] + g.s[2] * iw) * sW;
}

// Input offset of patch column k, relative to the token's first voxel. K is
// ordered (c, kt, kh, kw), like weight.reshape(d, K).
TUBEVIT_HD int64_t patch_column_offset(const TubeGeom& g, int64_t k, int64_t sC, int64_t sT,
                                       int64_t sH, int64_t sW) {
  const int64_t kw = k % g.k[2], r = k / g.k[2];
  const int64_t kh = r % g.k[1], r2 = r / g.k[1];
  const int64_t kt = r2 % g.k[0], c = r2 / g.k[0];
  return c * sC + kt * sT + kh * sH + kw * sW;
}

// Calls f(tok, k) for every token `tok` of tube g whose window covers voxel
// (c, t, h, w), with k the voxel's column in that token's patch (K ordered
// (c, kt, kh, kw)); tokens in row-major (t, h, w) order. The gather form of
// the input gradient (each voxel sums over the tokens that read it).
template <class F>
TUBEVIT_HD void for_each_covering(const TubeGeom& g, int64_t c, int64_t t, int64_t h, int64_t w, const F& f) {
  int64_t t0, t1, h0, h1, w0, w1;
  axis_covering(t, g.k[0], g.s[0], g.o[0], g.n[0], &t0, &t1);
  axis_covering(h, g.k[1], g.s[1], g.o[1], g.n[1], &h0, &h1);
  axis_covering(w, g.k[2], g.s[2], g.o[2], g.n[2], &w0, &w1);
  for (int64_t it = t0; it <= t1; ++it)
    for (int64_t ih = h0; ih <= h1; ++ih)
      for (int64_t iw = w0; iw <= w1; ++iw) {
        const int64_t tok = (it * g.n[1] + ih) * g.n[2] + iw;
        const int64_t k = ((c * g.k[0] + (t - g.o[0] - g.s[0] * it)) * g.k[1] + (h - g.o[1] - g.s[1] * ih)) * g.k[2] +
                          (w - g.o[2] - g.s[2] * iw);
        f(tok, k);
      }
}

// Resolve tube `t` described by 9 ints (see kTubeInts) for input
// (C, T, H, W) with `token_offset` tokens before it.
inline TubeGeom make_tube_geom(const int64_t* p, int64_t channels,
                               const int64_t* size_thw, int64_t token_offset) {
  TubeGeom g{};
  for (int a = 0; a < 3; ++a) {
    g.k[a] = p[a];
    g.s[a] = p[3 + a];
    g.o[a] = p[6 + a];
    g.n[a] = axis_positions(size_thw[a], g.k[a], g.s[a], g.o[a]);
  }
  g.num_tokens = g.n[0] * g.n[1] * g.n[2];
  g.token_offset = token_offset;
  g.patch_size = channels * g.k[0] * g.k[1] * g.k[2];
  return g;
}

}  // namespace tubevit
