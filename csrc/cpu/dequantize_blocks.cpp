#include "cpu/dequantize_blocks.h"

#include <omp.h>

#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define DSPARK_DQ_AVX2 1
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define DSPARK_DQ_512 1
#endif
#endif

namespace dspark::cpu {
namespace {

template <BlockFormat F, typename Y>
void decode_row(const uint8_t* row, int64_t blocks, Y* y) {
  constexpr int64_t bytes = block_bytes(F);
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* block = row + b * bytes;
    const float d = half_at(block);
    const float m = F == BlockFormat::kQ4_1 ? half_at(block + 2) : 0.f;
    const uint8_t* quants = block + header_bytes<F>();
    Y* out = y + b * kBlockWeights;
    for (int i = 0; i < kBlockWeights; ++i) {
      float q;
      if constexpr (F == BlockFormat::kQ8_0) {
        q = static_cast<float>(static_cast<int8_t>(quants[i]));
      } else {
        const int nibble = i < 16 ? quants[i] & 0x0f : quants[i - 16] >> 4;
        q = static_cast<float>(F == BlockFormat::kQ4_0 ? nibble - 8 : nibble);
      }
      // d * q is exact in fp32 (an 11-bit fp16 mantissa times a code of at most 8 bits), so adding m
      // rounds once whether or not the compiler contracts it into an fma. Q4_0 and Q8_0 add no m
      // (adding +0 would turn -0 into +0).
      out[i] = from_float<Y>(F == BlockFormat::kQ4_1 ? d * q + m : d * q);
    }
  }
}

#ifdef DSPARK_DQ_AVX2
// half_at by F16C: the same value for every fp16 (a NaN comes out quiet, which the multiply below makes
// it anyway), without the scalar conversion's branches.
inline float half_lane(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, sizeof(bits));
  return _cvtsh_ss(bits);
}

#ifdef DSPARK_DQ_512
// A block's 32 weights in two vectors of 16 fp32 lanes.
constexpr int kVectors = 2;
using Vec = __m512;
inline Vec splat(float x) { return _mm512_set1_ps(x); }
inline Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }

// The block's 32 codes as fp32 lanes, weights 0..31 in order (Q4_0's zero point 8 subtracted).
template <BlockFormat F>
inline void block_codes(const uint8_t* quants, Vec out[kVectors]) {
  if constexpr (F == BlockFormat::kQ8_0) {
    for (int k = 0; k < 2; ++k)
      out[k] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(quants + 16 * k))));
  } else {
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(quants));
    const __m128i mask = _mm_set1_epi8(0x0f);
    const __m512i zero_point = _mm512_set1_epi32(F == BlockFormat::kQ4_0 ? 8 : 0);
    const __m128i nibbles[2] = {_mm_and_si128(packed, mask), _mm_and_si128(_mm_srli_epi16(packed, 4), mask)};
    for (int k = 0; k < 2; ++k)
      out[k] = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(nibbles[k]), zero_point));
  }
}

inline void store(float* out, const Vec w[kVectors]) {
  for (int k = 0; k < kVectors; ++k) _mm512_storeu_ps(out + 16 * k, w[k]);
}

// from_float<BFloat16> in 16 lanes: nearest even, a NaN kept with its upper bits and made quiet. AVX512-BF16's
// conversion is that rule except that it flushes fp32 subnormals, which never occur here (every decoded
// weight is 0 or a multiple of 2^-24, fp16's least step).
inline __m256i to_bf16(Vec v) {
#ifdef __AVX512BF16__
  return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
#else
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
  const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), rounded, quiet));
#endif
}

inline void store(BFloat16* out, const Vec w[kVectors]) {
  for (int k = 0; k < kVectors; ++k) _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16 * k), to_bf16(w[k]));
}
#else
// A block's 32 weights in four vectors of 8 fp32 lanes.
constexpr int kVectors = 4;
using Vec = __m256;
inline Vec splat(float x) { return _mm256_set1_ps(x); }
inline Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }

template <BlockFormat F>
inline void block_codes(const uint8_t* quants, Vec out[kVectors]) {
  if constexpr (F == BlockFormat::kQ8_0) {
    for (int k = 0; k < 4; ++k) {
      const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(quants + 8 * k));
      out[k] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
    }
  } else {
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(quants));
    const __m128i mask = _mm_set1_epi8(0x0f);
    const __m128i low = _mm_and_si128(packed, mask), high = _mm_and_si128(_mm_srli_epi16(packed, 4), mask);
    const __m256i zero_point = _mm256_set1_epi32(F == BlockFormat::kQ4_0 ? 8 : 0);
    const __m128i halves[4] = {low, _mm_srli_si128(low, 8), high, _mm_srli_si128(high, 8)};
    for (int k = 0; k < 4; ++k)
      out[k] = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(halves[k]), zero_point));
  }
}

