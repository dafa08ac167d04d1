// tree_attention on the GPU (DESIGN.md, op 1): a split-KV, decode-style flash attention for few round
// tokens per request over long committed prefixes, plus each token's ancestors-or-self in the round.
//
// A block owns (a tile of one request's rows, one KV head, one split of the prefix). Rows are the
// request's (node, query head) pairs of that KV head's GQA group, numbered node * group + h, so one
// K/V tile in shared memory serves every node and every query head of the group; each warp owns 16
// rows (one MMA row tile). K/V tiles arrive by 16-byte cp.async copies, double-buffered. Prefix tiles
// carry no mask beyond their end; the round's own slots (the last split's job) test packed ancestor
// bits, staged per tile in shared memory from the words build_ancestor_words writes once per call.
// Splits write fp32 partial outputs and log-sum-exps that merge_splits_kernel combines.
//
// This header holds the block's geometry and staging helpers; tree_attention_kernel.cuh the kernel,
// round_kernels.cuh the per-call helpers (work items, ancestor words, split merge).
#pragma once

#include <cstdint>
#include <type_traits>

#include "attention_math.cuh"
#include "common.cuh"

namespace dspark::cuda {

constexpr int kRowsPerWarp = 16;
constexpr int kWordBits = 32;

struct TreeAttentionArgs {
  const void* q;
  const void* k_cache;
  const void* v_cache;
  void* out;                       // q's dtype, written directly when splits == 1
  float* partial;                  // [splits, T, H_q, D] when splits > 1
  float* lse;                      // [splits, T, H_q], log2 domain
  const int32_t* qo_indptr;
  const int32_t* cache_seqlens;
  const int32_t* block_table;      // nullptr: contiguous
  const uint32_t* ancestor_words;  // [T, num_words], nullptr for chains
  const int32_t* tile_starts;      // [R + 1]: first work item of each request
  int64_t num_requests, num_tokens, num_q_heads, num_kv_heads, head_dim, group;
  int64_t slots_per_row, cache_rows, max_blocks, capacity, num_words, chunk;
  int splits;
  float scale_log2;
  bool vectorised;                 // head rows and pointers allow 16-byte copies
};

// Tile geometry of one instantiation: about 16 KiB per K (or V) tile, rows padded by 16 bytes so the
// fragment loads of the 8 row groups of a warp hit different banks.
template <typename T, int kDimPad>
struct AttentionTile {
  static constexpr int kKeysRaw = 16384 / (kDimPad * static_cast<int>(sizeof(T)));
  static constexpr int kKeys = kKeysRaw > 64 ? 64 : (kKeysRaw < 16 ? 16 : kKeysRaw);
  static constexpr int kStride = kDimPad + 16 / static_cast<int>(sizeof(T));  // elements per staged row
  static constexpr int kChunks = kDimPad * static_cast<int>(sizeof(T)) / 16;   // 16-byte pieces per row
  static constexpr int kMaskWords = (kKeys + kWordBits - 1) / kWordBits;
  static constexpr bool kFma = std::is_same<T, float>::value;

