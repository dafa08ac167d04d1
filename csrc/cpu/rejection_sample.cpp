// Lossless verification of draft chains and trees on CPU. The executable spec is
// dspark/reference/rejection_sample.py (and dspark/reference/philox.py for the seeded uniforms);
// this file follows it rule for rule, tie for tie:
//
// - Greedy requests (temperature 0): argmax of the raw logits row (ties: lowest id), follow the first
//   child carrying that token, emit the argmax when none does. No uniforms are consumed.
// - Sampled requests: p = target_distribution(row) in float64 (softmax of logits / temperature, then
//   top-k with ties to the lower id, then top-p over the descending order), computed only for the
//   nodes the walk visits. Children are judged in index order with a = uniforms[c, 0]:
//     deterministic proposals (no draft_probs): accept iff a * sum(residual) < residual[x], else
//       residual[x] = 0;
//     stochastic proposals (q = draft_probs row of the parent): accept iff a * q[x] < residual[x],
//       else residual = norm(max(residual - q, 0)), or p when that is all zeros.
//   Without an accepted child the final token is drawn from the residual (p when the residual has no
//   mass) with uniforms[u, 1] by inverse CDF over a left-to-right cumulative sum.
//
// Floating point: every decision the rules make (a * sum < r, a * q < r, cumulative > u * total,
// mass_before < top_p with mass_before = cumsum - p, argmax ties) uses the same IEEE double
// operations as the reference, and none of them contains a multiply feeding an add, so
// -ffp-contract=fast cannot fuse them (the only contractions are inside exp, where FMA is wanted,
// and x * (1/t) - m for a power-of-two t, whose product is exact). The sampling cumulative sum is
// a plain left-to-right double accumulation in id order, like torch.cumsum on CPU. What differs
// from the reference is how some float64 values are produced: exp (a vectorised polynomial here,
// about 1 ulp; SLEEF in torch, agreeing on ~94% of inputs) and the summation order of the softmax
// denominator and of sum() (lane-wise / blocked sums here, torch's vectorised and cascade sums
// there). Those move probabilities by an ulp or so, which changes a token only when a uniform falls
// within ~1e-16 (relative) of a decision boundary: random uniforms essentially never do, but a
// hand-picked uniform that lands exactly on a boundary (say u = 0.5 with mirror-symmetric kept
// probabilities) can resolve either way. Exactly representable cases (ties, uniform logits over a
// power-of-two vocabulary, one-hot rows) agree bit for bit.
//
// Work and memory: p is computed only for the nodes a walk visits; top-k uses a bounded heap
// (k <= 1024) or nth_element, top-p sorts only as many of the best candidates as it needs, and
// after either filter the sums and the sampling cumsum run over the kept ids only. Requests run in
// parallel (OpenMP, dynamic schedule); each thread keeps its scratch (3 x V doubles plus small
// vectors) in thread_local storage across calls, so the hot path does not allocate once warm.
//
// Rows whose softmax has no finite positive mass (NaN or +inf logits, or all -inf; the reference
// raises or samples NaN there) are treated as a one-hot distribution at the row's argmax, so the op
// always returns ids in [0, V). top_p <= 0 (the reference keeps nothing) keeps the most likely token.
#include "rejection_sample.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "philox.h"
#include "target_distribution.h"
#include "vec_math.h"

