// A Llama-family decoder stack for the few rows of a CPU decoding or verification round, in one call.
//
// The Python model code spends about as long dispatching ~45 small torch ops per layer (norms, RoPE,
// splits, casts, cache writes) as the weights take to stream from memory at batch 1. This runs the
// same arithmetic per layer in C++ around the small_batch_linear and tree_attention kernels: RMSNorm,
// fused QKV projection (+ bias), optional per-head q/k RMSNorm (Qwen3), rotate-half RoPE from
// precomputed tables, the cache write at (row, slot), tree attention, output projection, residual,
// RMSNorm, fused gate/up projection, SiLU(gate) * up, down projection, residual. Every element rounds
// to the activation dtype where the PyTorch code rounds (after each op), and every row is computed
// alone, so results are batch invariant like the kernels it calls.
#pragma once

#include <cstdint>

#include "cpu/common.h"
#include "cpu/quantized_linear.h"
#include "cpu/tree_attention.h"

namespace dspark::cpu {

struct DecoderLayerWeights {
  const void* input_norm;    // [hidden]
  const void* qkv;           // [(H + 2 H_kv) * D, hidden]
  const void* qkv_bias;      // [(H + 2 H_kv) * D] or nullptr
  const void* q_norm;        // [D] or nullptr (per-head q/k RMSNorm before RoPE)
  const void* k_norm;        // [D] or nullptr
  const void* o_proj;        // [hidden, H * D]
  const void* o_bias;        // [hidden] or nullptr
  const void* post_norm;     // [hidden]
  const void* gate_up;       // [2 * intermediate, hidden]: gate rows, then up rows
  const void* gate_up_bias;  // or nullptr
  const void* down;          // [hidden, intermediate]
  const void* down_bias;     // or nullptr
  void* k_cache;             // this layer's cache, layout as tree_attention's
  void* v_cache;
  // The four projections' formats: 0 = dense in the activation dtype, else a GGML block format whose
  // weight is [out rows, in / 32 blocks] bytes, or with kPackedFormat or-ed in, packed (quantized_linear.h);
  // biases stay dense.
  int qkv_format = 0, o_format = 0, gate_up_format = 0, down_format = 0;
};

struct DecoderParams {
  DType dtype;  // activations, weights and caches
  int64_t num_layers;
  const DecoderLayerWeights* layers;
  void* hidden;                 // [rows, hidden_size] residual stream: embeddings in, last layer's output out
  // [rows, num_captured * hidden_size], or with capture_slots_per_row > 0 a per-token side cache
  // [R, capture_slots_per_row, num_captured * hidden_size] written at (write_rows[t], write_slots[t]);
  // or nullptr
  void* captured;
  int64_t capture_slots_per_row;
  const int32_t* capture_slot;  // [num_layers]: where layer i's output goes in `captured`, or -1
  int64_t num_captured;
  const int64_t* positions;     // [rows]: each token's RoPE position
  const float* inv_freq;        // [head_dim / 2]: RoPE inverse frequencies (fp32)
  const int64_t* write_rows;    // [rows]: the cache row (request) of each token
  const int64_t* write_slots;   // [rows]: its slot in that row
  int64_t rows;
  int64_t hidden_size;
  int64_t num_heads;
  int64_t num_kv_heads;
  int64_t head_dim;
  int64_t intermediate_size;
  float eps;
  // [hidden_size] in the activation dtype: the model's final RMSNorm, applied to `hidden` after the last
  // layer (nullptr: hidden stays the last layer's residual stream)
  const void* final_norm = nullptr;
  // The round's metadata (qo_indptr, cache_seqlens, parents, block_table, counts, slots_per_row,
  // max_blocks, sm_scale); q, k_cache, v_cache and out are set per layer.
  TreeAttentionParams attention;
};

// Inputs are validated by the caller (dspark/models/cpu_decoder.py); this trusts every index.
void llama_decoder_layers(const DecoderParams& params);

}  // namespace dspark::cpu
