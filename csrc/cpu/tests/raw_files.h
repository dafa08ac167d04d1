// Raw binary files for the test CLIs (quantized_linear_cli, dequantize_cli): tests/test_quantized_linear.py
// writes their inputs with numpy's tofile and reads their outputs with fromfile.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <vector>

namespace dspark::cpu::test_files {

// Exactly `count` items of T from path; a short or missing file ends the process with status 2.
template <typename T>
std::vector<T> read_all(const char* path, size_t count) {
  std::vector<T> data(count);
  FILE* f = std::fopen(path, "rb");
  if (f == nullptr || std::fread(data.data(), sizeof(T), count, f) != count) {
    std::fprintf(stderr, "cannot read %zu items from %s\n", count, path);
    std::exit(2);
  }
  std::fclose(f);
  return data;
}

template <typename T>
void write_all(const char* path, const std::vector<T>& data) {
  FILE* f = std::fopen(path, "wb");
  std::fwrite(data.data(), sizeof(T), data.size(), f);
  std::fclose(f);
}

}  // namespace dspark::cpu::test_files
