// GGUF blocks (quantized_linear.h's formats) decoded to a dense [out, in] matrix, for the rounds where
// many rows share a linear layer (prefills): a dense GEMM with AVX512-BF16 or AMX then beats the
// integer kernel 3-5x, and decoding the blocks costs one pass over the matrix per call.
//
// w = d * q (+ m) in fp32, as the reference dequantize and the gguf package decode (d * q is exact, so
// the one rounding is the add's); bf16 and fp16 round that value to nearest even.
#pragma once

#include <cstdint>

#include "cpu/common.h"
#include "cpu/quantized_linear.h"

namespace dspark::cpu {

struct DequantizeParams {
  const uint8_t* weight;  // [out_features, in_features / 32 blocks], contiguous; or packed (quantized_linear.h)
  BlockFormat format;
  int64_t tile_rows = 0;  // packed: its rows per tile (quantized_tile_rows()); 0: the file's layout
  int64_t out_features;
  int64_t in_features;    // a multiple of 32
  DType y_dtype;
  void* y;                // [out_features, in_features], contiguous; with `rows`, [num_rows, in_features]
  const int64_t* rows = nullptr;  // optional, non-null when num_rows > 0: only these rows (each in [0, out_features))
  int64_t num_rows = 0;
};

void dequantize_blocks(const DequantizeParams& params);

}  // namespace dspark::cpu
