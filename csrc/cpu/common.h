// Shared by the CPU kernels: element types and their conversions, free of any framework type so
// that CMake can build the kernels as a plain library.
#pragma once

#include <cstdint>
#include <cstring>

namespace dspark::cpu {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

inline float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return bits;
}

inline float to_float(float x) { return x; }

inline float to_float(BFloat16 x) { return bits_to_float(static_cast<uint32_t>(x.bits) << 16); }

// IEEE binary16 -> binary32, exact for every input (subnormals, infinities, NaN).
inline float to_float(Half x) {
  const uint32_t sign = (static_cast<uint32_t>(x.bits) & 0x8000u) << 16;
  const uint32_t exponent = (x.bits >> 10) & 0x1fu;
  uint32_t mantissa = x.bits & 0x3ffu;
  if (exponent == 0x1f) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));
  if (exponent != 0) return bits_to_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
  if (mantissa == 0) return bits_to_float(sign);
  // Subnormal: value = mantissa * 2^-24; exact in fp32.
  float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-08f;
  return sign ? -magnitude : magnitude;
}

// The little-endian fp16 at p (an unaligned field of a GGUF block), exactly.
inline float half_at(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, sizeof(bits));
  return to_float(Half{bits});
}

template <typename T>
inline T from_float(float x);

template <>
inline float from_float<float>(float x) {
  return x;
}

// Round to nearest even, as torch's .to(torch.bfloat16) does; a NaN stays a (quiet) NaN. Written as a select, not a
// branch, so that the loops calling it vectorise.
template <>
inline BFloat16 from_float<BFloat16>(float x) {
  const uint32_t bits = float_to_bits(x);
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (bits >> 16) | 0x40u;
  return BFloat16{static_cast<uint16_t>((bits & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded)};
}

// Round to nearest even, overflow to infinity, gradual underflow, as torch's .to(torch.float16).
template <>
inline Half from_float<Half>(float x) {
  const uint32_t bits = float_to_bits(x);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t abs_bits = bits & 0x7fffffffu;
  if (abs_bits > 0x7f800000u) return Half{static_cast<uint16_t>(sign | 0x7e00u)};
  if (abs_bits >= 0x477ff000u) return Half{static_cast<uint16_t>(sign | 0x7c00u)};  // rounds past 65504
  if (abs_bits < 0x38800000u) {
    // Result is subnormal or zero: scale so that one half-ulp (2^-24) becomes 1 and round there.
    const float magnitude = bits_to_float(abs_bits) * 16777216.0f;  // exact: power-of-two scaling
    const float rounded = __builtin_nearbyintf(magnitude);        // default mode: ties to even
    return Half{static_cast<uint16_t>(sign | static_cast<uint16_t>(rounded))};
  }
  uint32_t rounded = abs_bits + 0xfffu + ((abs_bits >> 13) & 1u);
  return Half{static_cast<uint16_t>(sign | ((rounded - (112u << 23)) >> 13))};
}

}  // namespace dspark::cpu
