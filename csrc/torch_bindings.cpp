// The one file (with its CUDA twin csrc/cuda/torch_cuda_bindings.cpp, compiled into CUDA builds only)
// that touches torch's C++ API: turns validated tensors into the plain parameter structs of the
// framework-free kernels. Validation lives in dspark/ops (Python); the checks here
// only guard the assumptions the pointer arithmetic makes (device, dtype, contiguity).
#include <torch/extension.h>

#include "cpu/decoder_layers.h"
#include "cpu/kv_rollback.h"
#include "cpu/dequantize_blocks.h"
#include "cpu/quantized_linear.h"
#include "cpu/rejection_sample.h"
#include "cpu/small_batch_linear.h"
#include "cpu/tree_attention.h"

namespace {

using dspark::cpu::DType;

DType element_type(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK_VALUE(false, name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

void expect(const at::Tensor& t, at::ScalarType dtype, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

void expect_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
  element_type(t, name);
}

template <typename T>
const T* optional_ptr(const std::optional<at::Tensor>& t, at::ScalarType dtype, const char* name) {
  if (!t.has_value()) return nullptr;
  expect(*t, dtype, name);
  return t->data_ptr<T>();
}

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

dspark::cpu::BlockFormat block_format(int64_t format) {
  TORCH_CHECK_VALUE(format == 2 || format == 3 || format == 8, "format must be a GGML type id: 2 (Q4_0), 3 (Q4_1) or "
                    "8 (Q8_0), got ", format);
  return static_cast<dspark::cpu::BlockFormat>(format);
}

// A quantized weight's layout from its shape: [out, blocks * bytes] as in the file, or packed [tiles, blocks,
// R * bytes] (quantized_linear.h), which must hold `out` rows. Returns whether it is packed.
bool quantized_layout(const at::Tensor& weight, dspark::cpu::BlockFormat f, int64_t out, int64_t in) {
  const int64_t blocks = in / dspark::cpu::kBlockWeights, bytes = dspark::cpu::block_bytes(f);
  TORCH_CHECK_VALUE(in % dspark::cpu::kBlockWeights == 0, "in_features must be a multiple of 32, got ", in);
  if (weight.dim() == 3) {
    const int64_t r = dspark::cpu::quantized_tile_rows();
    TORCH_CHECK_VALUE(weight.size(0) == (out + r - 1) / r && weight.size(1) == blocks && weight.size(2) == r * bytes,
                      "a packed weight of ", out, " rows must be [", (out + r - 1) / r, ", ", blocks, ", ", r * bytes,
                      "] (tiles of ", r, " rows), got ", weight.sizes());
    return true;
  }
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == blocks * bytes, "weight rows must hold ", blocks,
                    " blocks of ", bytes, " bytes, got ", weight.sizes());
  TORCH_CHECK_VALUE(weight.size(0) == out, "weight holds ", weight.size(0), " rows but out has ", out, " outputs");
  return false;
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

// Weights per layer, in this order (None where the checkpoint has none): input_norm, qkv, qkv_bias,
// q_norm, k_norm, o_proj, o_bias, post_norm, gate_up, gate_up_bias, down, down_bias.
constexpr int kWeightsPerLayer = 12;

const void* weight_ptr(const std::optional<at::Tensor>& t, at::ScalarType dtype, int64_t numel, const char* name,
                       bool required) {
  if (!t.has_value() || !t->defined()) {
    TORCH_CHECK_VALUE(!required, name, " is required");
    return nullptr;
  }
  expect(*t, dtype, name);
  TORCH_CHECK_VALUE(t->numel() == numel, name, " must have ", numel, " elements, got ", t->numel());
  return t->data_ptr();
}

// A projection's weight: dense in the activation dtype (format 0), GGML blocks as uint8 [out, in / 32 * bytes], or
// with kPackedFormat or-ed into the format, packed (quantized_linear.h).
const void* projection_ptr(const std::optional<at::Tensor>& t, int64_t format, at::ScalarType dtype, int64_t out,
                           int64_t in, const char* name) {
  if (format == 0) return weight_ptr(t, dtype, out * in, name, true);
  const bool packed = (format & dspark::cpu::kPackedFormat) != 0;
  const auto f = block_format(format & ~dspark::cpu::kPackedFormat);
  TORCH_CHECK_VALUE(in % dspark::cpu::kBlockWeights == 0, name, ": in_features must be a multiple of 32");
  const int64_t r = dspark::cpu::quantized_tile_rows();
  const int64_t rows = packed ? (out + r - 1) / r * r : out;  // a packed weight's last tile is padded
  return weight_ptr(t, at::kByte, rows * in / dspark::cpu::kBlockWeights * dspark::cpu::block_bytes(f), name, true);
}

void llama_decoder_layers(at::Tensor& hidden, const std::vector<std::optional<at::Tensor>>& weights,
                          const std::vector<int64_t>& weight_formats,
                          const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& positions,
                          const at::Tensor& inv_freq, const at::Tensor& write_rows, const at::Tensor& write_slots,
                          const at::Tensor& qo_indptr, const at::Tensor& cache_seqlens,
                          const std::optional<at::Tensor>& parents, const std::optional<at::Tensor>& block_table,
                          const std::optional<at::Tensor>& captured, const std::vector<int64_t>& capture_slot,
                          int64_t num_heads, int64_t intermediate_size, double eps, double sm_scale,
                          const std::optional<at::Tensor>& final_norm, bool bidirectional_rounds) {
  expect_float(hidden, "hidden");
  const auto dtype = hidden.scalar_type();
  TORCH_CHECK_VALUE(hidden.dim() == 2, "hidden must be [rows, hidden_size]");
  TORCH_CHECK_VALUE(weights.size() % kWeightsPerLayer == 0, "weights must hold 12 entries per layer");
  TORCH_CHECK_VALUE(weight_formats.size() == weights.size(), "weight_formats must hold one entry per weight");
  const int64_t num_layers = static_cast<int64_t>(weights.size()) / kWeightsPerLayer;
  expect(k_cache, dtype, "k_cache");
  expect(v_cache, dtype, "v_cache");
  TORCH_CHECK_VALUE(k_cache.dim() == 5 && k_cache.sizes() == v_cache.sizes() && k_cache.size(0) == num_layers,
                    "k_cache and v_cache must be [num_layers, rows or blocks, slots, H_kv, D] alike");
  const int64_t rows = hidden.size(0), hidden_size = hidden.size(1);
  const int64_t kv_heads = k_cache.size(3), dim = k_cache.size(4);
  TORCH_CHECK_VALUE(num_heads >= kv_heads && kv_heads > 0 && num_heads % kv_heads == 0 && dim % 2 == 0,
                    "num_heads must be a multiple of the cache's KV heads, head_dim even");
  expect(positions, at::kLong, "positions");
  expect(inv_freq, at::kFloat, "inv_freq");
  TORCH_CHECK_VALUE(positions.numel() == rows && inv_freq.numel() == dim / 2,
                    "positions must be [rows] and inv_freq [head_dim / 2]");
  expect(write_rows, at::kLong, "write_rows");
  expect(write_slots, at::kLong, "write_slots");
  expect(qo_indptr, at::kInt, "qo_indptr");
  expect(cache_seqlens, at::kInt, "cache_seqlens");
  const int64_t num_requests = cache_seqlens.numel();
  TORCH_CHECK_VALUE(write_rows.numel() == rows && write_slots.numel() == rows && qo_indptr.numel() == num_requests + 1,
                    "write_rows, write_slots: one per row; qo_indptr: R + 1");
  const bool paged = block_table.has_value();
  const int64_t slots_per_row = k_cache.size(2);
  const int64_t capacity = paged ? block_table->size(1) * slots_per_row : slots_per_row;
  TORCH_CHECK_VALUE(paged || k_cache.size(1) == num_requests, "a contiguous cache has one row per request");
  const int64_t* wr = write_rows.data_ptr<int64_t>();
  const int64_t* ws = write_slots.data_ptr<int64_t>();
  const int32_t* table = nullptr;
  if (paged) {
    expect(*block_table, at::kInt, "block_table");
    TORCH_CHECK_VALUE(block_table->dim() == 2 && block_table->size(0) == num_requests, "block_table must be [R, max_blocks]");
    table = block_table->data_ptr<int32_t>();
  }
  {  // the round's token counts must fit each request's cache: attention reads slots [0, seqlen + count)
    const int32_t* indptr = qo_indptr.data_ptr<int32_t>();
    const int32_t* seqlens = cache_seqlens.data_ptr<int32_t>();
    TORCH_CHECK_VALUE(indptr[0] == 0 && indptr[num_requests] == rows, "qo_indptr must run from 0 to the row count");
    for (int64_t r = 0; r < num_requests; ++r) {
      const int64_t count = static_cast<int64_t>(indptr[r + 1]) - indptr[r];
      TORCH_CHECK_VALUE(count >= 0 && seqlens[r] >= 0 && seqlens[r] + count <= capacity, "request ", r,
                        ": cache_seqlens + its token count must lie in [0, capacity] with a count >= 0");
    }
  }
  for (int64_t t = 0; t < rows; ++t) {  // the plan validated the round; these must agree with it
    TORCH_CHECK_VALUE(0 <= wr[t] && wr[t] < num_requests && 0 <= ws[t] && ws[t] < capacity,
                      "write_rows/write_slots out of range at row ", t);
    if (paged) {
      const int32_t block = table[wr[t] * block_table->size(1) + ws[t] / slots_per_row];
      TORCH_CHECK_VALUE(0 <= block && block < k_cache.size(1), "block_table maps row ", t, "'s slot to block ", block,
                        " outside the cache");
    }
  }
  const int64_t qkv_rows = (num_heads + 2 * kv_heads) * dim;
  const int64_t layer_elems = k_cache.numel() / num_layers;
  std::vector<dspark::cpu::DecoderLayerWeights> layers(num_layers);
  for (int64_t i = 0; i < num_layers; ++i) {
    const auto* w = &weights[i * kWeightsPerLayer];
    auto& l = layers[i];
    l.input_norm = weight_ptr(w[0], dtype, hidden_size, "input_norm", true);
    const int64_t* formats = &weight_formats[i * kWeightsPerLayer];
    for (int j = 0; j < kWeightsPerLayer; ++j) {
      TORCH_CHECK_VALUE(formats[j] == 0 || j == 1 || j == 5 || j == 8 || j == 10,
                        "only the qkv, o, gate_up and down projections may be block-quantized");
    }
    l.qkv_format = static_cast<int>(formats[1]);
    l.o_format = static_cast<int>(formats[5]);
    l.gate_up_format = static_cast<int>(formats[8]);
    l.down_format = static_cast<int>(formats[10]);
    l.qkv = projection_ptr(w[1], formats[1], dtype, qkv_rows, hidden_size, "qkv_proj");
    l.qkv_bias = weight_ptr(w[2], dtype, qkv_rows, "qkv_proj bias", false);
    l.q_norm = weight_ptr(w[3], dtype, dim, "q_norm", false);
    l.k_norm = weight_ptr(w[4], dtype, dim, "k_norm", false);
    TORCH_CHECK_VALUE((l.q_norm == nullptr) == (l.k_norm == nullptr), "q_norm and k_norm come together");
    l.o_proj = projection_ptr(w[5], formats[5], dtype, hidden_size, num_heads * dim, "o_proj");
    l.o_bias = weight_ptr(w[6], dtype, hidden_size, "o_proj bias", false);
    l.post_norm = weight_ptr(w[7], dtype, hidden_size, "post_attention_layernorm", true);
    l.gate_up = projection_ptr(w[8], formats[8], dtype, 2 * intermediate_size, hidden_size, "gate_up_proj");
    l.gate_up_bias = weight_ptr(w[9], dtype, 2 * intermediate_size, "gate_up_proj bias", false);
    l.down = projection_ptr(w[10], formats[10], dtype, hidden_size, intermediate_size, "down_proj");
    l.down_bias = weight_ptr(w[11], dtype, hidden_size, "down_proj bias", false);
    l.k_cache = static_cast<char*>(k_cache.data_ptr()) + i * layer_elems * k_cache.element_size();
    l.v_cache = static_cast<char*>(v_cache.data_ptr()) + i * layer_elems * v_cache.element_size();
  }
  TORCH_CHECK_VALUE(static_cast<int64_t>(capture_slot.size()) == num_layers, "capture_slot: one per layer");
  std::vector<int32_t> slots(capture_slot.begin(), capture_slot.end());
  int64_t num_captured = 0;
  for (int32_t s : slots) num_captured = std::max<int64_t>(num_captured, s + 1);
  dspark::cpu::DecoderParams p{};
  p.dtype = element_type(hidden, "hidden");
  p.num_layers = num_layers;
  p.layers = layers.data();
  p.hidden = hidden.data_ptr();
  if (num_captured > 0) {
    TORCH_CHECK_VALUE(captured.has_value(), "captured is required when a layer is captured");
    expect(*captured, dtype, "captured");
    TORCH_CHECK_VALUE(captured->is_contiguous(), "captured must be contiguous");
    const int64_t width = num_captured * hidden_size;
    if (captured->dim() == 4) {  // a side cache [R, S, 1, width]: each token lands at (write_rows, write_slots)
      TORCH_CHECK_VALUE(captured->size(2) == 1 && captured->size(3) == width,
                        "a captured side cache must be [R, S, 1, n * hidden]");
      for (int64_t t = 0; t < rows; ++t) {
        TORCH_CHECK_VALUE(wr[t] < captured->size(0) && ws[t] < captured->size(1),
                          "write_rows/write_slots outside the captured side cache at row ", t);
      }
      p.capture_slots_per_row = captured->size(1);
    } else {
      TORCH_CHECK_VALUE(captured->numel() == rows * width, "captured must be [rows, n * hidden] or [R, S, 1, n * hidden]");
    }
    p.captured = captured->data_ptr();
  }
  p.capture_slot = slots.data();
  p.num_captured = num_captured;
  p.positions = positions.data_ptr<int64_t>();
  p.inv_freq = inv_freq.data_ptr<float>();
  p.write_rows = wr;
  p.write_slots = ws;
  p.rows = rows;
  p.hidden_size = hidden_size;
  p.num_heads = num_heads;
  p.num_kv_heads = kv_heads;
  p.head_dim = dim;
  p.intermediate_size = intermediate_size;
  p.eps = static_cast<float>(eps);
  if (final_norm.has_value()) {
    expect(*final_norm, dtype, "final_norm");
    TORCH_CHECK_VALUE(final_norm->numel() == hidden_size, "final_norm must be [hidden_size]");
    p.final_norm = final_norm->data_ptr();
  }
  auto& a = p.attention;
  a.dtype = p.dtype;
  a.qo_indptr = qo_indptr.data_ptr<int32_t>();
  a.cache_seqlens = cache_seqlens.data_ptr<int32_t>();
  a.parents = optional_ptr<int32_t>(parents, at::kInt, "parents");
  a.block_table = optional_ptr<int32_t>(block_table, at::kInt, "block_table");
  a.num_requests = num_requests;
  a.num_tokens = rows;
  a.num_q_heads = num_heads;
  a.num_kv_heads = kv_heads;
  a.head_dim = dim;
  a.slots_per_row = slots_per_row;
  a.max_blocks = paged ? block_table->size(1) : 0;
  a.sm_scale = static_cast<float>(sm_scale);
  a.bidirectional_rounds = bidirectional_rounds;
  dspark::cpu::llama_decoder_layers(p);
}

}  // namespace

#ifdef DSPARK_WITH_CUDA
namespace dspark {
void register_cuda_kernels(pybind11::module_& m);  // csrc/cuda/torch_cuda_bindings.cpp
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "DSpark C++ kernels (raw; call them through dspark.ops, which validates inputs)";
  // The kernels release the GIL: a server's HTTP thread (dspark serve) runs while a round computes.
  const auto release = pybind11::call_guard<pybind11::gil_scoped_release>();
  m.def("tree_attention", &tree_attention, release);
  m.def("rejection_sample", &rejection_sample, release);
  m.def("kv_rollback", &kv_rollback, release);
  m.def("small_batch_linear", &small_batch_linear, release);
  m.def("quantized_linear", &quantized_linear, release);
  m.def("dequantize_blocks", &dequantize_blocks, release);
  m.def("dequantize_rows", &dequantize_rows, release);
  m.def("quantized_tile_rows", &dspark::cpu::quantized_tile_rows);
  m.def("llama_decoder_layers", &llama_decoder_layers, release);
#ifdef DSPARK_WITH_CUDA
  dspark::register_cuda_kernels(m);  // *_cuda entry points for CUDA tensors
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
