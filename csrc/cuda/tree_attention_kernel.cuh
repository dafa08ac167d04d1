// The tree_attention kernel (design: tree_attention.cuh). Grid: (work item, KV head, split); block:
// 1, 2 or 4 warps of 16 rows each.
#pragma once

#include <cstdint>
#include <type_traits>

#include "attention_math.cuh"
#include "common.cuh"
#include "tree_attention.cuh"

namespace dspark::cuda {

// Where the shared-memory pieces of a block start (layout: AttentionTile::shared_bytes).
template <typename T, int kDimPad>
struct AttentionShared {
  using Tile = AttentionTile<T, kDimPad>;
  T* keys;          // [2][kKeys][kStride]
  T* values;        // [2][kKeys][kStride]
  T* queries;       // [rows][kStride]
  uint32_t* masks;  // [2][rows][kMaskWords]: ancestor words of the block's nodes for the staged round tile
  float* p_scratch; // [rows][kKeys] (fp32 math only)

  __device__ AttentionShared(unsigned char* raw, int rows) {
    keys = reinterpret_cast<T*>(raw);
    values = keys + 2 * Tile::kKeys * Tile::kStride;
    queries = values + 2 * Tile::kKeys * Tile::kStride;
    masks = reinterpret_cast<uint32_t*>(queries + rows * Tile::kStride);
    p_scratch = reinterpret_cast<float*>(masks + 2 * rows * Tile::kMaskWords);
  }
};

// First key of tile t: a committed slot for prefix tiles, a round index j (slot committed + j) after.
template <int kKeys>
__device__ __forceinline__ int64_t tile_first_key(const AttentionBlock& b, int64_t t) {
  return t < b.prefix_tiles ? b.prefix_lo + t * kKeys : (t - b.prefix_tiles) * kKeys;
}

template <typename T, int kDimPad>
__device__ void stage_tile(const TreeAttentionArgs& a, const AttentionBlock& b, const AttentionShared<T, kDimPad>& sh,
                           int rows, int64_t t, int stage) {
  using Tile = AttentionTile<T, kDimPad>;
  const bool prefix = t < b.prefix_tiles;
  const int64_t first_key = tile_first_key<Tile::kKeys>(b, t);
  const int64_t kv_head = blockIdx.y;
  const auto source = [&](int i) -> int64_t {
    const int64_t key = first_key + i;
    if (key >= (prefix ? b.prefix_hi : b.round_end)) return -1;
    const int64_t row = cache_row(a, b.request, prefix ? key : b.committed + key);
    return row < 0 ? -1 : (row * a.num_kv_heads + kv_head) * a.head_dim;
  };
  const size_t offset = size_t(stage) * Tile::kKeys * Tile::kStride;
  stage_rows<T, kDimPad>(a, sh.keys + offset, static_cast<const T*>(a.k_cache), Tile::kKeys, source);
  stage_rows<T, kDimPad>(a, sh.values + offset, static_cast<const T*>(a.v_cache), Tile::kKeys, source);
  if (!prefix && a.ancestor_words != nullptr) {
    uint32_t* masks = sh.masks + size_t(stage) * rows * Tile::kMaskWords;
    const int64_t nodes = b.end_node - b.first_node;
    for (int64_t i = threadIdx.x; i < nodes * Tile::kMaskWords; i += blockDim.x) {
      const int64_t word = first_key / kWordBits + i % Tile::kMaskWords;
      const int64_t token = b.start + b.first_node + i / Tile::kMaskWords;
      masks[i] = word < a.num_words ? a.ancestor_words[token * a.num_words + word] : 0u;
    }
  }
  copy_async_commit();
}

// Scales the scores of tile t to base 2 and hides what the lane's rows may not see: keys past the
// tile's range, and round slots that are not the row's node or one of its ancestors.
template <typename T, int kDimPad>
__device__ __forceinline__ void mask_scores(const TreeAttentionArgs& a, const AttentionBlock& b,
                                            const uint32_t* masks, int64_t t,
                                            float (&s)[AttentionTile<T, kDimPad>::kKeys / 8][4]) {
  using Tile = AttentionTile<T, kDimPad>;
  const int lane = threadIdx.x % kWarpSize, g = lane / 4, tq = lane % 4;
  const bool prefix = t < b.prefix_tiles;
  const int64_t first_key = tile_first_key<Tile::kKeys>(b, t);
  const int64_t key_end = prefix ? b.prefix_hi : b.round_end;
  int64_t node[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int64_t row = b.first_row + (threadIdx.x / kWarpSize) * kRowsPerWarp + g + 8 * half;
    node[half] = row < b.end_row ? row / a.group : -1;  // padding rows: range checks only
  }
#pragma unroll
  for (int nt = 0; nt < Tile::kKeys / 8; ++nt) {
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int64_t key = first_key + nt * 8 + 2 * tq + c % 2;
      const int64_t row_node = node[c / 2];
      bool visible = key < key_end;
      if (!prefix && visible && row_node >= 0) {
        if (a.ancestor_words == nullptr) {
          visible = key <= row_node;  // a chain
        } else {
          const uint32_t word = masks[(row_node - b.first_node) * Tile::kMaskWords + key / kWordBits -
                                      first_key / kWordBits];
          visible = (word >> (key % kWordBits)) & 1u;
        }
      }
      s[nt][c] = visible ? s[nt][c] * a.scale_log2 : -INFINITY;
    }
  }
}

