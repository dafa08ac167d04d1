#include "cpu/decoder_layers.h"

#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/exp_nonpositive.h"
#include "cpu/small_batch_linear.h"

namespace dspark::cpu {

namespace {

template <typename T>
inline T round_to(float x) {
  return from_float<T>(x);
}

// y = round(round(x * rsqrt(mean(x^2) + eps)) * w), per row of `width` elements (as the PyTorch
// rms_norm: normalise in fp32, cast to the dtype, multiply by the weight in the dtype). The sum of squares
// runs in vector lanes (its order is the same for every row, whatever the number of rows).
template <typename T>
void rms_norm_row(const T* x, const T* w, T* y, int64_t width, float eps) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t e = 0; e < width; ++e) {
    const float v = to_float(x[e]);
    sum += v * v;
  }
  const float scale = 1.0f / std::sqrt(sum / static_cast<float>(width) + eps);
#pragma omp simd
  for (int64_t e = 0; e < width; ++e) {
    const float normed = to_float(round_to<T>(to_float(x[e]) * scale));
    y[e] = round_to<T>(normed * to_float(w[e]));
  }
}

// out = round(round(SiLU(gate)) * up) over a row. SiLU(g) = g / (1 + e^-g) taken as (g or g e^g) / (1 + e^-|g|)
// so that the exp only sees x <= 0 (exp_nonpositive: vector lanes, relative error below 1e-7).
template <typename T>
void silu_mul_row(const T* gate, const T* up, T* out, int64_t width) {
#pragma omp simd
  for (int64_t e = 0; e < width; ++e) {
    const float g = to_float(gate[e]);
    const float t = exp_nonpositive(-std::fabs(g));
    // g or g e^g as g * (1 or t), the factor picked by g's sign bit in integers: a select on floats keeps GCC from
    // vectorising the loop. g >= 0 and -0 take 1 (g * 1 = g exactly).
    const uint32_t negative = 0u - static_cast<uint32_t>(g < 0.0f);
    const float factor = bits_to_float(float_to_bits(1.0f) ^ ((float_to_bits(1.0f) ^ float_to_bits(t)) & negative));
    const float silu = to_float(round_to<T>(g * factor / (1.0f + t)));
    out[e] = round_to<T>(silu * to_float(up[e]));
  }
}

// h = round(h + delta), elementwise.
template <typename T>
void add_residual(T* h, const T* delta, int64_t n) {
#pragma omp simd
  for (int64_t e = 0; e < n; ++e) h[e] = round_to<T>(to_float(h[e]) + to_float(delta[e]));
}

// Rotate-half RoPE of one head: out = x * cos + swap_halves(x) * sin, in fp32, rounded once; each half in its own
// loop, which vectorises.
template <typename T>
void rope_head(const T* x, const float* cos, const float* sin, T* out, int64_t dim) {
  const int64_t half = dim / 2;
#pragma omp simd
  for (int64_t e = 0; e < half; ++e) out[e] = round_to<T>(to_float(x[e]) * cos[e] + to_float(x[e + half]) * sin[e]);
#pragma omp simd
  for (int64_t e = half; e < dim; ++e) out[e] = round_to<T>(to_float(x[e]) * cos[e] + to_float(x[e - half]) * sin[e]);
}

template <typename T>
void linear(const T* x, const void* weight, int format, const void* bias, T* y, int64_t rows, int64_t in,
            int64_t out, DType dtype) {
  if (format != 0) {
    QuantizedLinearParams q{};
    q.x_dtype = dtype;
    q.x = x;
    q.format = static_cast<BlockFormat>(format & ~kPackedFormat);
    q.packed = (format & kPackedFormat) != 0;
    q.weight = static_cast<const uint8_t*>(weight);
    q.bias = bias;
    q.y = y;
    q.rows = rows;
    q.in_features = in;
    q.out_features = out;
    quantized_linear(q);
    return;
  }
  SmallBatchLinearParams p{};
  p.x_dtype = dtype;
  p.weight_dtype = dtype;
  p.x = x;
  p.weight = weight;
  p.bias = bias;
  p.y = y;
  p.rows = rows;
  p.in_features = in;
  p.out_features = out;
  small_batch_linear(p);
}

