// Recycled CPU memory for the patch matrices tube_tokens_with_patches saves
// for the backward.
//
// Why: those buffers are a few MB per tube, allocated every forward and freed
// when autograd releases the graph. glibc serves blocks that size with
// mmap/munmap or trims them back to the OS, so each step paid fresh page
// faults on ~1.4x the token output (and, depending on the allocator's
// adaptive thresholds, run-to-run swings of several ms per step were measured
// on the dev VM; bench/NOTES.md). The pool keeps freed blocks and hands them
// out again. Only internal buffers come from it (these, and the whole-batch
// gradient rows of the 16-bit backward), never tensors a user receives (pool
// tensors' storage cannot be resized).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace tubevit {

// Uninitialised contiguous tensor of `sizes` (CPU, options' dtype) whose
// memory returns to the pool when its storage is freed.
at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options);

// Bytes held by the pool (freed blocks waiting for reuse). At most
// TUBEVIT_CPU_PATCH_CACHE_MB (read per release; default 256) MiB are kept;
// a block that would exceed it goes straight back to the system.
int64_t patch_pool_cached_bytes();

// Returns every cached block to the system.
void patch_pool_empty();

}  // namespace tubevit
