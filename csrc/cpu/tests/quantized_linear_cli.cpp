// Runs quantized_linear on raw files, for tests/test_quantized_linear.py to compare a portable build
// (no AVX2) with the extension's AVX2 one:  quantized_linear_cli FORMAT ROWS IN OUT x.f32 w.u8 y.f32
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cpu/quantized_linear.h"
#include "cpu/tests/raw_files.h"

int main(int argc, char** argv) {
  if (argc != 8) {
    std::fprintf(stderr, "usage: %s FORMAT ROWS IN OUT x.f32 w.u8 y.f32\n", argv[0]);
    return 2;
  }
  using namespace dspark::cpu;
  using test_files::read_all;
  const auto format = static_cast<BlockFormat>(std::atoi(argv[1]));
  const int64_t rows = std::atoll(argv[2]), in = std::atoll(argv[3]), out = std::atoll(argv[4]);
  const auto x = read_all<float>(argv[5], rows * in);
  const auto w = read_all<uint8_t>(argv[6], out * in / kBlockWeights * block_bytes(format));
  std::vector<float> y(rows * out);
  QuantizedLinearParams p{};
  p.x_dtype = DType::kFloat32;
  p.x = x.data();
  p.format = format;
  p.weight = w.data();
  p.y = y.data();
  p.rows = rows;
  p.in_features = in;
  p.out_features = out;
  quantized_linear(p);
  test_files::write_all(argv[7], y);
  return 0;
}
