// Micro-kernels of the CPU tree attention: element loads and conversion, a vectorisable exp, and
// the per-tile score / softmax / value updates on fp32 scratch. Framework-free; included by
// tree_attention.cpp only.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
#include <immintrin.h>
#endif
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define DSPARK_ATTENTION_AVX2 1
#endif

#include "common.h"
#include "exp_nonpositive.h"

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




// Scores of NR rows against a whole tile: s[i][j] = q_i . k_j for j < kTile, the tile's keys transposed
// ([dim, kTile]) so that the keys run along the vector lanes: each score is one fma chain over d in
// order, with no horizontal sums. Every row of every item goes through this arithmetic over whole
// tiles (slots past a short tile are scored, then masked), whatever NR, so a row's scores never depend
// on how many rows or keys share its item: the batch invariance of tree_attention.cpp rests on it. The
// AVX-512 version keeps the NR x kTile accumulators in registers (the generic loop, vectorised by the
// compiler at its preferred width, kept them on the stack); the fma chains are the same.
template <int NR>
inline void tile_scores(const float* __restrict q, const float* __restrict kt, int64_t dim, float* __restrict s) {
#if defined(__AVX512F__)
  static_assert(kTile == 32, "two 16-lane vectors per row");
  __m512 a0[NR], a1[NR];
  for (int i = 0; i < NR; ++i) a0[i] = a1[i] = _mm512_setzero_ps();
  for (int64_t d = 0; d < dim; ++d) {
    const __m512 k0 = _mm512_loadu_ps(kt + d * kTile), k1 = _mm512_loadu_ps(kt + d * kTile + 16);
    for (int i = 0; i < NR; ++i) {
      const __m512 x = _mm512_set1_ps(q[i * dim + d]);
      a0[i] = _mm512_fmadd_ps(x, k0, a0[i]);
      a1[i] = _mm512_fmadd_ps(x, k1, a1[i]);
    }
  }
  for (int i = 0; i < NR; ++i) {
    _mm512_storeu_ps(s + i * kTile, a0[i]);
    _mm512_storeu_ps(s + i * kTile + 16, a1[i]);
  }
#elif defined(DSPARK_ATTENTION_AVX2)
  // Half a tile (16 keys) at a time, so that NR x 2 accumulators, the keys and the broadcast fit 16 registers.
  static_assert(kTile == 32, "two halves of two 8-lane vectors per row");
  for (int half = 0; half < 2; ++half) {
    __m256 a0[NR], a1[NR];
    for (int i = 0; i < NR; ++i) a0[i] = a1[i] = _mm256_setzero_ps();
    for (int64_t d = 0; d < dim; ++d) {
      const float* k = kt + d * kTile + 16 * half;
      const __m256 k0 = _mm256_loadu_ps(k), k1 = _mm256_loadu_ps(k + 8);
      for (int i = 0; i < NR; ++i) {
        const __m256 x = _mm256_set1_ps(q[i * dim + d]);
        a0[i] = _mm256_fmadd_ps(x, k0, a0[i]);
        a1[i] = _mm256_fmadd_ps(x, k1, a1[i]);
      }
    }
    for (int i = 0; i < NR; ++i) {
      _mm256_storeu_ps(s + i * kTile + 16 * half, a0[i]);
      _mm256_storeu_ps(s + i * kTile + 16 * half + 8, a1[i]);
    }
  }
#else
  float a[NR][kTile];
  for (int i = 0; i < NR; ++i)
    for (int64_t j = 0; j < kTile; ++j) a[i][j] = 0.0f;
  for (int64_t d = 0; d < dim; ++d) {
    const float* __restrict k = kt + d * kTile;
    for (int i = 0; i < NR; ++i) {
      const float x = q[i * dim + d];
#pragma omp simd
      for (int64_t j = 0; j < kTile; ++j) a[i][j] = std::fma(x, k[j], a[i][j]);
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int64_t j = 0; j < kTile; ++j) s[i * kTile + j] = a[i][j];
#endif
}

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const BFloat16* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
inline __m512 load16(const Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }

inline __m512 unpacklo_pairs(__m512 a, __m512 b) {
  return _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
}
inline __m512 unpackhi_pairs(__m512 a, __m512 b) {
  return _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
}

// r[i][j] <- r[j][i] for a 16 x 16 block of floats: interleave words, pairs, then 128-bit lanes twice.
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = unpacklo_pairs(t[i], t[i + 2]);
    r[i + 1] = unpackhi_pairs(t[i], t[i + 2]);
    r[i + 2] = unpacklo_pairs(t[i + 1], t[i + 3]);
    r[i + 3] = unpackhi_pairs(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
  }
}
#endif

