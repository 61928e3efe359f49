// Host emulator of the ldmatrix + mma.sync forward and weight gradient
// (cuda/tube_tokens_mma.cu), as the test-only ops
// tubevit_testing::tube_tokens_mma_emulated{,_dw}. It runs the
// kernel's tile functions (kernels/mma_tiles.h, the code the GPU compiles)
// block by block in the kernel's order: row tables, each thread's column
// cursor, the three-stage pipeline (steps issued two ahead into the stage
// the kernel's counters pick, then multiplied), and for every warp and k16
// slice the 32 lanes' ldmatrix.x4 row addresses, with ldmatrix and
// mma.sync.m16n8k16.row.col computed from the PTX ISA's fragment layouts
// (written here independently of the kernel's address functions), then the
// epilogue from the accumulator registers; for dW the same with
// ldmatrix.trans, the token splits' fp32 partials and their reduction.
//
// It checks what a GPU would not report, or report only as wrong numbers:
// every ldmatrix row 16-byte aligned and inside its operand's part of the
// stage, the eight rows of each ldmatrix phase on disjoint banks (no bank
// conflict), no shared-memory write past the stages, every producer copy
// from x, W and G inside its tensor (HostReadScope, kernels/common.h) and
// aligned to its width, bias and pe reads inside theirs (every input is
// copied between NaN guard zones, so a stray read poisons the result), every
// output element written (outputs and dW partials start as NaN) and no
// write past them.
// Slow by design (plain loops).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "../kernels/mma_tiles.h"
#include "../tube_tokens.h"
#include "tensor_extent.h"

namespace tubevit {
namespace {

using namespace mma;

// A copy of t (same sizes and strides, same address modulo 16 bytes, so the
// kernels choose the same copy widths) with kGuard NaN elements on both
// sides of the storage it reaches.
struct Guarded {
  static constexpr int64_t kGuard = 256;
  at::Tensor buf, view;
  int64_t lead = 0, extent = 0;

