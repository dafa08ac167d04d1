// The checks every torch binding of the CPU kernels makes before handing raw pointers on (csrc/op_bindings.cpp,
// csrc/decoder_bindings.cpp): device, dtype and contiguity, the GGML block format, a quantized weight's layout.
#pragma once

#include <ATen/core/Tensor.h>

#include "cpu/quantized_linear.h"

namespace dspark::bindings {

using dspark::cpu::DType;

inline DType element_type(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK_VALUE(false, name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

inline void expect(const at::Tensor& t, at::ScalarType dtype, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

inline void expect_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
  element_type(t, name);
}

template <typename T>
const T* optional_ptr(const std::optional<at::Tensor>& t, at::ScalarType dtype, const char* name) {
  if (!t.has_value()) return nullptr;
  expect(*t, dtype, name);
  return t->data_ptr<T>();
}

inline dspark::cpu::BlockFormat block_format(int64_t format) {
  TORCH_CHECK_VALUE(format == 2 || format == 3 || format == 8, "format must be a GGML type id: 2 (Q4_0), 3 (Q4_1) or "
                    "8 (Q8_0), got ", format);
  return static_cast<dspark::cpu::BlockFormat>(format);
}

// A quantized weight's layout from its shape: [out, blocks * bytes] as in the file, or packed [tiles, blocks,
// R * bytes] (quantized_linear.h), which must hold `out` rows. Returns whether it is packed. `name` names it in errors.
inline bool quantized_layout(const at::Tensor& weight, dspark::cpu::BlockFormat f, int64_t out, int64_t in,
                             const char* name = "weight") {
  const int64_t blocks = in / dspark::cpu::kBlockWeights, bytes = dspark::cpu::block_bytes(f);
  TORCH_CHECK_VALUE(in % dspark::cpu::kBlockWeights == 0, name, ": in_features must be a multiple of 32, got ", in);
  if (weight.dim() == 3) {
    const int64_t r = dspark::cpu::quantized_tile_rows();
    TORCH_CHECK_VALUE(weight.size(0) == (out + r - 1) / r && weight.size(1) == blocks && weight.size(2) == r * bytes,
                      "a packed ", name, " of ", out, " rows must be [", (out + r - 1) / r, ", ", blocks, ", ",
                      r * bytes, "] (tiles of ", r, " rows), got ", weight.sizes());
    return true;
  }
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == blocks * bytes, name, " rows must hold ", blocks,
                    " blocks of ", bytes, " bytes, got ", weight.sizes());
  TORCH_CHECK_VALUE(weight.size(0) == out, name, " holds ", weight.size(0), " rows but out has ", out, " outputs");
  return false;
}

}  // namespace dspark::bindings
