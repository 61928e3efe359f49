// Host emulator of the tensor-core kernels (cuda/tube_tokens_tc.cu), as the
// test-only ops tubevit_testing::tube_tokens_tc_emulated{,_dw,_dx}; the dX
// step runs the gather of kernels/grad_input.h the same way.
//
// It runs the kernels' tile functions from kernels/tc_tiles.h (the same code the GPU
// compiles) block by block, thread by thread between the points where the
// kernels hold a barrier, with an MMA written from WMMA's documented
// semantics (row-/column-major 16 x depth x 16 blocks, fp32 accumulation;
// fp32 inputs rounded to TF32 as __float_to_tf32 does: nearest, ties away).
// So a CPU test checks every index, stride, leading dimension and boundary
// mask of the kernels; what it cannot check is the hardware (fragment
// loads, alignment, barriers), which compute-sanitizer and the CUDA tests do
// on a GPU. Slow by design (plain loops).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstring>
#include <limits>
#include <vector>

#include "../kernels/naive_kernels.h"
#include "../kernels/grad_input.h"
#include "../kernels/tc_tiles.h"
#include "../tube_tokens.h"
#include "dx_emulation.h"

namespace tubevit {
namespace {

using namespace tc;
using namespace dx;

// What an MMA multiplies: the staged value, fp32 inputs as TF32.
template <typename scalar_t>
float mma_input(scalar_t v) {
  return static_cast<float>(v);
}
template <>
float mma_input<float>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  if ((u & 0x7F800000u) != 0x7F800000u) u = (u + 0x1000u) & 0xFFFFE000u;  // finite: round, ties away
  float r;
  std::memcpy(&r, &u, sizeof(r));
  return r;
}

using WarpAcc = float[2][2][16][16];

// WMMA semantics of mma_2x2 (cuda/tube_tokens_tc.cu) for one warp.
template <typename scalar_t>
void mma_2x2(WarpAcc& acc, const scalar_t* As, const scalar_t* Bs, const MmaArgs& m, bool b_col_major,
             bool a_col_major = false) {
  constexpr int depth = MmaDepth<scalar_t>::value;
  for (int a = 0; a < 2; ++a)
    for (int c = 0; c < 2; ++c)
      for (int r = 0; r < 16; ++r)
        for (int col = 0; col < 16; ++col) {
          float s = acc[a][c][r][col];
          for (int kk = 0; kk < depth; ++kk) {
            const scalar_t av = a_col_major ? As[m.a_off + a * m.a_step + kk * m.lda + r]
                                            : As[m.a_off + a * m.a_step + r * m.lda + kk];
            const scalar_t bv = b_col_major ? Bs[m.b_off + c * m.b_step + col * m.ldb + kk]
                                            : Bs[m.b_off + c * m.b_step + kk * m.ldb + col];
            s += mma_input(av) * mma_input(bv);
          }
          acc[a][c][r][col] = s;
        }
}

// store_matrix_sync(Cs + acc_offset(...), acc, LDC, mem_row_major) for every warp.
void store_acc(const WarpAcc (&acc)[kWarps], float* Cs) {
  for (int w = 0; w < kWarps; ++w)
    for (int a = 0; a < 2; ++a)
      for (int c = 0; c < 2; ++c)
        for (int r = 0; r < 16; ++r)
          for (int col = 0; col < 16; ++col) Cs[acc_offset(w, a, c) + r * LDC + col] = acc[w][a][c][r][col];
}

// Shared memory of one block, with a guard zone behind it that the tile
// functions must never touch.
struct Smem {
  std::vector<unsigned char> bytes;
  int used;
  explicit Smem(int n) : bytes(n + 256, 0xA5), used(n) {}
  template <typename T>
  T* as() {
    return reinterpret_cast<T*>(bytes.data());
  }
  void check() const {
    for (size_t k = used; k < bytes.size(); ++k)
      TORCH_CHECK(bytes[k] == 0xA5, "tc emulation: shared-memory write past the tile buffers");
  }
};

void check_emulable(const TubeLayout& L) {
  TORCH_CHECK_VALUE(L.tubes.size() <= size_t(kMaxTubes), "the tensor-core kernels take at most ",
                    kMaxTubes, " tubes, got ", L.tubes.size());
}

template <typename scalar_t>
void emulate_forward(const at::Tensor& x, const std::vector<at::Tensor>& w, const std::vector<at::Tensor>& bias,
                     const at::Tensor& pe, const TubeLayout& L, at::Tensor& out) {
  std::vector<const void*> wp, bp;
  for (size_t i = 0; i < L.tubes.size(); ++i) {
    wp.push_back(w[i].const_data_ptr());
    bp.push_back(bias.empty() ? nullptr : bias[i].const_data_ptr());
  }
  const Params p = make_fwd_params(L, x.strides().data(), x.const_data_ptr(), x.element_size(), wp.data(),
                                   bias.empty() ? nullptr : bp.data());
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* pep = pe.defined() ? pe.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const int64_t blocks = fwd_blocks(p);
  for (int64_t bx = 0; bx < blocks; ++bx) {
    Smem smem(fwd_smem_bytes<scalar_t>());
    scalar_t* As = smem.as<scalar_t>();
    scalar_t* Bs = As + BM * LDS;
    float* Cs = smem.as<float>();
    int64_t row_base[BM], koff[BK];
    const FwdLoc l = fwd_locate(p, bx);
    for (int t = 0; t < kThreads; ++t) fwd_row_base(p, l, t, row_base);
    std::vector<FwdCols> cols;  // per-thread registers
    for (int t = 0; t < kThreads; ++t) cols.push_back(fwd_cols_init(p, l, t));
    WarpAcc acc[kWarps] = {};
    for (int64_t k0 = 0; k0 < p.g[l.i].patch_size; k0 += BK) {
      for (int t = 0; t < kThreads; ++t) fwd_koff(p, l, cols[t], t, koff);
      for (int t = 0; t < kThreads; ++t) {
        fwd_fill_a(p, l, xp, row_base, koff, t, As);
        fwd_fill_b(p, l, k0, t, Bs);
      }
      for (int warp = 0; warp < kWarps; ++warp)
        for (int ks = 0; ks < BK; ks += MmaDepth<scalar_t>::value)
          mma_2x2(acc[warp], As, Bs, fwd_mma_args(warp, ks), /*b_col_major=*/true);
    }
    store_acc(acc, Cs);
    for (int t = 0; t < kThreads; ++t) fwd_epilogue(p, l, Cs, pep, t, op);
    smem.check();
  }
}

template <typename scalar_t>
void emulate_grad_weight(const at::Tensor& x, const at::Tensor& grad, const TubeLayout& L,
                         std::vector<at::Tensor>& dws) {
  std::vector<void*> dp;
  for (auto& t : dws) dp.push_back(t.mutable_data_ptr());
  const ParamsDW p = make_dw_params(L, x.strides().data(), x.const_data_ptr(), x.element_size(),
                                    grad.const_data_ptr(), dp.data());
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* gp = grad.const_data_ptr<scalar_t>();
  for (int64_t bx = 0; bx < p.tiles_before[p.n_tubes]; ++bx) {
    Smem smem(dw_smem_bytes<scalar_t>());
    scalar_t* As = smem.as<scalar_t>();
    scalar_t* Bs = As + kDwARows * LDA2;
    float* Cs = smem.as<float>();
    int64_t row_base[DM], grad_row[DM], koff[BN];
    const DwLoc l = dw_locate(p, bx);
    for (int t = 0; t < kThreads; ++t) dw_koff(p, l, t, koff);
    WarpAcc acc[kWarps] = {};
    const int64_t M = p.B * p.g[l.i].num_tokens;
    for (int64_t m0 = 0; m0 < M; m0 += DM) {
      for (int t = 0; t < kThreads; ++t) dw_rows(p, l, m0, t, row_base, grad_row);
      for (int t = 0; t < kThreads; ++t) {
        dw_fill_a(p, l, gp, grad_row, t, As);
        dw_fill_b(p, l, xp, row_base, koff, t, Bs);
      }
      for (int warp = 0; warp < kWarps; ++warp)
        for (int ks = 0; ks < DM; ks += MmaDepth<scalar_t>::value)
          mma_2x2(acc[warp], As, Bs, dw_mma_args(warp, ks), /*b_col_major=*/false, kDwTokenMajorA);
    }
    store_acc(acc, Cs);
    for (int t = 0; t < kThreads; ++t) dw_epilogue<scalar_t>(p, l, Cs, t);
    smem.check();
  }
}

template <typename scalar_t>
void emulate_grad_input(const at::Tensor& grad, const std::vector<at::Tensor>& w, const TubeLayout& L,
                        at::Tensor& dx) {
  std::vector<const void*> wp;
  for (const auto& t : w) wp.push_back(t.const_data_ptr());
  int64_t dp_elems = 0;
  const ParamsDX p = make_dx_params(L, wp.data(), &dp_elems);
  // poisoned: every entry the gather reads must have been written by step 1
  std::vector<float> dp(dp_elems, std::numeric_limits<float>::quiet_NaN());
  const scalar_t* gp = grad.const_data_ptr<scalar_t>();
  for (int64_t bx = 0; bx < p.tiles_before[p.n_tubes]; ++bx) {
    Smem smem(dx_smem_bytes<scalar_t>());
    scalar_t* As = smem.as<scalar_t>();
    scalar_t* Bs = As + BM * LDS;
    float* Cs = smem.as<float>();
    int64_t grad_row[BM];
    const DxLoc l = dx_locate(p, bx);
    for (int t = 0; t < kThreads; ++t) dx_rows(p, l, t, grad_row);
    WarpAcc acc[kWarps] = {};
    for (int64_t j0 = 0; j0 < p.d; j0 += BK) {
      for (int t = 0; t < kThreads; ++t) {
        dx_fill_a(p, gp, grad_row, j0, t, As);
        dx_fill_b(p, l, j0, t, Bs);
      }
      for (int warp = 0; warp < kWarps; ++warp)
        for (int ks = 0; ks < BK; ks += MmaDepth<scalar_t>::value)
          mma_2x2(acc[warp], As, Bs, dx_mma_args(warp, ks), /*b_col_major=*/false);
    }
    store_acc(acc, Cs);
    for (int t = 0; t < kThreads; ++t) dx_epilogue(p, l, Cs, t, dp.data());
    smem.check();
  }
  // step 2, tile by tile and thread by thread as tube_dx_gather_kernel runs it
  emulate_gather<scalar_t>(p, dp.data(), L, dx.mutable_data_ptr<scalar_t>());
}

at::Tensor tc_emulated_cpu(const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                           at::IntArrayRef tubes, const c10::optional<at::Tensor>& pos_embed) {
  const TubeLayout L = check_forward_args(x, weights, biases, tubes, pos_embed);
  check_emulable(L);
  at::Tensor out = at::empty({L.batch, L.num_tokens, L.dim}, x.options());
  if (out.numel() == 0) return out;
  at::Tensor pe;
  if (pos_embed.has_value() && pos_embed->defined()) pe = pos_embed->contiguous();
  const auto w = contiguous_all(weights);
  const auto b = contiguous_all(biases);
  TUBEVIT_DISPATCH_TC_TYPES(x.scalar_type(), "tube_tokens_tc_emulated",
                            [&] { emulate_forward<scalar_t>(x, w, b, pe, L, out); });
  return out;
}

std::vector<at::Tensor> tc_emulated_dw_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                           at::TensorList weights, at::IntArrayRef tubes) {
  const TubeLayout L = check_backward_args(grad_out, x, weights, tubes);
  check_emulable(L);
  std::vector<at::Tensor> dws;
  for (const auto& w : weights) dws.push_back(at::empty(w.sizes(), x.options()));
  const at::Tensor grad = grad_out.contiguous();
  TUBEVIT_DISPATCH_TC_TYPES(x.scalar_type(), "tube_tokens_tc_emulated_dw",
                            [&] { emulate_grad_weight<scalar_t>(x, grad, L, dws); });
  return dws;
}

at::Tensor tc_emulated_dx_cpu(const at::Tensor& grad_out, const at::Tensor& x, at::TensorList weights,
                              at::IntArrayRef tubes) {
  const TubeLayout L = check_backward_args(grad_out, x, weights, tubes);
  check_emulable(L);
  at::Tensor dx = at::empty({L.batch, L.channels, L.size[0], L.size[1], L.size[2]}, x.options());
  if (dx.numel() == 0) return dx;
  const auto w = contiguous_all(weights);
  const at::Tensor grad = grad_out.contiguous();
  TUBEVIT_DISPATCH_TC_TYPES(x.scalar_type(), "tube_tokens_tc_emulated_dx",
                            [&] { emulate_grad_input<scalar_t>(grad, w, L, dx); });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(tubevit_testing, CPU, m) {
  m.impl("tube_tokens_tc_emulated", &tc_emulated_cpu);
  m.impl("tube_tokens_tc_emulated_dw", &tc_emulated_dw_cpu);
  m.impl("tube_tokens_tc_emulated_dx", &tc_emulated_dx_cpu);
}

}  // namespace tubevit
