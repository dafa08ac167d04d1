#include "cpu/quantized_linear.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define DSPARK_QL_AVX2 1
#endif

namespace dspark::cpu {
namespace {

constexpr int kLanes = 8;
constexpr int kRowsPerTile = 4;  // x rows per pass over one W row: 4 accumulators + the unpacked block

// The rows of x, quantised per 32-block.
struct QuantizedX {
  std::vector<int8_t> q;     // [rows, in]
  std::vector<float> scale;  // [rows, blocks]: max|x| / 127 (NaN when the block holds a NaN or inf)
  std::vector<float> sum;    // [rows, blocks]: scale * (sum of the block's codes), the quantised x's sum (Q4_1's m term)
};

template <typename X>
void quantize_x(const X* x, int64_t rows, int64_t in, QuantizedX& out) {
  const int64_t blocks = in / kBlockWeights;
  out.q.resize(rows * in);
  out.scale.resize(rows * blocks);
  out.sum.resize(rows * blocks);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b = 0; b < blocks; ++b) {
      const X* src = x + r * in + b * kBlockWeights;
      int8_t* q = out.q.data() + r * in + b * kBlockWeights;
      float v[kBlockWeights];
      float amax = 0.f;
      bool finite = true;
      for (int i = 0; i < kBlockWeights; ++i) {
        v[i] = to_float(src[i]);
        amax = std::max(amax, std::fabs(v[i]));
        finite = finite && std::isfinite(v[i]);
      }
      if (!finite) {  // a NaN or inf in the block: every output it touches becomes NaN
        std::fill(q, q + kBlockWeights, int8_t{0});
        out.scale[r * blocks + b] = out.sum[r * blocks + b] = std::nanf("");
        continue;
      }
      // A block too small for 127 / max|x| to be finite (max|x| < ~3.7e-37) quantises to zeros.
      const float ratio = 127.f / amax;
      const float inverse = amax > 0.f && std::isfinite(ratio) ? ratio : 0.f;
      int32_t codes = 0;
      for (int i = 0; i < kBlockWeights; ++i) {
        const float scaled = std::nearbyint(v[i] * inverse);  // ties to even, as torch.round
        q[i] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, scaled)));
        codes += q[i];
      }
      const float scale = amax / 127.f;
      out.scale[r * blocks + b] = scale;
      // The quantised x's sum, not x's: then every term is w_i * xhat_i, whose rounding errors meet the
      // centred w = d q + m rather than the all-positive d q (measured on SmolLM2: 0.7% against 1.8%
      // relative error of a projection with the exact sum).
      out.sum[r * blocks + b] = scale * static_cast<float>(codes);
    }
  }
}

inline float half_at(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, sizeof(bits));
#ifdef DSPARK_QL_AVX2
  return _cvtsh_ss(bits);  // exact, as to_float(Half)
#else
  return to_float(Half{bits});
#endif
}

#ifdef DSPARK_QL_AVX2
using Acc = __m256;
inline Acc acc_zero() { return _mm256_setzero_ps(); }
inline float acc_sum(Acc v) {
  alignas(32) float l[kLanes];
  _mm256_store_ps(l, v);
  return ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]));
}
// 16 bytes of nibbles -> 32 unsigned bytes in weight order (low nibbles: weights 0-15, high: 16-31).
// The bytes go to both halves and the upper half's dwords shift right by 4: each byte's low nibble is
// then its own high nibble (the bits shifted in from the next byte are masked off).
inline __m256i unpack_nibbles(const uint8_t* p) {
  const __m256i bytes = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i shifted = _mm256_srlv_epi32(bytes, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4));
  return _mm256_and_si256(shifted, _mm256_set1_epi8(0x0f));
}
// Lane j = sum of u_i * s_i over i = 4j..4j+3 (exact: |u_i s_i + u_i+1 s_i+1| <= 2 * 128 * 127 < 2^15).
inline __m256i lane_dots(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);  // the same exact sums in one instruction
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}
inline Acc scaled_add(__m256i lanes, float scale, Acc acc) {
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(lanes), _mm256_set1_ps(scale), acc);
}
inline void prefetch_ahead(const uint8_t* p) { _mm_prefetch(reinterpret_cast<const char*>(p) + 2048, _MM_HINT_T0); }

