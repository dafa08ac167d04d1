// rejection_sample on the GPU: one thread block per request walks its chain or tree from the anchor
// (DESIGN.md, op 2). The CUDA twin of triton_kernels/rejection_sampling.py, rule for rule (the spec
// is dspark/reference/rejection_sample.py):
// - greedy (temperature 0): follow the first child carrying the row's argmax; emit the argmax where none does;
// - sampled: p of each visited node comes from sampling_distribution.cuh; children are judged in index
//   order with a = uniform(c, 0): deterministic proposals accept iff a * sum(r) < r(x), else r(x) = 0;
//   stochastic ones (q = draft_probs row) accept iff a * q(x) < r(x), else r = norm(max(r - q, 0)), or
//   p when nothing is left. Without an accepted child the final token is drawn from r by inverse CDF
//   in id order with uniform(u, 1).
// Stochastic residuals are not stored: r at any id is replayed from p, q and the normalisers of the
// earlier rejections, kept in a float64 scratch vector (one slot per node). All threads of the block
// run the walk in lockstep; block reductions hand every decision's inputs to all of them.
#pragma once

#include <climits>
#include <cstdint>

#include "common.cuh"
#include "launchers.h"
#include "philox.cuh"
#include "sampling_distribution.cuh"

namespace dspark::cuda {

struct RejectionSampleArgs {
  int draft_probs_dtype;  // DType of draft_probs
  const void* draft_probs;
  const int64_t* draft_tokens;
  const int32_t* qo_indptr;
  const int32_t* parents;
  const float* temperature;
  const int32_t* top_k;
  const float* top_p;
  const double* uniforms;
  const int64_t* seed;
  const int64_t* offset;
  double* normalisers;  // [num_tokens] when draft_probs is given
  int64_t num_tokens, vocab_size, path_width;
  int32_t* accepted_nodes;
  int32_t* num_accepted;
  int64_t* output_tokens;
};

// One request's view of the round, shared by the walk's helpers.
template <typename T>
struct RequestView {
  const RejectionSampleArgs& a;
  const T* logits;
  int64_t request, start, n;
  int64_t seed, offset;

  __device__ LogitsRow<T> row(int64_t node) const { return {logits + (start + node) * a.vocab_size, a.vocab_size}; }
  __device__ bool is_child(int64_t c, int64_t node) const {
    return a.parents == nullptr ? c == node + 1 : a.parents[start + c] == node;
  }
  // Node's children lie in (node, end): any later node of a tree, node + 1 in a chain.
  __device__ int64_t children_end(int64_t node) const {
    return a.parents == nullptr ? (node + 2 < n ? node + 2 : n) : n;
  }
  __device__ int64_t token(int64_t node) const { return a.draft_tokens[start + node]; }
  __device__ double uniform(int64_t node, int column) const {
    if (a.uniforms != nullptr) return a.uniforms[(start + node) * 2 + column];
    return philox_node_uniform(seed, offset, static_cast<uint32_t>(node), column);
  }
  __device__ double draft_prob(int64_t node, int64_t id) const {
    const int64_t at = (start + node) * a.vocab_size + id;
    switch (static_cast<DType>(a.draft_probs_dtype)) {
      case DType::kFloat16: return __half2float(static_cast<const __half*>(a.draft_probs)[at]);
      case DType::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(a.draft_probs)[at]);
      default: return static_cast<const float*>(a.draft_probs)[at];
    }
  }
  // The residual at `id` (p there: p_id, q there: q_id) after node's children below `upto` were
  // rejected: deterministic proposals zero their tokens; stochastic ones replay r <- max(r - q, 0) / z
  // with the normaliser z stored per rejected child (z = 0: the residual fell back to p).
  __device__ double residual(double p_id, double q_id, int64_t id, int64_t node, int64_t upto) const {
    double r = p_id;
    for (int64_t c = node + 1; c < upto; ++c) {
      if (!is_child(c, node)) continue;
      if (a.draft_probs != nullptr) {
        const double z = a.normalisers[start + c];
        r = z > 0.0 ? fmax(r - q_id, 0.0) / z : p_id;
      } else if (token(c) == id) {
        r = 0.0;
      }
    }
    return r;
  }
};

