// Device helpers shared by the CUDA kernels: element conversions, warp and block reductions that
// return the same value to every thread, and 16-byte asynchronous copies. CUDA headers only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace dspark::cuda {

constexpr int kWarpSize = 32;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Round to nearest even, as torch's .to(dtype) does.
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// ---------------------------------------------------------------------------------------------
// Reductions. Tree orders are fixed by the block shape, so results are reproducible run to run.

template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T value, Op op) {
#pragma unroll
  for (int delta = kWarpSize / 2; delta > 0; delta /= 2) value = op(value, __shfl_xor_sync(0xffffffffu, value, delta));
  return value;
}

// Every thread of the block must call it, with the same `scratch` (kWarpSize elements of shared
// memory); every thread gets the result. The trailing barrier lets the scratch be reused at once.
template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T value, Op op, T* scratch) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int num_warps = (blockDim.x + kWarpSize - 1) / kWarpSize;
  value = warp_reduce(value, op);
  __syncthreads();  // an earlier call may still be reading scratch
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  T total = scratch[0];
  for (int w = 1; w < num_warps; ++w) total = op(total, scratch[w]);
  __syncthreads();
  return total;
}

struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a + b;
  }
};
struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a > b ? a : b;
  }
};
struct MinOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a < b ? a : b;
  }
};

// Inclusive prefix sum over the block in thread order; every thread gets its own prefix, and
// `total` the block's sum. scratch: kWarpSize elements of shared memory.
template <typename T>
__device__ __forceinline__ T block_inclusive_scan(T value, T* scratch, T& total) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int num_warps = (blockDim.x + kWarpSize - 1) / kWarpSize;
#pragma unroll
  for (int delta = 1; delta < kWarpSize; delta *= 2) {
    const T other = __shfl_up_sync(0xffffffffu, value, delta);
    if (lane >= delta) value = value + other;
  }
  __syncthreads();
  if (lane == kWarpSize - 1) scratch[warp] = value;
  __syncthreads();
  T before = T(0);
  total = T(0);
  for (int w = 0; w < num_warps; ++w) {
    if (w < warp) before = before + scratch[w];
    total = total + scratch[w];
  }
  __syncthreads();
  return before + value;
}

// ---------------------------------------------------------------------------------------------
// 16-byte global -> shared copies (sm_80 cp.async); src_bytes = 0 fills the 16 bytes with zeros.

__device__ __forceinline__ void copy_async_16(void* shared_dst, const void* global_src, int src_bytes) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(shared_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(global_src), "r"(src_bytes));
}
__device__ __forceinline__ void copy_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void copy_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

}  // namespace dspark::cuda