// One block's weights, ready for every row: unsigned (Q4_1) or |w| with w kept for the signs.
template <BlockFormat F>
struct Block {
  __m256i magnitude, sign;
  explicit Block(const uint8_t* quants) {
    if constexpr (F == BlockFormat::kQ4_1) {
      magnitude = unpack_nibbles(quants);
    } else {
      const __m256i w = F == BlockFormat::kQ8_0
                            ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(quants))
                            : _mm256_sub_epi8(unpack_nibbles(quants), _mm256_set1_epi8(8));
      magnitude = _mm256_sign_epi8(w, w);
      sign = w;
    }
  }
  __m256i dots(const int8_t* xq) const {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
    if constexpr (F == BlockFormat::kQ4_1) return lane_dots(magnitude, x);
    return lane_dots(magnitude, _mm256_sign_epi8(x, sign));
  }
};

using MinAcc = __m128;
inline MinAcc min_zero() { return _mm_setzero_ps(); }
inline float min_sum(MinAcc v) {
  alignas(16) float l[4];
  _mm_store_ps(l, v);
  return (l[0] + l[1]) + (l[2] + l[3]);
}
inline __m128 four_halves(const uint8_t* p, int64_t stride) {
  uint16_t h[4];
  for (int k = 0; k < 4; ++k) std::memcpy(&h[k], p + k * stride, sizeof(uint16_t));
  return _mm_cvtph_ps(_mm_set_epi16(0, 0, 0, 0, static_cast<int16_t>(h[3]), static_cast<int16_t>(h[2]),
                                    static_cast<int16_t>(h[1]), static_cast<int16_t>(h[0])));
}

// Four consecutive blocks, unpacked once for every row. Their integer lanes fold into one vector,
// lane k = products 0-15 of block k and lane k + 4 = its products 16-31 (two rounds of hadd), so one
// conversion and one fmadd with [d_k * dx_k] serve four blocks.
template <BlockFormat F>
struct Group {
  static constexpr int64_t kBytes = F == BlockFormat::kQ4_0 ? 18 : F == BlockFormat::kQ4_1 ? 20 : 34;
  static constexpr int64_t kHeader = F == BlockFormat::kQ4_1 ? 4 : 2;
  Block<F> b0, b1, b2, b3;
  __m256 d;
  __m128 m;
  explicit Group(const uint8_t* p)
      : b0(p + kHeader), b1(p + kBytes + kHeader), b2(p + 2 * kBytes + kHeader), b3(p + 3 * kBytes + kHeader) {
    if constexpr (F == BlockFormat::kQ4_1) {
      // Each block's header is (d, m): four 32-bit loads and one conversion give [d0 m0 .. d3 m3].
      int32_t dm[4];
      for (int k = 0; k < 4; ++k) std::memcpy(&dm[k], p + k * kBytes, sizeof(int32_t));
      const __m256 pairs = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(dm)));
      d = _mm256_permutevar8x32_ps(pairs, _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6));
      m = _mm256_castps256_ps128(_mm256_permutevar8x32_ps(pairs, _mm256_setr_epi32(1, 3, 5, 7, 1, 3, 5, 7)));
    } else {
      const __m128 d4 = four_halves(p, kBytes);
      d = _mm256_set_m128(d4, d4);
      m = _mm_setzero_ps();
    }
  }
  Acc accumulate(const int8_t* xq, const float* dx, Acc acc) const {
    const __m256i lanes = _mm256_hadd_epi32(_mm256_hadd_epi32(b0.dots(xq), b1.dots(xq + 32)),
                                            _mm256_hadd_epi32(b2.dots(xq + 64), b3.dots(xq + 96)));
    const __m256 scale = _mm256_mul_ps(d, _mm256_broadcast_ps(reinterpret_cast<const __m128*>(dx)));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(lanes), scale, acc);
  }
  MinAcc mins(const float* sums, MinAcc acc) const { return _mm_fmadd_ps(m, _mm_loadu_ps(sums), acc); }
};
#else
// The same lanes in portable code (builds without AVX2): integer lane sums are exact, the fp32 steps
// are the same operations in the same order.
struct Acc {
  float l[kLanes];
};
inline Acc acc_zero() { return Acc{}; }
inline float acc_sum(Acc v) {
  const float* l = v.l;
  return ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]));
}
struct Lanes {
  int32_t l[kLanes];
};
inline Acc scaled_add(Lanes lanes, float scale, Acc acc) {
  for (int j = 0; j < kLanes; ++j) acc.l[j] = std::fmaf(static_cast<float>(lanes.l[j]), scale, acc.l[j]);
  return acc;
}
inline void prefetch_ahead(const uint8_t*) {}

