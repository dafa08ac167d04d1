// y = x W^T (+ bias) for the few rows of a decoding or verification step on a CPU.
//
// With one to a few dozen rows a linear layer is bound by streaming W from memory, yet BLAS switches
// from its matrix-vector path at one row to a packed GEMM at two and more, which re-reads W (2-2.5x
// slower at 2 rows than at 1 on an AVX2 EPYC), and bf16 GEMMs without AVX512-BF16 run row by row.
// This kernel streams W from memory once, converts it to fp32 in registers, and applies it to every x row
// while it sits in L1. Where the CPU has AVX512-BF16, bf16 x and W skip the conversion (vdpbf16ps) and
// W is read one row at a time, front to back, which the hardware prefetcher streams at close to the
// memory's bandwidth.
//
// Every output element is computed by the same instruction sequence whatever the number of rows and
// the row's place among them, so results are batch invariant: verifying k tokens gives bit for bit the
// logits that decoding them one at a time would (greedy speculative decoding then matches plain
// decoding exactly).
#pragma once

#include <cstdint>

#include "cpu/common.h"

namespace dspark::cpu {

struct SmallBatchLinearParams {
  DType x_dtype;       // x and y
  DType weight_dtype;  // weight and bias
  const void* x;       // [rows, in_features], contiguous
  const void* weight;  // [out_features, in_features], contiguous
  const void* bias;    // [out_features] or nullptr
  void* y;             // [rows, out_features], contiguous
  int64_t rows;
  int64_t in_features;
  int64_t out_features;
};

void small_batch_linear(const SmallBatchLinearParams& params);

}  // namespace dspark::cpu
