#include "target_distribution.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>

#include "vec_math.h"

namespace dspark::cpu {

Scratch& thread_scratch() {
  static thread_local Scratch scratch;
  return scratch;
}

namespace {

// ---------------------------------------------------------------------------------------------
// Target distribution.

// torch.argmax semantics: the first maximum; a NaN counts as the maximum (the first NaN wins). Two passes, each in
// vector lanes: the row's maximum and whether it holds a NaN, then the first id holding the NaN or the maximum,
// found a span at a time (a lane-wise test per span, the scan inside the first span that holds it). -0 and +0 are
// equal here as under torch's comparisons, so the first of them wins either way.
template <typename T>
int64_t argmax_row(const T* x, int64_t vocab) {
  float top = -std::numeric_limits<float>::infinity();
  int nan = 0;
#pragma omp simd reduction(max : top) reduction(| : nan)
  for (int64_t i = 0; i < vocab; ++i) {
    const float v = load_float(x, i);
    top = v > top ? v : top;
    nan |= v != v;
  }
  const auto hit = [&](float v) { return nan ? v != v : v == top; };
  constexpr int64_t kSpan = 64;
  for (int64_t from = 0; from < vocab; from += kSpan) {
    const int64_t to = std::min(vocab, from + kSpan);
    int any = 0;
#pragma omp simd reduction(| : any)
    for (int64_t i = from; i < to; ++i) any |= hit(load_float(x, i)) ? 1 : 0;
    if (!any) continue;
    for (int64_t i = from; i < to; ++i) {
      if (hit(load_float(x, i))) return i;
    }
  }
  return 0;  // every value is -inf: id 0 holds the maximum (reached only if -inf == top failed, which it cannot)
}

}  // namespace

int64_t argmax_row(DType dtype, const void* row, int64_t vocab) {
  switch (dtype) {
    case DType::kFloat16: return argmax_row(static_cast<const Half*>(row), vocab);
    case DType::kBFloat16: return argmax_row(static_cast<const BFloat16*>(row), vocab);
    default: return argmax_row(static_cast<const float*>(row), vocab);
  }
}

namespace {

// out[i] = exp(double(x[i]) / t - m) with m = max_i double(x[i]) / t, as torch.softmax computes
// its numerators; returns their sum (kLanes running sums, like torch's vectorised reduction). NaN
// or +inf logits, or all -inf, make the sum NaN.
template <typename T>
double softmax_numerators(const T* x, int64_t vocab, double t, double* out) {
  const int64_t body = vocab - vocab % kLanes;
  const VecD zero = {};
  VecD hi = zero - INFINITY, lo = zero + INFINITY;
  for (int64_t i = 0; i < body; i += kLanes) {
    const VecD v = load_vec(x, i);
    hi = blend(v > hi, v, hi);
    lo = blend(v < lo, v, lo);
  }
  double lanes_hi[kLanes], lanes_lo[kLanes];
  std::memcpy(lanes_hi, &hi, sizeof(hi));
  std::memcpy(lanes_lo, &lo, sizeof(lo));
  double max_x = -INFINITY, min_x = INFINITY;
  for (int j = 0; j < kLanes; ++j) {
    max_x = lanes_hi[j] > max_x ? lanes_hi[j] : max_x;
    min_x = lanes_lo[j] < min_x ? lanes_lo[j] : min_x;
  }
  for (int64_t i = body; i < vocab; ++i) {
    const double v = load_float(x, i);
    max_x = v > max_x ? v : max_x;
    min_x = v < min_x ? v : min_x;
  }
  // Rounded division is monotone: max_i fl(x_i / t) = fl(max x / t) for t > 0, fl(min x / t) for t < 0.
  const double m = (t < 0.0 ? min_x : max_x) / t;
  // x / t equals x * (1 / t) exactly when t is a moderate power of two (x is a float, so neither
  // result can overflow or underflow), which saves the division in the common temperature-1 case.
  int exponent = 0;
  const bool power_of_two = std::frexp(t, &exponent) == 0.5 && exponent > -500 && exponent < 500;
  const double inv_t = 1.0 / t;
  auto scaled = [&](VecD v) { return power_of_two ? v * inv_t : v / t; };
  VecD acc = zero;
  for (int64_t i = 0; i < body; i += kLanes) {
    const VecD e = exp_vec(scaled(load_vec(x, i)) - m);
    std::memcpy(out + i, &e, sizeof(e));
    acc += e;
  }
  if (body < vocab) {
    const int64_t count = vocab - body;
    const VecD e = exp_vec(scaled(load_vec_partial(x, body, count)) - m);
    double lanes[kLanes] = {};
    std::memcpy(lanes, &e, count * sizeof(double));  // lanes past the row stay 0
    std::memcpy(out + body, lanes, count * sizeof(double));
    VecD tail;
    std::memcpy(&tail, lanes, sizeof(tail));
    acc += tail;
  }
  return lanes_sum(acc);
}

double softmax_numerators(DType dtype, const void* row, int64_t vocab, double t, double* out) {
  switch (dtype) {
    case DType::kFloat16: return softmax_numerators(static_cast<const Half*>(row), vocab, t, out);
    case DType::kBFloat16: return softmax_numerators(static_cast<const BFloat16*>(row), vocab, t, out);
    default: return softmax_numerators(static_cast<const float*>(row), vocab, t, out);
  }
}

// p <- the entries of `kept` (any order) divided by their sum, zero elsewhere; records the support.
void renormalise_onto(double* p, int64_t vocab, std::vector<Entry>& kept, Scratch& s) {
  std::sort(kept.begin(), kept.end(), lower_id);
  double total = 0.0;
  for (const Entry& e : kept) total += e.v;
  std::fill(p, p + vocab, 0.0);
  s.support.clear();
  for (Entry& e : kept) {
    e.v = e.v / total;
    p[e.id] = e.v;
    s.support.push_back(e.id);
  }
  s.sparse = true;
}

// Keeps the k largest of p (ties: lower id), renormalised; leaves the kept (id, p) in s.entries.
void apply_top_k(double* p, int64_t vocab, int64_t k, Scratch& s) {
  std::vector<Entry>& kept = s.entries;
  kept.clear();
  if (k <= 1024) {
    // Bounded heap with the worst kept entry on top. Ids arrive in increasing order, so a newcomer
    // that ties the worst kept value loses the tie (higher id) and only a strictly larger value enters.
    for (int64_t i = 0; i < k; ++i) kept.push_back(Entry{p[i], static_cast<int32_t>(i)});
    std::make_heap(kept.begin(), kept.end(), better);
    for (int64_t i = k; i < vocab; ++i) {
      if (p[i] > kept.front().v) {
        std::pop_heap(kept.begin(), kept.end(), better);
        kept.back() = Entry{p[i], static_cast<int32_t>(i)};
        std::push_heap(kept.begin(), kept.end(), better);
      }
    }
  } else {
    // k-th largest value by selection, then all larger values and the lowest-id ties.
    std::copy(p, p + vocab, s.work.begin());
    std::nth_element(s.work.begin(), s.work.begin() + (k - 1), s.work.begin() + vocab, std::greater<double>());
    const double threshold = s.work[k - 1];
    int64_t greater = 0;
    for (int64_t i = 0; i < vocab; ++i) greater += p[i] > threshold;
    int64_t ties_left = k - greater;
    for (int64_t i = 0; i < vocab; ++i) {
      if (p[i] > threshold || (p[i] == threshold && ties_left-- > 0)) kept.push_back(Entry{p[i], static_cast<int32_t>(i)});
    }
  }
  renormalise_onto(p, vocab, kept, s);
}

// Keeps the sorted positions j (descending, ties: lower id) whose mass_before = cumsum_j - p_j is
// < top_p, renormalised. Candidates: s.entries when from_entries (the top-k survivors), else every
// non-zero p (zeros never change the kept mass). Sorts lazily: chunks of the best remaining
// candidates are selected and sorted until the cut-off is passed.
void apply_top_p(double* p, int64_t vocab, double top_p, bool from_entries, Scratch& s) {
  std::vector<Entry>& cand = s.entries;
  if (from_entries) {
    int64_t n = 0;
    for (const Entry& e : cand) {
      if (e.v != 0.0) cand[n++] = e;
    }
    cand.resize(n);
  } else {
    cand.clear();
    for (int64_t i = 0; i < vocab; ++i) {
      if (p[i] != 0.0) cand.push_back(Entry{p[i], static_cast<int32_t>(i)});
    }
  }
  const int64_t n = static_cast<int64_t>(cand.size());
  int64_t kept = 0;          // kept candidates are compacted to the front of cand
  double cumulative = 0.0;   // torch.cumsum order: left to right over the sorted probabilities
  bool exhaustive = false;   // a cut-off too close to top_p to rule out later positions
  int64_t lo = 0, chunk = 64;
  bool done = false;
  while (lo < n && !done) {
    const int64_t hi = exhaustive ? n : std::min(n, lo + chunk);
    if (hi < n) std::nth_element(cand.begin() + lo, cand.begin() + hi, cand.end(), better);
    std::sort(cand.begin() + lo, cand.begin() + hi, better);
    for (int64_t j = lo; j < hi; ++j) {
      const double v = cand[j].v;
      const double next = cumulative + v;
      const double mass_before = next - v;  // as the reference: cumsum - sorted, not the previous cumsum
      cumulative = next;
      if (mass_before < top_p) {
        cand[kept++] = cand[j];
      } else if (!exhaustive) {
        // Every later mass_before is >= this one minus an ulp or two of the running sum (<= ~1), so
        // with a margin far above that no later position can pass; otherwise check them all.
        if (mass_before - top_p > 1e-12) {
          done = true;
          break;
        }
        exhaustive = true;
      }
    }
    lo = hi;
    chunk *= 4;
  }
  if (kept == 0 && n > 0) {  // top_p <= 0: keep the most likely token rather than nothing
    std::nth_element(cand.begin(), cand.begin(), cand.end(), better);
    kept = 1;
  }
  cand.resize(kept);
  renormalise_onto(p, vocab, cand, s);
}

}  // namespace

// s.p = target_distribution(row, temperature, top_k, top_p) of the reference, in float64.
void target_distribution(DType dtype, const void* row, int64_t vocab, double temperature, int64_t top_k,
                         double top_p, Scratch& s) {
  double* p = s.p.data();
  s.sparse = false;
  const double total = softmax_numerators(dtype, row, vocab, temperature, p);
  if (!(total > 0.0) || !(total <= std::numeric_limits<double>::max())) {
    // NaN / +inf logits or all -inf: no usable distribution; fall back to the argmax (see header).
    std::fill(p, p + vocab, 0.0);
    const int64_t best = argmax_row(dtype, row, vocab);
    p[best] = 1.0;
    s.support.assign(1, static_cast<int32_t>(best));
    s.sparse = true;
    return;
  }
  const double inv = 1.0 / total;  // torch's softmax multiplies by the reciprocal of the sum
  for (int64_t i = 0; i < vocab; ++i) p[i] = p[i] * inv;
  const bool use_top_k = top_k > 0 && top_k < vocab;
  if (use_top_k) apply_top_k(p, vocab, top_k, s);
  if (top_p < 1.0) apply_top_p(p, vocab, top_p, use_top_k, s);
}

// ---------------------------------------------------------------------------------------------
// Sampling.

// sum of w over p's support (all ids when p is dense).
double weight_sum(const double* w, int64_t vocab, const Scratch& s) {
  if (!s.sparse) return sum_of(w, vocab);
  double total = 0.0;
  for (const int32_t id : s.support) total += w[id];
  return total;
}

// Inverse CDF of the reference's sample_index: the first id whose left-to-right cumulative weight
// exceeds uniform * total (total = the last cumulative value) and whose weight is > 0; with none
// (rounding at the top), the last id with weight > 0. Returns -1 when no weight is > 0. Weights are
// >= 0 and zero outside p's support, so when p is sparse the cumsum runs over the support only.
int64_t sample_index(const double* w, int64_t vocab, double uniform, Scratch& s) {
  if (s.sparse) {
    double total = 0.0;
    for (const int32_t id : s.support) total += w[id];
    const double threshold = uniform * total;
    double cumulative = 0.0;
    for (const int32_t id : s.support) {
      cumulative += w[id];
      if (cumulative > threshold && w[id] > 0.0) return id;
    }
    for (auto it = s.support.rbegin(); it != s.support.rend(); ++it) {
      if (w[*it] > 0.0) return *it;
    }
    return -1;
  }
  // Dense: one serial pass stores the cumulative sums; with weights >= 0 they never decrease and the
  // first one above the threshold belongs to an id of positive weight, so a binary search finds it.
  double* cum = s.work.data();
  double cumulative = 0.0;
  for (int64_t i = 0; i < vocab; ++i) {
    cumulative += w[i];
    cum[i] = cumulative;
  }
  const double threshold = uniform * cumulative;
  const int64_t hit = std::upper_bound(cum, cum + vocab, threshold) - cum;
  if (hit < vocab && w[hit] > 0.0) return hit;
  for (int64_t i = hit; i < vocab; ++i) {  // defensive: only reachable with negative weights
    if (cum[i] > threshold && w[i] > 0.0) return i;
  }
  for (int64_t i = vocab - 1; i >= 0; --i) {
    if (w[i] > 0.0) return i;
  }
  return -1;
}

}  // namespace dspark::cpu