inline void store(float* out, const Vec w[kVectors]) {
  for (int k = 0; k < kVectors; ++k) _mm256_storeu_ps(out + 8 * k, w[k]);
}

// from_float<BFloat16> in 16 lanes (two vectors): nearest even, a NaN kept with its upper bits and made quiet.
inline __m256i to_bf16(Vec a, Vec b) {
  auto round = [](Vec v) {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
    const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(0x40));
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    return _mm256_blendv_epi8(rounded, quiet, nan);  // 0..0xffff per lane
  };
  // packus works within 128-bit halves: a0-3 b0-3 a4-7 b4-7, then the 64-bit quarters back in order.
  return _mm256_permute4x64_epi64(_mm256_packus_epi32(round(a), round(b)), 0xd8);
}

inline void store(BFloat16* out, const Vec w[kVectors]) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), to_bf16(w[0], w[1]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16), to_bf16(w[2], w[3]));
}
#endif

// decode_row in vector lanes, for fp32 and bf16 outputs: the same fp32 values (d * q is exact, so the
// fma rounds once, as the scalar add does) and the same rounding.
template <BlockFormat F, typename Y>
void decode_row_lanes(const uint8_t* row, int64_t blocks, Y* y) {
  constexpr int64_t bytes = block_bytes(F);
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* block = row + b * bytes;
    const Vec d = splat(half_lane(block));
    Vec w[kVectors];
    block_codes<F>(block + header_bytes<F>(), w);
    if constexpr (F == BlockFormat::kQ4_1) {
      const Vec m = splat(half_lane(block + 2));
      for (int k = 0; k < kVectors; ++k) w[k] = fma(d, w[k], m);
    } else {
      for (int k = 0; k < kVectors; ++k) w[k] = mul(d, w[k]);
    }
    store(y + b * kBlockWeights, w);
  }
}
#endif

template <BlockFormat F, typename Y>
void decode_row_any(const uint8_t* row, int64_t blocks, Y* y) {
#ifdef DSPARK_DQ_AVX2
  if constexpr (!std::is_same_v<Y, Half>) {  // fp16 (rare on CPU) keeps the scalar conversion
    decode_row_lanes<F>(row, blocks, y);
    return;
  }
#endif
  decode_row<F>(row, blocks, y);
}

// Lane j of a packed block of R lanes (quantized_linear.h) back into the file's block at dst: its fp16 scales
// (lane_header), its 4-byte code chunks (lane_codes).
template <BlockFormat F>
inline void lane_header(const uint8_t* src, int64_t R, int64_t j, uint8_t* dst) {
  for (int64_t s = 0; s < header_bytes<F>() / 2; ++s) std::memcpy(dst + 2 * s, src + 2 * R * s + 2 * j, 2);
}
template <BlockFormat F>
inline void lane_codes(const uint8_t* src, int64_t R, int64_t j, uint8_t* dst) {
  constexpr int64_t header = header_bytes<F>(), chunks = (block_bytes(F) - header) / 4;
  const uint8_t* codes = src + R * header;
  for (int64_t k = 0; k < chunks; ++k) std::memcpy(dst + header + 4 * k, codes + 4 * R * k + 4 * j, 4);
}

// The R rows of tile t of a packed weight, in the file's layout, into rows[R * row_bytes].
template <BlockFormat F>
void unpack_tile(const uint8_t* packed, int64_t R, int64_t t, int64_t blocks, uint8_t* rows) {
  constexpr int64_t bytes = block_bytes(F), header = header_bytes<F>(), scales = header / 2;
  constexpr int64_t chunks = (bytes - header) / 4;
  const int64_t row_bytes = blocks * bytes;
  const uint8_t* tile = packed + t * blocks * R * bytes;
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* src = tile + b * R * bytes;
    for (int64_t j = 0; j < R; ++j) lane_header<F>(src, R, j, rows + j * row_bytes + b * bytes);
    const uint8_t* codes = src + 2 * R * scales;
#ifdef DSPARK_DQ_512
    if (R == 16) {  // 4 chunks of 16 dwords at a time: a 4 x 16 transpose into 16 rows of 16 bytes
      for (int64_t k0 = 0; k0 < chunks; k0 += 4) {
        __m512i c[4];
        for (int i = 0; i < 4; ++i) c[i] = _mm512_loadu_si512(codes + 64 * (k0 + i));
        const __m512i t0 = _mm512_unpacklo_epi32(c[0], c[1]), t1 = _mm512_unpackhi_epi32(c[0], c[1]);
        const __m512i t2 = _mm512_unpacklo_epi32(c[2], c[3]), t3 = _mm512_unpackhi_epi32(c[2], c[3]);
        const __m512i r[4] = {_mm512_unpacklo_epi64(t0, t2), _mm512_unpackhi_epi64(t0, t2),
                              _mm512_unpacklo_epi64(t1, t3), _mm512_unpackhi_epi64(t1, t3)};
        alignas(64) uint8_t lanes[4][64];
        for (int i = 0; i < 4; ++i) _mm512_store_si512(lanes[i], r[i]);
        for (int l = 0; l < 4; ++l)  // 128-bit lane l of r[i] holds row 4l + i's chunks k0..k0+3
          for (int i = 0; i < 4; ++i)
            std::memcpy(rows + (4 * l + i) * row_bytes + b * bytes + header + 4 * k0, lanes[i] + 16 * l, 16);
      }
      continue;
    }
#endif
    for (int64_t j = 0; j < R; ++j) lane_codes<F>(src, R, j, rows + j * row_bytes + b * bytes);
  }
}

