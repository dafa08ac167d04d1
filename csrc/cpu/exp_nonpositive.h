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
namespace exp_steps {  // the constants of both versions below
constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2High = 0.693359375f, kLn2Low = -2.12194440e-4f;  // ln 2 = high + low
constexpr float kPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                            4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
constexpr float kUnderflow = -87.0f;  // below: 0
}  // namespace exp_steps

inline float exp_nonpositive(float x) {
  using namespace exp_steps;
  const float shifted = x * kLog2e + kMagic;
  const float n = shifted - kMagic;
  float r = x - n * kLn2High;
  r = r - n * kLn2Low;
  float p = kPoly[0];
  for (int i = 1; i < 6; ++i) p = p * r + kPoly[i];
  const float y = p * r * r + r + 1.0f;
  const uint32_t exponent = float_to_bits(shifted) - float_to_bits(kMagic) + 127u;  // n + 127
  const float result = y * bits_to_float(exponent << 23);
  const uint32_t keep = 0u - static_cast<uint32_t>(x >= kUnderflow);
  return bits_to_float(float_to_bits(result) & keep);
}

#if defined(__AVX512F__)
// exp_nonpositive in 16 lanes: the same steps, each written as the fma or product it is contracted to.
inline __m512 exp_nonpositive16(__m512 x) {
  using namespace exp_steps;
  const __m512 magic = _mm512_set1_ps(kMagic);
  const __m512 shifted = _mm512_fmadd_ps(x, _mm512_set1_ps(kLog2e), magic);
  const __m512 n = _mm512_sub_ps(shifted, magic);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2High), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Low), r);
  __m512 p = _mm512_set1_ps(kPoly[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kPoly[i]));
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
  const __m512i exponent = _mm512_add_epi32(
      _mm512_sub_epi32(_mm512_castps_si512(shifted), _mm512_castps_si512(magic)), _mm512_set1_epi32(127));
  const __m512 result = _mm512_mul_ps(y, _mm512_castsi512_ps(_mm512_slli_epi32(exponent, 23)));
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kUnderflow), _CMP_GE_OQ);
  return _mm512_maskz_mov_ps(keep, result);
}
#endif

}  // namespace dspark::cpu
