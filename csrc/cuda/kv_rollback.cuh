// kv_rollback on the GPU (DESIGN.md, op 3): for j < m_r, slot L_r + j <- slot L_r + accepted_nodes[r, j],
// for every layer of the cache in one launch; then cache_seqlens[r] += m_r in a second, tiny launch.
//
// Why it is overlap-safe: thread x of a block owns word x of the slot row (16, 8, 4, 2 or 1 bytes)
// in every move of its request and layer, so all reads and writes of one byte range come from one
// thread, in path order; no barrier is needed. Paths are strictly increasing, so the source of move j
// (slot L + path[j] >= L + j) is never an earlier move's destination (L + i, i < j): a thread may load
// a batch of moves before storing them, for memory-level parallelism, and still equal the sequential
// result. The second launch exists because every block of a request reads the old L_r.
#pragma once

#include <cstdint>

#include "common.cuh"

namespace dspark::cuda {

struct KVRollbackArgs {
  char* k_cache;
  char* v_cache;  // may be nullptr
  int64_t num_layers, rows, slots_per_row, row_bytes;
  const int32_t* cache_seqlens;
  const int32_t* accepted_nodes;
  const int32_t* num_accepted;
  const int32_t* block_table;  // nullptr: contiguous
  int64_t num_requests, path_width, max_blocks;
};

constexpr int kRollbackBatch = 8;  // moves loaded before any of them is stored

// Index of request r's `slot` row inside one layer, or -1 when the slot or its block is out of range
// (only corrupt inputs get there: the move is skipped instead of touching foreign memory).
__device__ __forceinline__ int64_t rollback_row(const KVRollbackArgs& a, int64_t r, int64_t slot) {
  if (a.block_table == nullptr) {
    return (slot >= 0 && slot < a.slots_per_row && r < a.rows) ? r * a.slots_per_row + slot : -1;
  }
  const int64_t block_index = slot / a.slots_per_row;
  if (slot < 0 || block_index >= a.max_blocks) return -1;
  const int64_t block = a.block_table[r * a.max_blocks + block_index];
  return (block >= 0 && block < a.rows) ? block * a.slots_per_row + slot % a.slots_per_row : -1;
}

__device__ __forceinline__ int64_t accepted_count(const KVRollbackArgs& a, int64_t r) {
  const int64_t m = a.num_accepted[r];
  return m < 0 ? 0 : (m > a.path_width ? a.path_width : m);
}

template <typename Word>
__device__ __forceinline__ void move_path(const KVRollbackArgs& a, Word* layer, int64_t r, int64_t column,
                                          int64_t words_per_row) {
  const int64_t committed = a.cache_seqlens[r];
  const int64_t count = accepted_count(a, r);
  const int32_t* path = a.accepted_nodes + r * a.path_width;
  for (int64_t first = 0; first < count; first += kRollbackBatch) {
    Word held[kRollbackBatch];
    int64_t destination[kRollbackBatch];
#pragma unroll
    for (int b = 0; b < kRollbackBatch; ++b) {
      const int64_t j = first + b;
      destination[b] = -1;
      if (j >= count) continue;
      const int64_t node = path[j];
      if (node == j) continue;  // kept in place
      const int64_t source_row = rollback_row(a, r, committed + node);
      const int64_t destination_row = rollback_row(a, r, committed + j);
      if (source_row < 0 || destination_row < 0) continue;
      held[b] = layer[source_row * words_per_row + column];
      destination[b] = destination_row * words_per_row + column;
    }
#pragma unroll
    for (int b = 0; b < kRollbackBatch; ++b) {
      if (destination[b] >= 0) layer[destination[b]] = held[b];
    }
  }
}

// Grid: (word columns / blockDim.x, requests, layers), each dimension walked grid-stride.
template <typename Word>
__global__ void kv_rollback_kernel(KVRollbackArgs a) {
  const int64_t words_per_row = a.row_bytes / static_cast<int64_t>(sizeof(Word));
  const int64_t column = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (column >= words_per_row) return;
  const int64_t layer_words = a.rows * a.slots_per_row * words_per_row;
  for (int64_t r = blockIdx.y; r < a.num_requests; r += gridDim.y) {
    for (int64_t layer = blockIdx.z; layer < a.num_layers; layer += gridDim.z) {
      move_path(a, reinterpret_cast<Word*>(a.k_cache) + layer * layer_words, r, column, words_per_row);
      if (a.v_cache != nullptr) {
        move_path(a, reinterpret_cast<Word*>(a.v_cache) + layer * layer_words, r, column, words_per_row);
      }
    }
  }
}

__global__ void add_accepted_kernel(int32_t* cache_seqlens, KVRollbackArgs a) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r < a.num_requests) cache_seqlens[r] += static_cast<int32_t>(accepted_count(a, r));
}

}  // namespace dspark::cuda