// Online softmax over one tile, rows g and g + 8 of the lane (the quad of 4 lanes shares a row).
template <int kKeys, int kDimPad>
__device__ __forceinline__ void online_softmax(float (&s)[kKeys / 8][4], float (&o)[kDimPad / 8][4], float (&m)[2],
                                               float (&l)[2]) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float tile_max = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < kKeys / 8; ++nt) tile_max = fmaxf(tile_max, fmaxf(s[nt][2 * half], s[nt][2 * half + 1]));
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
    const float m_new = fmaxf(m[half], tile_max);
    const float m_safe = m_new == -INFINITY ? 0.f : m_new;  // nothing visible yet: keep exp2 away from NaN
    const float alpha = exp2f(m[half] - m_safe);
    float sum = 0.f;
#pragma unroll
    for (int nt = 0; nt < kKeys / 8; ++nt) {
#pragma unroll
      for (int c = 2 * half; c < 2 * half + 2; ++c) {
        s[nt][c] = exp2f(s[nt][c] - m_safe);
        sum += s[nt][c];
      }
    }
    l[half] = l[half] * alpha + sum;  // this lane's share; the quad adds its shares at the end
#pragma unroll
    for (int nd = 0; nd < kDimPad / 8; ++nd) {
      o[nd][2 * half] *= alpha;
      o[nd][2 * half + 1] *= alpha;
    }
    m[half] = m_new;
  }
}

// Normalises the lane's rows and writes them: to out when there is one split, else to the split's
// fp32 partial and log-sum-exp (base 2) for merge_splits_kernel.
template <typename T, int kDimPad>
__device__ __forceinline__ void write_rows(const TreeAttentionArgs& a, const AttentionBlock& b,
                                           float (&o)[kDimPad / 8][4], const float (&m)[2], float (&l)[2]) {
  const int lane = threadIdx.x % kWarpSize, g = lane / 4, tq = lane % 4;
  const int64_t split = blockIdx.z;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    l[half] += __shfl_xor_sync(0xffffffffu, l[half], 1);
    l[half] += __shfl_xor_sync(0xffffffffu, l[half], 2);
  }
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int64_t row = b.first_row + (threadIdx.x / kWarpSize) * kRowsPerWarp + g + 8 * half;
    if (row >= b.end_row) continue;
    const int64_t token = b.start + row / a.group;
    const int64_t head = static_cast<int64_t>(blockIdx.y) * a.group + row % a.group;
    const int64_t at = token * a.num_q_heads + head;  // (token, head) row of out / lse
    const float l_safe = l[half] == 0.f ? 1.f : l[half];  // only an empty split has l = 0
