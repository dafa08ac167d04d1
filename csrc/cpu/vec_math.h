// Float64 vector helpers of the sampling kernels: element loads, blocked sums and a vectorised exp,
// on GCC/Clang vector extensions (framework-free, like every kernel under csrc/cpu).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__F16C__)
#include <immintrin.h>
#endif

#include "common.h"

namespace dspark::cpu {

// ---------------------------------------------------------------------------------------------
// Element loads.

inline float load_float(const float* x, int64_t i) { return x[i]; }
inline float load_float(const BFloat16* x, int64_t i) { return to_float(x[i]); }
inline float load_float(const Half* x, int64_t i) {
#if defined(__F16C__)
  return _cvtsh_ss(x[i].bits);
#else
  return to_float(x[i]);
#endif
}

// ---------------------------------------------------------------------------------------------
// Vectorisable float64 helpers.

// sum(x[0..n)): 8 independent accumulators (vectorises) over blocks of 1024, the block sums
// accumulated the same way, so the rounding error grows with ~n/8192 + 128 rather than n/8. For
// non-negative inputs the result is > 0 exactly when some input is > 0.
inline double sum_block(const double* x, int64_t n) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) acc[j] += x[i + j];
  }
  double tail = 0.0;
  for (; i < n; ++i) tail += x[i];
  return (((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))) + tail;
}

inline double sum_of(const double* x, int64_t n) {
  constexpr int64_t kBlock = 1024;
  if (n <= kBlock) return sum_block(x, n);
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t b = 0;
  for (int64_t i = 0; i < n; i += kBlock, ++b) acc[b & 7] += sum_block(x + i, std::min(kBlock, n - i));
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// exp for doubles on GCC/Clang vector extensions (explicit SIMD that -ftrapping-math cannot block;
// the compiler lowers it to whatever the target has: AVX-512, AVX2 + FMA, or SSE2).
// x = k ln2 + r with |r| <= ln2/2 (Cody-Waite split with a 32-bit ln2_hi, so k * ln2_hi and
// x - k * ln2_hi are exact), a degree-13 Taylor polynomial for e^r (truncation error < 5e-18) and
// 2^k applied in two halves, so that subnormal results round once and overflow gives inf.
// Error about 1 ulp (measured max 1.0 with FMA, 1.16 without); NaN stays NaN and -inf gives 0.
#if defined(__AVX512F__)
constexpr int kLanes = 8;
#elif defined(__AVX__)
constexpr int kLanes = 4;
#else
constexpr int kLanes = 2;
#endif
typedef double VecD __attribute__((vector_size(kLanes * sizeof(double))));
typedef uint64_t VecU __attribute__((vector_size(kLanes * sizeof(double))));
typedef decltype(VecD{} < VecD{}) VecMask;

inline VecD blend(VecMask mask, VecD a, VecD b) { return (VecD)((mask & (VecMask)a) | (~mask & (VecMask)b)); }

inline VecD exp_vec(VecD x) {
  constexpr double kLog2e = 1.4426950408889634074;
  constexpr double kLn2Hi = 6.93147180369123816490e-01;  // 0x3FE62E42FEE00000: 32 significant bits
  constexpr double kLn2Lo = 1.90821492927058770002e-10;  // ln 2 - kLn2Hi
  constexpr double kShifter = 6755399441055744.0;         // 1.5 * 2^52: adding it rounds to an integer
  const VecD zero = {};
  // exp(-800) underflows to 0 and exp(800) overflows to inf, so clamping there changes no result
  // (and keeps k small); NaN fails both comparisons and propagates.
  x = blend(x < zero - 800.0, zero - 800.0, x);
  x = blend(x > zero + 800.0, zero + 800.0, x);
  const VecD kd = (x * kLog2e + kShifter) - kShifter;  // nearest integer to x / ln 2
  VecD r = x - kd * kLn2Hi;
  r = r - kd * kLn2Lo;
  VecD poly = zero + 1.0 / 6227020800.0;  // 1/13!
  poly = poly * r + 1.0 / 479001600.0;
  poly = poly * r + 1.0 / 39916800.0;
  poly = poly * r + 1.0 / 3628800.0;
  poly = poly * r + 1.0 / 362880.0;
  poly = poly * r + 1.0 / 40320.0;
  poly = poly * r + 1.0 / 5040.0;
  poly = poly * r + 1.0 / 720.0;
  poly = poly * r + 1.0 / 120.0;
  poly = poly * r + 1.0 / 24.0;
  poly = poly * r + 1.0 / 6.0;
  poly = poly * r + 0.5;
  poly = poly * r + 1.0;
  poly = poly * r + 1.0;
  // 2^k = 2^k1 * 2^k2 with |k1|, |k2| <= 578: both normal. The integer sits in the low mantissa bits
  // of (k + kShifter); adding the bias and shifting it into the exponent field drops the rest.
  const VecD k1 = (kd * 0.5 + kShifter) - kShifter;
  const VecD k2 = kd - k1;
  const VecD scale1 = (VecD)((((VecU)(k1 + kShifter)) + 1023) << 52);
  const VecD scale2 = (VecD)((((VecU)(k2 + kShifter)) + 1023) << 52);
  return poly * scale1 * scale2;
}

template <typename T>
inline VecD load_vec(const T* x, int64_t i) {
  double lanes[kLanes];
  for (int j = 0; j < kLanes; ++j) lanes[j] = static_cast<double>(load_float(x, i + j));
  VecD v;
  std::memcpy(&v, lanes, sizeof(v));
  return v;
}

// The first `count` (< kLanes) elements from i, the other lanes 0.
template <typename T>
inline VecD load_vec_partial(const T* x, int64_t i, int64_t count) {
  double lanes[kLanes] = {};
  for (int64_t j = 0; j < count; ++j) lanes[j] = static_cast<double>(load_float(x, i + j));
  VecD v;
  std::memcpy(&v, lanes, sizeof(v));
  return v;
}

inline double lanes_sum(VecD v) {
  double lanes[kLanes];
  std::memcpy(lanes, &v, sizeof(v));
  double total = 0.0;
  for (int j = 0; j < kLanes; ++j) total += lanes[j];
  return total;
}


}  // namespace dspark::cpu