#if defined(DSPARK_ATTENTION_AVX2)
// r[i][j] <- r[j][i] for an 8 x 8 block of floats: interleave words, then pairs, then 128-bit lanes.
inline void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
#endif

template <typename T>
inline void convert_row(const T* __restrict src, float* __restrict dst, int64_t n) {
  int64_t d = 0;
#if defined(__AVX512F__)
  for (; d + 16 <= n; d += 16) _mm512_storeu_ps(dst + d, load16(src + d));
#endif
#pragma omp simd
  for (int64_t e = d; e < n; ++e) dst[e] = load_float(src + e);
}

// The tile's keys (keys[j] for j < tk) into its transposed scratch: kt[d * kTile + j] = k_j[d]. Slots
// past tk hold zeros or what they held before: finite, and masked after scoring.
template <typename T>
inline void convert_keys(const T* const keys[], int64_t tk, int64_t dim, float* __restrict kt) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, BFloat16>) {
    if (dim % 32 == 0) {  // 16 keys x 16 pairs of dims at a time: half the shuffles of transposing floats
      const __m512i high = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
      for (int64_t j0 = 0; j0 < tk; j0 += 16) {
        for (int64_t d0 = 0; d0 < dim; d0 += 32) {
          __m512 r[16];
          for (int i = 0; i < 16; ++i) {
            r[i] = j0 + i < tk ? _mm512_loadu_ps(reinterpret_cast<const float*>(keys[j0 + i] + d0)) : _mm512_setzero_ps();
          }
          transpose16(r);  // r[w]: the pair of dims (d0 + 2w, d0 + 2w + 1) of 16 keys, one bf16 pair per lane
          for (int w = 0; w < 16; ++w) {
            const __m512i pair = _mm512_castps_si512(r[w]);
            _mm512_storeu_ps(kt + (d0 + 2 * w) * kTile + j0, _mm512_castsi512_ps(_mm512_slli_epi32(pair, 16)));
            _mm512_storeu_ps(kt + (d0 + 2 * w + 1) * kTile + j0, _mm512_castsi512_ps(_mm512_and_si512(pair, high)));
          }
        }
      }
      return;
    }
  }
  if (dim % 16 == 0) {  // 16 keys x 16 dims at a time, transposed in registers
    for (int64_t j0 = 0; j0 < tk; j0 += 16) {
      for (int64_t d0 = 0; d0 < dim; d0 += 16) {
        __m512 r[16];
        for (int i = 0; i < 16; ++i) r[i] = j0 + i < tk ? load16(keys[j0 + i] + d0) : _mm512_setzero_ps();
        transpose16(r);
        for (int i = 0; i < 16; ++i) _mm512_storeu_ps(kt + (d0 + i) * kTile + j0, r[i]);
      }
    }
    return;
  }
#elif defined(DSPARK_ATTENTION_AVX2)
  if constexpr (std::is_same_v<T, BFloat16>) {
    if (dim % 16 == 0) {  // 8 keys x 8 pairs of dims at a time, as the AVX-512 path above
      const __m256i high = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
      for (int64_t j0 = 0; j0 < tk; j0 += 8) {
        for (int64_t d0 = 0; d0 < dim; d0 += 16) {
          __m256 r[8];
          for (int i = 0; i < 8; ++i) {
            r[i] = j0 + i < tk ? _mm256_loadu_ps(reinterpret_cast<const float*>(keys[j0 + i] + d0)) : _mm256_setzero_ps();
          }
          transpose8(r);  // r[w]: the pair of dims (d0 + 2w, d0 + 2w + 1) of 8 keys, one bf16 pair per lane
          for (int w = 0; w < 8; ++w) {
            const __m256i pair = _mm256_castps_si256(r[w]);
            _mm256_storeu_ps(kt + (d0 + 2 * w) * kTile + j0, _mm256_castsi256_ps(_mm256_slli_epi32(pair, 16)));
            _mm256_storeu_ps(kt + (d0 + 2 * w + 1) * kTile + j0, _mm256_castsi256_ps(_mm256_and_si256(pair, high)));
          }
        }
      }
      return;
    }
  } else if (dim % 8 == 0) {  // 8 keys x 8 dims at a time, transposed in registers
    for (int64_t j0 = 0; j0 < tk; j0 += 8) {
      for (int64_t d0 = 0; d0 < dim; d0 += 8) {
        __m256 r[8];
        for (int i = 0; i < 8; ++i) r[i] = j0 + i < tk ? load8(keys[j0 + i] + d0) : _mm256_setzero_ps();
        transpose8(r);
        for (int i = 0; i < 8; ++i) _mm256_storeu_ps(kt + (d0 + i) * kTile + j0, r[i]);
      }
    }
    return;
  }