template <typename T>
int64_t slot_offset(const DecoderParams& p, int64_t row, int64_t slot) {
  const TreeAttentionParams& a = p.attention;
  const int64_t slot_elems = p.num_kv_heads * p.head_dim;
  if (a.block_table == nullptr) return (row * a.slots_per_row + slot) * slot_elems;
  const int64_t block = a.block_table[row * a.max_blocks + slot / a.slots_per_row];
  return (block * a.slots_per_row + slot % a.slots_per_row) * slot_elems;
}

// The rotate-half RoPE tables of dspark.models.layers.rope_tables, [rows, dim] each: angle =
// float(position) * inv_freq in fp32; cos over both halves, -sin over the first and sin over the second.
void rope_tables(const DecoderParams& p, std::vector<float>& cos_table, std::vector<float>& sin_table) {
  const int64_t dim = p.head_dim, half = dim / 2;
  cos_table.resize(p.rows * dim);
  sin_table.resize(p.rows * dim);
  for (int64_t t = 0; t < p.rows; ++t) {
    const float position = static_cast<float>(p.positions[t]);
    for (int64_t i = 0; i < half; ++i) {
      const float angle = position * p.inv_freq[i], c = std::cos(angle), s = std::sin(angle);
      cos_table[t * dim + i] = cos_table[t * dim + half + i] = c;
      sin_table[t * dim + i] = -s;
      sin_table[t * dim + half + i] = s;
    }
  }
}

// A round's per-layer buffers, sized once for all layers.
template <typename T>
struct LayerScratch {
  std::vector<T> x, qkv, q, normed, attn, proj, gate_up, act;
  std::vector<float> cos_table, sin_table;
  explicit LayerScratch(const DecoderParams& p) {
    const int64_t rows = p.rows, dim = p.head_dim, heads = p.num_heads;
    x.resize(rows * p.hidden_size);
    qkv.resize(rows * (heads + 2 * p.num_kv_heads) * dim);
    q.resize(rows * heads * dim);
    normed.resize(dim);
    attn.resize(rows * heads * dim);
    proj.resize(rows * p.hidden_size);
    gate_up.resize(rows * 2 * p.intermediate_size);
    act.resize(rows * p.intermediate_size);
    rope_tables(p, cos_table, sin_table);
  }
};

// h += o_proj(attention(RoPE(qkv_proj(rms_norm(h))))), the round's K/V written to the layer's cache first.
template <typename T>
void attention_block(const DecoderParams& p, const DecoderLayerWeights& w, T* h, LayerScratch<T>& s) {
  const int64_t rows = p.rows, hidden = p.hidden_size, dim = p.head_dim;
  const int64_t heads = p.num_heads, kv_heads = p.num_kv_heads;
  const int64_t qkv_width = (heads + 2 * kv_heads) * dim;
  for (int64_t t = 0; t < rows; ++t) {
    rms_norm_row(h + t * hidden, static_cast<const T*>(w.input_norm), s.x.data() + t * hidden, hidden, p.eps);
  }
  linear(s.x.data(), w.qkv, w.qkv_format, w.qkv_bias, s.qkv.data(), rows, hidden, qkv_width, p.dtype);
  T* k_cache = static_cast<T*>(w.k_cache);
  T* v_cache = static_cast<T*>(w.v_cache);
  for (int64_t t = 0; t < rows; ++t) {
    const float* cos = s.cos_table.data() + t * dim;
    const float* sin = s.sin_table.data() + t * dim;
    const T* row = s.qkv.data() + t * qkv_width;
    const int64_t cache_at = slot_offset<T>(p, p.write_rows[t], p.write_slots[t]);
    for (int64_t head = 0; head < heads + kv_heads; ++head) {
      const T* src = row + head * dim;
      const bool is_q = head < heads;
      const void* norm = is_q ? w.q_norm : w.k_norm;
      if (norm != nullptr) {
        rms_norm_row(src, static_cast<const T*>(norm), s.normed.data(), dim, p.eps);
        src = s.normed.data();
      }
      T* dst = is_q ? s.q.data() + (t * heads + head) * dim : k_cache + cache_at + (head - heads) * dim;
      rope_head(src, cos, sin, dst, dim);
    }
    const T* v = row + (heads + kv_heads) * dim;
    for (int64_t e = 0; e < kv_heads * dim; ++e) v_cache[cache_at + e] = v[e];
  }
  TreeAttentionParams a = p.attention;
  a.q = s.q.data();
  a.k_cache = k_cache;
  a.v_cache = v_cache;
  a.out = s.attn.data();
  tree_attention(a);
  linear(s.attn.data(), w.o_proj, w.o_format, w.o_bias, s.proj.data(), rows, heads * dim, hidden, p.dtype);
  add_residual(h, s.proj.data(), rows * hidden);
}

