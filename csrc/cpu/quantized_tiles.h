// Micro-kernels of quantized_linear.cpp, first half: a tile of 8 (16) W rows in one of GGUF's block formats laid
// out block by block in 4-byte lanes (one per W row), transposed from the file's layout or loaded packed, and the
// quantised rows of x they meet (quantized_dots.h takes the dot products). Framework-free; included by
// quantized_linear.cpp (through quantized_dots.h) only.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/quantized_linear.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define DSPARK_QL_AVX2 1
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define DSPARK_QL_VNNI 1
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define DSPARK_QL_512 1
#endif
#endif
#endif

// A block prepared and used at once stays in registers only if both steps are inlined into one loop.
#if defined(__GNUC__)
#define DSPARK_QL_INLINE inline __attribute__((always_inline))
#else
#define DSPARK_QL_INLINE inline
#endif

namespace dspark::cpu::quantized_tiles {

#ifdef DSPARK_QL_512
constexpr int kTileRows = 16;  // W rows per tile: one 32-bit lane each of a 512-bit vector
#else
constexpr int kTileRows = 8;  // W rows per tile: one 32-bit lane each
#endif
constexpr int kChunks = 8;    // 4-weight chunks of a block
constexpr int64_t kChunkBlocks = 8;  // blocks prepared at a time: the prepared chunk stays in L1
// x rows per pass over a chunk of prepared blocks, and the most rows that use each block as it is prepared
// (one pass, no chunk stored): their accumulators must fit the vector registers with the block's.
#if defined(__AVX512VL__)
constexpr int kRowsPerPass = 4;  // 32 vector registers
constexpr int kFusedRows = 8;
#else
constexpr int kRowsPerPass = 2;  // 16 vector registers
constexpr int kFusedRows = 2;
#endif

// The rows of x, quantised per 32-block.
struct QuantizedX {
  std::vector<int8_t> q;      // [rows, in]
  std::vector<float> scale;   // [rows, blocks]: max|x| / 127 (NaN when the block holds a NaN or inf)
  std::vector<float> sum;     // [rows, blocks]: scale * (sum of the block's codes), the quantised x's sum (Q4_1's m term)
  std::vector<int32_t> codes; // [rows, blocks]: sum of the block's codes (Q4_0's zero point)
};

// Q8_0's codes go to the dot products as w + 128 (unsigned) where one dpbusd takes them, the zero point
// 128 coming off through x's code sum; elsewhere as |w| with w's signs moved onto x (maddubs would
// overflow int16 on w + 128). Both give the same exact integers.
#ifdef DSPARK_QL_VNNI
constexpr bool kUnsignedQ8 = true;
#else
constexpr bool kUnsignedQ8 = false;
#endif

template <BlockFormat F>
constexpr int32_t zero_point() {
  return F == BlockFormat::kQ4_0 ? 8 : F == BlockFormat::kQ8_0 && kUnsignedQ8 ? 128 : 0;
}

struct alignas(64) Lanes {
  float v[kTileRows];
};

// One block of a tile of 8 W rows, laid out for the dot products: chunk k holds, in lane j (4 bytes),
// the codes of weights 4k..4k+3 of row j. Q4 formats store the nibbles (0..15, Q4_0's zero point 8 is
// subtracted through x's code sum); Q8_0 stores |w| in `codes` and w itself in `signs`, whose signs
// move onto x, so that every product is unsigned x signed as the integer dot instructions take them.
#if defined(DSPARK_QL_512)
struct TileBlock {  // vectors, so that a block prepared and used at once can stay in registers
  __m512i codes[kChunks];
  __m512 d, m;  // m: Q4_1 only
};
#elif defined(DSPARK_QL_AVX2)
struct TileBlock {  // vectors, so that a block prepared and used at once can stay in registers
  __m256i codes[kChunks];
  __m256i signs[kChunks];  // Q8_0 without VNNI only
  __m256 d, m;             // m: Q4_1 only
};
#else
struct TileBlock {
  uint8_t codes[kChunks][kTileRows * 4];
  int8_t signs[kChunks][kTileRows * 4];  // Q8_0 without VNNI only
  float d[kTileRows];
  float m[kTileRows];  // Q4_1 only
};
#endif

// Lane j of out[k] = dword k of rows[j] + offset, k = 0..3: an 8 x 4 transpose of 32-bit words.
#ifdef DSPARK_QL_AVX2
inline void transpose_dwords(const uint8_t* const rows[kTileRows], int64_t offset, __m256i out[4]) {
  auto pair = [&](int lo, int hi) {
    return _mm256_set_m128i(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[hi] + offset)),
                            _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[lo] + offset)));
  };
  const __m256i a0 = pair(0, 4), a1 = pair(1, 5), a2 = pair(2, 6), a3 = pair(3, 7);
  const __m256i t0 = _mm256_unpacklo_epi32(a0, a1), t1 = _mm256_unpackhi_epi32(a0, a1);
  const __m256i t2 = _mm256_unpacklo_epi32(a2, a3), t3 = _mm256_unpackhi_epi32(a2, a3);
  out[0] = _mm256_unpacklo_epi64(t0, t2);
  out[1] = _mm256_unpackhi_epi64(t0, t2);
  out[2] = _mm256_unpacklo_epi64(t1, t3);
  out[3] = _mm256_unpackhi_epi64(t1, t3);
}
#endif

