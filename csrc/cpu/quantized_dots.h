// Micro-kernels of quantized_linear.cpp, second half: the exact integer dots of rows of quantised x against a
// tile's block as quantized_tiles.h lays it out (one 4-byte lane per W row), accumulated per lane in fp32, in
// vector registers at the tile's width (AVX2 / 512-bit VNNI) or, in a portable build, lane by lane with the same
// operations in the same order. Framework-free; included by quantized_linear.cpp only.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu/quantized_tiles.h"

namespace dspark::cpu::quantized_tiles {

#if defined(DSPARK_QL_AVX2)
// The vector operations of the lanes, at the tile's width: 16 lanes (zmm) with 512-bit VNNI, else 8 (ymm).
#if defined(DSPARK_QL_512)
using VecI = __m512i;
using VecF = __m512;
inline VecI splat_i32(int32_t x) { return _mm512_set1_epi32(x); }
inline VecF splat_f32(float x) { return _mm512_set1_ps(x); }
inline VecI zero_i32() { return _mm512_setzero_si512(); }
inline VecI add_i32(VecI a, VecI b) { return _mm512_add_epi32(a, b); }
inline VecI sub_i32(VecI a, VecI b) { return _mm512_sub_epi32(a, b); }
inline VecF to_f32(VecI a) { return _mm512_cvtepi32_ps(a); }
inline VecF mul_f32(VecF a, VecF b) { return _mm512_mul_ps(a, b); }
inline VecF fma_f32(VecF a, VecF b, VecF c) { return _mm512_fmadd_ps(a, b, c); }
inline VecF load_f32(const float* p) { return _mm512_load_ps(p); }
inline void store_f32(float* p, VecF a) { _mm512_store_ps(p, a); }
inline VecI dot_add(VecI acc, VecI u, VecI s) { return _mm512_dpbusd_epi32(acc, u, s); }
#else
using VecI = __m256i;
using VecF = __m256;
inline VecI splat_i32(int32_t x) { return _mm256_set1_epi32(x); }
inline VecF splat_f32(float x) { return _mm256_set1_ps(x); }
inline VecI zero_i32() { return _mm256_setzero_si256(); }
inline VecI add_i32(VecI a, VecI b) { return _mm256_add_epi32(a, b); }
inline VecI sub_i32(VecI a, VecI b) { return _mm256_sub_epi32(a, b); }
inline VecF to_f32(VecI a) { return _mm256_cvtepi32_ps(a); }
inline VecF mul_f32(VecF a, VecF b) { return _mm256_mul_ps(a, b); }
inline VecF fma_f32(VecF a, VecF b, VecF c) { return _mm256_fmadd_ps(a, b, c); }
inline VecF load_f32(const float* p) { return _mm256_load_ps(p); }
inline void store_f32(float* p, VecF a) { _mm256_store_ps(p, a); }
// Lane j += sum over i of u_i * s_i, bytes 4j..4j+3 (exact: |u_i s_i + u_i+1 s_i+1| <= 2 * 128 * 127 < 2^15).
inline VecI dot_add(VecI acc, VecI u, VecI s) {
#ifdef DSPARK_QL_VNNI
  return _mm256_dpbusd_epi32(acc, u, s);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}
#endif

inline VecI x_chunk(const int8_t* xq, int k) {
  int32_t word;
  std::memcpy(&word, xq + 4 * k, sizeof(word));
  return splat_i32(word);
}

// Block b of a prepared tile into the lanes of MR rows of x: the exact integer dot (minus the zero point
// times x's code sum), then acc = fma(float(dot), d * dx, acc) and, for Q4_1, mins = fma(m, x's sum, mins).
template <BlockFormat F, int MR>
DSPARK_QL_INLINE void accumulate(const TileBlock& t, int64_t b, const QuantizedX& qx, int64_t first_row, int64_t in,
                                 VecF acc[MR], VecF mins[MR]) {
  const int64_t stride = in / kBlockWeights;
  for (int m = 0; m < MR; ++m) {
    const int64_t xb = (first_row + m) * stride + b;
    const int8_t* xq = qx.q.data() + (first_row + m) * in + b * kBlockWeights;
    VecI low = zero_i32(), high = zero_i32();
#if !defined(DSPARK_QL_VNNI)
    if constexpr (F != BlockFormat::kQ8_0) {
      // Without VNNI a dot step is maddubs, madd and add. A nibble code (<= 15) times an x code (|.| <= 127), paired,
      // is at most 3810 in magnitude, so the block's 8 chunks sum exactly in int16 (<= 30480) and widen once: the
      // same integers with 9 multiply instructions a block instead of 16 (AMD EPYC, AVX2: a fused 300-token SmolLM2 prefill 0.80 s against 0.89-0.91).
      __m256i sums[2];
      for (int h = 0; h < 2; ++h) {
        sums[h] = _mm256_maddubs_epi16(t.codes[4 * h], x_chunk(xq, 4 * h));
        for (int k = 1; k < 4; ++k)
          sums[h] = _mm256_add_epi16(sums[h], _mm256_maddubs_epi16(t.codes[4 * h + k], x_chunk(xq, 4 * h + k)));
      }
      low = _mm256_madd_epi16(_mm256_add_epi16(sums[0], sums[1]), _mm256_set1_epi16(1));
    } else
#endif
    for (int k = 0; k < 4; ++k) {
      VecI s0 = x_chunk(xq, k), s1 = x_chunk(xq, k + 4);
#ifndef DSPARK_QL_512
      if constexpr (F == BlockFormat::kQ8_0 && !kUnsignedQ8) {
        s0 = _mm256_sign_epi8(s0, t.signs[k]);
        s1 = _mm256_sign_epi8(s1, t.signs[k + 4]);
      }
#endif
      low = dot_add(low, t.codes[k], s0);
      high = dot_add(high, t.codes[k + 4], s1);
    }
    VecI dot = add_i32(low, high);
    if constexpr (zero_point<F>() != 0) dot = sub_i32(dot, splat_i32(zero_point<F>() * qx.codes[xb]));
    const VecF scale = mul_f32(t.d, splat_f32(qx.scale[xb]));
    acc[m] = fma_f32(to_f32(dot), scale, acc[m]);
    if constexpr (F == BlockFormat::kQ4_1) mins[m] = fma_f32(t.m, splat_f32(qx.sum[xb]), mins[m]);
  }
}

// Lanes of MR rows of x, carried in `io` between calls: zeroed by the caller, (acc, mins) per row.
template <int MR>
struct Accumulators {
  VecF acc[MR], mins[MR];
  explicit Accumulators(const Lanes* io) {
    for (int m = 0; m < MR; ++m) {
      acc[m] = load_f32(io[2 * m].v);
      mins[m] = load_f32(io[2 * m + 1].v);
    }
  }
  void store(Lanes* io) const {
    for (int m = 0; m < MR; ++m) {
      store_f32(io[2 * m].v, acc[m]);
      store_f32(io[2 * m + 1].v, mins[m]);
    }
  }
};
template <BlockFormat F, int MR>
DSPARK_QL_INLINE void accumulate(const TileBlock& t, int64_t b, const QuantizedX& qx, int64_t first_row, int64_t in,
                                 Accumulators<MR>& a) {
  accumulate<F, MR>(t, b, qx, first_row, in, a.acc, a.mins);
}
#else
// The same lanes in portable code (builds without AVX2): integer dots are exact, the fp32 steps are the
// same operations in the same order.
template <int MR>
struct Accumulators {
  Lanes acc[MR], mins[MR];
  explicit Accumulators(const Lanes* io) {
    for (int m = 0; m < MR; ++m) acc[m] = io[2 * m], mins[m] = io[2 * m + 1];
  }
  void store(Lanes* io) const {
    for (int m = 0; m < MR; ++m) io[2 * m] = acc[m], io[2 * m + 1] = mins[m];
  }
};
template <BlockFormat F, int MR>
inline void accumulate(const TileBlock& t, int64_t b, const QuantizedX& qx, int64_t first_row, int64_t in,
                       Accumulators<MR>& a) {
  const int64_t stride = in / kBlockWeights;
  for (int m = 0; m < MR; ++m) {
    const int64_t xb = (first_row + m) * stride + b;
    const int8_t* xq = qx.q.data() + (first_row + m) * in + b * kBlockWeights;
    for (int j = 0; j < kTileRows; ++j) {
      int32_t dot = 0;
      for (int k = 0; k < kChunks; ++k) {
        for (int i = 0; i < 4; ++i) {
          const int32_t x = xq[4 * k + i], u = t.codes[k][4 * j + i];
          dot += u * (F == BlockFormat::kQ8_0 && !kUnsignedQ8 && t.signs[k][4 * j + i] < 0 ? -x : x);
        }
      }
      dot -= zero_point<F>() * qx.codes[xb];
      a.acc[m].v[j] = std::fmaf(static_cast<float>(dot), t.d[j] * qx.scale[xb], a.acc[m].v[j]);
      if constexpr (F == BlockFormat::kQ4_1) a.mins[m].v[j] = std::fmaf(t.m[j], qx.sum[xb], a.mins[m].v[j]);
    }
  }
}
#endif

}  // namespace dspark::cpu::quantized_tiles
