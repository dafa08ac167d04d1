// Torch side of the fused CPU decoder layers (csrc/cpu/decoder_layers.h): the flat per-layer weight list and the
// round's tensors checked and turned into the kernel's parameter struct. Exposed as dspark._C.llama_decoder_layers
// by csrc/torch_bindings.cpp.
#include "cpu/decoder_layers.h"
#include "cpu/quantized_linear.h"
#include "torch_bindings.h"
#include "torch_checks.h"

namespace dspark::bindings {
namespace {

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
// with kPackedFormat or-ed into the format, packed (quantized_linear.h) and shaped so (torch_checks.h).
const void* projection_ptr(const std::optional<at::Tensor>& t, int64_t format, at::ScalarType dtype, int64_t out,
                           int64_t in, const char* name) {
  if (format == 0) return weight_ptr(t, dtype, out * in, name, true);
  TORCH_CHECK_VALUE(t.has_value() && t->defined(), name, " is required");
  expect(*t, at::kByte, name);
  const bool packed = (format & dspark::cpu::kPackedFormat) != 0;
  const bool shaped_packed = quantized_layout(*t, block_format(format & ~dspark::cpu::kPackedFormat), out, in, name);
  TORCH_CHECK_VALUE(shaped_packed == packed, name, packed ? "'s format says packed but its shape is the file's layout"
                                                         : "'s shape is packed but its format does not say so");
  return t->data_ptr();
}

// The round's bookkeeping against the cache: every request's token count fits its cache (attention reads slots
// [0, seqlen + count)), every row's write lands inside it, paged blocks included.
void check_round_writes(int64_t rows, const at::Tensor& k_cache, const at::Tensor& write_rows,
                           const at::Tensor& write_slots, const at::Tensor& qo_indptr, const at::Tensor& cache_seqlens,
                           const std::optional<at::Tensor>& block_table) {
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
  const int32_t* indptr = qo_indptr.data_ptr<int32_t>();
  const int32_t* seqlens = cache_seqlens.data_ptr<int32_t>();
  TORCH_CHECK_VALUE(indptr[0] == 0 && indptr[num_requests] == rows, "qo_indptr must run from 0 to the row count");
  for (int64_t r = 0; r < num_requests; ++r) {
    const int64_t count = static_cast<int64_t>(indptr[r + 1]) - indptr[r];
    TORCH_CHECK_VALUE(count >= 0 && seqlens[r] >= 0 && seqlens[r] + count <= capacity, "request ", r,
                      ": cache_seqlens + its token count must lie in [0, capacity] with a count >= 0");
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
}

struct LayerShape {
  int64_t hidden_size, num_heads, kv_heads, head_dim, intermediate_size;
};

// The flat weight list (kWeightsPerLayer entries a layer) checked and pointed to, each layer with its cache slices.
std::vector<dspark::cpu::DecoderLayerWeights> layer_weights(const std::vector<std::optional<at::Tensor>>& weights,
                                                            const std::vector<int64_t>& weight_formats,
                                                            at::ScalarType dtype, const LayerShape& shape,
                                                            const at::Tensor& k_cache, const at::Tensor& v_cache) {
  const int64_t num_layers = static_cast<int64_t>(weights.size()) / kWeightsPerLayer;
  const int64_t hidden_size = shape.hidden_size, dim = shape.head_dim, inter = shape.intermediate_size;
  const int64_t qkv_rows = (shape.num_heads + 2 * shape.kv_heads) * dim;
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
    l.o_proj = projection_ptr(w[5], formats[5], dtype, hidden_size, shape.num_heads * dim, "o_proj");
    l.o_bias = weight_ptr(w[6], dtype, hidden_size, "o_proj bias", false);
    l.post_norm = weight_ptr(w[7], dtype, hidden_size, "post_attention_layernorm", true);
    l.gate_up = projection_ptr(w[8], formats[8], dtype, 2 * inter, hidden_size, "gate_up_proj");
    l.gate_up_bias = weight_ptr(w[9], dtype, 2 * inter, "gate_up_proj bias", false);
    l.down = projection_ptr(w[10], formats[10], dtype, hidden_size, inter, "down_proj");
    l.down_bias = weight_ptr(w[11], dtype, hidden_size, "down_proj bias", false);
    l.k_cache = static_cast<char*>(k_cache.data_ptr()) + i * layer_elems * k_cache.element_size();
    l.v_cache = static_cast<char*>(v_cache.data_ptr()) + i * layer_elems * v_cache.element_size();
  }
  return layers;
}

// Where captured layers' outputs go (capture_slot[layer] >= 0: that slot of each row's n captured states): a
// [rows, n * hidden] buffer, or a side cache [R, S, 1, n * hidden] written at (write_rows, write_slots).
void set_capture(dspark::cpu::DecoderParams& p, const std::optional<at::Tensor>& captured,
                 const std::vector<int32_t>& slots, at::ScalarType dtype, const int64_t* wr, const int64_t* ws) {
  int64_t num_captured = 0;
  for (int32_t s : slots) num_captured = std::max<int64_t>(num_captured, s + 1);
  if (num_captured > 0) {
    TORCH_CHECK_VALUE(captured.has_value(), "captured is required when a layer is captured");
    expect(*captured, dtype, "captured");
    TORCH_CHECK_VALUE(captured->is_contiguous(), "captured must be contiguous");
    const int64_t width = num_captured * p.hidden_size;
    if (captured->dim() == 4) {
      TORCH_CHECK_VALUE(captured->size(2) == 1 && captured->size(3) == width,
                        "a captured side cache must be [R, S, 1, n * hidden]");
      for (int64_t t = 0; t < p.rows; ++t) {
        TORCH_CHECK_VALUE(wr[t] < captured->size(0) && ws[t] < captured->size(1),
                          "write_rows/write_slots outside the captured side cache at row ", t);
      }
      p.capture_slots_per_row = captured->size(1);
    } else {
      TORCH_CHECK_VALUE(captured->numel() == p.rows * width, "captured must be [rows, n * hidden] or [R, S, 1, n * hidden]");
    }
    p.captured = captured->data_ptr();
  }
  p.capture_slot = slots.data();
  p.num_captured = num_captured;
}

}  // namespace

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
  check_round_writes(rows, k_cache, write_rows, write_slots, qo_indptr, cache_seqlens, block_table);
  std::vector<dspark::cpu::DecoderLayerWeights> layers =
      layer_weights(weights, weight_formats, dtype, {hidden_size, num_heads, kv_heads, dim, intermediate_size},
                    k_cache, v_cache);
  TORCH_CHECK_VALUE(static_cast<int64_t>(capture_slot.size()) == num_layers, "capture_slot: one per layer");
  const std::vector<int32_t> slots(capture_slot.begin(), capture_slot.end());
  dspark::cpu::DecoderParams p{};
  p.dtype = element_type(hidden, "hidden");
  p.num_layers = num_layers;
  p.layers = layers.data();
  p.hidden = hidden.data_ptr();
  p.positions = positions.data_ptr<int64_t>();
  p.inv_freq = inv_freq.data_ptr<float>();
  p.write_rows = write_rows.data_ptr<int64_t>();
  p.write_slots = write_slots.data_ptr<int64_t>();
  p.rows = rows;
  p.hidden_size = hidden_size;
  p.num_heads = num_heads;
  p.num_kv_heads = kv_heads;
  p.head_dim = dim;
  p.intermediate_size = intermediate_size;
  p.eps = static_cast<float>(eps);
  set_capture(p, captured, slots, dtype, p.write_rows, p.write_slots);
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
  a.num_requests = cache_seqlens.numel();
  a.num_tokens = rows;
  a.num_q_heads = num_heads;
  a.num_kv_heads = kv_heads;
  a.head_dim = dim;
  a.slots_per_row = k_cache.size(2);
  a.max_blocks = block_table.has_value() ? block_table->size(1) : 0;
  a.sm_scale = static_cast<float>(sm_scale);
  a.bidirectional_rounds = bidirectional_rounds;
  dspark::cpu::llama_decoder_layers(p);
}

}  // namespace dspark::bindings
