// Philox4x32-10 for rejection_sample's seeded uniforms, bit-exact with dspark/reference/philox.py,
// csrc/cpu/philox.h and the Triton kernel (triton_kernels/rejection_sampling.py).
//
// Written out by hand rather than taken from curand_kernel.h: curand's Philox state turns
// (seed, subsequence, offset) into its own key and counter layout (and the toolkit used by CI ships
// no curand headers at all), whereas every backend here must use key = (seed lo32, seed hi32) and
// counter = (offset lo32, offset hi32, local node, 0), exactly. The round function is the same
// Philox4x32-10 as curand's.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace dspark::cuda {

struct PhiloxWords {
  uint32_t w[4];
};

__host__ __device__ __forceinline__ uint32_t mul_high_32(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

__host__ __device__ __forceinline__ PhiloxWords philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                                              uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kW0;  // uint32 wrap-around
      k1 += kW1;
    }
    const uint32_t hi0 = mul_high_32(kM0, c0), lo0 = kM0 * c0;
    const uint32_t hi1 = mul_high_32(kM1, c2), lo1 = kM1 * c2;
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return PhiloxWords{{c0, c1, c2, c3}};
}

// 53 random bits as a double in [0, 1): ((high >> 5) * 2^26 + (low >> 6)) * 2^-53, exact.
__host__ __device__ __forceinline__ double philox_unit53(uint32_t high, uint32_t low) {
  const uint64_t bits = (static_cast<uint64_t>(high >> 5) << 26) + static_cast<uint64_t>(low >> 6);
  return static_cast<double>(bits) * (1.0 / 9007199254740992.0);
}

// Local node `node` of a request: column 0 judges the node, column 1 samples the final token at it.
__host__ __device__ __forceinline__ double philox_node_uniform(int64_t seed, int64_t offset, uint32_t node,
                                                               int column) {
  const uint64_t s = static_cast<uint64_t>(seed), o = static_cast<uint64_t>(offset);
  const PhiloxWords b = philox4x32_10(static_cast<uint32_t>(o), static_cast<uint32_t>(o >> 32), node, 0u,
                                      static_cast<uint32_t>(s), static_cast<uint32_t>(s >> 32));
  return column == 0 ? philox_unit53(b.w[0], b.w[1]) : philox_unit53(b.w[2], b.w[3]);
}

}  // namespace dspark::cuda
