// Torch side of the CPU ops (csrc/torch_bindings.h): validated tensors turned into the plain parameter structs of the
// framework-free kernels. Validation lives in dspark/ops (Python); the checks here only guard the assumptions the
// pointer arithmetic makes (device, dtype, contiguity). ATen only: pybind11 stays in csrc/torch_bindings.cpp.

#include "cpu/kv_rollback.h"
#include "cpu/dequantize_blocks.h"
#include "cpu/quantized_linear.h"
#include "cpu/rejection_sample.h"
#include "cpu/small_batch_linear.h"
#include "cpu/tree_attention.h"
#include "torch_bindings.h"
#include "torch_checks.h"

namespace dspark::bindings {

void tree_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                    const at::Tensor& qo_indptr, const at::Tensor& cache_seqlens,
                    const std::optional<at::Tensor>& parents, const std::optional<at::Tensor>& block_table,
                    double sm_scale, at::Tensor& out) {
  expect_float(q, "q");
  expect(k_cache, q.scalar_type(), "k_cache");
  expect(v_cache, q.scalar_type(), "v_cache");
  expect(out, q.scalar_type(), "out");
  expect(qo_indptr, at::kInt, "qo_indptr");
  expect(cache_seqlens, at::kInt, "cache_seqlens");
  TORCH_CHECK_VALUE(q.dim() == 3 && k_cache.dim() == 4 && out.sizes() == q.sizes(), "bad tensor ranks");
  dspark::cpu::TreeAttentionParams p{};
  p.dtype = element_type(q, "q");
  p.q = q.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.out = out.data_ptr();
  p.qo_indptr = qo_indptr.data_ptr<int32_t>();
  p.cache_seqlens = cache_seqlens.data_ptr<int32_t>();
  p.parents = optional_ptr<int32_t>(parents, at::kInt, "parents");
  p.block_table = optional_ptr<int32_t>(block_table, at::kInt, "block_table");
  p.num_requests = cache_seqlens.numel();
  p.num_tokens = q.size(0);
  p.num_q_heads = q.size(1);
  p.num_kv_heads = k_cache.size(2);
  p.head_dim = q.size(2);
  p.slots_per_row = k_cache.size(1);
  p.max_blocks = block_table.has_value() ? block_table->size(1) : 0;
  p.sm_scale = static_cast<float>(sm_scale);
  dspark::cpu::tree_attention(p);
}

void rejection_sample(const at::Tensor& target_logits, const at::Tensor& draft_tokens,
                      const at::Tensor& qo_indptr, const std::optional<at::Tensor>& parents,
                      const std::optional<at::Tensor>& draft_probs, const at::Tensor& temperature,
                      const at::Tensor& top_k, const at::Tensor& top_p,
                      const std::optional<at::Tensor>& uniforms, const std::optional<at::Tensor>& seed,
                      const std::optional<at::Tensor>& offset, at::Tensor& accepted_nodes,
                      at::Tensor& num_accepted, at::Tensor& output_tokens,
                      const std::optional<at::Tensor>& draft_vocab) {
  expect_float(target_logits, "target_logits");
  expect(draft_tokens, at::kLong, "draft_tokens");
  expect(qo_indptr, at::kInt, "qo_indptr");
  expect(temperature, at::kFloat, "temperature");
  expect(top_k, at::kInt, "top_k");
  expect(top_p, at::kFloat, "top_p");
  expect(accepted_nodes, at::kInt, "accepted_nodes");
  expect(num_accepted, at::kInt, "num_accepted");
  expect(output_tokens, at::kLong, "output_tokens");
  if (!uniforms.has_value() && !(seed.has_value() && offset.has_value())) {
    const float* t = temperature.data_ptr<float>();
    for (int64_t r = 0; r < temperature.numel(); ++r)
      TORCH_CHECK_VALUE(t[r] == 0.f, "sampled requests need uniforms, or seed and offset");
  }
  dspark::cpu::RejectionSampleParams p{};
  p.logits_dtype = element_type(target_logits, "target_logits");
  p.target_logits = target_logits.data_ptr();
  if (draft_probs.has_value()) {
    expect_float(*draft_probs, "draft_probs");
    p.draft_probs_dtype = element_type(*draft_probs, "draft_probs");
    p.draft_probs = draft_probs->data_ptr();
  }
  if (draft_vocab.has_value()) {
    expect(*draft_vocab, at::kLong, "draft_vocab");
    TORCH_CHECK_VALUE(draft_probs.has_value() && draft_probs->dim() == 2 && draft_probs->size(1) == draft_vocab->numel(),
                      "draft_vocab needs draft_probs with one column per draft token");
    p.draft_vocab = draft_vocab->data_ptr<int64_t>();
    p.draft_vocab_size = draft_vocab->numel();
  }
  p.draft_tokens = draft_tokens.data_ptr<int64_t>();
  p.qo_indptr = qo_indptr.data_ptr<int32_t>();
  p.parents = optional_ptr<int32_t>(parents, at::kInt, "parents");
  p.temperature = temperature.data_ptr<float>();
  p.top_k = top_k.data_ptr<int32_t>();
  p.top_p = top_p.data_ptr<float>();
  p.uniforms = optional_ptr<double>(uniforms, at::kDouble, "uniforms");
  p.seed = optional_ptr<int64_t>(seed, at::kLong, "seed");
  p.offset = optional_ptr<int64_t>(offset, at::kLong, "offset");
  p.num_requests = qo_indptr.numel() - 1;
  p.num_tokens = target_logits.size(0);
  p.vocab_size = target_logits.size(1);
  p.path_width = accepted_nodes.size(1);
  p.accepted_nodes = accepted_nodes.data_ptr<int32_t>();
  p.num_accepted = num_accepted.data_ptr<int32_t>();
  p.output_tokens = output_tokens.data_ptr<int64_t>();
  dspark::cpu::rejection_sample(p);
}

