// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11): the
// counter-based generator behind rejection_sample's uniforms when no explicit `uniforms` are given.
// Plain 32-bit integer arithmetic, no framework types, so every backend can derive the same numbers
// (spec: dspark/reference/philox.py).
//
// Node j (local index) of request r uses key = (seed lo32, seed hi32) and
// counter = (offset lo32, offset hi32, j, 0); words (w0, w1) give its acceptance uniform and
// (w2, w3) its sampling uniform, each with 53 random bits in [0, 1).
#pragma once

#include <cstdint>

namespace dspark::cpu {

struct PhiloxBlock {
  uint32_t w[4];
};

namespace philox_detail {

constexpr uint32_t kM0 = 0xD2511F53u;
constexpr uint32_t kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u;  // golden ratio
constexpr uint32_t kW1 = 0xBB67AE85u;  // sqrt(3) - 1

inline void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t product = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(product >> 32);
  lo = static_cast<uint32_t>(product);
}

}  // namespace philox_detail

// Philox4x32 with 10 rounds: counter (c0, c1, c2, c3), key (k0, k1).
inline PhiloxBlock philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  using namespace philox_detail;
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kW0;  // uint32 wrap-around
      k1 += kW1;
    }
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kM0, c0, hi0, lo0);
    mulhilo32(kM1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return PhiloxBlock{{c0, c1, c2, c3}};
}

// 53 random bits from two words as a double in [0, 1): ((high >> 5) * 2^26 + (low >> 6)) * 2^-53.
// Exact: the integer has at most 53 bits and the scaling is by a power of two.
inline double philox_unit53(uint32_t high, uint32_t low) {
  const uint64_t bits = (static_cast<uint64_t>(high >> 5) << 26) + static_cast<uint64_t>(low >> 6);
  return static_cast<double>(bits) * (1.0 / 9007199254740992.0);
}

// The two uniforms of local node `node` of a request with this seed and offset:
// out[0] judges the node (acceptance), out[1] samples the final token at it.
inline void philox_node_uniforms(int64_t seed, int64_t offset, uint32_t node, double out[2]) {
  const uint64_t s = static_cast<uint64_t>(seed), o = static_cast<uint64_t>(offset);
  const PhiloxBlock b = philox4x32_10(static_cast<uint32_t>(o), static_cast<uint32_t>(o >> 32), node, 0u,
                                      static_cast<uint32_t>(s), static_cast<uint32_t>(s >> 32));
  out[0] = philox_unit53(b.w[0], b.w[1]);
  out[1] = philox_unit53(b.w[2], b.w[3]);
}

}  // namespace dspark::cpu