#pragma unroll
    for (int nd = 0; nd < kDimPad / 8; ++nd) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int64_t d = nd * 8 + 2 * tq + e;
        if (d >= a.head_dim) continue;
        const float value = o[nd][2 * half + e] / l_safe;
        if (a.splits == 1) {
          static_cast<T*>(a.out)[at * a.head_dim + d] = from_float<T>(value);
        } else {
          a.partial[(split * a.num_tokens * a.num_q_heads + at) * a.head_dim + d] = value;
        }
      }
    }
    if (a.splits > 1 && tq == 0) {
      a.lse[split * a.num_tokens * a.num_q_heads + at] = l[half] == 0.f ? -INFINITY : m[half] + log2f(l[half]);
    }
  }
}

template <typename T, int kDimPad>
__global__ void __launch_bounds__(4 * kWarpSize) tree_attention_kernel(TreeAttentionArgs a) {
  using Tile = AttentionTile<T, kDimPad>;
  constexpr int kKeys = Tile::kKeys;
  using Math = typename std::conditional<Tile::kFma, FmaTileMath<kDimPad, kKeys>, MmaTileMath<T, kDimPad, kKeys>>::type;
  extern __shared__ __align__(16) unsigned char shared_raw[];
  const int warp = threadIdx.x / kWarpSize;
  const int rows = kRowsPerWarp * (blockDim.x / kWarpSize);
  AttentionBlock b;
  if (!locate_block<kKeys>(a, rows, b)) return;  // uniform over the block
  const AttentionShared<T, kDimPad> sh(shared_raw, rows);
  const int64_t kv_head = blockIdx.y;

  float o[kDimPad / 8][4], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
#pragma unroll
  for (int nd = 0; nd < kDimPad / 8; ++nd) o[nd][0] = o[nd][1] = o[nd][2] = o[nd][3] = 0.f;
  const bool warp_has_rows = b.first_row + warp * kRowsPerWarp < b.end_row;

  if (b.tiles > 0) {
    stage_rows<T, kDimPad>(a, sh.queries, static_cast<const T*>(a.q), rows, [&](int i) -> int64_t {
      const int64_t row = b.first_row + i;
      if (row >= b.end_row) return -1;
      return ((b.start + row / a.group) * a.num_q_heads + kv_head * a.group + row % a.group) * a.head_dim;
    });
    stage_tile(a, b, sh, rows, 0, 0);  // its commit group carries the queries too
  }
  for (int64_t t = 0; t < b.tiles; ++t) {
    const int stage = static_cast<int>(t & 1);
    if (t + 1 < b.tiles) {
      stage_tile(a, b, sh, rows, t + 1, stage ^ 1);
      copy_async_wait<1>();
    } else {
      copy_async_wait<0>();
    }
    __syncthreads();  // tile t (and its mask words) visible to every warp
    if (warp_has_rows) {
      const size_t offset = size_t(stage) * kKeys * Tile::kStride;
      float s[kKeys / 8][4];
      Math::scores(sh.queries + warp * kRowsPerWarp * Tile::kStride, sh.keys + offset, Tile::kStride, s);
      mask_scores<T, kDimPad>(a, b, sh.masks + size_t(stage) * rows * Tile::kMaskWords, t, s);
      online_softmax<kKeys, kDimPad>(s, o, m, l);
      Math::accumulate(s, sh.values + offset, Tile::kStride, o, sh.p_scratch + warp * kRowsPerWarp * kKeys);
    }
    __syncthreads();  // every warp is done with this stage before tile t + 2 overwrites it
  }
  if (warp_has_rows) write_rows<T, kDimPad>(a, b, o, m, l);
}

}  // namespace dspark::cuda
