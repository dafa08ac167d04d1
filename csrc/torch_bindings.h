// The torch entry points of the CPU kernels, one per op (csrc/op_bindings.cpp) and the fused decoder layers
// (csrc/decoder_bindings.cpp). Only csrc/torch_bindings.cpp includes pybind11 (through torch/csrc/utils/pybind.h) to
// expose them as dspark._C; the others see ATen's tensor alone: torch/extension.h in each took ~40 s of the build.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace dspark::bindings {

void tree_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                    const at::Tensor& qo_indptr, const at::Tensor& cache_seqlens,
                    const std::optional<at::Tensor>& parents, const std::optional<at::Tensor>& block_table,
                    double sm_scale, at::Tensor& out);
void rejection_sample(const at::Tensor& target_logits, const at::Tensor& draft_tokens,
                      const at::Tensor& qo_indptr, const std::optional<at::Tensor>& parents,
                      const std::optional<at::Tensor>& draft_probs, const at::Tensor& temperature,
                      const at::Tensor& top_k, const at::Tensor& top_p,
                      const std::optional<at::Tensor>& uniforms, const std::optional<at::Tensor>& seed,
                      const std::optional<at::Tensor>& offset, at::Tensor& accepted_nodes,
                      at::Tensor& num_accepted, at::Tensor& output_tokens,
                      const std::optional<at::Tensor>& draft_vocab);
void kv_rollback(at::Tensor& k_cache, const std::optional<at::Tensor>& v_cache, at::Tensor& cache_seqlens,
                 const at::Tensor& accepted_nodes, const at::Tensor& num_accepted,
                 const std::optional<at::Tensor>& block_table);
void small_batch_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        at::Tensor& out);
void quantized_linear(const at::Tensor& x, const at::Tensor& weight, int64_t format,
                      const std::optional<at::Tensor>& bias, at::Tensor& out);
void dequantize_blocks(const at::Tensor& weight, int64_t format, at::Tensor& out);
void dequantize_rows(const at::Tensor& weight, int64_t format, int64_t out_features, const at::Tensor& rows,
                     at::Tensor& out);
void llama_decoder_layers(at::Tensor& hidden, const std::vector<std::optional<at::Tensor>>& weights,
                          const std::vector<int64_t>& weight_formats,
                          const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& positions,
                          const at::Tensor& inv_freq, const at::Tensor& write_rows, const at::Tensor& write_slots,
                          const at::Tensor& qo_indptr, const at::Tensor& cache_seqlens,
                          const std::optional<at::Tensor>& parents, const std::optional<at::Tensor>& block_table,
                          const std::optional<at::Tensor>& captured, const std::vector<int64_t>& capture_slot,
                          int64_t num_heads, int64_t intermediate_size, double eps, double sm_scale,
                          const std::optional<at::Tensor>& final_norm, bool bidirectional_rounds);

}  // namespace dspark::bindings
