// The Hopper kernels' shared-memory operand layouts and wgmma atoms as CuTe
// types, host + device: the kernels (hopper_*.cu) build their stage
// buffers from them, and the CPU emulator (hopper_emulation.cpp)
// evaluates the same layouts on the host, so that the CPU suite checks the
// producers' swizzled addresses (every chunk of V elements contiguous and
// 2V-byte aligned in shared memory, every stage element written once).
// Needs the CUTLASS/CuTe headers (builds with TUBEVIT_WITH_HOPPER).
#pragma once

#include <cute/tensor.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/numeric_types.h>

#include <type_traits>

#include "hopper_tiles.h"

namespace tubevit {
namespace hopper {

// One 64 x BN x 16 wgmma with fp32 accumulators, both operands in shared
// memory, A with major-ness MA and B with MB (K: the reduction dimension
// contiguous; MN: the rows / columns of the product contiguous).
template <typename T, cute::GMMA::Major MA, cute::GMMA::Major MB> struct GmmaAtomOf;
template <cute::GMMA::Major MA, cute::GMMA::Major MB> struct GmmaAtomOf<cutlass::half_t, MA, MB> {
  using type = cute::SM90_64x128x16_F32F16F16_SS<MA, MB>;
};
template <cute::GMMA::Major MA, cute::GMMA::Major MB> struct GmmaAtomOf<cutlass::bfloat16_t, MA, MB> {
  using type = cute::SM90_64x128x16_F32BF16BF16_SS<MA, MB>;
};
template <typename T, cute::GMMA::Major MA, cute::GMMA::Major MB = MA>
using GmmaAtom = typename GmmaAtomOf<T, MA, MB>::type;

// kStages stages of a Rows x BK operand tile in 128-byte-swizzled shared
// memory, (row, k, stage), with major-ness M.
template <typename T, cute::GMMA::Major M, int Rows>
using StageLayout = decltype(cute::tile_to_shape(
    std::conditional_t<M == cute::GMMA::Major::K, cute::GMMA::Layout_K_SW128_Atom<T>,
                       cute::GMMA::Layout_MN_SW128_Atom<T>>{},
    cute::make_shape(cute::Int<Rows>{}, cute::Int<BK>{}, cute::Int<kStages>{})));

// The stage layouts of the three kernels: (row, k, stage) of each operand.
namespace layouts {
template <typename T> using ForwardA = StageLayout<T, cute::GMMA::Major::K, BM>;   // patch rows
template <typename T> using ForwardB = StageLayout<T, cute::GMMA::Major::K, BN>;   // W rows
template <typename T> using DwA = StageLayout<T, cute::GMMA::Major::MN, BM>;       // G^T (channel, token)
template <typename T> using DwB = StageLayout<T, cute::GMMA::Major::MN, BN>;       // P (column, token)
template <typename T> using DpA = StageLayout<T, cute::GMMA::Major::K, BM>;        // G rows
template <typename T> using DpB = StageLayout<T, cute::GMMA::Major::MN, BN>;       // W (column, channel)
}  // namespace layouts

}  // namespace hopper
}  // namespace tubevit
