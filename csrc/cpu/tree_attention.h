// Tree attention on CPU: each round token attends to its request's committed KV prefix and to its
// ancestors-or-self among the round's tokens (contract: DESIGN.md, "The three ops").
#pragma once

#include <cstdint>

#include "common.h"

namespace dspark::cpu {

struct TreeAttentionParams {
  DType dtype;           // of q, k_cache, v_cache and out
  const void* q;         // [num_tokens, num_q_heads, head_dim], contiguous
  const void* k_cache;   // contiguous [R, capacity, H_kv, D] or paged [num_blocks, block_size, H_kv, D]
  const void* v_cache;   // same layout as k_cache
  void* out;             // [num_tokens, num_q_heads, head_dim], contiguous
  const int32_t* qo_indptr;      // [R + 1]
  const int32_t* cache_seqlens;  // [R]
  const int32_t* parents;        // [num_tokens] local parent indices, or nullptr for chains
  const int32_t* block_table;    // [R, max_blocks] or nullptr for a contiguous cache
  int64_t num_requests;
  int64_t num_tokens;
  int64_t num_q_heads;
  int64_t num_kv_heads;
  int64_t head_dim;
  // Contiguous cache: slots per request. Paged cache: slots per block.
  int64_t slots_per_row;
  int64_t max_blocks;  // block_table row length (paged only)
  float sm_scale;
  // Every round token sees all of its request's round tokens, not only its ancestors: a DSpark drafter's
  // block of positions decoded in parallel (bidirectional within the block). Not part of the tree_attention
  // op's contract: only the fused decoder layers set it, for a drafter's block (dspark/drafters/dspark_cpu.py).
  bool bidirectional_rounds = false;
};

// Inputs are validated by the caller; this function trusts every index.
void tree_attention(const TreeAttentionParams& params);

}  // namespace dspark::cpu
