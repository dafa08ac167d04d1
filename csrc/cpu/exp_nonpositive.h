// exp on x <= 0 in fp32, written to vectorise: the softmax of tree_attention.cpp and the SiLU of
// decoder_layers.cpp. Framework-free.
#pragma once

#include <cstdint>

#include "common.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace dspark::cpu {

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

#if defined(__AVX512F__)
// exp_nonpositive in 16 lanes: the same steps, each written as the fma or product it is contracted to.
inline __m512 exp_nonpositive16(__m512 x) {
  const __m512 magic = _mm512_set1_ps(12582912.0f);
  const __m512 shifted = _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), magic);
  const __m512 n = _mm512_sub_ps(shifted, magic);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
  const __m512i exponent = _mm512_add_epi32(
      _mm512_sub_epi32(_mm512_castps_si512(shifted), _mm512_castps_si512(magic)), _mm512_set1_epi32(127));
  const __m512 result = _mm512_mul_ps(y, _mm512_castsi512_ps(_mm512_slli_epi32(exponent, 23)));
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ);
  return _mm512_maskz_mov_ps(keep, result);
}
#endif

}  // namespace dspark::cpu
