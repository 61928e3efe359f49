// Recycled CPU memory for the large buffers of the CPU kernels: the token
// output, the patch matrices tube_tokens_with_patches saves for the
// backward, the whole-batch gradient rows of the 16-bit backward, and the
// input gradient.
//
// Why: those buffers are megabytes (the input gradient of a 4 x 3 x 32 x
// 224 x 224 clip is 77 MB), allocated every step and freed when autograd
// or the optimiser lets go of them. glibc serves blocks that size with
// mmap/munmap or trims them back to the OS, so every step paid fresh page
// faults on all of it: ~0.85 us per 4 KiB page on the dev VM, i.e. 16-17 ms
// for `torch.zeros` of that input gradient against 1.7 ms for zeroing
// recycled memory; and, depending on glibc's adaptive thresholds, run-to-run
// swings of several ms per step (bench/DESIGN.md). Above 32 MiB (glibc's
// largest mmap threshold) every such block is fresh pages: the token output
// at B = 32, d = 768 (53 MB) cost ~9 % of the forward. The pool keeps freed
// blocks and hands them out again.
//
// Tensors from it are ordinary tensors: their storage is resizable, with
// this pool as its allocator (a resize takes a new block from the pool and
// returns the old one), so they may be handed to users.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace tubevit {

// Uninitialised contiguous tensor of `sizes` (CPU, options' dtype) whose
// memory returns to the pool when its storage is freed.
at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options);

// Bytes held by the pool (freed blocks waiting for reuse). At most
// TUBEVIT_CPU_PATCH_CACHE_MB (csrc/options.h; default 256) MiB are kept;
// a block that would exceed it goes straight back to the system.
int64_t patch_pool_cached_bytes();

// Returns every cached block to the system.
void patch_pool_empty();

}  // namespace tubevit
