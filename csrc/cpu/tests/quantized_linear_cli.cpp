// Runs quantized_linear on raw files, for tests/test_quantized_linear.py to compare other builds (portable, AVX2,
// AVX-512) with the extension's:  quantized_linear_cli FORMAT ROWS IN OUT x.f32 w.u8 y.f32 [packed]
// With `packed` the weights are in this build's packed layout (tiles of the rows `quantized_linear_cli tile-rows`
// prints), else in the file's.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cpu/quantized_linear.h"
#include "cpu/tests/raw_files.h"

int main(int argc, char** argv) {
  using namespace dspark::cpu;
  if (argc == 2 && std::strcmp(argv[1], "tile-rows") == 0) {
    std::printf("%lld\n", static_cast<long long>(quantized_tile_rows()));
    return 0;
  }
  const bool packed = argc == 9 && std::strcmp(argv[8], "packed") == 0;
  if (argc != 8 && !packed) {
    std::fprintf(stderr, "usage: %s FORMAT ROWS IN OUT x.f32 w.u8 y.f32 [packed] | %s tile-rows\n", argv[0], argv[0]);
    return 2;
  }
  using test_files::read_all;
  const auto format = static_cast<BlockFormat>(std::atoi(argv[1]));
  const int64_t rows = std::atoll(argv[2]), in = std::atoll(argv[3]), out = std::atoll(argv[4]);
  const int64_t tile = quantized_tile_rows(), stored = packed ? (out + tile - 1) / tile * tile : out;
  const auto x = read_all<float>(argv[5], rows * in);
  const auto w = read_all<uint8_t>(argv[6], stored * in / kBlockWeights * block_bytes(format));
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
  p.packed = packed;
  quantized_linear(p);
  test_files::write_all(argv[7], y);
  return 0;
}