#endif
  for (int64_t j = 0; j < tk; ++j)
    for (int64_t d = 0; d < dim; ++d) kt[d * kTile + j] = load_float(keys[j] + d);
}

// Online-softmax statistics of one row for one whole tile: turns the scores s[0, kTile) (masked ones are
// -inf) into probabilities relative to the new running max, updates m and l, and returns the factor alpha
// by which the row's accumulator must be rescaled. The tile's max skips NaN scores (as std::max does); the
// maximum of a set does not depend on the order it is taken in.
inline float softmax_row(float* __restrict s, float& m, float& l) {
#if defined(__AVX512F__)
  static_assert(kTile == 32, "two 16-lane vectors per row");
  const __m512 neg_inf = _mm512_set1_ps(kNegInf);
  __m512 s0 = _mm512_loadu_ps(s), s1 = _mm512_loadu_ps(s + 16);
  // max(a, b) is a when a > b, else b: a NaN in a yields b.
  const float tile_max = _mm512_reduce_max_ps(_mm512_max_ps(s1, _mm512_max_ps(s0, neg_inf)));
#else
  constexpr int kMaxLanes = 16;
  float lanes[kMaxLanes];
  for (int i = 0; i < kMaxLanes; ++i) lanes[i] = kNegInf;
  for (int64_t j0 = 0; j0 < kTile; j0 += kMaxLanes) {
    for (int i = 0; i < kMaxLanes; ++i) lanes[i] = lanes[i] < s[j0 + i] ? s[j0 + i] : lanes[i];
  }
  float tile_max = kNegInf;
  for (int i = 0; i < kMaxLanes; ++i) tile_max = std::max(tile_max, lanes[i]);
#endif
  if (tile_max == kNegInf) {  // nothing visible in this tile: contribute nothing
    std::fill(s, s + kTile, 0.0f);
    return 1.0f;
  }
  const float m_new = std::max(m, tile_max);
  const float alpha = m == kNegInf ? 0.0f : (m == m_new ? 1.0f : std::exp(m - m_new));
#if defined(__AVX512F__)
  const __m512 shift = _mm512_set1_ps(m_new);
  s0 = exp_nonpositive16(_mm512_sub_ps(s0, shift));
  s1 = exp_nonpositive16(_mm512_sub_ps(s1, shift));
  _mm512_storeu_ps(s, s0);
  _mm512_storeu_ps(s + 16, s1);
  const float sum = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
#else
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < kTile; ++j) {
    const float e = exp_nonpositive(s[j] - m_new);
    s[j] = e;
    sum += e;
  }
#endif
  l = l * alpha + sum;
  m = m_new;
  return alpha;
}

// acc[i] = alpha[i] * acc[i] + sum_j p[i][j] v[j] for NR rows (p is [NR, kTile], v is [kTile, dim];
// slots past the end of a short tile have p = 0 and v = 0). Vectorised across dim with the NR row
// accumulators in registers over the whole tile: each value vector load serves NR rows. Per element:
// one product alpha * acc, then one fma per key in key order, whatever NR and the vector width.
template <int NR>
inline void tile_values(const float* __restrict p, const float* __restrict alpha, const float* __restrict v,
                        int64_t dim, float* __restrict acc) {
  int64_t d0 = 0;
#if defined(__AVX512F__)
  for (; d0 + 16 <= dim; d0 += 16) {
    __m512 a[NR];
    for (int i = 0; i < NR; ++i) a[i] = _mm512_mul_ps(_mm512_set1_ps(alpha[i]), _mm512_loadu_ps(acc + i * dim + d0));
    for (int64_t j = 0; j < kTile; ++j) {
      const __m512 x = _mm512_loadu_ps(v + j * dim + d0);
      for (int i = 0; i < NR; ++i) a[i] = _mm512_fmadd_ps(_mm512_set1_ps(p[i * kTile + j]), x, a[i]);
    }
    for (int i = 0; i < NR; ++i) _mm512_storeu_ps(acc + i * dim + d0, a[i]);
  }
#endif
#pragma omp simd
  for (int64_t d = d0; d < dim; ++d) {
    float a[NR];
    for (int i = 0; i < NR; ++i) a[i] = alpha[i] * acc[i * dim + d];
#pragma GCC unroll 32
    for (int64_t j = 0; j < kTile; ++j) {
      const float x = v[j * dim + d];
      for (int i = 0; i < NR; ++i) a[i] = std::fma(p[i * kTile + j], x, a[i]);
    }
    for (int i = 0; i < NR; ++i) acc[i * dim + d] = a[i];
  }
}


}  // namespace dspark::cpu::attention_tiles