// sum over ids of max(r - q, 0) for the stochastic residual r before child `upto`: its normaliser.
template <typename T>
__device__ double rejected_mass(const RequestView<T>& view, const TargetDistribution& dist, int64_t node,
                                int64_t upto, SamplerShared& shared) {
  const LogitsRow<T> row = view.row(node);
  double total = 0.0;
  for (int64_t i = threadIdx.x; i < row.vocab; i += blockDim.x) {
    const double p = dist.prob(row.at(i), i), q = view.draft_prob(node, i);
    total += fmax(view.residual(p, q, i, node, upto) - q, 0.0);
  }
  return block_reduce(total, SumOp{}, shared.sums);
}

// Judges node's children in index order; returns the accepted one, or -1 with every child rejected.
template <typename T>
__device__ int64_t judge_children(const RequestView<T>& view, const TargetDistribution& dist, int64_t node,
                                  SamplerShared& shared) {
  const LogitsRow<T> row = view.row(node);
  const bool stochastic = view.a.draft_probs != nullptr;
  double residual_mass = -1.0;  // deterministic: sum(r), computed at the first child
  const int64_t end = view.children_end(node);
  for (int64_t c = node + 1; c < end; ++c) {
    if (!view.is_child(c, node)) continue;
    const int64_t x = view.token(c);
    const bool in_vocab = x >= 0 && x < row.vocab;  // a token outside [0, V) is rejected, never read
    const double p_x = in_vocab ? dist.prob(row.at(x), x) : 0.0;
    const double q_x = stochastic ? (in_vocab ? view.draft_prob(node, x) : 0.0) : p_x;
    const double r_x = in_vocab ? view.residual(p_x, q_x, x, node, c) : 0.0;
    const double a = view.uniform(c, 0);
    if (!stochastic && residual_mass < 0.0) {
      residual_mass = 0.0;
      for (int64_t i = threadIdx.x; i < row.vocab; i += blockDim.x) residual_mass += dist.prob(row.at(i), i);
      residual_mass = block_reduce(residual_mass, SumOp{}, shared.sums);
    }
    const double bound = stochastic ? a * q_x : a * residual_mass;
    if (bound < r_x) return c;
    if (stochastic) {
      const double z = rejected_mass(view, dist, node, c, shared);
      if (threadIdx.x == 0) view.a.normalisers[view.start + c] = z;
      __syncthreads();  // later passes of every thread read it back
    } else {
      residual_mass -= r_x;
    }
  }
  return -1;
}

// Sum of the residual after node's children below `upto` were rejected.
template <typename T>
__device__ double residual_total(const RequestView<T>& view, const TargetDistribution& dist, int64_t node,
                                 int64_t upto, SamplerShared& shared) {
  const LogitsRow<T> row = view.row(node);
  const bool stochastic = view.a.draft_probs != nullptr;
  double total = 0.0;
  for (int64_t i = threadIdx.x; i < row.vocab; i += blockDim.x) {
    const double p = dist.prob(row.at(i), i);
    total += view.residual(p, stochastic ? view.draft_prob(node, i) : p, i, node, upto);
  }
  return block_reduce(total, SumOp{}, shared.sums);
}