// h += down(SiLU(gate) * up), gate and up from one projection of rms_norm(h).
template <typename T>
void mlp_block(const DecoderParams& p, const DecoderLayerWeights& w, T* h, LayerScratch<T>& s) {
  const int64_t rows = p.rows, hidden = p.hidden_size, inter = p.intermediate_size;
  for (int64_t t = 0; t < rows; ++t) {
    rms_norm_row(h + t * hidden, static_cast<const T*>(w.post_norm), s.x.data() + t * hidden, hidden, p.eps);
  }
  linear(s.x.data(), w.gate_up, w.gate_up_format, w.gate_up_bias, s.gate_up.data(), rows, hidden, 2 * inter, p.dtype);
  for (int64_t t = 0; t < rows; ++t) {
    const T* g = s.gate_up.data() + t * 2 * inter;
    silu_mul_row(g, g + inter, s.act.data() + t * inter, inter);
  }
  linear(s.act.data(), w.down, w.down_format, w.down_bias, s.proj.data(), rows, inter, hidden, p.dtype);
  add_residual(h, s.proj.data(), rows * hidden);
}

// The residual stream after a captured layer, into its slot of each row's captured states.
template <typename T>
void capture(const DecoderParams& p, int32_t slot, const T* h) {
  T* captured = static_cast<T*>(p.captured);
  const int64_t hidden = p.hidden_size;
  for (int64_t t = 0; t < p.rows; ++t) {
    const int64_t at = p.capture_slots_per_row > 0 ? p.write_rows[t] * p.capture_slots_per_row + p.write_slots[t] : t;
    std::memcpy(captured + (at * p.num_captured + slot) * hidden, h + t * hidden, hidden * sizeof(T));
  }
}

template <typename T>
void run(const DecoderParams& p) {
  LayerScratch<T> scratch(p);
  T* h = static_cast<T*>(p.hidden);
  for (int64_t layer = 0; layer < p.num_layers; ++layer) {
    attention_block(p, p.layers[layer], h, scratch);
    mlp_block(p, p.layers[layer], h, scratch);
    const int32_t slot = p.capture_slot == nullptr ? -1 : p.capture_slot[layer];
    if (slot >= 0 && p.captured != nullptr) capture(p, slot, h);
  }
  if (p.final_norm != nullptr) {  // rms_norm_row reads a row whole before writing it: in place is safe
    for (int64_t t = 0; t < p.rows; ++t) {
      rms_norm_row(h + t * p.hidden_size, static_cast<const T*>(p.final_norm), h + t * p.hidden_size, p.hidden_size,
                   p.eps);
    }
  }
}

}  // namespace

void llama_decoder_layers(const DecoderParams& params) {
  if (params.rows <= 0 || params.num_layers <= 0) return;
  switch (params.dtype) {
    case DType::kFloat32: run<float>(params); break;
    case DType::kFloat16: run<Half>(params); break;
    case DType::kBFloat16: run<BFloat16>(params); break;
  }
}

}  // namespace dspark::cpu