  // Dynamic shared memory of a block of `warps` warps: K, V (two stages each), Q, mask words, P.
  static constexpr __host__ __device__ size_t kv_bytes() { return size_t(2) * kKeys * kStride * sizeof(T); }
  static constexpr __host__ __device__ size_t shared_bytes(int warps) {
    const size_t rows = size_t(kRowsPerWarp) * warps;
    return 2 * kv_bytes() + rows * kStride * sizeof(T) + 2 * rows * kMaskWords * sizeof(uint32_t) +
           (kFma ? rows * kKeys * sizeof(float) : 0);
  }
};

// Row (slot index inside the cache's first two dims) of request r's `slot`; -1 when out of range.
__device__ __forceinline__ int64_t cache_row(const TreeAttentionArgs& a, int64_t r, int64_t slot) {
  if (slot < 0 || slot >= a.capacity) return -1;
  if (a.block_table == nullptr) return r < a.cache_rows ? r * a.slots_per_row + slot : -1;
  const int64_t block = a.block_table[r * a.max_blocks + slot / a.slots_per_row];
  return (block >= 0 && block < a.cache_rows) ? block * a.slots_per_row + slot % a.slots_per_row : -1;
}

// Copies `count` rows of D elements into shared rows of kStride (zeros past D and for rows whose
// source is -1). source(i) gives row i's element offset in `base`.
template <typename T, int kDimPad, typename Source>
__device__ __forceinline__ void stage_rows(const TreeAttentionArgs& a, T* dst, const T* base, int count,
                                           Source source) {
  using Tile = AttentionTile<T, kDimPad>;
  if (a.vectorised) {
    const int row_bytes = static_cast<int>(a.head_dim * sizeof(T));
    for (int i = threadIdx.x; i < count * Tile::kChunks; i += blockDim.x) {
      const int row = i / Tile::kChunks, piece = i % Tile::kChunks;
      const int64_t offset = source(row);
      const bool present = offset >= 0 && piece * 16 < row_bytes;
      const T* src = present ? base + offset + piece * (16 / sizeof(T)) : base;
      copy_async_16(dst + row * Tile::kStride + piece * (16 / sizeof(T)), src, present ? 16 : 0);
    }
    return;
  }
  for (int i = threadIdx.x; i < count * kDimPad; i += blockDim.x) {
    const int row = i / kDimPad, d = i % kDimPad;
    const int64_t offset = source(row);
    dst[row * Tile::kStride + d] = (offset >= 0 && d < a.head_dim) ? base[offset + d] : from_float<T>(0.f);
  }
}

// The block's place in the round, uniform over its threads.
struct AttentionBlock {
  int64_t request, start, n, committed;
  int64_t first_row, end_row;      // the block's rows [first_row, end_row) of node * group + h
  int64_t first_node, end_node;    // nodes spanned by those rows
  int64_t prefix_lo, prefix_hi;    // this split's committed slots
  int64_t prefix_tiles, round_end, tiles;
};

template <int kKeys>
__device__ __forceinline__ bool locate_block(const TreeAttentionArgs& a, int rows_per_block, AttentionBlock& b) {
  const int64_t item = blockIdx.x;
  if (item >= a.tile_starts[a.num_requests]) return false;  // spare item of the shape-only plan
  int64_t lo = 0, hi = a.num_requests;                     // last r with tile_starts[r] <= item
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    (a.tile_starts[mid] <= item ? lo : hi) = mid;
  }
  b.request = lo;
  b.start = a.qo_indptr[lo];
  b.n = a.qo_indptr[lo + 1] - b.start;
  if (b.start < 0 || b.n <= 0 || b.start + b.n > a.num_tokens) return false;
  b.committed = a.cache_seqlens[lo];
  b.committed = b.committed < 0 ? 0 : b.committed;
  b.first_row = (item - a.tile_starts[lo]) * rows_per_block;
  b.end_row = b.first_row + rows_per_block < b.n * a.group ? b.first_row + rows_per_block : b.n * a.group;
  b.first_node = b.first_row / a.group;
  b.end_node = (b.end_row - 1) / a.group + 1;
  const int split = blockIdx.z;
  b.prefix_lo = split * a.chunk;
  const int64_t limit = b.committed < a.capacity ? b.committed : a.capacity;
  b.prefix_hi = b.prefix_lo + a.chunk < limit ? b.prefix_lo + a.chunk : limit;
  b.prefix_tiles = b.prefix_hi > b.prefix_lo ? (b.prefix_hi - b.prefix_lo + kKeys - 1) / kKeys : 0;
  b.round_end = split == a.splits - 1 ? b.end_node : 0;  // ancestors precede their descendants
  b.tiles = b.prefix_tiles + (b.round_end + kKeys - 1) / kKeys;
  return true;
}

}  // namespace dspark::cuda
