// Launcher of tree_attention (kernels: tree_attention_kernel.cuh, round_kernels.cuh): the plan from
// shapes only, the workspace layout, and the per-call kernels in stream order.
#include <algorithm>

#include "launchers.h"
#include "round_kernels.cuh"
#include "tree_attention_kernel.cuh"

namespace dspark::cuda {

namespace {

constexpr int64_t kMinSplitSlots = 256;  // never cut the prefix into splits shorter than this
constexpr int64_t kMaxSplits = 65535;    // grid dimension z

// The largest block (4 warps) of every instantiation fits the dynamic shared memory of sm_80
// (163 KiB; sm_90 allows 227 KiB).
constexpr size_t kMaxSharedBytes = 163 * 1024;
static_assert(AttentionTile<float, 256>::shared_bytes(4) <= kMaxSharedBytes, "fp32 tiles too large");
static_assert(AttentionTile<__half, 256>::shared_bytes(4) <= kMaxSharedBytes, "fp16 tiles too large");
static_assert(AttentionTile<float, 128>::shared_bytes(4) <= kMaxSharedBytes, "fp32 tiles too large");

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
size_t align16(size_t bytes) { return (bytes + 15) / 16 * 16; }

int64_t capacity_of(const TreeAttentionParams& p) {
  return p.block_table != nullptr ? p.max_blocks * p.slots_per_row : p.slots_per_row;
}

template <typename T, int kDimPad>
cudaError_t launch_attention(const TreeAttentionArgs& args, const TreeAttentionPlan& plan, cudaStream_t stream) {
  using Tile = AttentionTile<T, kDimPad>;
  const size_t shared = Tile::shared_bytes(plan.warps);
  const cudaError_t status = cudaFuncSetAttribute(tree_attention_kernel<T, kDimPad>,
                                                  cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared));
  if (status != cudaSuccess) return status;
  const dim3 grid(static_cast<unsigned>(plan.num_items), static_cast<unsigned>(args.num_kv_heads),
                  static_cast<unsigned>(plan.splits));
  tree_attention_kernel<T, kDimPad><<<grid, plan.warps * kWarpSize, shared, stream>>>(args);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_for_type(const TreeAttentionArgs& args, const TreeAttentionPlan& plan, cudaStream_t stream) {
  if (args.head_dim <= 64) return launch_attention<T, 64>(args, plan, stream);
  if (args.head_dim <= 128) return launch_attention<T, 128>(args, plan, stream);
  return launch_attention<T, 256>(args, plan, stream);
}

template <typename T>
void launch_merge(const TreeAttentionArgs& args, cudaStream_t stream) {
  const int64_t rows = args.num_tokens * args.num_q_heads;
  const int threads = 256;
  merge_splits_kernel<T><<<static_cast<unsigned>(ceil_div(rows * kWarpSize, threads)), threads, 0, stream>>>(
      args.partial, args.lse, static_cast<T*>(args.out), rows, args.head_dim, args.splits);
}

bool sixteen_byte_copies(const TreeAttentionParams& p) {
  const size_t element = p.dtype == DType::kFloat32 ? 4 : 2;
  const auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  return (p.head_dim * element) % 16 == 0 && aligned(p.q) && aligned(p.k_cache) && aligned(p.v_cache);
}

}  // namespace

TreeAttentionPlan plan_tree_attention(const TreeAttentionParams& p) {
  TreeAttentionPlan plan{};
  const int64_t group = p.num_kv_heads > 0 ? p.num_q_heads / p.num_kv_heads : 1;
  const int64_t rows = p.num_tokens * group;
  const int64_t average_rows = ceil_div(rows, std::max<int64_t>(p.num_requests, 1));
  plan.warps = average_rows <= 16 ? 1 : (average_rows <= 32 ? 2 : 4);
  const int64_t rows_per_block = kRowsPerWarp * plan.warps;
  // sum_r ceil(n_r * group / rows_per_block) <= rows / rows_per_block + R: a bound without a host read.
  plan.num_items = std::max<int64_t>(ceil_div(rows, rows_per_block) + p.num_requests, 1);
  const int64_t capacity = std::max<int64_t>(capacity_of(p), 1);
  const int64_t blocks = std::max<int64_t>(ceil_div(rows, rows_per_block) * p.num_kv_heads, 1);
  int64_t splits = std::min(ceil_div(2 * std::max(p.num_sms, 1), blocks), ceil_div(capacity, kMinSplitSlots));
  splits = std::min(std::max<int64_t>(splits, 1), kMaxSplits);
  plan.chunk = splits > 1 ? ceil_div(ceil_div(capacity, splits), 64) * 64 : capacity;
  plan.splits = static_cast<int>(ceil_div(capacity, plan.chunk));  // no split without prefix slots
  plan.num_words = p.parents != nullptr ? ceil_div(p.num_tokens, kWordBits) : 0;
  size_t at = 0;
  plan.tile_starts_offset = at;
  at += align16(sizeof(int32_t) * (p.num_requests + 1));
  plan.words_offset = at;
  at += align16(sizeof(uint32_t) * p.num_tokens * plan.num_words);
  plan.partial_offset = at;
  const size_t split_rows = plan.splits > 1 ? size_t(plan.splits) * p.num_tokens * p.num_q_heads : 0;
  at += align16(sizeof(float) * split_rows * p.head_dim);
  plan.lse_offset = at;
  at += align16(sizeof(float) * split_rows);
  plan.workspace_bytes = at;
  return plan;
}

size_t tree_attention_workspace_bytes(const TreeAttentionParams& p) { return plan_tree_attention(p).workspace_bytes; }

cudaError_t tree_attention(const TreeAttentionParams& p, void* workspace, cudaStream_t stream) {
  if (p.num_kv_heads < 1 || p.num_q_heads % p.num_kv_heads != 0 || p.head_dim < 1 || p.head_dim > 256 ||
      p.num_requests < 0 || p.num_kv_heads > 65535 || (p.block_table != nullptr && p.max_blocks < 1)) {
    return cudaErrorInvalidValue;
  }
  if (p.num_tokens == 0 || p.num_requests == 0) return cudaSuccess;
  const TreeAttentionPlan plan = plan_tree_attention(p);
  if (workspace == nullptr || reinterpret_cast<uintptr_t>(workspace) % 16 != 0) return cudaErrorInvalidValue;
  char* base = static_cast<char*>(workspace);
  TreeAttentionArgs args{};
  args.q = p.q;
  args.k_cache = p.k_cache;
  args.v_cache = p.v_cache;
  args.out = p.out;
  args.partial = reinterpret_cast<float*>(base + plan.partial_offset);
  args.lse = reinterpret_cast<float*>(base + plan.lse_offset);
  args.qo_indptr = p.qo_indptr;
  args.cache_seqlens = p.cache_seqlens;
  args.block_table = p.block_table;
  args.ancestor_words = p.parents != nullptr ? reinterpret_cast<uint32_t*>(base + plan.words_offset) : nullptr;
  args.tile_starts = reinterpret_cast<int32_t*>(base + plan.tile_starts_offset);
  args.num_requests = p.num_requests;
  args.num_tokens = p.num_tokens;
  args.num_q_heads = p.num_q_heads;
  args.num_kv_heads = p.num_kv_heads;
  args.head_dim = p.head_dim;
  args.group = p.num_q_heads / p.num_kv_heads;
  args.slots_per_row = p.slots_per_row;
  args.cache_rows = p.cache_rows;
  args.max_blocks = p.max_blocks;
  args.capacity = capacity_of(p);
  args.num_words = plan.num_words;
  args.chunk = plan.chunk;
  args.splits = plan.splits;
  args.scale_log2 = p.sm_scale * 1.4426950408889634f;
  args.vectorised = sixteen_byte_copies(p);

  tile_starts_kernel<<<1, kWarpSize, 0, stream>>>(p.qo_indptr, p.num_requests, args.group,
                                                  kRowsPerWarp * plan.warps, const_cast<int32_t*>(args.tile_starts));
  if (p.parents != nullptr) {
    const int threads = 128;
    ancestor_words_kernel<<<static_cast<unsigned>(ceil_div(p.num_tokens, threads)), threads, 0, stream>>>(
        p.parents, p.qo_indptr, p.num_requests, p.num_tokens, plan.num_words,
        reinterpret_cast<uint32_t*>(base + plan.words_offset));
  }
  cudaError_t status;
  switch (p.dtype) {
    case DType::kFloat16: status = launch_for_type<__half>(args, plan, stream); break;
    case DType::kBFloat16: status = launch_for_type<__nv_bfloat16>(args, plan, stream); break;
    default: status = launch_for_type<float>(args, plan, stream); break;
  }
  if (status != cudaSuccess || plan.splits == 1) return status;
  switch (p.dtype) {
    case DType::kFloat16: launch_merge<__half>(args, stream); break;
    case DType::kBFloat16: launch_merge<__nv_bfloat16>(args, stream); break;
    default: launch_merge<float>(args, stream); break;
  }
  return cudaGetLastError();
}

}  // namespace dspark::cuda