// Caches are [*layers, rows, slots, H_kv, D]; any element type (the copy moves bytes).
void kv_rollback(at::Tensor& k_cache, const std::optional<at::Tensor>& v_cache, at::Tensor& cache_seqlens,
                 const at::Tensor& accepted_nodes, const at::Tensor& num_accepted,
                 const std::optional<at::Tensor>& block_table) {
  TORCH_CHECK_VALUE(k_cache.device().is_cpu() && k_cache.is_contiguous() && k_cache.dim() >= 4,
                    "k_cache must be a contiguous CPU tensor of rank >= 4");
  if (v_cache.has_value()) {
    TORCH_CHECK_VALUE(v_cache->device().is_cpu() && v_cache->is_contiguous() && v_cache->sizes() == k_cache.sizes() &&
                          v_cache->scalar_type() == k_cache.scalar_type(),
                      "v_cache must be a contiguous CPU tensor shaped and typed like k_cache");
  }
  expect(cache_seqlens, at::kInt, "cache_seqlens");
  expect(accepted_nodes, at::kInt, "accepted_nodes");
  expect(num_accepted, at::kInt, "num_accepted");
  const int64_t d = k_cache.dim();
  dspark::cpu::KVRollbackParams p{};
  p.k_cache = static_cast<char*>(k_cache.data_ptr());
  p.v_cache = v_cache.has_value() ? static_cast<char*>(v_cache->data_ptr()) : nullptr;
  p.rows = k_cache.size(d - 4);
  p.slots_per_row = k_cache.size(d - 3);
  p.row_bytes = k_cache.size(d - 2) * k_cache.size(d - 1) * k_cache.element_size();
  p.num_layers = 1;
  for (int64_t i = 0; i < d - 4; ++i) p.num_layers *= k_cache.size(i);
  p.cache_seqlens = cache_seqlens.data_ptr<int32_t>();
  p.accepted_nodes = accepted_nodes.data_ptr<int32_t>();
  p.num_accepted = num_accepted.data_ptr<int32_t>();
  p.block_table = optional_ptr<int32_t>(block_table, at::kInt, "block_table");
  p.num_requests = cache_seqlens.numel();
  p.path_width = accepted_nodes.size(1);
  p.max_blocks = block_table.has_value() ? block_table->size(1) : 0;
  dspark::cpu::kv_rollback(p);
}

void small_batch_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        at::Tensor& out) {
  expect_float(x, "x");
  expect_float(weight, "weight");
  expect(out, x.scalar_type(), "out");
  TORCH_CHECK_VALUE(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "x [rows, in] and weight [out, in] expected");
  TORCH_CHECK_VALUE(out.dim() == 2 && out.size(0) == x.size(0) && out.size(1) == weight.size(0), "out must be [rows, out]");
  dspark::cpu::SmallBatchLinearParams p{};
  p.x_dtype = element_type(x, "x");
  p.weight_dtype = element_type(weight, "weight");
  if (bias.has_value()) {
    expect(*bias, weight.scalar_type(), "bias");
    TORCH_CHECK_VALUE(bias->numel() == weight.size(0), "bias must have out_features elements");
    p.bias = bias->data_ptr();
  }
  p.x = x.data_ptr();
  p.weight = weight.data_ptr();
  p.y = out.data_ptr();
  p.rows = x.size(0);
  p.in_features = x.size(1);
  p.out_features = weight.size(0);
  dspark::cpu::small_batch_linear(p);
}

