#include "cpu/dequantize_blocks.h"

#include <omp.h>

namespace dspark::cpu {
namespace {

template <BlockFormat F, typename Y>
void decode_row(const uint8_t* row, int64_t blocks, Y* y) {
  constexpr int64_t bytes = block_bytes(F);
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* block = row + b * bytes;
    const float d = half_at(block);
    const float m = F == BlockFormat::kQ4_1 ? half_at(block + 2) : 0.f;
    const uint8_t* quants = block + (F == BlockFormat::kQ4_1 ? 4 : 2);
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

template <BlockFormat F, typename Y>
void run(const DequantizeParams& p) {
  const int64_t blocks = p.in_features / kBlockWeights, row_bytes = blocks * block_bytes(F);
  Y* y = static_cast<Y*>(p.y);
#pragma omp parallel for schedule(static) if (p.out_features * p.in_features >= 65536)
  for (int64_t o = 0; o < p.out_features; ++o) decode_row<F>(p.weight + o * row_bytes, blocks, y + o * p.in_features);
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
