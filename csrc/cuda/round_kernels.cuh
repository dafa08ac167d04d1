// Small kernels around tree_attention_kernel: the work list and the ancestor bits of a call (built on
// the device, so no size is read back to the host), and the merge of split-KV partial results.
#pragma once

#include <cstdint>

#include "common.cuh"

namespace dspark::cuda {

// tile_starts[r] = sum over r' < r of ceil(n_r' * group / rows_per_block): request r's first work item.
// One warp, scanning 32 requests at a time.
__global__ void tile_starts_kernel(const int32_t* qo_indptr, int64_t num_requests, int64_t group,
                                   int64_t rows_per_block, int32_t* tile_starts) {
  const int lane = threadIdx.x;
  int64_t carry = 0;
  if (lane == 0) tile_starts[0] = 0;
  for (int64_t base = 0; base < num_requests; base += kWarpSize) {
    const int64_t r = base + lane;
    int64_t tiles = 0;
    if (r < num_requests) {
      const int64_t n = static_cast<int64_t>(qo_indptr[r + 1]) - qo_indptr[r];
      tiles = n > 0 ? (n * group + rows_per_block - 1) / rows_per_block : 0;
    }
#pragma unroll
    for (int delta = 1; delta < kWarpSize; delta *= 2) {
      const int64_t other = __shfl_up_sync(0xffffffffu, tiles, delta);
      if (lane >= delta) tiles += other;
    }
    if (r < num_requests) tile_starts[r + 1] = static_cast<int32_t>(carry + tiles);
    carry += __shfl_sync(0xffffffffu, tiles, kWarpSize - 1);
  }
}

// words[t, w] bit b: node 32 w + b of token t's request is t's node or one of its ancestors. One
// thread per token; a parent that is not in [0, node) ends the walk (corrupt input stays in bounds).
__global__ void ancestor_words_kernel(const int32_t* parents, const int32_t* qo_indptr, int64_t num_requests,
                                      int64_t num_tokens, int64_t num_words, uint32_t* words) {
  const int64_t token = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (token >= num_tokens) return;
  uint32_t* row = words + token * num_words;
  for (int64_t w = 0; w < num_words; ++w) row[w] = 0u;
  int64_t lo = 0, hi = num_requests;  // the last r with qo_indptr[r] <= token
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    (qo_indptr[mid] <= token ? lo : hi) = mid;
  }
  const int64_t start = qo_indptr[lo];
  int64_t node = token - start;
  if (node < 0) return;
  while (node >= 0 && node / 32 < num_words) {
    row[node / 32] |= 1u << (node % 32);
    const int64_t parent = parents[start + node];
    if (parent >= node) break;
    node = parent;
  }
}

// out[t, h] = sum_s 2^(lse_s - lse) partial_s: the splits' partial softmaxes made one. One warp per
// (token, head) row; lanes stride over the head dim.
template <typename T>
__global__ void merge_splits_kernel(const float* partial, const float* lse, T* out, int64_t rows, int64_t head_dim,
                                    int splits) {
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (row >= rows) return;
  float top = -INFINITY;
  for (int s = 0; s < splits; ++s) top = fmaxf(top, lse[s * rows + row]);
  float total = 0.f;
  for (int s = 0; s < splits; ++s) total += top == -INFINITY ? 0.f : exp2f(lse[s * rows + row] - top);
  const float inv_total = total > 0.f ? 1.f / total : 0.f;
  for (int64_t d = lane; d < head_dim; d += kWarpSize) {
    float value = 0.f;
    for (int s = 0; s < splits; ++s) {
      const float weight = top == -INFINITY ? 0.f : exp2f(lse[s * rows + row] - top) * inv_total;
      value += weight * partial[(s * rows + row) * head_dim + d];
    }
    out[row * head_dim + d] = from_float<T>(value);
  }
}

}  // namespace dspark::cuda
