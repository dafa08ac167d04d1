// Smoke test of the CPU kernel library without torch: a two-node chain over a one-slot prefix,
// greedy acceptance, and the rollback of the accepted path. Exit status 0 on success.
#include <cmath>
#include <cstdio>
#include <vector>

#include "cpu/kv_rollback.h"
#include "cpu/rejection_sample.h"
#include "cpu/tree_attention.h"

using namespace dspark::cpu;

static int failures = 0;

static void check(bool ok, const char* what) {
  if (!ok) {
    std::printf("FAILED: %s\n", what);
    ++failures;
  }
}

int main() {
  // One request, one head, D = 2, one committed slot, two round nodes (a chain).
  std::vector<float> k = {1, 0, 0, 1, 1, 1, 9, 9}, v = {1, 2, 3, 4, 5, 6, 9, 9};  // [1, 4, 1, 2]
  std::vector<float> q = {0, 0, 0, 0}, out(4, 0.f);
  std::vector<int32_t> indptr = {0, 2}, seqlens = {1};
  TreeAttentionParams a{};
  a.dtype = DType::kFloat32;
  a.q = q.data(); a.k_cache = k.data(); a.v_cache = v.data(); a.out = out.data();
  a.qo_indptr = indptr.data(); a.cache_seqlens = seqlens.data();
  a.num_requests = 1; a.num_tokens = 2; a.num_q_heads = 1; a.num_kv_heads = 1; a.head_dim = 2;
  a.slots_per_row = 4; a.sm_scale = 1.f;
  tree_attention(a);
  // Zero queries weigh visible slots equally: node 0 sees slots 0-1, node 1 sees slots 0-2.
  check(std::fabs(out[0] - 2.f) < 1e-6f && std::fabs(out[1] - 3.f) < 1e-6f, "attention node 0");
  check(std::fabs(out[2] - 3.f) < 1e-6f && std::fabs(out[3] - 4.f) < 1e-6f, "attention node 1");

  // Greedy: node 0's argmax is node 1's token (2); node 1's argmax (0) differs from node 2's (1).
  std::vector<float> logits = {0, 1, 5, 9, 0, 0, 0, 1, 0};  // [3 nodes, V = 3]
  std::vector<int64_t> tokens = {0, 2, 1}, emitted(3, 0);
  std::vector<int32_t> rs_indptr = {0, 3}, path(3, 0), count(1, 0), top_k = {0};
  std::vector<float> temperature = {0.f}, top_p = {1.f};
  std::vector<int64_t> seed = {1}, offset = {0};
  RejectionSampleParams r{};
  r.logits_dtype = DType::kFloat32; r.target_logits = logits.data(); r.draft_tokens = tokens.data();
  r.qo_indptr = rs_indptr.data(); r.temperature = temperature.data(); r.top_k = top_k.data();
  r.top_p = top_p.data(); r.seed = seed.data(); r.offset = offset.data();
  r.num_requests = 1; r.num_tokens = 3; r.vocab_size = 3; r.path_width = 3;
  r.accepted_nodes = path.data(); r.num_accepted = count.data(); r.output_tokens = emitted.data();
  rejection_sample(r);
  check(count[0] == 2 && path[0] == 0 && path[1] == 1 && path[2] == -1, "greedy path");
  check(emitted[0] == 2 && emitted[1] == 0 && emitted[2] == -1, "greedy tokens");

  // Keep path [0, 2] of a round written at slots 1..3: slot 1 stays, slot 3 moves to slot 2.
  std::vector<int32_t> keep = {0, 2, -1}, keep_count = {2}, lengths = {1};
  KVRollbackParams b{};
  b.k_cache = reinterpret_cast<char*>(k.data()); b.v_cache = reinterpret_cast<char*>(v.data());
  b.num_layers = 1; b.rows = 1; b.slots_per_row = 4; b.row_bytes = 2 * sizeof(float);
  b.cache_seqlens = lengths.data(); b.accepted_nodes = keep.data(); b.num_accepted = keep_count.data();
  b.num_requests = 1; b.path_width = 3;
  kv_rollback(b);
  check(lengths[0] == 3, "rollback length");
  check(v[4] == 9.f && v[5] == 9.f && v[2] == 3.f, "rollback moved slot 3 to slot 2, kept slot 1");
  std::printf(failures ? "smoke test failed\n" : "smoke test passed\n");
  return failures ? 1 : 0;
}