#ifdef DSPARK_QL_AVX2
// The headers' first dwords (d, or d and m) of 8 rows at byte `at`, halves regrouped to [d0..d7 | m0..m7]
// and converted at once.
template <BlockFormat F>
DSPARK_QL_INLINE void headers8(const uint8_t* const* rows, int64_t at, __m256& d, __m256& m) {
  auto word = [&](int j) {
    int32_t w;
    std::memcpy(&w, rows[j] + at, sizeof(w));
    return w;
  };
  __m128i low = _mm_cvtsi32_si128(word(0)), high = _mm_cvtsi32_si128(word(4));
  low = _mm_insert_epi32(_mm_insert_epi32(_mm_insert_epi32(low, word(1), 1), word(2), 2), word(3), 3);
  high = _mm_insert_epi32(_mm_insert_epi32(_mm_insert_epi32(high, word(5), 1), word(6), 2), word(7), 3);
  const __m256i pairs = _mm256_shuffle_epi8(_mm256_set_m128i(high, low),
                                            _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15,
                                                             0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15));
  const __m256i grouped = _mm256_permute4x64_epi64(pairs, 0xd8);  // qwords 0, 2, 1, 3
  d = _mm256_cvtph_ps(_mm256_castsi256_si128(grouped));
  m = F == BlockFormat::kQ4_1 ? _mm256_cvtph_ps(_mm256_extracti128_si256(grouped, 1)) : _mm256_setzero_ps();
}
#endif

#ifdef DSPARK_QL_512
inline __m512i join(__m256i low, __m256i high) { return _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1); }
inline __m512 join(__m256 low, __m256 high) {
  return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(low)), _mm256_castps_pd(high), 1));
}

// Block b of the 16 rows into `out`: each half of 8 rows as the AVX2 path transposes it, then joined.
template <BlockFormat F>
DSPARK_QL_INLINE void prepare_block(const uint8_t* const rows[kTileRows], int64_t b, TileBlock& out) {
  constexpr int64_t bytes = block_bytes(F), header = header_bytes<F>();
  const int64_t at = b * bytes;
  __m256 d0, m0, d1, m1;
  headers8<F>(rows, at, d0, m0);
  headers8<F>(rows + 8, at, d1, m1);
  out.d = join(d0, d1);
  out.m = join(m0, m1);
  __m256i low[4], high[4];
  transpose_dwords(rows, at + header, low);
  transpose_dwords(rows + 8, at + header, high);
  if constexpr (F == BlockFormat::kQ8_0) {
    __m256i low2[4], high2[4];
    transpose_dwords(rows, at + header + 16, low2);
    transpose_dwords(rows + 8, at + header + 16, high2);
    const __m512i offset = _mm512_set1_epi8(static_cast<char>(0x80));
    for (int k = 0; k < 4; ++k) {
      out.codes[k] = _mm512_xor_si512(join(low[k], high[k]), offset);
      out.codes[k + 4] = _mm512_xor_si512(join(low2[k], high2[k]), offset);
    }
  } else {
    const __m512i low_nibbles = _mm512_set1_epi8(0x0f);
    for (int k = 0; k < 4; ++k) {
      const __m512i words = join(low[k], high[k]);
      out.codes[k] = _mm512_and_si512(words, low_nibbles);
      out.codes[k + 4] = _mm512_and_si512(_mm512_srli_epi16(words, 4), low_nibbles);
    }
  }
}
#else
// Block b of the 8 rows into `out`.
template <BlockFormat F>
DSPARK_QL_INLINE void prepare_block(const uint8_t* const rows[kTileRows], int64_t b, TileBlock& out) {
  constexpr int64_t bytes = block_bytes(F), header = header_bytes<F>();
  const int64_t at = b * bytes;
#ifdef DSPARK_QL_AVX2
  headers8<F>(rows, at, out.d, out.m);
  __m256i words[4];
  transpose_dwords(rows, at + header, words);
  if constexpr (F == BlockFormat::kQ8_0) {
    __m256i high[4];
    transpose_dwords(rows, at + header + 16, high);
    for (int k = 0; k < 4; ++k) {
      if constexpr (kUnsignedQ8) {
        const __m256i offset = _mm256_set1_epi8(static_cast<char>(0x80));
        out.codes[k] = _mm256_xor_si256(words[k], offset);
        out.codes[k + 4] = _mm256_xor_si256(high[k], offset);
      } else {
        out.codes[k] = _mm256_abs_epi8(words[k]);
        out.signs[k] = words[k];
        out.codes[k + 4] = _mm256_abs_epi8(high[k]);
        out.signs[k + 4] = high[k];
      }
    }
  } else {
    const __m256i low_nibbles = _mm256_set1_epi8(0x0f);
    for (int k = 0; k < 4; ++k) {  // byte i: weight i in its low nibble, weight i + 16 in its high one
      out.codes[k] = _mm256_and_si256(words[k], low_nibbles);
      out.codes[k + 4] = _mm256_and_si256(_mm256_srli_epi16(words[k], 4), low_nibbles);
    }
  }
#else
  for (int j = 0; j < kTileRows; ++j) {
    out.d[j] = half_at(rows[j] + at);
    out.m[j] = F == BlockFormat::kQ4_1 ? half_at(rows[j] + at + 2) : 0.f;
  }
  for (int j = 0; j < kTileRows; ++j) {
    const uint8_t* quants = rows[j] + at + header;
    for (int k = 0; k < kChunks; ++k) {
      for (int i = 0; i < 4; ++i) {
        const int w = 4 * k + i;
        if constexpr (F == BlockFormat::kQ8_0) {
          const int8_t code = static_cast<int8_t>(quants[w]);
          out.codes[k][4 * j + i] = static_cast<uint8_t>(kUnsignedQ8 ? code + 128 : code < 0 ? -code : code);
          out.signs[k][4 * j + i] = code;
        } else {
          out.codes[k][4 * j + i] = w < 16 ? quants[w] & 0x0f : quants[w - 16] >> 4;
        }
      }
    }
  }
#endif
}
#endif  // DSPARK_QL_512

