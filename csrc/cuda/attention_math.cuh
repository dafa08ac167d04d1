// The per-warp math of tree_attention.cuh: S = Q K^T and O += P V for one warp's 16 rows against a
// tile of kKeys keys staged in shared memory.
//
// Both variants keep S and O in the C-fragment layout of mma.sync.m16n8k16 (lane = 4 g + t):
//   S[nt][c]: row g + 8 (c / 2), key nt * 8 + 2 t + c % 2;   O[nd][c]: row g + 8 (c / 2), dim nd * 8 + 2 t + c % 2,
// so the online softmax in tree_attention.cuh is written once.
// - fp16 / bf16 (MmaTileMath): tensor-core MMAs with fp32 accumulation. Q K^T is exact products summed
//   in fp32; P is split into two halves (P = hi + lo, both in the input type) and P V is two MMAs, so
//   P carries about 16 mantissa bits instead of 8 (bf16) or 11 (fp16) and the output's error is its
//   own rounding, as in the Triton kernel. Decoding is memory-bound: the second MMA is free.
// - fp32 (FmaTileMath): CUDA-core FMAs in fp32 (TF32 MMAs would lose the precision fp32 callers ask for).
#pragma once

#include <cstdint>

#include "common.cuh"

namespace dspark::cuda {

__device__ __forceinline__ uint16_t bits_of(__half x) { return __half_as_ushort(x); }
__device__ __forceinline__ uint16_t bits_of(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }

template <typename T>
__device__ __forceinline__ uint32_t pack_pair(T low, T high) {
  return static_cast<uint32_t>(bits_of(low)) | (static_cast<uint32_t>(bits_of(high)) << 16);
}

// Two consecutive elements (the first at an even index) as one 32-bit register.
template <typename T>
__device__ __forceinline__ uint32_t load_pair(const T* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

// D += A B for m16n8k16, A row-major (4 registers), B column-major (2 registers), fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_m16n8k16<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                     uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_m16n8k16<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                            uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <typename T, int kDimPad, int kKeys>
struct MmaTileMath {
  static_assert(kDimPad % 16 == 0 && kKeys % 16 == 0, "m16n8k16 tiles");

  // q: the warp's 16 rows, keys: kKeys rows; both with `stride` elements per row.
  static __device__ __forceinline__ void scores(const T* q, const T* keys, int stride, float (&s)[kKeys / 8][4]) {
    const int lane = threadIdx.x % kWarpSize, g = lane / 4, t = lane % 4;
#pragma unroll
    for (int nt = 0; nt < kKeys / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < kDimPad / 16; ++ks) {
      const int col = ks * 16 + 2 * t;
      const uint32_t a[4] = {load_pair(q + g * stride + col), load_pair(q + (g + 8) * stride + col),
                             load_pair(q + g * stride + col + 8), load_pair(q + (g + 8) * stride + col + 8)};
#pragma unroll
      for (int nt = 0; nt < kKeys / 8; ++nt) {
        const T* key = keys + (nt * 8 + g) * stride + col;
        mma_m16n8k16<T>(s[nt], a, load_pair(key), load_pair(key + 8));
      }
    }
  }

  // o += p V; p is in S-fragment layout, which is A's layout for keys 16 kk .. 16 kk + 15.
  static __device__ __forceinline__ void accumulate(const float (&p)[kKeys / 8][4], const T* values, int stride,
                                                    float (&o)[kDimPad / 8][4], float* /*unused scratch*/) {
    const int lane = threadIdx.x % kWarpSize, g = lane / 4, t = lane % 4;
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk) {
      uint32_t hi[4], lo[4];
#pragma unroll
      for (int half = 0; half < 2; ++half) {  // keys 16 kk + 8 half .. + 7
#pragma unroll
        for (int row = 0; row < 2; ++row) {  // rows g, g + 8
          const float x0 = p[2 * kk + half][2 * row], x1 = p[2 * kk + half][2 * row + 1];
          const T h0 = from_float<T>(x0), h1 = from_float<T>(x1);
          hi[2 * half + row] = pack_pair(h0, h1);
          lo[2 * half + row] = pack_pair(from_float<T>(x0 - to_float(h0)), from_float<T>(x1 - to_float(h1)));
        }
      }
      const T* v0 = values + (16 * kk + 2 * t) * stride;  // B rows (keys) 2t, 2t + 1, then 2t + 8, 2t + 9
#pragma unroll
      for (int nd = 0; nd < kDimPad / 8; ++nd) {
        const int col = nd * 8 + g;
        const uint32_t b0 = pack_pair(v0[col], v0[stride + col]);
        const uint32_t b1 = pack_pair(v0[8 * stride + col], v0[9 * stride + col]);
        mma_m16n8k16<T>(o[nd], hi, b0, b1);
        mma_m16n8k16<T>(o[nd], lo, b0, b1);
      }
    }
  }
};

template <int kDimPad, int kKeys>
struct FmaTileMath {
  static_assert(kDimPad % 8 == 0 && kKeys % 8 == 0, "fragment-shaped tiles");

