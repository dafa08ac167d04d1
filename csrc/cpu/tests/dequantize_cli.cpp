// Runs dequantize_blocks on a raw file, for tests/test_quantized_linear.py to compare other builds
// (portable, AVX2, AVX-512 with and without BF16) with the extension's:
//   dequantize_cli FORMAT OUT IN DTYPE w.u8 y.bin      (DTYPE: dspark::cpu::DType, 0 fp32, 1 fp16, 2 bf16)
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cpu/dequantize_blocks.h"
#include "cpu/tests/raw_files.h"

int main(int argc, char** argv) {
  if (argc != 7) {
    std::fprintf(stderr, "usage: %s FORMAT OUT IN DTYPE w.u8 y.bin\n", argv[0]);
    return 2;
  }
  using namespace dspark::cpu;
  const auto format = static_cast<BlockFormat>(std::atoi(argv[1]));
  const int64_t out = std::atoll(argv[2]), in = std::atoll(argv[3]);
  const auto dtype = static_cast<DType>(std::atoi(argv[4]));
  const auto w = test_files::read_all<uint8_t>(argv[5], out * in / kBlockWeights * block_bytes(format));
  std::vector<uint8_t> y(out * in * (dtype == DType::kFloat32 ? 4 : 2));
  DequantizeParams p{};
  p.weight = w.data();
  p.format = format;
  p.out_features = out;
  p.in_features = in;
  p.y_dtype = dtype;
  p.y = y.data();
  dequantize_blocks(p);
  test_files::write_all(argv[6], y);
  return 0;
}