namespace dspark::cpu {

namespace {

// residual = max(src - q, 0) into dst (torch.clamp(src - q, min=0)); returns its sum.
template <typename T>
double subtract_clamped(const double* src, const T* q, int64_t vocab, double* dst) {
  const int64_t body = vocab - vocab % kLanes;
  const VecD zero = {};
  for (int64_t i = 0; i < body; i += kLanes) {
    VecD d;
    std::memcpy(&d, src + i, sizeof(d));
    d -= load_vec(q, i);
    d = blend(d > zero, d, zero);
    std::memcpy(dst + i, &d, sizeof(d));
  }
  for (int64_t i = body; i < vocab; ++i) {
    const double d = src[i] - static_cast<double>(load_float(q, i));
    dst[i] = d > 0.0 ? d : 0.0;
  }
  return sum_of(dst, vocab);
}

double subtract_clamped(DType dtype, const double* src, const void* q, int64_t vocab, double* dst) {
  switch (dtype) {
    case DType::kFloat16: return subtract_clamped(src, static_cast<const Half*>(q), vocab, dst);
    case DType::kBFloat16: return subtract_clamped(src, static_cast<const BFloat16*>(q), vocab, dst);
    default: return subtract_clamped(src, static_cast<const float*>(q), vocab, dst);
  }
}

double load_prob(DType dtype, const void* q, int64_t i) {
  switch (dtype) {
    case DType::kFloat16: return load_float(static_cast<const Half*>(q), i);
    case DType::kBFloat16: return load_float(static_cast<const BFloat16*>(q), i);
    default: return load_float(static_cast<const float*>(q), i);
  }
}

size_t element_size(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

// A draft row over a draft vocabulary (strictly increasing ids): q at token id x, 0 outside it.
double sparse_prob(DType dtype, const void* q, const int64_t* ids, int64_t count, int64_t x) {
  const int64_t* at = std::lower_bound(ids, ids + count, x);
  return at != ids + count && *at == x ? load_prob(dtype, q, at - ids) : 0.0;
}

// residual = max(src - q, 0) into dst for q over a draft vocabulary: src itself outside it (src >= 0,
// and src - 0 is src exactly, so the values equal the dense computation's); returns its sum.
double subtract_clamped_sparse(DType dtype, const double* src, const void* q, const int64_t* ids, int64_t count,
                               int64_t vocab, double* dst) {
  for (int64_t i = 0; i < vocab; ++i) dst[i] = src[i] > 0.0 ? src[i] : 0.0;
  for (int64_t j = 0; j < count; ++j) {
    const double d = src[ids[j]] - load_prob(dtype, q, j);
    dst[ids[j]] = d > 0.0 ? d : 0.0;
  }
  return sum_of(dst, vocab);
}

// ---------------------------------------------------------------------------------------------
// One request.

class RequestWalk {
 public:
  RequestWalk(const RejectionSampleParams& prm, int64_t r, Scratch& s)
      : prm_(prm), r_(r), s_(s), start_(prm.qo_indptr[r]), n_(prm.qo_indptr[r + 1] - prm.qo_indptr[r]) {}

  void run() {
    int32_t* nodes_out = prm_.accepted_nodes + r_ * prm_.path_width;
    int64_t* tokens_out = prm_.output_tokens + r_ * prm_.path_width;
    int64_t m = 0;
    if (n_ > 0) {
      build_children();
      m = prm_.temperature[r_] == 0.0f ? walk_greedy(nodes_out, tokens_out) : walk_sampled(nodes_out, tokens_out);
    }
    m = std::min<int64_t>(m, prm_.path_width);
    for (int64_t j = m; j < prm_.path_width; ++j) {
      nodes_out[j] = -1;
      tokens_out[j] = -1;
    }
    prm_.num_accepted[r_] = static_cast<int32_t>(m);
  }

 private:
  // Children of every node in index order (CSR). Parents are trusted to be validated; one that is
  // not in [0, i) is ignored rather than followed.
  void build_children() {
    s_.child_start.assign(n_ + 1, 0);
    s_.child_list.resize(n_ > 0 ? n_ - 1 : 0);
    const int32_t* parents = prm_.parents ? prm_.parents + start_ : nullptr;
    auto parent_of = [&](int64_t i) -> int64_t { return parents ? parents[i] : i - 1; };
    for (int64_t i = 1; i < n_; ++i) {
      const int64_t u = parent_of(i);
      if (u >= 0 && u < i) ++s_.child_start[u + 1];
    }
    for (int64_t u = 0; u < n_; ++u) s_.child_start[u + 1] += s_.child_start[u];
    s_.child_cursor.assign(s_.child_start.begin(), s_.child_start.end() - 1);
    for (int64_t i = 1; i < n_; ++i) {
      const int64_t u = parent_of(i);
      if (u >= 0 && u < i) s_.child_list[s_.child_cursor[u]++] = static_cast<int32_t>(i);
    }
  }

  const int32_t* kids_begin(int64_t u) const { return s_.child_list.data() + s_.child_start[u]; }
  const int32_t* kids_end(int64_t u) const { return s_.child_list.data() + s_.child_start[u + 1]; }

  int64_t token(int64_t node) const { return prm_.draft_tokens[start_ + node]; }
  bool token_in_vocab(int64_t x) const { return x >= 0 && x < prm_.vocab_size; }

  const void* logits_row(int64_t node) const {
    return static_cast<const char*>(prm_.target_logits) +
           (start_ + node) * prm_.vocab_size * static_cast<int64_t>(element_size(prm_.logits_dtype));
  }
  const void* draft_row(int64_t node) const {
    const int64_t width = prm_.draft_vocab != nullptr ? prm_.draft_vocab_size : prm_.vocab_size;
    return static_cast<const char*>(prm_.draft_probs) +
           (start_ + node) * width * static_cast<int64_t>(element_size(prm_.draft_probs_dtype));
  }

  // uniforms[node, col], explicit or from Philox(seed[r], offset[r], node). (The caller guarantees
  // uniforms or seed and offset; a missing seed or offset reads as 0 rather than a null pointer.)
  double uniform(int64_t node, int col) const {
    if (prm_.uniforms) return prm_.uniforms[(start_ + node) * 2 + col];
    double u[2];
    philox_node_uniforms(prm_.seed ? prm_.seed[r_] : 0, prm_.offset ? prm_.offset[r_] : 0,
                         static_cast<uint32_t>(node), u);
    return u[col];
  }

  // Records the path node and its emitted token at step m (bounded by path_width).
  void emit(int32_t* nodes_out, int64_t* tokens_out, int64_t m, int64_t node, int64_t tok) const {
    if (m < prm_.path_width) {
      nodes_out[m] = static_cast<int32_t>(node);
      tokens_out[m] = tok;
    }
  }

  int64_t walk_greedy(int32_t* nodes_out, int64_t* tokens_out) {
    int64_t node = 0, m = 0;
    while (true) {
      const int64_t best = argmax_row(prm_.logits_dtype, logits_row(node), prm_.vocab_size);
      int64_t match = -1;
      for (const int32_t* c = kids_begin(node); c != kids_end(node); ++c) {
        if (token(*c) == best) {
          match = *c;
          break;
        }
      }
      emit(nodes_out, tokens_out, m, node, best);
      ++m;
      if (match < 0) return m;
      node = match;
    }
  }

  int64_t walk_sampled(int32_t* nodes_out, int64_t* tokens_out) {
    const int64_t vocab = prm_.vocab_size;
    const double temperature = prm_.temperature[r_];
    const int64_t top_k = prm_.top_k[r_];
    const double top_p = prm_.top_p[r_];
    s_.ensure_vocab(vocab);
    double* p = s_.p.data();
    int64_t node = 0, m = 0;
    while (true) {
      target_distribution(prm_.logits_dtype, logits_row(node), vocab, temperature, top_k, top_p, s_);
      const int64_t accepted =
          prm_.draft_probs ? judge_stochastic(node) : judge_deterministic(node);
      if (accepted < 0) {
        // judge_* left the residual to sample from in `weights_`.
        int64_t tok = sample_index(weights_, vocab, uniform(node, 1), s_);
        if (tok < 0 && weights_ != p) tok = sample_index(p, vocab, uniform(node, 1), s_);
        if (tok < 0) tok = 0;  // unreachable: p always has mass (see target_distribution)
        emit(nodes_out, tokens_out, m, node, tok);
        return m + 1;
      }
      emit(nodes_out, tokens_out, m, node, token(accepted));
      ++m;
      node = accepted;
    }
  }

  // Deterministic proposals: the residual is p with the rejected tokens zeroed, kept in place in
  // p with an undo log so that an all-zero residual can fall back to p.
  int64_t judge_deterministic(int64_t node) {
    const int64_t vocab = prm_.vocab_size;
    double* p = s_.p.data();
    s_.undo.clear();
    double residual_sum = weight_sum(p, vocab, s_);
    for (const int32_t* c = kids_begin(node); c != kids_end(node); ++c) {
      const int64_t x = token(*c);
      const double a = uniform(*c, 0);
      const double px = token_in_vocab(x) ? p[x] : 0.0;
      const double threshold = a * residual_sum;
      if (threshold < px) return *c;
      if (px != 0.0) {  // zeroing a zero changes nothing, the sum included
        s_.undo.emplace_back(static_cast<int32_t>(x), px);
        p[x] = 0.0;
        residual_sum = weight_sum(p, vocab, s_);
      }
    }
    if (!(residual_sum > 0.0)) {
      for (const auto& [x, px] : s_.undo) p[x] = px;  // residual = p
    }
    weights_ = p;
    return -1;
  }

  // Stochastic proposals, q = draft_probs[node]: accept iff a * q[x] < residual[x], else
  // residual = norm(max(residual - q, 0)), or p when that has no mass.
  int64_t judge_stochastic(int64_t node) {
    const int64_t vocab = prm_.vocab_size;
    double* p = s_.p.data();
    double* buffer = s_.residual.data();
    const void* q = draft_row(node);
    const double* residual = p;
    for (const int32_t* c = kids_begin(node); c != kids_end(node); ++c) {
      const int64_t x = token(*c);
      const double a = uniform(*c, 0);
      if (token_in_vocab(x)) {
        const double q_x = prm_.draft_vocab != nullptr
                               ? sparse_prob(prm_.draft_probs_dtype, q, prm_.draft_vocab, prm_.draft_vocab_size, x)
                               : load_prob(prm_.draft_probs_dtype, q, x);
        if (a * q_x < residual[x]) return *c;
      }
      const double total =
          prm_.draft_vocab != nullptr
              ? subtract_clamped_sparse(prm_.draft_probs_dtype, residual, q, prm_.draft_vocab, prm_.draft_vocab_size,
                                        vocab, buffer)
              : subtract_clamped(prm_.draft_probs_dtype, residual, q, vocab, buffer);
      if (total > 0.0) {
        for (int64_t i = 0; i < vocab; ++i) buffer[i] = buffer[i] / total;
        residual = buffer;
      } else {
        residual = p;
      }
    }
    weights_ = residual;  // sample_index-level fallback to p covers a residual without mass
    return -1;
  }

  const RejectionSampleParams& prm_;
  const int64_t r_;
  Scratch& s_;
  const int64_t start_;
  const int64_t n_;
  const double* weights_ = nullptr;
};

}  // namespace

void rejection_sample(const RejectionSampleParams& params) {
  const int64_t num_requests = params.num_requests;
#pragma omp parallel for schedule(dynamic, 1) if (num_requests > 1)
  for (int64_t r = 0; r < num_requests; ++r) {
    RequestWalk(params, r, thread_scratch()).run();
  }
}

}  // namespace dspark::cpu