template <BlockFormat F>
struct Block {
  int32_t w[kBlockWeights];
  explicit Block(const uint8_t* quants) {
    for (int i = 0; i < kBlockWeights; ++i) {
      if constexpr (F == BlockFormat::kQ8_0) {
        w[i] = static_cast<int8_t>(quants[i]);
      } else {
        const int nibble = i < 16 ? quants[i] & 0x0f : quants[i - 16] >> 4;
        w[i] = F == BlockFormat::kQ4_0 ? nibble - 8 : nibble;
      }
    }
  }
  Lanes dots(const int8_t* xq) const {
    Lanes out;
    for (int j = 0; j < kLanes; ++j) {
      int32_t s = 0;
      for (int i = 4 * j; i < 4 * j + 4; ++i) s += w[i] * xq[i];
      out.l[j] = s;
    }
    return out;
  }
  int32_t half_dot(const int8_t* xq, int half) const {
    int32_t s = 0;
    for (int i = 16 * half; i < 16 * half + 16; ++i) s += w[i] * xq[i];
    return s;
  }
};

struct MinAcc {
  float l[4];
};
inline MinAcc min_zero() { return MinAcc{}; }
inline float min_sum(MinAcc v) { return (v.l[0] + v.l[1]) + (v.l[2] + v.l[3]); }

template <BlockFormat F>
struct Group {
  static constexpr int64_t kBytes = F == BlockFormat::kQ4_0 ? 18 : F == BlockFormat::kQ4_1 ? 20 : 34;
  static constexpr int64_t kHeader = F == BlockFormat::kQ4_1 ? 4 : 2;
  Block<F> b0, b1, b2, b3;
  float d[4], m[4];
  explicit Group(const uint8_t* p)
      : b0(p + kHeader), b1(p + kBytes + kHeader), b2(p + 2 * kBytes + kHeader), b3(p + 3 * kBytes + kHeader) {
    for (int k = 0; k < 4; ++k) {
      d[k] = half_at(p + k * kBytes);
      m[k] = F == BlockFormat::kQ4_1 ? half_at(p + k * kBytes + 2) : 0.f;
    }
  }
  Acc accumulate(const int8_t* xq, const float* dx, Acc acc) const {
    const Block<F>* blocks[4] = {&b0, &b1, &b2, &b3};
    for (int k = 0; k < 4; ++k) {
      const float scale = d[k] * dx[k];
      acc.l[k] = std::fmaf(static_cast<float>(blocks[k]->half_dot(xq + 32 * k, 0)), scale, acc.l[k]);
      acc.l[k + 4] = std::fmaf(static_cast<float>(blocks[k]->half_dot(xq + 32 * k, 1)), scale, acc.l[k + 4]);
    }
    return acc;
  }
  MinAcc mins(const float* sums, MinAcc acc) const {
    for (int k = 0; k < 4; ++k) acc.l[k] = std::fmaf(m[k], sums[k], acc.l[k]);
    return acc;
  }
};
#endif

