// The CUDA kernels' host API: plain structs of pointers and sizes, and launchers that enqueue work on
// a stream. No torch here (DESIGN.md): CMake compiles the kernels with nvcc alone, and
// csrc/cuda/torch_cuda_bindings.cpp is the only caller that knows about tensors.
//
// Conventions shared by the launchers:
// - Inputs were validated by dspark/ops (shapes, dtypes, devices; values with DSPARK_DEBUG=1). The
//   kernels still guard every index they read (block ids, slots, parents, token ids), so corrupt values
//   give wrong numbers, never out-of-bounds accesses.
// - Outputs and scratch are allocated by the caller. Scratch sizes come from the *_workspace_bytes
//   functions, which read only shapes, so no launcher synchronises with the host and every launch can
//   be captured in a CUDA graph.
// - A launcher returns the first CUDA error it saw (cudaSuccess otherwise); an unsupported shape is
//   cudaErrorInvalidValue before anything is enqueued.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace dspark::cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// ---------------------------------------------------------------------------------------------
// tree_attention (DESIGN.md, op 1)

struct TreeAttentionParams {
  DType dtype;                   // of q, the caches and out
  const void* q;                 // [num_tokens, num_q_heads, head_dim], contiguous
  const void* k_cache;           // contiguous [R, slots, H_kv, D] or paged [num_blocks, block_size, H_kv, D]
  const void* v_cache;           // same layout as k_cache
  void* out;                     // [num_tokens, num_q_heads, head_dim], contiguous
  const int32_t* qo_indptr;      // [R + 1]
  const int32_t* cache_seqlens;  // [R]
  const int32_t* parents;        // [num_tokens] local parent indices, or nullptr for chains
  const int32_t* block_table;    // [R, max_blocks], or nullptr for a contiguous cache
  int64_t num_requests;
  int64_t num_tokens;
  int64_t num_q_heads;
  int64_t num_kv_heads;
  int64_t head_dim;              // <= 256
  int64_t slots_per_row;         // contiguous: slots per request; paged: block_size
  int64_t cache_rows;            // first dim of the caches: R (contiguous) or num_blocks (paged)
  int64_t max_blocks;            // block_table row length (paged only)
  float sm_scale;
  int num_sms;                   // multiprocessors of the device: sizes the split-KV plan
};

// How a call is cut into blocks; a function of the shapes only.
struct TreeAttentionPlan {
  int warps;             // per block; each warp owns 16 (node, query head) rows of one KV head
  int splits;            // the committed prefix is cut into this many chunks (flash-decoding)
  int64_t chunk;         // prefix slots per split
  int64_t num_items;     // upper bound of sum_r ceil(n_r * group / rows per block), without a host read
  int64_t num_words;     // ancestor-bit words per node (0 for chains)
  size_t tile_starts_offset, words_offset, partial_offset, lse_offset, workspace_bytes;
};

TreeAttentionPlan plan_tree_attention(const TreeAttentionParams& params);
size_t tree_attention_workspace_bytes(const TreeAttentionParams& params);
// workspace: tree_attention_workspace_bytes(params) bytes, 16-byte aligned, contents irrelevant.
cudaError_t tree_attention(const TreeAttentionParams& params, void* workspace, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// rejection_sample (DESIGN.md, op 2; rules: dspark/reference/rejection_sample.py)

struct RejectionSampleParams {
  DType logits_dtype;            // of target_logits
  const void* target_logits;     // [num_tokens, vocab_size], contiguous
  DType draft_probs_dtype;       // of draft_probs
  const void* draft_probs;       // [num_tokens, vocab_size], or nullptr for deterministic proposals
  const int64_t* draft_tokens;   // [num_tokens]
  const int32_t* qo_indptr;      // [R + 1]
  const int32_t* parents;        // [num_tokens] local parent indices, or nullptr for chains
  const float* temperature;      // [R], 0 = greedy
  const int32_t* top_k;          // [R], 0 = off
  const float* top_p;            // [R], 1 = off
  const double* uniforms;        // [num_tokens, 2], or nullptr: then Philox(seed, offset)
  const int64_t* seed;           // [R] (read when uniforms is nullptr; nullptr reads as 0)
  const int64_t* offset;         // [R]
  int64_t num_requests;
  int64_t num_tokens;
  int64_t vocab_size;
  int64_t path_width;            // columns of the outputs
  int32_t* accepted_nodes;       // [R, path_width], padded with -1
  int32_t* num_accepted;         // [R]
  int64_t* output_tokens;        // [R, path_width], padded with -1
};

// Scratch: one float64 normaliser per node for stochastic residuals (0 bytes without draft_probs).
size_t rejection_sample_workspace_bytes(const RejectionSampleParams& params);
cudaError_t rejection_sample(const RejectionSampleParams& params, void* workspace, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// kv_rollback (DESIGN.md, op 3)

struct KVRollbackParams {
  // Caches viewed as [num_layers, rows, slots_per_row, row_bytes], contiguous: rows are requests
  // (contiguous cache) or blocks (paged). v_cache may be nullptr.
  char* k_cache;
  char* v_cache;
  int64_t num_layers;
  int64_t rows;
  int64_t slots_per_row;
  int64_t row_bytes;              // bytes of one slot (H * D * element size)
  int32_t* cache_seqlens;         // [R], incremented by num_accepted after the moves
  const int32_t* accepted_nodes;  // [R, path_width]
  const int32_t* num_accepted;    // [R]
  const int32_t* block_table;     // [R, max_blocks], or nullptr for a contiguous cache
  int64_t num_requests;
  int64_t path_width;
  int64_t max_blocks;
};

cudaError_t kv_rollback(const KVRollbackParams& params, cudaStream_t stream);

}  // namespace dspark::cuda
