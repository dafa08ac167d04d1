// The target distribution of one logits row, computed by one thread block in vocab tiles and never
// stored: the CUDA twin of triton_kernels/sampling_distribution.py, same rules, same closed form.
//
// p = softmax(logits / T) in float64 (two passes: max, then sum), then top-k (the k-th largest logit
// by a radix select over the float bit patterns; ties at that value kept in id order), then top-p on
// the renormalised top-k distribution (a radix search for the largest key whose strictly-greater mass
// still reaches top_p; the ids of the last tie group kept while mass_before < top_p). p at any id is
// then a closed form of a few scalars (TargetDistribution::prob), which lets the walk read p(x) of one
// token or stream the residual for the sampling pass.
//
// Every function here is called by all threads of the block with the same arguments and returns the
// same value to all of them. No multiply feeds an add (__dmul_rn / __dadd_rn where the compiler could
// otherwise fuse them), as in the reference, which rounds each operation.
#pragma once

#include <cfloat>
#include <cstdint>

#include "common.cuh"

namespace dspark::cuda {

constexpr int kSamplerThreads = 256;
constexpr int kMassDigits = 16;  // 4 key bits per top-p search pass

struct SamplerShared {
  double sums[kWarpSize * kMassDigits];
  long long counts[kWarpSize];
  unsigned long long keys[kWarpSize];
  int histogram[256];
  long long broadcast[2];
};

// Order-preserving map of a float's bits to uint32 (NaNs aside): radix searches run on integers.
__device__ __forceinline__ uint32_t radix_key(float x) {
  const uint32_t bits = __float_as_uint(x);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}
__device__ __forceinline__ float radix_unkey(uint32_t key) {
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

template <typename T>
struct LogitsRow {
  const T* data;
  int64_t vocab;
  __device__ __forceinline__ float at(int64_t i) const { return to_float(data[i]); }
};

struct TargetDistribution {
  double temperature, mx, inv;
  double t1, k1, t2, k2;   // filters keep p > t, and p == t up to id tie, then divide by the kept mass k
  int64_t tie1, tie2;      // (a filter that is off has t = -1, tie = V, k = 1: x / 1 is exact)
  int64_t one_hot;         // >= 0: the row had no usable softmax (NaN / inf logits); p is one-hot there

  __device__ __forceinline__ double softmax(float x) const {
    return __dmul_rn(exp(static_cast<double>(x) / temperature - mx), inv);
  }
  __device__ __forceinline__ double after_top_k(float x, int64_t id) const {
    if (one_hot >= 0) return id == one_hot ? 1.0 : 0.0;
    const double p = softmax(x);
    return (p > t1 || (p == t1 && id <= tie1)) ? p / k1 : 0.0;
  }
  __device__ __forceinline__ double prob(float x, int64_t id) const {
    const double p = after_top_k(x, id);
    return (p > t2 || (p == t2 && id <= tie2)) ? p / k2 : 0.0;
  }
};

// torch.argmax of the raw logits: a NaN counts as the maximum, ties go to the lowest id.
template <typename T>
__device__ int64_t row_argmax(const LogitsRow<T>& row, SamplerShared& shared) {
  unsigned long long best = 0;
  for (int64_t i = threadIdx.x; i < row.vocab; i += blockDim.x) {
    const float x = row.at(i);
    const unsigned long long value_key = x != x ? 0xffffffffull : radix_key(x);
    const unsigned long long packed = (value_key << 32) | (0xffffffffull - static_cast<unsigned long long>(i));
    best = packed > best ? packed : best;
  }
  best = block_reduce(best, MaxOp{}, shared.keys);
  return static_cast<int64_t>(0xffffffffull - (best & 0xffffffffull));
}

// Largest key y with count(key >= y) >= k: the k-th largest logit's key (8 bits per pass).
template <typename T>
__device__ uint32_t kth_largest_key(const LogitsRow<T>& row, int64_t k, SamplerShared& shared) {
  uint32_t prefix = 0, mask = 0;
  long long remaining = k;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int d = threadIdx.x; d < 256; d += blockDim.x) shared.histogram[d] = 0;
    __syncthreads();
    for (int64_t i = threadIdx.x; i < row.vocab; i += blockDim.x) {
      const uint32_t key = radix_key(row.at(i));
      if ((key & mask) == prefix) atomicAdd(&shared.histogram[(key >> shift) & 255u], 1);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      long long above = 0;
      int digit = 0;
      for (int d = 255; d >= 0; --d) {
        if (above + shared.histogram[d] >= remaining) {
          digit = d;
          break;
        }
        above += shared.histogram[d];
      }
      shared.broadcast[0] = digit;
      shared.broadcast[1] = remaining - above;
    }
    __syncthreads();
    prefix |= static_cast<uint32_t>(shared.broadcast[0]) << shift;
    mask |= 255u << shift;
    remaining = shared.broadcast[1];
    __syncthreads();
  }
  return prefix;
}

