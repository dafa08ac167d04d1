// exp on x <= 0 in fp32, written to vectorise: the softmax of tree_attention.cpp and the SiLU of
// decoder_layers.cpp. Framework-free.
#pragma once

#include <cstdint>

#include "common.h"

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

}  // namespace dspark::cpu