void quantized_linear(const at::Tensor& x, const at::Tensor& weight, int64_t format,
                      const std::optional<at::Tensor>& bias, at::Tensor& out) {
  expect_float(x, "x");
  expect(weight, at::kByte, "weight");
  expect(out, x.scalar_type(), "out");
  const auto f = block_format(format);
  TORCH_CHECK_VALUE(x.dim() == 2 && out.dim() == 2, "x [rows, in] and out [rows, out] expected");
  const int64_t in = x.size(1);
  TORCH_CHECK_VALUE(out.size(0) == x.size(0), "out must be [rows, out_features]");
  const bool packed = quantized_layout(weight, f, out.size(1), in);
  dspark::cpu::QuantizedLinearParams p{};
  p.x_dtype = element_type(x, "x");
  if (bias.has_value()) {
    expect(*bias, x.scalar_type(), "bias");
    TORCH_CHECK_VALUE(bias->numel() == out.size(1), "bias must have out_features elements");
    p.bias = bias->data_ptr();
  }
  p.x = x.data_ptr();
  p.format = f;
  p.weight = weight.data_ptr<uint8_t>();
  p.packed = packed;
  p.y = out.data_ptr();
  p.rows = x.size(0);
  p.in_features = in;
  p.out_features = out.size(1);
  dspark::cpu::quantized_linear(p);
}

void dequantize_blocks(const at::Tensor& weight, int64_t format, at::Tensor& out) {
  expect(weight, at::kByte, "weight");
  expect_float(out, "out");
  const auto f = block_format(format);
  TORCH_CHECK_VALUE(out.dim() == 2, "out [out, in] expected");
  const bool packed = quantized_layout(weight, f, out.size(0), out.size(1));
  dspark::cpu::DequantizeParams p{};
  p.weight = weight.data_ptr<uint8_t>();
  p.format = f;
  p.tile_rows = packed ? dspark::cpu::quantized_tile_rows() : 0;
  p.out_features = out.size(0);
  p.in_features = out.size(1);
  p.y_dtype = element_type(out, "out");
  p.y = out.data_ptr();
  dspark::cpu::dequantize_blocks(p);
}

// Rows `rows` of a weight of out_features rows (either layout) decoded into out [rows, in]: embedding lookups.
void dequantize_rows(const at::Tensor& weight, int64_t format, int64_t out_features, const at::Tensor& rows,
                     at::Tensor& out) {
  expect(weight, at::kByte, "weight");
  expect(rows, at::kLong, "rows");
  expect_float(out, "out");
  const auto f = block_format(format);
  TORCH_CHECK_VALUE(rows.dim() == 1, "rows must be 1-D, got ", rows.sizes());
  TORCH_CHECK_VALUE(out.dim() == 2 && out.size(0) == rows.size(0), "out must be [", rows.size(0),
                    ", in_features], got ", out.sizes());
  TORCH_CHECK_VALUE(out_features >= 0, "out_features must be >= 0, got ", out_features);
  const bool packed = quantized_layout(weight, f, out_features, out.size(1));
  if (rows.numel() == 0) return;  // (an empty tensor's data pointer may be null: the kernel would take all rows)
  const int64_t* ids = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows.numel(); ++i)
    TORCH_CHECK_VALUE(ids[i] >= 0 && ids[i] < out_features, "rows must lie in [0, ", out_features, "), got ", ids[i],
                      " at ", i);
  dspark::cpu::DequantizeParams p{};
  p.weight = weight.data_ptr<uint8_t>();
  p.format = f;
  p.tile_rows = packed ? dspark::cpu::quantized_tile_rows() : 0;
  p.out_features = out_features;
  p.in_features = out.size(1);
  p.y_dtype = element_type(out, "out");
  p.y = out.data_ptr();
  p.rows = ids;
  p.num_rows = rows.numel();
  dspark::cpu::dequantize_blocks(p);
}

}  // namespace dspark::bindings