struct Boundary {
  long long greater, ties;
  double mass;  // of the values > v
};

// Over the top-k-filtered p: count and mass of values > v, count of values == v.
template <typename T>
__device__ Boundary boundary(const LogitsRow<T>& row, const TargetDistribution& dist, double v,
                             SamplerShared& shared) {
  long long greater = 0, ties = 0;
  double mass = 0.0;
  for (int64_t i = threadIdx.x; i < row.vocab; i += blockDim.x) {
    const double p = dist.after_top_k(row.at(i), i);
    greater += p > v;
    ties += p == v;
    mass += p > v ? p : 0.0;
  }
  Boundary b;
  b.greater = block_reduce(greater, SumOp{}, shared.counts);
  b.ties = block_reduce(ties, SumOp{}, shared.counts);
  b.mass = block_reduce(mass, SumOp{}, shared.sums);
  return b;
}

// The id of the nth (1-based) id, in id order, whose top-k-filtered p equals v; -1 if none.
template <typename T>
__device__ int64_t nth_tie(const LogitsRow<T>& row, const TargetDistribution& dist, double v, long long nth,
                           SamplerShared& shared) {
  long long seen = 0;
  for (int64_t tile = 0; tile < row.vocab; tile += blockDim.x) {
    const int64_t i = tile + threadIdx.x;
    const long long tie = i < row.vocab && dist.after_top_k(row.at(i), i) == v;
    long long in_tile = 0;
    const long long rank = seen + block_inclusive_scan(tie, shared.counts, in_tile);
    if (threadIdx.x == 0) shared.broadcast[0] = -1;
    __syncthreads();
    if (tie && rank == nth) shared.broadcast[0] = i;
    __syncthreads();
    const long long found = shared.broadcast[0];
    __syncthreads();
    if (found >= 0) return found;
    seen += in_tile;
  }
  return -1;
}

template <typename T>
__device__ void apply_top_k(const LogitsRow<T>& row, int64_t k, TargetDistribution& dist, SamplerShared& shared) {
  // The very expression every id's p goes through, so the k-th value's ties compare equal to it.
  const double t1 = dist.softmax(radix_unkey(kth_largest_key(row, k, shared)));
  const Boundary b = boundary(row, dist, t1, shared);  // dist's top-k filter is still off: plain p
  const long long need = k - b.greater;                // in [1, ties]
  const int64_t tie1 = need < b.ties ? nth_tie(row, dist, t1, need, shared) : row.vocab;
  dist.t1 = t1;
  dist.tie1 = tie1;
  dist.k1 = __dadd_rn(b.mass, __dmul_rn(static_cast<double>(need), t1));
}

