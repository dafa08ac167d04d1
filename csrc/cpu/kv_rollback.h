// In-place KV-cache compaction after verification: keeps the accepted path of every request
// (contract: DESIGN.md, "The three ops").
#pragma once

#include <cstdint>

namespace dspark::cpu {

struct KVRollbackParams {
  // Caches viewed as [num_layers, rows, slots_per_row, row_bytes]: rows are requests (contiguous)
  // or blocks (paged). v_cache may be nullptr.
  char* k_cache;
  char* v_cache;
  int64_t num_layers;
  int64_t rows;
  int64_t slots_per_row;
  int64_t row_bytes;          // bytes of one slot (H_kv * D * element size)
  int32_t* cache_seqlens;     // [R], incremented by num_accepted
  const int32_t* accepted_nodes;  // [R, path_width]
  const int32_t* num_accepted;    // [R]
  const int32_t* block_table;     // [R, max_blocks] or nullptr for a contiguous cache
  int64_t num_requests;
  int64_t path_width;
  int64_t max_blocks;
};

// Inputs are validated by the caller; this function trusts every index.
void kv_rollback(const KVRollbackParams& params);

}  // namespace dspark::cpu
