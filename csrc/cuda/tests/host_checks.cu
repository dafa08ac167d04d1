// What of the CUDA library can run without a GPU: the host side of Philox (the same __host__ __device__
// function the kernels call) against dspark/reference/philox.py, and the tree_attention plan and
// workspace layout. Exit status 0 on success. Built and run by tests/test_cuda_compile.py.
#include <cstdio>

#include "cuda/launchers.h"
#include "cuda/philox.cuh"

using namespace dspark::cuda;

static int failures = 0;

static void check(bool ok, const char* what) {
  if (!ok) {
    std::printf("FAILED: %s\n", what);
    ++failures;
  }
}

// Values printed by dspark.reference.philox for (seed, offset, local node).
static void check_philox() {
  struct Case {
    int64_t seed, offset;
    uint32_t node;
    uint32_t words[4];
    double u0, u1;
  };
  const Case cases[] = {
      {0, 0, 0, {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}, 0x1.989fa370b4e2cp-2, 0x1.78af58a6c036fp-1},
      {7919, 3, 5, {0x26fba238u, 0xfc40e20au, 0xa2446952u, 0xa8961435u}, 0x1.37dd11fc40e20p-3, 0x1.4488d2aa25850p-1},
      {-1, 1099511627783LL, 15, {0x566e7ec2u, 0x7172970au, 0x2fa2efecu, 0xea9c7c88u}, 0x1.59b9fb38b94b8p-2,
       0x1.7d177fea9c7c8p-3},
      {9223372036854775807LL, -5, 1, {0x42927024u, 0x46b235f3u, 0x70c1f856u, 0x097ee6a2u}, 0x1.0a49c0a3591aep-2,
       0x1.c307e104bf734p-2},
  };
  for (const Case& c : cases) {
    const uint64_t s = static_cast<uint64_t>(c.seed), o = static_cast<uint64_t>(c.offset);
    const PhiloxWords w = philox4x32_10(static_cast<uint32_t>(o), static_cast<uint32_t>(o >> 32), c.node, 0u,
                                        static_cast<uint32_t>(s), static_cast<uint32_t>(s >> 32));
    bool same = true;
    for (int i = 0; i < 4; ++i) same = same && w.w[i] == c.words[i];
    check(same, "philox words equal the reference");
    check(philox_node_uniform(c.seed, c.offset, c.node, 0) == c.u0, "acceptance uniform equals the reference");
    check(philox_node_uniform(c.seed, c.offset, c.node, 1) == c.u1, "sampling uniform equals the reference");
  }
}

static void check_plan(int64_t requests, int64_t tokens, int64_t q_heads, int64_t kv_heads, int64_t capacity,
                       bool paged, bool tree, int sms) {
  TreeAttentionParams p{};
  p.num_requests = requests;
  p.num_tokens = tokens;
  p.num_q_heads = q_heads;
  p.num_kv_heads = kv_heads;
  p.head_dim = 128;
  p.block_table = paged ? reinterpret_cast<const int32_t*>(16) : nullptr;  // only tested against nullptr
  p.parents = tree ? reinterpret_cast<const int32_t*>(16) : nullptr;
  p.slots_per_row = paged ? 16 : capacity;
  p.max_blocks = paged ? (capacity + 15) / 16 : 0;
  p.num_sms = sms;
  const TreeAttentionPlan plan = plan_tree_attention(p);
  const int64_t slots = paged ? p.max_blocks * 16 : capacity;
  const int64_t rows_per_block = 16 * plan.warps;
  const int64_t group = q_heads / kv_heads;
  // Every split but the last holds prefix slots; together they cover the capacity.
  check(plan.splits >= 1 && plan.chunk * plan.splits >= slots && plan.chunk * (plan.splits - 1) < slots,
        "splits cover the capacity without an empty one");
  // The item bound holds for the worst split of tokens over requests (one request holding the rest).
  const int64_t rest = tokens - (requests - 1);
  const int64_t worst = (requests - 1) * ((group + rows_per_block - 1) / rows_per_block) +
                        (rest * group + rows_per_block - 1) / rows_per_block;
  check(plan.num_items >= worst, "work-item bound");
  check(plan.words_offset % 16 == 0 && plan.partial_offset % 16 == 0 && plan.lse_offset % 16 == 0,
        "workspace pieces are 16-byte aligned");
  check(plan.num_words == (tree ? (tokens + 31) / 32 : 0), "ancestor words per node");
  const size_t split_rows = plan.splits > 1 ? size_t(plan.splits) * tokens * q_heads : 0;
  check(plan.workspace_bytes >= plan.lse_offset + split_rows * sizeof(float), "workspace holds the LSEs");
  check(tree_attention_workspace_bytes(p) == plan.workspace_bytes, "workspace size is the plan's");
}

int main() {
  check_philox();
  check_plan(1, 8, 32, 8, 4104, false, true, 132);      // one request decoding a tree over a long prefix
  check_plan(32, 256, 32, 8, 4104, true, true, 132);    // the suite's batch, paged
  check_plan(3, 4096, 8, 8, 4096, false, false, 108);   // causal prefill, no splits needed
  check_plan(7, 7, 64, 1, 100, true, false, 132);       // MQA, short prefix
  if (failures == 0) std::printf("ok\n");
  return failures == 0 ? 0 : 1;
}