// The largest key z whose strictly-greater (top-k-filtered) mass is >= top_p, then the smallest
// positive p above it: the value of top-p's last kept tie group.
template <typename T>
__device__ double top_p_value(const LogitsRow<T>& row, const TargetDistribution& dist, double top_p,
                              SamplerShared& shared) {
  uint32_t prefix = 0;
  for (int shift = 28; shift >= 0; shift -= 4) {
    double masses[kMassDigits];
#pragma unroll
    for (int d = 0; d < kMassDigits; ++d) masses[d] = 0.0;
    for (int64_t i = threadIdx.x; i < row.vocab; i += blockDim.x) {
      const float x = row.at(i);
      const uint32_t key = radix_key(x);
      const double p = dist.after_top_k(x, i);
#pragma unroll
      for (int d = 0; d < kMassDigits; ++d) masses[d] += key > prefix + (static_cast<uint32_t>(d) << shift) ? p : 0.0;
    }
    int reaching = 0;
#pragma unroll
    for (int d = 0; d < kMassDigits; ++d) reaching += block_reduce(masses[d], SumOp{}, shared.sums) >= top_p;
    prefix += static_cast<uint32_t>(reaching > 0 ? reaching - 1 : 0) << shift;
  }
  double v = INFINITY;
  for (int64_t i = threadIdx.x; i < row.vocab; i += blockDim.x) {
    const float x = row.at(i);
    const double p = dist.after_top_k(x, i);
    if (radix_key(x) > prefix && p > 0.0 && p < v) v = p;
  }
  return block_reduce(v, MinOp{}, shared.sums);
}

template <typename T>
__device__ void apply_top_p(const LogitsRow<T>& row, double top_p, TargetDistribution& dist, SamplerShared& shared) {
  const double v = top_p_value(row, dist, top_p, shared);
  if (!(v < INFINITY)) return;  // no positive p at all: unreachable once softmax had mass
  const Boundary b = boundary(row, dist, v, shared);
  // Sorted descending, the tie group of value v starts after mass G; its i-th member has mass_before
  // G + i * v. Keep the largest i < ties with G + i * v < top_p (i = 0 always): estimate, then step.
  const auto mass_before = [&](long long i) { return __dadd_rn(b.mass, __dmul_rn(static_cast<double>(i), v)); };
  double estimate = (top_p - b.mass) / v;
  estimate = estimate > 0.0 ? estimate : 0.0;
  estimate = estimate < static_cast<double>(b.ties - 1) ? estimate : static_cast<double>(b.ties - 1);
  long long i = static_cast<long long>(estimate);
  while (i + 1 < b.ties && mass_before(i + 1) < top_p) ++i;
  while (i > 0 && mass_before(i) >= top_p) --i;
  const long long kept = i + 1;
  dist.tie2 = kept < b.ties ? nth_tie(row, dist, v, kept, shared) : row.vocab;
  dist.t2 = v;
  dist.k2 = mass_before(kept);
}

// The scalars of p = target_distribution(row, temperature, top_k, top_p) of the reference.
template <typename T>
__device__ TargetDistribution target_distribution(const LogitsRow<T>& row, double temperature, int64_t top_k,
                                                  double top_p, SamplerShared& shared) {
  TargetDistribution dist{temperature, 0.0, 1.0, -1.0, 1.0, -1.0, 1.0, row.vocab, row.vocab, -1};
  double mx = -INFINITY;
  for (int64_t i = threadIdx.x; i < row.vocab; i += blockDim.x) {
    const double y = static_cast<double>(row.at(i)) / temperature;
    mx = y > mx ? y : mx;
  }
  dist.mx = block_reduce(mx, MaxOp{}, shared.sums);
  double total = 0.0;
  for (int64_t i = threadIdx.x; i < row.vocab; i += blockDim.x) {
    total += exp(static_cast<double>(row.at(i)) / temperature - dist.mx);
  }
  total = block_reduce(total, SumOp{}, shared.sums);
  if (!(total > 0.0) || !(total <= DBL_MAX)) {
    // NaN or +inf logits, or all -inf: one-hot at the argmax, as the C++ backend (ids stay in [0, V)).
    dist.one_hot = row_argmax(row, shared);
    return dist;
  }
  dist.inv = 1.0 / total;
  if (top_k > 0 && top_k < row.vocab) apply_top_k(row, top_k, dist, shared);
  if (top_p < 1.0) apply_top_p(row, top_p, dist, shared);
  return dist;
}

}  // namespace dspark::cuda