// Block b of a tile stored packed (quantized_linear.h) into `out`: the layout prepare_block builds, loaded.
template <BlockFormat F>
DSPARK_QL_INLINE void load_block(const uint8_t* block, TileBlock& out) {
  constexpr int64_t R = kTileRows;
  constexpr int64_t header = header_bytes<F>() * R;
#if defined(DSPARK_QL_512)
  out.d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(block)));
  out.m = F == BlockFormat::kQ4_1 ? _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 2 * R)))
                                  : _mm512_setzero_ps();
  if constexpr (F == BlockFormat::kQ8_0) {
    const __m512i offset = _mm512_set1_epi8(static_cast<char>(0x80));
    for (int k = 0; k < kChunks; ++k) out.codes[k] = _mm512_xor_si512(_mm512_loadu_si512(block + header + 64 * k), offset);
  } else {
    const __m512i low_nibbles = _mm512_set1_epi8(0x0f);
    for (int k = 0; k < 4; ++k) {
      const __m512i words = _mm512_loadu_si512(block + header + 64 * k);
      out.codes[k] = _mm512_and_si512(words, low_nibbles);
      out.codes[k + 4] = _mm512_and_si512(_mm512_srli_epi16(words, 4), low_nibbles);
    }
  }
#elif defined(DSPARK_QL_AVX2)
  out.d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block)));
  out.m = F == BlockFormat::kQ4_1 ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 2 * R)))
                                  : _mm256_setzero_ps();
  if constexpr (F == BlockFormat::kQ8_0) {
    for (int k = 0; k < kChunks; ++k) {
      const __m256i words = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + header + 32 * k));
      if constexpr (kUnsignedQ8) {
        out.codes[k] = _mm256_xor_si256(words, _mm256_set1_epi8(static_cast<char>(0x80)));
      } else {
        out.codes[k] = _mm256_abs_epi8(words);
        out.signs[k] = words;
      }
    }
  } else {
    const __m256i low_nibbles = _mm256_set1_epi8(0x0f);
    for (int k = 0; k < 4; ++k) {
      const __m256i words = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + header + 32 * k));
      out.codes[k] = _mm256_and_si256(words, low_nibbles);
      out.codes[k + 4] = _mm256_and_si256(_mm256_srli_epi16(words, 4), low_nibbles);
    }
  }
#else
  for (int j = 0; j < kTileRows; ++j) {
    out.d[j] = half_at(block + 2 * j);
    out.m[j] = F == BlockFormat::kQ4_1 ? half_at(block + 2 * R + 2 * j) : 0.f;
  }
  for (int k = 0; k < kChunks; ++k) {
    for (int j = 0; j < kTileRows; ++j) {
      for (int i = 0; i < 4; ++i) {
        if constexpr (F == BlockFormat::kQ8_0) {
          const int8_t code = static_cast<int8_t>(block[header + 4 * R * k + 4 * j + i]);
          out.codes[k][4 * j + i] = static_cast<uint8_t>(kUnsignedQ8 ? code + 128 : code < 0 ? -code : code);
          out.signs[k][4 * j + i] = code;
        } else {
          const uint8_t byte = block[header + 4 * R * (k % 4) + 4 * j + i];
          out.codes[k][4 * j + i] = k < 4 ? byte & 0x0f : byte >> 4;
        }
      }
    }
  }
#endif
}

}  // namespace dspark::cpu::quantized_tiles
