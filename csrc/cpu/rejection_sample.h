// Lossless verification of draft chains and trees on CPU (contract: DESIGN.md, "The three ops").
#pragma once

#include <cstdint>

#include "common.h"

namespace dspark::cpu {

struct RejectionSampleParams {
  DType logits_dtype;            // of target_logits
  const void* target_logits;     // [num_tokens, vocab_size], contiguous
  DType draft_probs_dtype;       // of draft_probs
  const void* draft_probs;       // [num_tokens, vocab_size] or nullptr (deterministic proposals); with a
                                 // draft vocabulary [num_tokens, draft_vocab_size], q = 0 outside it
  const int64_t* draft_vocab;    // [draft_vocab_size] strictly increasing token ids, or nullptr (dense rows)
  int64_t draft_vocab_size;
  const int64_t* draft_tokens;   // [num_tokens]
  const int32_t* qo_indptr;      // [R + 1]
  const int32_t* parents;        // [num_tokens] local parent indices, or nullptr for chains
  const float* temperature;      // [R], 0 = greedy
  const int32_t* top_k;          // [R], 0 = off
  const float* top_p;            // [R], 1 = off
  const double* uniforms;        // [num_tokens, 2] or nullptr: then drawn from seed/offset by Philox
  const int64_t* seed;           // [R] (used when uniforms is nullptr)
  const int64_t* offset;         // [R] (used when uniforms is nullptr)
  int64_t num_requests;
  int64_t num_tokens;
  int64_t vocab_size;
  int64_t path_width;            // columns of the outputs
  int32_t* accepted_nodes;       // [R, path_width], padded with -1
  int32_t* num_accepted;         // [R]
  int64_t* output_tokens;        // [R, path_width], padded with -1
};

// Inputs are validated by the caller; this function trusts every index.
void rejection_sample(const RejectionSampleParams& params);

}  // namespace dspark::cpu
