#include "cpu/small_batch_linear.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define DSPARK_SBL_AVX2 1
#endif

namespace dspark::cpu {
namespace {

constexpr int kLanes = 8;
constexpr int kRowsPerTile = 4;  // x rows per pass over a W row (AVX512-BF16 path)
// The fp32-lane path takes 2: two chains per row for 2 rows fill 4 accumulators, and measured against
// 4 (8 accumulators) it was 1.7-2.5x faster at 1-2 rows, even at 4 and 1.2-1.4x slower at 8.
constexpr int kLaneRowsPerTile = 2;

#ifdef DSPARK_SBL_AVX2
using Vec = __m256;
inline Vec zero() { return _mm256_setzero_ps(); }
inline Vec load(const float* p) { return _mm256_loadu_ps(p); }
inline Vec load(const BFloat16* p) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}
inline Vec load(const Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline float lanes_sum(Vec v) {
  alignas(32) float l[kLanes];
  _mm256_store_ps(l, v);
  return ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]));
}
#else
// The same lane-wise arithmetic in portable code, for builds without AVX2 (e.g. -march=x86-64-v2).
struct Vec {
  float l[kLanes];
};
inline Vec zero() { return Vec{}; }
template <typename T>
inline Vec load(const T* p) {
  Vec v;
  for (int i = 0; i < kLanes; ++i) v.l[i] = to_float(p[i]);
  return v;
}
inline Vec fmadd(Vec a, Vec b, Vec c) {
  for (int i = 0; i < kLanes; ++i) c.l[i] = std::fmaf(a.l[i], b.l[i], c.l[i]);
  return c;
}
inline Vec add(Vec a, Vec b) {
  for (int i = 0; i < kLanes; ++i) a.l[i] += b.l[i];
  return a;
}
inline float lanes_sum(Vec v) {
  const float* l = v.l;
  return ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]));
}
#endif

// dots[m] = x_m . w for MR rows of x (fp32, stride k) against one W row, read front to back (one stream
// the hardware prefetcher follows). Two fmadd chains per x row, over alternate 8-element chunks, so one
// row does not wait on the fmadd latency; then chain 0 + chain 1, the lane sum, and the tail with explicit
// fmaf (so that no instantiation contracts it differently): the same operations in the same order
// whatever MR, so a row's result never depends on the rows beside it.
template <int MR, typename W>
inline void row_dots(const float* x, int64_t k, const W* w, float* dots) {
  Vec acc[MR][2];
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = zero();
  const int64_t pairs = k - k % (2 * kLanes), full = k - k % kLanes;
  for (int64_t e = 0; e < pairs; e += 2 * kLanes) {
    const Vec v0 = load(w + e), v1 = load(w + e + kLanes);
    for (int m = 0; m < MR; ++m) {
      acc[m][0] = fmadd(v0, load(x + m * k + e), acc[m][0]);
      acc[m][1] = fmadd(v1, load(x + m * k + e + kLanes), acc[m][1]);
    }
  }
  if (full > pairs) {
    const Vec v0 = load(w + pairs);
    for (int m = 0; m < MR; ++m) acc[m][0] = fmadd(v0, load(x + m * k + pairs), acc[m][0]);
  }
  for (int m = 0; m < MR; ++m) {
    float s = lanes_sum(add(acc[m][0], acc[m][1]));
    for (int64_t e = full; e < k; ++e) s = std::fmaf(to_float(w[e]), x[m * k + e], s);
    dots[m] = s;
  }
}

// y = x W^T + b with W read one row at a time, front to back: each thread streams one contiguous run of
// W rows (static schedule), and each W row meets the x rows in tiles of up to Tile, whose dot products
// tile_dots(x_tile, rows_in_tile, w_row, dots) computes.
template <int Tile, typename X, typename W, typename XIn, typename TileDots>
void stream_w_rows(const SmallBatchLinearParams& p, const XIn* x, TileDots tile_dots) {
  const int64_t rows = p.rows, k = p.in_features, n_out = p.out_features;
  const W* weight = static_cast<const W*>(p.weight);
  const W* bias = static_cast<const W*>(p.bias);
  X* y = static_cast<X*>(p.y);
#pragma omp parallel for schedule(static) if (n_out * k * rows >= 32768)
  for (int64_t o = 0; o < n_out; ++o) {
    const W* w = weight + o * k;
    const float b = bias ? to_float(bias[o]) : 0.f;
    float dots[Tile];
    for (int64_t m0 = 0; m0 < rows; m0 += Tile) {
      const int64_t mr = std::min<int64_t>(Tile, rows - m0);
      tile_dots(x + m0 * k, mr, w, dots);
      for (int64_t m = 0; m < mr; ++m) y[(m0 + m) * n_out + o] = from_float<X>(dots[m] + b);
    }
  }
}

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#define DSPARK_SBL_AVX512BF16 1
constexpr int kBf16Chunk = 32;  // bf16 elements per zmm