  explicit Guarded(const at::Tensor& t) {
    if (!t.defined()) return;
    extent = extent_of(t);
    const int64_t es = t.element_size();
    const int64_t mis = static_cast<int64_t>(reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16) / es;
    lead = kGuard + mis;
    buf = at::full({lead + extent + kGuard}, std::numeric_limits<float>::quiet_NaN(), t.options());
    TORCH_CHECK(reinterpret_cast<uintptr_t>(buf.const_data_ptr()) % 16 == 0, "mma emulation: unaligned buffer");
    view = buf.as_strided(t.sizes(), t.strides(), lead);
    view.copy_(t);
  }
  // The bytes of the copy proper (what the kernel may read), for HostReadScope.
  std::pair<uintptr_t, uintptr_t> range() const {
    const uintptr_t a = view.defined() ? reinterpret_cast<uintptr_t>(view.const_data_ptr()) : 0;
    return {a, a + static_cast<uintptr_t>(extent * (view.defined() ? view.element_size() : 0))};
  }
  // The guard zones still hold NaN (checked for the output).
  bool guards_intact() const {
    const at::Tensor f = buf.to(at::kFloat);
    return f.narrow(0, 0, lead).isnan().all().item<bool>() &&
           f.narrow(0, lead + extent, kGuard).isnan().all().item<bool>();
  }
};

// Shared memory of one block: the stages, then a guard zone the tile
// functions must never touch.
struct Smem {
  std::vector<unsigned char> bytes;
  int used;
  explicit Smem(int n) : bytes(n + 256, 0xA5), used(n) {}
  void check() const {
    for (size_t k = used; k < bytes.size(); ++k)
      TORCH_CHECK(bytes[k] == 0xA5, "mma emulation: shared-memory write past the stages");
  }
};

// ldmatrix.sync.aligned.m8n8.x4.shared.b16 for one warp: lane 8 j + i gives
// the address of row i of matrix j (`offset`: elements from the stage's
// start); lane l receives in register j the elements at row l / 4, columns
// 2 (l % 4) and 2 (l % 4) + 1 of matrix j; with .trans (trans) the elements
// at rows 2 (l % 4) and 2 (l % 4) + 1, column l / 4. Checks each row 16-byte aligned,
// inside [lo, hi) (its operand's part of the stage) and each matrix's eight
// rows on disjoint banks (a 16-byte row covers four 4-byte banks).
template <typename scalar_t, class Offset>
void ldmatrix_x4(const scalar_t* stage, int stage_byte0, const Offset& offset, int lo, int hi,
                 float (&regs)[32][4][2], bool trans = false) {
  int rows[32];
  for (int l = 0; l < 32; ++l) {
    rows[l] = offset(l);
    TORCH_CHECK(rows[l] % 8 == 0, "mma emulation: ldmatrix row at element ", rows[l], " is not 16-byte aligned");
    TORCH_CHECK(rows[l] >= lo && rows[l] + 8 <= hi, "mma emulation: ldmatrix row [", rows[l], ", ", rows[l] + 8,
                ") outside its operand [", lo, ", ", hi, ")");
  }
  for (int j = 0; j < 4; ++j) {
    bool bank_used[32] = {};
    for (int i = 0; i < 8; ++i) {
      const int bank0 = ((stage_byte0 + 2 * rows[8 * j + i]) / 4) % 32;
      for (int q = 0; q < 4; ++q) {
        TORCH_CHECK(!bank_used[(bank0 + q) % 32], "mma emulation: bank conflict in ldmatrix matrix ", j);
        bank_used[(bank0 + q) % 32] = true;
      }
    }
  }
  for (int l = 0; l < 32; ++l)
    for (int j = 0; j < 4; ++j)
      for (int e = 0; e < 2; ++e)
        regs[l][j][e] = static_cast<float>(trans ? stage[rows[8 * j + 2 * (l % 4) + e] + l / 4]
                                                 : stage[rows[8 * j + l / 4] + 2 * (l % 4) + e]);
}

// mma.sync.aligned.m16n8k16.row.col.f32: lane l = 4 g + t holds A (16 x 16)
// elements in register j (a0..a3) at row g + 8 (j % 2), columns 2 t + e +
// 8 (j / 2); B (16 x 8, K x N) in register j at row 2 t + e + 8 j, column g;
// C / D element e at row g + 8 (e / 2), column 2 t + e % 2.
void mma_16816(float (&d)[32][4], const float (&a)[32][4][2], const float (&b)[32][2][2]) {
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    for (int j = 0; j < 4; ++j)
      for (int e = 0; e < 2; ++e) A[g + 8 * (j % 2)][2 * t + e + 8 * (j / 2)] = a[l][j][e];
    for (int j = 0; j < 2; ++j)
      for (int e = 0; e < 2; ++e) B[2 * t + e + 8 * j][g] = b[l][j][e];
  }
  for (int l = 0; l < 32; ++l)
    for (int e = 0; e < 4; ++e) {
      const int r = l / 4 + 8 * (e / 2), c = 2 * (l % 4) + e % 2;
      float s = d[l][e];
      for (int k = 0; k < 16; ++k) s += A[r][k] * B[k][c];
      d[l][e] = s;
    }
}

// acc[warp][mt][nt][lane][e]: every warp's accumulator registers.
using BlockAcc = std::vector<float>;
inline float& acc_at(BlockAcc& acc, int warp, int mt, int nt, int lane, int e) {
  return acc[((((warp * MT + mt) * NT + nt) * 32) + lane) * 4 + e];
}

// One staged step of every warp. Fragments: the forward's (a_frag_offset,
// b_frag_offset, plain ldmatrix; A rows [0, BM LDS) of the stage, B the rest)
// or dW's (dw_*_frag_offset, ldmatrix.trans; Ga [0, BK LDW), Pb the rest).
template <typename scalar_t>
void mma_step(BlockAcc& acc, const scalar_t* stage, int stage_byte0, bool dw) {
  const int a_end = dw ? BK * LDW : BM * LDS, stage_end = dw ? kDwStageElems : kStageElems;
  for (int warp = 0; warp < kWarps; ++warp)
    for (int ks = 0; ks < BK / 16; ++ks) {
      float a[MT][32][4][2];
      for (int mt = 0; mt < MT; ++mt)
        ldmatrix_x4(
            stage, stage_byte0,
            [&](int l) { return dw ? dw_a_frag_offset(warp, l, mt, ks) : a_frag_offset(warp, l, mt, ks); }, 0,
            a_end, a[mt], dw);
      for (int np = 0; np < NT / 2; ++np) {
        float r[32][4][2];
        ldmatrix_x4(
            stage, stage_byte0,
            [&](int l) { return dw ? dw_b_frag_offset(warp, l, np, ks) : b_frag_offset(warp, l, np, ks); }, a_end,
            stage_end, r, dw);
        for (int half = 0; half < 2; ++half) {  // tile 2 np + half: registers 2 half, 2 half + 1
          float b[32][2][2];
          for (int l = 0; l < 32; ++l)
            for (int j = 0; j < 2; ++j)
              for (int e = 0; e < 2; ++e) b[l][j][e] = r[l][2 * half + j][e];
          for (int mt = 0; mt < MT; ++mt) {
            float d[32][4];
            for (int l = 0; l < 32; ++l)
              for (int e = 0; e < 4; ++e) d[l][e] = acc_at(acc, warp, mt, 2 * np + half, l, e);
            mma_16816(d, a[mt], b);
            for (int l = 0; l < 32; ++l)
              for (int e = 0; e < 4; ++e) acc_at(acc, warp, mt, 2 * np + half, l, e) = d[l][e];
          }
        }
      }
    }
}

// One block's mainloop on the kernels' schedule (run_stages; no copies in flight here, so commit and
// top do nothing) and its accumulator walk: issue(s, stage) fills stage `stage` (stage_elems
// elements each) with K step s, store(r, n, v0, v1) takes each pair of accumulators.
template <typename scalar_t, class Issue, class Store>
void run_block(int steps, scalar_t* stages, int stage_elems, bool dw, const Issue& issue, const Store& store) {
  BlockAcc acc(size_t(kWarps) * MT * NT * 32 * 4, 0.0f);
  run_stages(steps, issue, [] {}, [] {}, [&](int stage) {
    mma_step(acc, stages + stage * stage_elems, 2 * stage * stage_elems, dw);
  });
  for (int warp = 0; warp < kWarps; ++warp)
    for (int lane = 0; lane < 32; ++lane)
      for_each_acc_pair(warp, lane, [&](int r, int n, int mt, int nt, int half) {
        store(r, n, acc_at(acc, warp, mt, nt, lane, 2 * half), acc_at(acc, warp, mt, nt, lane, 2 * half + 1));
      });
}

template <typename scalar_t>
void emulate_forward(const at::Tensor& x, const std::vector<at::Tensor>& w, const std::vector<at::Tensor>& bias,
                     const at::Tensor& pe, const TubeLayout& L, at::Tensor& out) {
  const Guarded gx(x), gpe(pe);
  std::vector<Guarded> gw, gb;
  std::vector<const void*> wp, bp;
  for (size_t i = 0; i < L.tubes.size(); ++i) {
    gw.emplace_back(w[i]);
    wp.push_back(gw.back().view.const_data_ptr());
    if (!bias.empty()) {
      gb.emplace_back(bias[i]);
      bp.push_back(gb.back().view.const_data_ptr());
    }
  }
  const Params p = make_params(L, gx.view.strides().data(), gx.view.const_data_ptr(), x.element_size(), wp.data(),
                               bias.empty() ? nullptr : bp.data());
  std::vector<std::pair<uintptr_t, uintptr_t>> readable = {gx.range()};
  for (const auto& g : gw) readable.push_back(g.range());
  const HostReadScope reads(readable);  // x and W: the producers' copies
  Guarded gout(out);  // NaN everywhere: an element no tile writes stays NaN
  gout.view.fill_(std::numeric_limits<float>::quiet_NaN());
  const scalar_t* xp = gx.view.const_data_ptr<scalar_t>();
  const scalar_t* pep = pe.defined() ? gpe.view.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* op = gout.view.mutable_data_ptr<scalar_t>();
  const int64_t n_blocks = blocks(p);
  for (int64_t blk = 0; blk < n_blocks; ++blk) {
    Smem smem(smem_bytes<scalar_t>());
    scalar_t* stages = reinterpret_cast<scalar_t*>(smem.bytes.data());
    int x_row[BM], out_row[BM], pe_row[BM];
    const Loc l = locate(p, static_cast<int>(blk));
    const RowTables t{x_row, out_row, pe_row};
    for (int tid = 0; tid < kThreads; ++tid) row_tables(p, l, tid, t);
    std::vector<ACursor> cur;  // per-thread registers
    for (int tid = 0; tid < kThreads; ++tid) cur.push_back(a_cursor(p, l, tid));
    const int steps = (static_cast<int>(p.g[l.i].patch_size) + BK - 1) / BK;
    const int va = p.vec_x[l.i];
    auto issue = [&](int s, int stage) {
      with_width(va, [&](auto v) {
        for (int tid = 0; tid < kThreads; ++tid)
          issue_step<decltype(v)::value>(p, l, xp, x_row, cur[tid], s, tid, stages + stage * kStageElems);
      });
    };
    run_block(steps, stages, kStageElems, /*dw=*/false, issue,
              [&](int r, int n, float v0, float v1) { store_pair(p, l, t, r, n, v0, v1, pep, op); });
    smem.check();
  }
  TORCH_CHECK(gout.guards_intact(), "mma emulation: a write past the output");
  out.copy_(gout.view);
}

template <typename scalar_t>
void emulate_grad_weight(const at::Tensor& x, const at::Tensor& grad, const TubeLayout& L, int64_t target,
                         std::vector<at::Tensor>& dws) {
  const Guarded gx(x), gg(grad);
  std::vector<Guarded> gdw;
  std::vector<void*> dp;
  for (auto& t : dws) {
    gdw.emplace_back(t);
    gdw.back().view.fill_(std::numeric_limits<float>::quiet_NaN());  // an entry nobody writes stays NaN
    dp.push_back(gdw.back().view.mutable_data_ptr());
  }
  int64_t ws_elems = 0;
  const DwParams p = make_dw_params(L, gx.view.strides().data(), gx.view.const_data_ptr(), x.element_size(),
                                    dp.data(), target, &ws_elems);
  // the partials start as NaN too: the reduction may read only what the blocks wrote
  Guarded gws(at::full({ws_elems}, std::numeric_limits<float>::quiet_NaN(), x.options().dtype(at::kFloat)));
  float* ws = ws_elems > 0 ? gws.view.mutable_data_ptr<float>() : nullptr;
  const HostReadScope reads({gx.range(), gg.range()});  // x and G: the producers' copies
  const scalar_t* xp = gx.view.const_data_ptr<scalar_t>();
  const scalar_t* gp = gg.view.const_data_ptr<scalar_t>();
  for (int64_t blk = 0; blk < dw_blocks(p); ++blk) {
    Smem smem(dw_smem_bytes<scalar_t>());
    scalar_t* stages = reinterpret_cast<scalar_t*>(smem.bytes.data());
    int koff[BN];
    const DwLoc l = dw_locate(p, static_cast<int>(blk));
    for (int tid = 0; tid < kThreads; ++tid) dw_koff(p, l, tid, koff);
    const int steps = dw_steps(l);
    const int vx = p.vec_x[l.i];
    auto issue = [&](int s, int stage) {
      with_width(vx, [&](auto v) {
        for (int tid = 0; tid < kThreads; ++tid)
          issue_dw_step<decltype(v)::value>(p, l, xp, gp, koff, s, tid, stages + stage * kDwStageElems);
      });
    };
    run_block(steps, stages, kDwStageElems, /*dw=*/true, issue,
              [&](int r, int n, float v0, float v1) { dw_store_pair<scalar_t>(p, l, ws, r, n, v0, v1); });
    smem.check();
  }
  for (int e = 0; e < p.reduce_before[p.n_tubes]; ++e) dw_reduce<scalar_t>(p, ws, e);
  TORCH_CHECK(gws.guards_intact(), "mma emulation: a write past the dW partials");
  for (size_t i = 0; i < dws.size(); ++i) {
    TORCH_CHECK(gdw[i].guards_intact(), "mma emulation: a write past dW[", i, "]");
    dws[i].copy_(gdw[i].view);
  }
}

void check_takes(const at::Tensor& x, const TubeLayout& L) {
  TORCH_CHECK_VALUE(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
                    "the mma kernels take float16 and bfloat16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(L.tubes.size() <= size_t(kMaxTubes), "the mma kernels take at most ", kMaxTubes,
                    " tubes, got ", L.tubes.size());
  TORCH_CHECK_VALUE(fits_int32(L, x.sizes().data(), x.strides().data()),
                    "the mma kernels index in int32; this call's offsets do not fit");
}

std::vector<at::Tensor> mma_emulated_dw_cpu(const at::Tensor& grad_out, const at::Tensor& x, at::TensorList weights,
                                            at::IntArrayRef tubes, int64_t target) {
  const TubeLayout L = check_backward_args(grad_out, x, weights, tubes);
  check_takes(x, L);
  const at::Tensor grad = grad_out.contiguous();
  TORCH_CHECK_VALUE(dw_takes(L, grad.const_data_ptr()), "the mma weight gradient needs d % 8 == 0 (got d = ",
                    L.dim, ") and a 16-byte aligned gradient");
  TORCH_CHECK_VALUE(target >= 1, "target must be positive, got ", target);
  std::vector<at::Tensor> dws;
  for (const auto& w : weights) dws.push_back(at::empty(w.sizes(), x.options()));
  AT_DISPATCH_SWITCH(x.scalar_type(), "tube_tokens_mma_emulated_dw",
                     AT_DISPATCH_CASE(at::kHalf, [&] { emulate_grad_weight<scalar_t>(x, grad, L, target, dws); })
                         AT_DISPATCH_CASE(at::kBFloat16,
                                          [&] { emulate_grad_weight<scalar_t>(x, grad, L, target, dws); }));
  return dws;
}

// [splits_0, steps_per_split_0, splits_1, ...] of make_dw_params for this call and target.
std::vector<int64_t> mma_dw_splits_cpu(const at::Tensor& grad_out, const at::Tensor& x, at::TensorList weights,
                                       at::IntArrayRef tubes, int64_t target) {
  const TubeLayout L = check_backward_args(grad_out, x, weights, tubes);
  check_takes(x, L);
  std::vector<void*> dp(L.tubes.size(), nullptr);
  int64_t ws_elems = 0;
  const DwParams p =
      make_dw_params(L, x.strides().data(), x.const_data_ptr(), x.element_size(), dp.data(), target, &ws_elems);
  std::vector<int64_t> out;
  for (int i = 0; i < p.n_tubes; ++i) {
    out.push_back(p.splits[i]);
    out.push_back(p.steps_per_split[i]);
  }
  return out;
}

at::Tensor mma_emulated_cpu(const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                            at::IntArrayRef tubes, const c10::optional<at::Tensor>& pos_embed) {
  const TubeLayout L = check_forward_args(x, weights, biases, tubes, pos_embed);
  check_takes(x, L);
  at::Tensor out = at::empty({L.batch, L.num_tokens, L.dim}, x.options());
  if (out.numel() == 0) return out;
  at::Tensor pe;
  if (pos_embed.has_value() && pos_embed->defined()) pe = pos_embed->contiguous();
  const auto w = contiguous_all(weights);
  const auto b = contiguous_all(biases);
  AT_DISPATCH_SWITCH(x.scalar_type(), "tube_tokens_mma_emulated",
                     AT_DISPATCH_CASE(at::kHalf, [&] { emulate_forward<scalar_t>(x, w, b, pe, L, out); })
                         AT_DISPATCH_CASE(at::kBFloat16, [&] { emulate_forward<scalar_t>(x, w, b, pe, L, out); }));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tubevit_testing, CPU, m) {
  m.impl("tube_tokens_mma_emulated", &mma_emulated_cpu);
  m.impl("tube_tokens_mma_emulated_dw", &mma_emulated_dw_cpu);
  m.impl("mma_dw_splits", &mma_dw_splits_cpu);
}

}  // namespace tubevit
