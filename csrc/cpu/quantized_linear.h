// y = x W^T (+ bias) for the few rows of a CPU decoding or verification round, with W in one of GGUF's
// 32-weight block formats, read in place (never dequantised to memory):
//   Q4_0: fp16 d, 16 bytes of nibbles                w = d * (q - 8)
//   Q4_1: fp16 d, fp16 m, 16 bytes of nibbles        w = d * q + m
//   Q8_0: fp16 d, 32 int8                           w = d * q
// (nibble j of a block's byte i: low nibble = weight i, high nibble = weight i + 16).
//
// Decoding reads every weight once per token, so bytes are the cost: Q4_1 is 5 bits a weight against bf16's
// 16. As llama.cpp does, each row of x is quantised per 32-block to int8 with an fp32 scale (dx = max|x| /
// 127, q = round-to-even(x * 127 / max|x|)) and the block dot products run in integers.
//
// Verification rounds have several rows, where integer work, not bytes, was the cost. So W is read in
// tiles of 8 rows (16 with AVX512-VNNI at 512 bits: one 32-bit lane each of a zmm, half the instructions
// per weight for the same operations per output), one 32-bit lane per row as llama.cpp's repacked kernels
// do: per block the 8 rows' codes are transposed into 8 vectors of 4-byte chunks, either on every call from
// the file's layout or once, at load time, into the packed layout below (QuantizedWeight.pack: the same
// bytes, so nothing is stored twice; the transposition was most of a decoding round's integer work), and
// each row of x then costs 8 broadcasts and 8 dpbusd (AVX512-VNNI; AVX2:
// maddubs/madd; a portable build: lane by lane) for 8 outputs, with no horizontal sums. Per output and
// block: the exact integer dot (Q4_0's zero point 8, and Q8_0's 128 where it goes in unsigned, come off
// through x's code sum), then acc = fma(float(dot), d * dx, acc), and for Q4_1 mins = fma(m, dx * sum(q),
// mins); y = acc + mins (+ bias). So y is W . xhat, xhat the quantised x, up to fp32 rounding, and its
// distance from dequantise-then-matmul in fp32 is bounded by the sum over blocks of (dx / 2) * sum |w|. Up
// to 8 rows of x (2 without AVX-512's 32 registers) use each block as it is transposed or loaded; more rows
// sweep chunks of 8 such blocks held in L1, 4 rows (2) at a time. A software prefetch stream runs one tile
// ahead, since the hardware prefetchers do not follow the file layout's block-by-block order across rows.
//
// Every row is quantised and accumulated by the same instruction sequence whatever the number of rows
// and the row's place among them: results are batch invariant, so greedy speculative decoding of a
// quantized model is token-identical to its plain decoding.
#pragma once

#include <cstdint>

#include "cpu/common.h"

namespace dspark::cpu {

// GGML's type ids.
enum class BlockFormat : int { kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8 };

constexpr int64_t kBlockWeights = 32;

constexpr int64_t block_bytes(BlockFormat format) {
  switch (format) {
    case BlockFormat::kQ4_0: return 18;
    case BlockFormat::kQ4_1: return 20;
    case BlockFormat::kQ8_0: return 34;
  }
  return 0;
}

// The packed layout (`packed` below): the rows as the kernel reads them, stored so once at load time instead of
// transposed on every call. Tiles of quantized_tile_rows() rows (R: 16 in builds with 512-bit VNNI, else 8),
// the last one padded with zero rows; per tile, block by block, R * block_bytes bytes: the R rows' d (fp16),
// for Q4_1 then their m (fp16), then the codes in 4-byte lanes, chunk by chunk (Q4: 4 chunks holding bytes
// 4k..4k+3 of each row's 16 nibble bytes; Q8_0: 8 chunks holding codes 4k..4k+3), lane j for row j. Same
// bytes per weight as the file's layout.
constexpr int kPackedFormat = 0x100;  // or-ed into a format id (decoder layers): the weight is packed

int64_t quantized_tile_rows();

// Bytes of a block before its codes: the fp16 d, and Q4_1's fp16 m.
template <BlockFormat F>
constexpr int64_t header_bytes() {
  return F == BlockFormat::kQ4_1 ? 4 : 2;
}

struct QuantizedLinearParams {
  DType x_dtype;          // x, y and bias
  const void* x;          // [rows, in_features], contiguous
  BlockFormat format;
  // [out_features, in_features / 32 blocks], contiguous; or packed: [tiles, in_features / 32, R * block bytes]
  const uint8_t* weight;
  bool packed = false;
  const void* bias;       // [out_features] or nullptr
  void* y;                // [rows, out_features], contiguous
  int64_t rows;
  int64_t in_features;    // a multiple of 32
  int64_t out_features;
};

void quantized_linear(const QuantizedLinearParams& params);

}  // namespace dspark::cpu
