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
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#if defined(__F16C__)
#include <immintrin.h>
#endif

#include "philox.h"

namespace dspark::cpu {

namespace {

// ---------------------------------------------------------------------------------------------
// Element loads.

inline float load_float(const float* x, int64_t i) { return x[i]; }
inline float load_float(const BFloat16* x, int64_t i) { return to_float(x[i]); }
inline float load_float(const Half* x, int64_t i) {
#if defined(__F16C__)
  return _cvtsh_ss(x[i].bits);
#else
  return to_float(x[i]);
#endif
}

// ---------------------------------------------------------------------------------------------
// Vectorisable float64 helpers.

// sum(x[0..n)): 8 independent accumulators (vectorises) over blocks of 1024, the block sums
// accumulated the same way, so the rounding error grows with ~n/8192 + 128 rather than n/8. For
// non-negative inputs the result is > 0 exactly when some input is > 0.
inline double sum_block(const double* x, int64_t n) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) acc[j] += x[i + j];
  }
  double tail = 0.0;
  for (; i < n; ++i) tail += x[i];
  return (((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))) + tail;
}

inline double sum_of(const double* x, int64_t n) {
  constexpr int64_t kBlock = 1024;
  if (n <= kBlock) return sum_block(x, n);
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t b = 0;
  for (int64_t i = 0; i < n; i += kBlock, ++b) acc[b & 7] += sum_block(x + i, std::min(kBlock, n - i));
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// exp for doubles on GCC/Clang vector extensions (explicit SIMD that -ftrapping-math cannot block;
// the compiler lowers it to whatever the target has: AVX-512, AVX2 + FMA, or SSE2).
// x = k ln2 + r with |r| <= ln2/2 (Cody-Waite split with a 32-bit ln2_hi, so k * ln2_hi and
// x - k * ln2_hi are exact), a degree-13 Taylor polynomial for e^r (truncation error < 5e-18) and
// 2^k applied in two halves, so that subnormal results round once and overflow gives inf.
// Error about 1 ulp (measured max 1.0 with FMA, 1.16 without); NaN stays NaN and -inf gives 0.
#if defined(__AVX512F__)
constexpr int kLanes = 8;
#elif defined(__AVX__)
constexpr int kLanes = 4;
#else
constexpr int kLanes = 2;
#endif
typedef double VecD __attribute__((vector_size(kLanes * sizeof(double))));
typedef uint64_t VecU __attribute__((vector_size(kLanes * sizeof(double))));
typedef decltype(VecD{} < VecD{}) VecMask;

inline VecD blend(VecMask mask, VecD a, VecD b) { return (VecD)((mask & (VecMask)a) | (~mask & (VecMask)b)); }

inline VecD exp_vec(VecD x) {
  constexpr double kLog2e = 1.4426950408889634074;
  constexpr double kLn2Hi = 6.93147180369123816490e-01;  // 0x3FE62E42FEE00000: 32 significant bits
  constexpr double kLn2Lo = 1.90821492927058770002e-10;  // ln 2 - kLn2Hi
  constexpr double kShifter = 6755399441055744.0;         // 1.5 * 2^52: adding it rounds to an integer
  const VecD zero = {};
  // exp(-800) underflows to 0 and exp(800) overflows to inf, so clamping there changes no result
  // (and keeps k small); NaN fails both comparisons and propagates.
  x = blend(x < zero - 800.0, zero - 800.0, x);
  x = blend(x > zero + 800.0, zero + 800.0, x);
  const VecD kd = (x * kLog2e + kShifter) - kShifter;  // nearest integer to x / ln 2
  VecD r = x - kd * kLn2Hi;
  r = r - kd * kLn2Lo;
  VecD poly = zero + 1.0 / 6227020800.0;  // 1/13!
  poly = poly * r + 1.0 / 479001600.0;
  poly = poly * r + 1.0 / 39916800.0;
  poly = poly * r + 1.0 / 3628800.0;
  poly = poly * r + 1.0 / 362880.0;
  poly = poly * r + 1.0 / 40320.0;
  poly = poly * r + 1.0 / 5040.0;
  poly = poly * r + 1.0 / 720.0;
  poly = poly * r + 1.0 / 120.0;
  poly = poly * r + 1.0 / 24.0;
  poly = poly * r + 1.0 / 6.0;
  poly = poly * r + 0.5;
  poly = poly * r + 1.0;
  poly = poly * r + 1.0;
  // 2^k = 2^k1 * 2^k2 with |k1|, |k2| <= 578: both normal. The integer sits in the low mantissa bits
  // of (k + kShifter); adding the bias and shifting it into the exponent field drops the rest.
  const VecD k1 = (kd * 0.5 + kShifter) - kShifter;
  const VecD k2 = kd - k1;
  const VecD scale1 = (VecD)((((VecU)(k1 + kShifter)) + 1023) << 52);
  const VecD scale2 = (VecD)((((VecU)(k2 + kShifter)) + 1023) << 52);
  return poly * scale1 * scale2;
}

template <typename T>
inline VecD load_vec(const T* x, int64_t i) {
  double lanes[kLanes];
  for (int j = 0; j < kLanes; ++j) lanes[j] = static_cast<double>(load_float(x, i + j));
  VecD v;
  std::memcpy(&v, lanes, sizeof(v));
  return v;
}

// The first `count` (< kLanes) elements from i, the other lanes 0.
template <typename T>
inline VecD load_vec_partial(const T* x, int64_t i, int64_t count) {
  double lanes[kLanes] = {};
  for (int64_t j = 0; j < count; ++j) lanes[j] = static_cast<double>(load_float(x, i + j));
  VecD v;
  std::memcpy(&v, lanes, sizeof(v));
  return v;
}

inline double lanes_sum(VecD v) {
  double lanes[kLanes];
  std::memcpy(lanes, &v, sizeof(v));
  double total = 0.0;
  for (int j = 0; j < kLanes; ++j) total += lanes[j];
  return total;
}

// ---------------------------------------------------------------------------------------------
// Per-thread scratch, kept across calls (OpenMP reuses its threads), grown on demand.

struct Entry {
  double v;
  int32_t id;
};

// Descending probability, ties to the lower id: the order of torch.sort(descending, stable).
inline bool better(const Entry& a, const Entry& b) { return a.v > b.v || (a.v == b.v && a.id < b.id); }
inline bool lower_id(const Entry& a, const Entry& b) { return a.id < b.id; }

struct Scratch {
  std::vector<double> p;         // target distribution of the current node
  std::vector<double> residual;  // stochastic residual
  std::vector<double> work;      // top-k selection, cumulative sums
  std::vector<Entry> entries;    // top-k / top-p candidates
  // Ids (ascending) outside which p is zero, when top-k / top-p made p sparse; every residual's
  // support lies inside p's, so sums and the sampling cumsum can skip the rest (adding an exact 0
  // leaves a left-to-right sum unchanged).
  std::vector<int32_t> support;
  bool sparse = false;
  std::vector<int32_t> child_start, child_list, child_cursor;
  std::vector<std::pair<int32_t, double>> undo;  // deterministic rejections: (token, p[token])

  void ensure_vocab(int64_t vocab) {
    if (static_cast<int64_t>(p.size()) < vocab) {
      p.resize(vocab);
      residual.resize(vocab);
      work.resize(vocab);
    }
  }
};

Scratch& thread_scratch() {
  static thread_local Scratch scratch;
  return scratch;
}

// ---------------------------------------------------------------------------------------------
// Target distribution.

// torch.argmax semantics: the first maximum; a NaN counts as the maximum (the first NaN wins).
template <typename T>
int64_t argmax_row(const T* x, int64_t vocab) {
  int64_t best = 0;
  float best_value = load_float(x, 0);
  if (best_value != best_value) return 0;
  for (int64_t i = 1; i < vocab; ++i) {
    const float v = load_float(x, i);
    if (v != v) return i;
    if (v > best_value) {
      best_value = v;
      best = i;
    }
  }
  return best;
}

int64_t argmax_row(DType dtype, const void* row, int64_t vocab) {
  switch (dtype) {
    case DType::kFloat16: return argmax_row(static_cast<const Half*>(row), vocab);
    case DType::kBFloat16: return argmax_row(static_cast<const BFloat16*>(row), vocab);
    default: return argmax_row(static_cast<const float*>(row), vocab);
  }
}

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
    return static_cast<const char*>(prm_.draft_probs) +
           (start_ + node) * prm_.vocab_size * static_cast<int64_t>(element_size(prm_.draft_probs_dtype));
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
        const double threshold = a * load_prob(prm_.draft_probs_dtype, q, x);
        if (threshold < residual[x]) return *c;
      }
      const double total = subtract_clamped(prm_.draft_probs_dtype, residual, q, vocab, buffer);
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
