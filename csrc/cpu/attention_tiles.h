// Micro-kernels of the CPU tree attention: element loads and conversion, a vectorisable exp, and
// the per-tile score / softmax / value updates on fp32 scratch. Framework-free; included by
// tree_attention.cpp only.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "common.h"

namespace dspark::cpu::attention_tiles {

constexpr int64_t kTile = 32;  // key slots per tile
constexpr float kNegInf = -std::numeric_limits<float>::infinity();


// Prefetch hint. It only affects speed.
#if defined(__GNUC__)
#define DSPARK_PREFETCH(addr) __builtin_prefetch(addr)
#else
#define DSPARK_PREFETCH(addr) ((void)0)
#endif

// Element loads. Half -> float with bit masks instead of branches so that tile conversion
// vectorises; exact for every input (normals, subnormals, infinities, NaN payloads), like
// to_float(Half).
inline float load_float(const float* p) { return *p; }
inline float load_float(const BFloat16* p) { return bits_to_float(static_cast<uint32_t>(p->bits) << 16); }
inline float load_float(const Half* p) {
  const uint32_t h = p->bits;
  const uint32_t em = h & 0x7fffu;
  const uint32_t normal = (em << 13) + (112u << 23);  // rebias the exponent: 15 -> 127
  const uint32_t special = (em << 13) | 0x7f800000u;  // infinity, NaN
  const uint32_t subnormal = float_to_bits(static_cast<float>(static_cast<int32_t>(em)) * 5.9604644775390625e-08f);
  const uint32_t is_special = 0u - static_cast<uint32_t>(em >= 0x7c00u);
  const uint32_t is_subnormal = 0u - static_cast<uint32_t>(em < 0x400u);
  uint32_t bits = (normal & ~is_special) | (special & is_special);
  bits = (bits & ~is_subnormal) | (subnormal & is_subnormal);
  return bits_to_float(bits | ((h & 0x8000u) << 16));
}

template <typename T>
inline void convert_row(const T* __restrict src, float* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) dst[d] = load_float(src + d);
}

// exp(x) for x <= 0 (x = score - running max); relative error below 1e-7. Inputs below -87, -inf
// (masked slots) included, give exactly 0. Written without branches or float-to-int conversions so
// that the compiler vectorises the loops calling it: the integer part n comes out of the mantissa of
// x * log2(e) + 1.5 * 2^23, and the result is masked with bit operations rather than a select that
// the compiler would turn into a branch around the polynomial.
inline float exp_nonpositive(float x) {
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float shifted = x * 1.44269504088896341f + magic;
  const float n = shifted - magic;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const uint32_t exponent = float_to_bits(shifted) - float_to_bits(magic) + 127u;  // n + 127
  const float result = y * bits_to_float(exponent << 23);
  const uint32_t keep = 0u - static_cast<uint32_t>(x >= -87.0f);
  return bits_to_float(float_to_bits(result) & keep);
}


// Scores of one row against a whole tile: s[j] = q . k[j] for j < kTile, keys kept as rows ([kTile,
// dim]), four keys per pass over q. Every row of every item goes through this one function over whole
// tiles (slots past a short tile are scored, then masked), so a row's scores never depend on how
// many rows or keys share its item: the batch invariance of tree_attention.cpp rests on it.
inline void dot_1x4(const float* __restrict q, const float* __restrict k, int64_t dim, float* __restrict out) {
  const float *__restrict k0 = k, *__restrict k1 = k + dim, *__restrict k2 = k + 2 * dim, *__restrict k3 = k + 3 * dim;
  float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
  for (int64_t d = 0; d < dim; ++d) {
    const float x = q[d];
    a0 += x * k0[d];
    a1 += x * k1[d];
    a2 += x * k2[d];
    a3 += x * k3[d];
  }
  out[0] = a0;
  out[1] = a1;
  out[2] = a2;
  out[3] = a3;
}

inline void tile_scores_row(const float* __restrict q, const float* __restrict k, int64_t dim, float* __restrict s) {
  static_assert(kTile % 4 == 0, "whole groups of four keys");
  for (int64_t j = 0; j < kTile; j += 4) dot_1x4(q, k + j * dim, dim, s + j);
}

// Online-softmax statistics of one row for one tile: turns the scores s[0, tk) (masked ones are -inf)
// into probabilities relative to the new running max, updates m and l, and returns the factor alpha
// by which the row's accumulator must be rescaled.
inline float softmax_row(float* __restrict s, int64_t tk, float& m, float& l) {
  float tile_max = kNegInf;
#pragma omp simd reduction(max : tile_max)
  for (int64_t j = 0; j < tk; ++j) tile_max = std::max(tile_max, s[j]);
  if (tile_max == kNegInf) {  // nothing visible in this tile: contribute nothing
    std::fill(s, s + tk, 0.0f);
    return 1.0f;
  }
  const float m_new = std::max(m, tile_max);
  const float alpha = m == kNegInf ? 0.0f : (m == m_new ? 1.0f : std::exp(m - m_new));
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < tk; ++j) {
    const float e = exp_nonpositive(s[j] - m_new);
    s[j] = e;
    sum += e;
  }
  l = l * alpha + sum;
  m = m_new;
  return alpha;
}

// acc[i] = alpha[i] * acc[i] + sum_j p[i][j] v[j] for NR rows (p is [NR, kTile], v is [kTile, dim];
// slots past the end of a short tile have p = 0 and v = 0). Vectorised across dim with the NR row
// accumulators in registers over the whole tile: each value vector load serves NR rows. The key
// loop has a constant trip count and is unrolled so that the compiler vectorises the dim loop.
template <int NR>
inline void tile_values(const float* __restrict p, const float* __restrict alpha, const float* __restrict v,
                        int64_t dim, float* __restrict acc) {
#pragma omp simd
  for (int64_t d = 0; d < dim; ++d) {
    float a[NR];
    for (int i = 0; i < NR; ++i) a[i] = alpha[i] * acc[i * dim + d];
#pragma GCC unroll 32
    for (int64_t j = 0; j < kTile; ++j) {
      const float x = v[j * dim + d];
      for (int i = 0; i < NR; ++i) a[i] += p[i * kTile + j] * x;
    }
    for (int i = 0; i < NR; ++i) acc[i * dim + d] = a[i];
  }
}


}  // namespace dspark::cpu::attention_tiles