// dots[m] = x_m . w for MR rows of x against one W row of `blocks` blocks: groups of four blocks into
// one accumulator, the last blocks % 4 one by one into another, then (groups + rest) + (m terms).
// The same operations in the same order for every row, whatever MR.
template <BlockFormat F, int MR>
void row_dots(const uint8_t* row, int64_t blocks, const QuantizedX& qx, int64_t first_row, int64_t in,
              float* dots) {
  constexpr int64_t bytes = Group<F>::kBytes, header = Group<F>::kHeader;
  Acc acc[MR], rest[MR];
  MinAcc mins[MR];
  float rest_min[MR];
  for (int m = 0; m < MR; ++m) {
    acc[m] = rest[m] = acc_zero();
    mins[m] = min_zero();
    rest_min[m] = 0.f;
  }
  const float* scales = qx.scale.data() + first_row * blocks;
  const float* sums = qx.sum.data() + first_row * blocks;
  const int8_t* xq = qx.q.data() + first_row * in;
  const int64_t grouped = blocks - blocks % 4;
  for (int64_t b = 0; b < grouped; b += 4) {
    const uint8_t* group = row + b * bytes;
    prefetch_ahead(group);
    prefetch_ahead(group + 64);
    const Group<F> w(group);
    for (int m = 0; m < MR; ++m) {
      acc[m] = w.accumulate(xq + m * in + b * kBlockWeights, scales + m * blocks + b, acc[m]);
      if constexpr (F == BlockFormat::kQ4_1) mins[m] = w.mins(sums + m * blocks + b, mins[m]);
    }
  }
  for (int64_t b = grouped; b < blocks; ++b) {
    const uint8_t* block = row + b * bytes;
    const float d = half_at(block);
    const Block<F> w(block + header);
    for (int m = 0; m < MR; ++m) {
      const float scale = d * scales[m * blocks + b];
      rest[m] = scaled_add(w.dots(xq + m * in + b * kBlockWeights), scale, rest[m]);
      if constexpr (F == BlockFormat::kQ4_1) rest_min[m] = std::fmaf(half_at(block + 2), sums[m * blocks + b], rest_min[m]);
    }
  }
  for (int m = 0; m < MR; ++m) dots[m] = (acc_sum(acc[m]) + acc_sum(rest[m])) + (min_sum(mins[m]) + rest_min[m]);
}

template <typename X, BlockFormat F>
void run(const QuantizedLinearParams& p, const QuantizedX& qx) {
  const int64_t rows = p.rows, in = p.in_features, n_out = p.out_features;
  const int64_t blocks = in / kBlockWeights, row_bytes = blocks * block_bytes(F);
  const X* bias = static_cast<const X*>(p.bias);
  X* y = static_cast<X*>(p.y);
  // Each thread streams one contiguous run of W rows (static schedule), which the prefetcher follows.
#pragma omp parallel for schedule(static) if (n_out * in * rows >= 16384)
  for (int64_t o = 0; o < n_out; ++o) {
    const uint8_t* row = p.weight + o * row_bytes;
    const float b = bias ? to_float(bias[o]) : 0.f;
    float dots[kRowsPerTile];
    for (int64_t m0 = 0; m0 < rows; m0 += kRowsPerTile) {
      const int64_t mr = std::min<int64_t>(kRowsPerTile, rows - m0);
      switch (mr) {
        case 4: row_dots<F, 4>(row, blocks, qx, m0, in, dots); break;
        case 3: row_dots<F, 3>(row, blocks, qx, m0, in, dots); break;
        case 2: row_dots<F, 2>(row, blocks, qx, m0, in, dots); break;
        default: row_dots<F, 1>(row, blocks, qx, m0, in, dots); break;
      }
      for (int64_t m = 0; m < mr; ++m) y[(m0 + m) * n_out + o] = from_float<X>(dots[m] + b);
    }
  }
}

template <typename X>
void dispatch(const QuantizedLinearParams& p) {
  // Thread-local: decoding calls this ~200 times a token; the buffers stay warm and never reallocate.
  thread_local QuantizedX qx;
  quantize_x(static_cast<const X*>(p.x), p.rows, p.in_features, qx);
  switch (p.format) {
    case BlockFormat::kQ4_0: return run<X, BlockFormat::kQ4_0>(p, qx);
    case BlockFormat::kQ4_1: return run<X, BlockFormat::kQ4_1>(p, qx);
    case BlockFormat::kQ8_0: return run<X, BlockFormat::kQ8_0>(p, qx);
  }
}

}  // namespace

void quantized_linear(const QuantizedLinearParams& p) {
  if (p.rows == 0 || p.out_features == 0) return;
  switch (p.x_dtype) {
    case DType::kFloat32: return dispatch<float>(p);
    case DType::kFloat16: return dispatch<Half>(p);
    case DType::kBFloat16: return dispatch<BFloat16>(p);
  }
}

}  // namespace dspark::cpu
