// The target distribution of a sampled request (softmax / temperature, top-k, top-p, in float64)
// and inverse-CDF sampling from it, with per-thread scratch. Used by rejection_sample.cpp; the
// rules are those of dspark/reference/rejection_sample.py (see the comment atop rejection_sample.cpp).
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "common.h"

namespace dspark::cpu {

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

// This thread's scratch, kept across calls (OpenMP reuses its threads).
Scratch& thread_scratch();

// torch.argmax semantics on one logits row: the first maximum (a NaN counts as the maximum).
int64_t argmax_row(DType dtype, const void* row, int64_t vocab);

// s.p = target_distribution(row, temperature, top_k, top_p) of the reference, in float64.
void target_distribution(DType dtype, const void* row, int64_t vocab, double temperature, int64_t top_k,
                         double top_p, Scratch& s);

// Sum of w over p's support (all ids when p is dense).
double weight_sum(const double* w, int64_t vocab, const Scratch& s);

// The reference's sample_index: first id whose cumulative weight exceeds uniform * total and whose
// weight is > 0 (the last id with weight on rounding); -1 when no weight is > 0.
int64_t sample_index(const double* w, int64_t vocab, double uniform, Scratch& s);

}  // namespace dspark::cpu