// Inverse CDF in id order over the residual, or over p when the residual has no mass: the first id
// whose cumulative weight exceeds u * total and whose weight is > 0 (on rounding at the top end, the
// last id with weight; 0 if there is none, so the id is always in [0, V)).
template <typename T>
__device__ int64_t sample_final(const RequestView<T>& view, const TargetDistribution& dist, int64_t node,
                                int64_t upto, double u, SamplerShared& shared) {
  const LogitsRow<T> row = view.row(node);
  const bool stochastic = view.a.draft_probs != nullptr;
  double total = residual_total(view, dist, node, upto, shared);
  if (!(total > 0.0)) {
    upto = node + 1;  // replay no rejection: the weights are p
    total = residual_total(view, dist, node, upto, shared);
  }
  const double threshold = u * total;
  double carry = 0.0;
  long long last = -1;
  for (int64_t tile = 0; tile < row.vocab; tile += blockDim.x) {
    const int64_t i = tile + threadIdx.x;
    double w = 0.0;
    if (i < row.vocab) {
      const double p = dist.prob(row.at(i), i);
      w = view.residual(p, stochastic ? view.draft_prob(node, i) : p, i, node, upto);
    }
    double tile_total = 0.0;
    const double cumulative = carry + block_inclusive_scan(w, shared.sums, tile_total);
    const long long hit = (cumulative > threshold && w > 0.0) ? i : LLONG_MAX;
    const long long found = block_reduce(hit, MinOp{}, shared.counts);
    if (found != LLONG_MAX) return found;
    last = block_reduce(w > 0.0 ? static_cast<long long>(i) : last, MaxOp{}, shared.counts);
    carry += tile_total;
  }
  return last >= 0 ? last : 0;
}

// Records path node and emitted token at `step` (bounded by the output width).
__device__ __forceinline__ void emit(const RejectionSampleArgs& a, int64_t request, int64_t step, int64_t node,
                                     int64_t token) {
  if (threadIdx.x == 0 && step < a.path_width) {
    a.accepted_nodes[request * a.path_width + step] = static_cast<int32_t>(node);
    a.output_tokens[request * a.path_width + step] = token;
  }
}

template <typename T>
__device__ int64_t walk_greedy(const RequestView<T>& view, SamplerShared& shared) {
  int64_t node = 0, steps = 0;
  while (true) {
    const int64_t best = row_argmax(view.row(node), shared);
    int64_t accepted = -1;
    const int64_t end = view.children_end(node);
    for (int64_t c = node + 1; c < end && accepted < 0; ++c) {
      if (view.is_child(c, node) && view.token(c) == best) accepted = c;
    }
    emit(view.a, view.request, steps++, node, best);
    if (accepted < 0) return steps;
    node = accepted;
  }
}

template <typename T>
__device__ int64_t walk_sampled(const RequestView<T>& view, SamplerShared& shared) {
  const RejectionSampleArgs& a = view.a;
  const double temperature = a.temperature[view.request];
  const int64_t top_k = a.top_k[view.request];
  const double top_p = a.top_p[view.request];
  int64_t node = 0, steps = 0;
  while (true) {
    const TargetDistribution dist = target_distribution(view.row(node), temperature, top_k, top_p, shared);
    const int64_t accepted = judge_children(view, dist, node, shared);
    if (accepted < 0) {
      const int64_t token = sample_final(view, dist, node, view.children_end(node), view.uniform(node, 1), shared);
      emit(a, view.request, steps++, node, token);
      return steps;
    }
    emit(a, view.request, steps++, node, view.token(accepted));
    node = accepted;
  }
}

// Grid: one block of kSamplerThreads per request.
template <typename T>
__global__ void __launch_bounds__(kSamplerThreads) rejection_sample_kernel(RejectionSampleArgs a, const T* logits) {
  __shared__ SamplerShared shared;
  const int64_t r = blockIdx.x;
  const int64_t start = a.qo_indptr[r], end = a.qo_indptr[r + 1];
  int64_t steps = 0;
  if (start >= 0 && end > start && end <= a.num_tokens) {  // corrupt offsets: an empty result, no reads
    const RequestView<T> view{a, logits, r, start, end - start, a.seed != nullptr ? a.seed[r] : 0,
                              a.offset != nullptr ? a.offset[r] : 0};
    steps = a.temperature[r] == 0.0f ? walk_greedy(view, shared) : walk_sampled(view, shared);
  }
  steps = steps < a.path_width ? steps : a.path_width;
  for (int64_t j = steps + threadIdx.x; j < a.path_width; j += blockDim.x) {
    a.accepted_nodes[r * a.path_width + j] = -1;
    a.output_tokens[r * a.path_width + j] = -1;
  }
  if (threadIdx.x == 0) a.num_accepted[r] = static_cast<int32_t>(steps);
}

}  // namespace dspark::cuda