  static __device__ __forceinline__ void scores(const float* q, const float* keys, int stride,
                                                float (&s)[kKeys / 8][4]) {
    const int lane = threadIdx.x % kWarpSize, g = lane / 4, t = lane % 4;
    const float* q_lo = q + g * stride;
    const float* q_hi = q + (g + 8) * stride;
#pragma unroll
    for (int nt = 0; nt < kKeys / 8; ++nt) {
      const float* k0 = keys + (nt * 8 + 2 * t) * stride;
      const float* k1 = k0 + stride;
      float acc[4] = {0.f, 0.f, 0.f, 0.f};
      for (int d = 0; d < kDimPad; d += 4) {
        const float4 a = *reinterpret_cast<const float4*>(q_lo + d), b = *reinterpret_cast<const float4*>(q_hi + d);
        const float4 x = *reinterpret_cast<const float4*>(k0 + d), y = *reinterpret_cast<const float4*>(k1 + d);
        acc[0] += a.x * x.x + a.y * x.y + a.z * x.z + a.w * x.w;
        acc[1] += a.x * y.x + a.y * y.y + a.z * y.z + a.w * y.w;
        acc[2] += b.x * x.x + b.y * x.y + b.z * x.z + b.w * x.w;
        acc[3] += b.x * y.x + b.y * y.y + b.z * y.z + b.w * y.w;
      }
#pragma unroll
      for (int c = 0; c < 4; ++c) s[nt][c] = acc[c];
    }
  }

  // p_scratch: this warp's [16][kKeys] floats, so every lane can read whole rows of P.
  static __device__ __forceinline__ void accumulate(const float (&p)[kKeys / 8][4], const float* values, int stride,
                                                    float (&o)[kDimPad / 8][4], float* p_scratch) {
    const int lane = threadIdx.x % kWarpSize, g = lane / 4, t = lane % 4;
    __syncwarp();  // the previous tile's reads of p_scratch are done
#pragma unroll
    for (int nt = 0; nt < kKeys / 8; ++nt) {
#pragma unroll
      for (int c = 0; c < 4; ++c) p_scratch[(g + 8 * (c / 2)) * kKeys + nt * 8 + 2 * t + c % 2] = p[nt][c];
    }
    __syncwarp();
    for (int key = 0; key < kKeys; ++key) {
      const float p_lo = p_scratch[g * kKeys + key], p_hi = p_scratch[(g + 8) * kKeys + key];
      const float* v = values + key * stride + 2 * t;
#pragma unroll
      for (int nd = 0; nd < kDimPad / 8; ++nd) {
        const float2 x = *reinterpret_cast<const float2*>(v + nd * 8);
        o[nd][0] += p_lo * x.x;
        o[nd][1] += p_lo * x.y;
        o[nd][2] += p_hi * x.x;
        o[nd][3] += p_hi * x.y;
      }
    }
  }
};

}  // namespace dspark::cuda
