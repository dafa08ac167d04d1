#include "kv_rollback.h"

#include <cstring>
#include <initializer_list>

namespace dspark::cpu {

namespace {

// Where slot `slot` of request r starts inside one layer of the cache.
inline int64_t slot_offset(const KVRollbackParams& p, int64_t r, int64_t slot) {
  if (p.block_table == nullptr) return (r * p.slots_per_row + slot) * p.row_bytes;
  const int64_t block = p.block_table[r * p.max_blocks + slot / p.slots_per_row];
  return (block * p.slots_per_row + slot % p.slots_per_row) * p.row_bytes;
}

}  // namespace

void kv_rollback(const KVRollbackParams& p) {
  const int64_t layer_bytes = p.rows * p.slots_per_row * p.row_bytes;
  const int64_t work = p.num_layers * p.num_requests;
  // Requests own disjoint slots (and blocks), so (layer, request) items are independent; within one
  // item the moves run in path order, which is what makes overlapping moves such as 2->1, 3->2 correct.
#pragma omp parallel for schedule(static) if (work > 1)
  for (int64_t item = 0; item < work; ++item) {
    const int64_t layer = item / p.num_requests, r = item % p.num_requests;
    const int64_t committed = p.cache_seqlens[r];
    const int32_t* path = p.accepted_nodes + r * p.path_width;
    for (char* cache : {p.k_cache, p.v_cache}) {
      if (cache == nullptr) continue;
      char* base = cache + layer * layer_bytes;
      for (int64_t j = 0; j < p.num_accepted[r]; ++j) {
        if (path[j] == j) continue;
        std::memcpy(base + slot_offset(p, r, committed + j), base + slot_offset(p, r, committed + path[j]),
                    p.row_bytes);
      }
    }
  }
  for (int64_t r = 0; r < p.num_requests; ++r) p.cache_seqlens[r] += p.num_accepted[r];
}

}  // namespace dspark::cpu