// Row o of a packed weight, in the file's layout, into row[row_bytes]: lane o % R of each of its tile's blocks.
template <BlockFormat F>
void unpack_row(const uint8_t* packed, int64_t R, int64_t o, int64_t blocks, uint8_t* row) {
  constexpr int64_t bytes = block_bytes(F);
  const uint8_t* tile = packed + (o / R) * blocks * R * bytes;
  for (int64_t b = 0; b < blocks; ++b) {
    lane_header<F>(tile + b * R * bytes, R, o % R, row + b * bytes);
    lane_codes<F>(tile + b * R * bytes, R, o % R, row + b * bytes);
  }
}

// The picked rows (embedding lookups): each decoded alone, from either layout.
template <BlockFormat F, typename Y>
void run_rows(const DequantizeParams& p) {
  const int64_t blocks = p.in_features / kBlockWeights, row_bytes = blocks * block_bytes(F);
  Y* y = static_cast<Y*>(p.y);
#pragma omp parallel if (p.num_rows * p.in_features >= 65536)
  {
    thread_local std::vector<uint8_t> row;
    row.resize(static_cast<size_t>(row_bytes));
#pragma omp for schedule(static)
    for (int64_t i = 0; i < p.num_rows; ++i) {
      const int64_t o = p.rows[i];
      const uint8_t* src = p.weight + o * row_bytes;
      if (p.tile_rows > 0) {
        unpack_row<F>(p.weight, p.tile_rows, o, blocks, row.data());
        src = row.data();
      }
      decode_row_any<F>(src, blocks, y + i * p.in_features);
    }
  }
}

template <BlockFormat F, typename Y>
void run(const DequantizeParams& p) {
  if (p.rows != nullptr) return run_rows<F, Y>(p);
  const int64_t blocks = p.in_features / kBlockWeights, row_bytes = blocks * block_bytes(F);
  Y* y = static_cast<Y*>(p.y);
  if (p.tile_rows > 0) {  // packed: a tile's rows back in the file's layout (in L1), then decoded as usual
    const int64_t R = p.tile_rows, tiles = (p.out_features + R - 1) / R;
#pragma omp parallel if (p.out_features * p.in_features >= 65536)
    {
      thread_local std::vector<uint8_t> rows;
      rows.resize(static_cast<size_t>(R * row_bytes));
#pragma omp for schedule(static)
      for (int64_t t = 0; t < tiles; ++t) {
        unpack_tile<F>(p.weight, R, t, blocks, rows.data());
        for (int64_t j = 0; j < R && t * R + j < p.out_features; ++j)
          decode_row_any<F>(rows.data() + j * row_bytes, blocks, y + (t * R + j) * p.in_features);
      }
    }
    return;
  }
#pragma omp parallel for schedule(static) if (p.out_features * p.in_features >= 65536)
  for (int64_t o = 0; o < p.out_features; ++o) decode_row_any<F>(p.weight + o * row_bytes, blocks, y + o * p.in_features);
}

template <typename Y>
void dispatch(const DequantizeParams& p) {
  switch (p.format) {
    case BlockFormat::kQ4_0: return run<BlockFormat::kQ4_0, Y>(p);
    case BlockFormat::kQ4_1: return run<BlockFormat::kQ4_1, Y>(p);
    case BlockFormat::kQ8_0: return run<BlockFormat::kQ8_0, Y>(p);
  }
}

}  // namespace

void dequantize_blocks(const DequantizeParams& p) {
  if (p.out_features == 0) return;
  switch (p.y_dtype) {
    case DType::kFloat32: return dispatch<float>(p);
    case DType::kFloat16: return dispatch<Half>(p);
    case DType::kBFloat16: return dispatch<BFloat16>(p);
  }
}

}  // namespace dspark::cpu