// bf16 x against bf16 W where the CPU has AVX512-BF16: vdpbf16ps adds two exact bf16 products per fp32
// lane, 32 elements an instruction, with no conversion of W, so one chain per x row keeps up with memory
// and W is read one row at a time, front to back, with no software prefetch: measured on the 2-vCPU
// EPYC (Zen 4), one such stream per core reads 19-24 GB/s where four interleaved W rows with prefetches
// read 8-10. dots[m] is one chain over k in chunks of 32, then a fixed 16-lane tree, then the tail with
// explicit fmaf: the same sequence whatever MR, so results stay batch invariant (they differ from the
// fp32-lane build's by rounding only; vdpbf16ps also treats subnormal inputs as zero).
template <int MR>
inline void row_dots_bf16(const BFloat16* x, int64_t k, const BFloat16* w, float* dots) {
  __m512 acc[MR];
  for (int m = 0; m < MR; ++m) acc[m] = _mm512_setzero_ps();
  const int64_t full = k - k % kBf16Chunk;
  for (int64_t e = 0; e < full; e += kBf16Chunk) {
    const __m512bh v = (__m512bh)_mm512_loadu_si512(w + e);
    for (int m = 0; m < MR; ++m)
      acc[m] = _mm512_dpbf16_ps(acc[m], v, (__m512bh)_mm512_loadu_si512(x + m * k + e));
  }
  for (int m = 0; m < MR; ++m) {
    alignas(64) float l[16];
    _mm512_store_ps(l, acc[m]);
    float s = (((l[0] + l[8]) + (l[4] + l[12])) + ((l[2] + l[10]) + (l[6] + l[14]))) +
              (((l[1] + l[9]) + (l[5] + l[13])) + ((l[3] + l[11]) + (l[7] + l[15])));
    for (int64_t e = full; e < k; ++e) s = std::fmaf(to_float(w[e]), to_float(x[m * k + e]), s);
    dots[m] = s;
  }
}

void run_bf16(const SmallBatchLinearParams& p) {
  const int64_t k = p.in_features;
  stream_w_rows<kRowsPerTile, BFloat16, BFloat16>(
      p, static_cast<const BFloat16*>(p.x), [k](const BFloat16* xt, int64_t mr, const BFloat16* w, float* dots) {
        switch (mr) {
          case 4: return row_dots_bf16<4>(xt, k, w, dots);
          case 3: return row_dots_bf16<3>(xt, k, w, dots);
          case 2: return row_dots_bf16<2>(xt, k, w, dots);
          default: return row_dots_bf16<1>(xt, k, w, dots);
        }
      });
}
#endif

template <typename X, typename W>
void run(const SmallBatchLinearParams& p, const float* x) {
  const int64_t k = p.in_features;
  stream_w_rows<kLaneRowsPerTile, X, W>(p, x, [k](const float* xt, int64_t mr, const W* w, float* dots) {
    if (mr == 2) return row_dots<2>(xt, k, w, dots);
    return row_dots<1>(xt, k, w, dots);
  });
}

template <typename X>
void dispatch_weight(const SmallBatchLinearParams& p, const float* x) {
  switch (p.weight_dtype) {
    case DType::kFloat32: return run<X, float>(p, x);
    case DType::kFloat16: return run<X, Half>(p, x);
    case DType::kBFloat16: return run<X, BFloat16>(p, x);
  }
}

template <typename X>
const float* as_float_rows(const SmallBatchLinearParams& p, std::vector<float>& buffer) {
  const int64_t n = p.rows * p.in_features;
  const X* x = static_cast<const X*>(p.x);
  buffer.resize(n);
  for (int64_t i = 0; i < n; ++i) buffer[i] = to_float(x[i]);
  return buffer.data();
}

}  // namespace

void small_batch_linear(const SmallBatchLinearParams& p) {
  if (p.rows == 0 || p.out_features == 0) return;
#ifdef DSPARK_SBL_AVX512BF16
  if (p.x_dtype == DType::kBFloat16 && p.weight_dtype == DType::kBFloat16) return run_bf16(p);
#endif
  std::vector<float> buffer;
  switch (p.x_dtype) {
    case DType::kFloat32: return dispatch_weight<float>(p, static_cast<const float*>(p.x));
    case DType::kFloat16: return dispatch_weight<Half>(p, as_float_rows<Half>(p, buffer));
    case DType::kBFloat16: return dispatch_weight<BFloat16>(p, as_float_rows<BFloat16>(p, buffer));
  }
}

}  // namespace dspark::cpu
