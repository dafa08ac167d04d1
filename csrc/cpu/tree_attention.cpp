// Tree attention on CPU (contract: DESIGN.md, op 1; executable spec: dspark/reference/tree_attention.py).
//
// Work decomposition. A work item is (request r, block of the request's tokens, KV head g, chunk of
// the key range). The rows of an item are the block's tokens times the `group` query heads that
// share KV head g (GQA), so every K/V element converted to fp32 serves all of them. Keys are walked
// in tiles of kTile slots: each tile is converted once into float scratch buffers (keys transposed,
// so that scores run along the keys with no horizontal sums), every row takes its scores of the
// tile, updates its online softmax (running max, running sum, rescaled accumulator), and the
// accumulators take the tile's values eight rows at a time (then four, then the last one to three).
// A token block needs keys [0, L_r + its last token], so causal prefill skips the tiles above the
// diagonal. Key ranges longer than kChunk are split at fixed multiples of kChunk into chunks whose
// partial (max, sum, acc) are merged afterwards (flash-decoding).
//
// Batch invariance. A row's output depends only on its own query and the keys it sees, never on how
// many other tokens or requests share the round: every row is computed by the same arithmetic (one
// score function over whole tiles, slots past the range or hidden from the row masked to -inf, a
// softmax over whole tiles, values in groups of one to eight rows whose per-row sums are the same in
// any group) and chunk boundaries do not depend on the work. So verifying a draft gives its first
// token bit for bit what plain decoding gives it, and greedy speculative decoding stays
// token-identical to target-only decoding. A chunk a row cannot see contributes exactly nothing to
// the merge (a single visible chunk merges to its own value).
//
// Round slots L_r + j are visible to token i when j is i or an ancestor of i: a per-request bit
// matrix built from parents (a chain needs none: j <= i); with bidirectional_rounds (a drafter's block,
// set by the fused decoder layers only), every round slot of the request is.
#include "tree_attention.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "attention_tiles.h"

namespace dspark::cpu {

namespace {

using namespace attention_tiles;

constexpr int64_t kRowsPerBlock = 64;  // target rows (tokens x group) per work item
constexpr int64_t kChunk = 128;        // key ranges are split at multiples of this (a multiple of kTile); small
                                       // enough that one decoding token yields work for every thread
static_assert(kChunk % kTile == 0, "chunks must hold whole tiles");

struct Item {
  int32_t request;
  int32_t kv_head;
  int32_t token_begin, token_end;  // local token indices of the block
  int32_t key_begin, key_end;      // slot range of this chunk
  int32_t split;                   // chunk index, -1 when the item covers the whole range
  int64_t partial_offset;          // into the partial buffer (floats), when split >= 0
};

struct MergeGroup {
  int32_t request, kv_head, token_begin, token_end;
  int32_t num_splits;
  int64_t partial_offset;  // first split's partial
};

struct Scratch {
  std::vector<float> q;    // [rows, dim], scaled queries
  std::vector<float> acc;  // [rows, dim]
  std::vector<float> m, l;  // [rows] running max and sum
  std::vector<float> alpha;  // [rows] rescaling of the accumulators in one tile
  std::vector<float> kt;   // [dim, kTile] keys of the tile, transposed (slots past a short tile: stale but finite)
  std::vector<float> v;    // [kTile, dim] values of the tile (zero past the end of a short tile)
  std::vector<float> s;    // [rows, kTile] scores, then probabilities
  std::vector<uint8_t> vis;  // [kTile] visibility of the tile's slots to one token
};

struct Context {
  const TreeAttentionParams* p;
  int64_t group;
  int64_t block_tokens;
  std::vector<int64_t> mask_offset;  // per request, into mask (words); -1: chain
  std::vector<int64_t> mask_words;   // per request: words per mask row
  std::vector<uint64_t> mask;
  std::vector<float> partial;  // split items' (m, l, acc); each item writes its own part
};

// Element offset of (slot, kv_head) of request r inside the cache.
inline int64_t slot_offset(const TreeAttentionParams& p, int64_t r, int64_t slot, int64_t g) {
  int64_t row;
  if (p.block_table == nullptr) {
    row = r * p.slots_per_row + slot;
  } else {
    const int64_t block = p.block_table[r * p.max_blocks + slot / p.slots_per_row];
    row = block * p.slots_per_row + slot % p.slots_per_row;
  }
  return (row * p.num_kv_heads + g) * p.head_dim;
}

// The item's queries, scaled, as fp32 rows (token, head in group): one token's group rows are contiguous.
template <typename T>
void load_queries(const TreeAttentionParams& p, const Item& it, int64_t group, float* __restrict qf) {
  const T* q = static_cast<const T*>(p.q);
  const int64_t dim = p.head_dim, start = p.qo_indptr[it.request];
  for (int64_t t = 0; t < it.token_end - it.token_begin; ++t) {
    const T* src = q + ((start + it.token_begin + t) * p.num_q_heads + it.kv_head * group) * dim;
    float* dst = qf + t * group * dim;
#pragma omp simd
    for (int64_t e = 0; e < group * dim; ++e) dst[e] = load_float(src + e) * p.sm_scale;
  }
}

// Slots [t0, t0 + tk) of the item's request and KV head into the tile buffers (keys transposed into kt, values
// into vf, zero past tk; K rows past tk stay finite and are masked), the next tile's rows prefetched.
template <typename T>
void load_tile(const TreeAttentionParams& p, const Item& it, int64_t t0, int64_t tk, float* __restrict kt,
               float* __restrict vf) {
  const T* k_cache = static_cast<const T*>(p.k_cache);
  const T* v_cache = static_cast<const T*>(p.v_cache);
  const int64_t dim = p.head_dim, r = it.request, g = it.kv_head;
  // A contiguous cache holds a request's slots at a fixed stride: no per-slot offset arithmetic.
  const bool contiguous = p.block_table == nullptr;
  const int64_t slot_stride = p.num_kv_heads * dim;
  const T* keys[kTile];
  const int64_t tile_offset = contiguous ? slot_offset(p, r, t0, g) : 0;
  for (int64_t j = 0; j < tk; ++j) {
    const int64_t off = contiguous ? tile_offset + j * slot_stride : slot_offset(p, r, t0 + j, g);
    keys[j] = k_cache + off;
    convert_row(v_cache + off, vf + j * dim, dim);
  }
  convert_keys(keys, tk, dim, kt);
  if (tk < kTile) std::fill(vf + tk * dim, vf + kTile * dim, 0.0f);
  const int64_t row_bytes = dim * static_cast<int64_t>(sizeof(T));
  const int64_t next_end = std::min<int64_t>(it.key_end, t0 + 2 * kTile);
  for (int64_t slot = t0 + kTile; slot < next_end; ++slot) {
    const int64_t off = slot_offset(p, r, slot, g);
    const char* kb = reinterpret_cast<const char*>(k_cache + off);
    const char* vb = reinterpret_cast<const char*>(v_cache + off);
    for (int64_t b = 0; b < row_bytes; b += 64) {
      DSPARK_PREFETCH(kb + b);
      DSPARK_PREFETCH(vb + b);
    }
  }
}

// Every row's scores of the tile. Whole tiles for every row, whatever tk and the row count: see "Batch
// invariance" above. Rows four at a time, then the last one to three: each row's scores are the same arithmetic
// in either group.
inline void score_rows(const float* qf, const float* kt, int64_t rows, int64_t dim, float* s) {
  int64_t rw = 0;
  for (; rw + 4 <= rows; rw += 4) tile_scores<4>(qf + rw * dim, kt, dim, s + rw * kTile);
  switch (rows - rw) {
    case 3: tile_scores<3>(qf + rw * dim, kt, dim, s + rw * kTile); break;
    case 2: tile_scores<2>(qf + rw * dim, kt, dim, s + rw * kTile); break;
    case 1: tile_scores<1>(qf + rw * dim, kt, dim, s + rw * kTile); break;
    default: break;
  }
}

// The tile's slots each token may not see set to -inf in its rows' scores, then each row's online softmax step
// (its running max and sum updated, alpha: its accumulator's rescaling).
void mask_and_softmax(const Context& ctx, const Item& it, int64_t t0, int64_t tk, Scratch& sc) {
  const TreeAttentionParams& p = *ctx.p;
  const int64_t r = it.request, group = ctx.group, committed = p.cache_seqlens[r];
  const bool chain = ctx.mask_offset[r] < 0;
  const uint64_t* mask = chain ? nullptr : ctx.mask.data() + ctx.mask_offset[r];
  const int64_t words = ctx.mask_words[r];
  const bool has_round = t0 + tk > committed;
  const bool masked = tk < kTile || has_round;  // a whole tile of committed slots is visible to every row
  uint8_t* vis = sc.vis.data();
  for (int64_t t = 0; t < it.token_end - it.token_begin; ++t) {
    const int64_t i = it.token_begin + t;
    if (masked) {
      for (int64_t j = 0; j < kTile; ++j) {
        const int64_t slot = t0 + j;
        bool visible = j < tk;
        if (visible && has_round && slot >= committed) {
          const int64_t jj = slot - committed;
          visible = p.bidirectional_rounds ||
                    (jj <= i && (chain || ((mask[i * words + (jj >> 6)] >> (jj & 63)) & 1u)));
        }
        vis[j] = visible;
      }
    }
    for (int64_t h = 0; h < group; ++h) {
      const int64_t row = t * group + h;
      float* sr = sc.s.data() + row * kTile;
      if (masked) {
        for (int64_t j = 0; j < kTile; ++j)
          if (!vis[j]) sr[j] = kNegInf;
      }
      sc.alpha[row] = softmax_row(sr, sc.m[row], sc.l[row]);
    }
  }
}

// acc = alpha * acc + P V over the tile, eight rows at a time, then four, then the last one to three.
inline void accumulate_values(const float* s, const float* alpha, const float* vf, int64_t rows, int64_t dim,
                              float* acc) {
  int64_t row = 0;
  for (; row + 8 <= rows; row += 8) tile_values<8>(s + row * kTile, alpha + row, vf, dim, acc + row * dim);
  if (row + 4 <= rows) {
    tile_values<4>(s + row * kTile, alpha + row, vf, dim, acc + row * dim);
    row += 4;
  }
  switch (rows - row) {
    case 3: tile_values<3>(s + row * kTile, alpha + row, vf, dim, acc + row * dim); break;
    case 2: tile_values<2>(s + row * kTile, alpha + row, vf, dim, acc + row * dim); break;
    case 1: tile_values<1>(s + row * kTile, alpha + row, vf, dim, acc + row * dim); break;
    default: break;
  }
}

// The item's rows normalised into the output or, for a chunk of a split range, its partial (m, l, acc), laid out
// m[rows], l[rows], acc[rows, dim], for merge_group.
template <typename T>
void finish_item(Context& ctx, const Item& it, const Scratch& sc) {
  const TreeAttentionParams& p = *ctx.p;
  const int64_t dim = p.head_dim, group = ctx.group, tokens = it.token_end - it.token_begin, rows = tokens * group;
  if (it.split >= 0) {
    float* part = ctx.partial.data() + it.partial_offset;
    std::copy(sc.m.begin(), sc.m.begin() + rows, part);
    std::copy(sc.l.begin(), sc.l.begin() + rows, part + rows);
    std::copy(sc.acc.begin(), sc.acc.begin() + rows * dim, part + 2 * rows);
    return;
  }
  T* out = static_cast<T*>(p.out);
  const int64_t start = p.qo_indptr[it.request];
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t h = 0; h < group; ++h) {
      const int64_t rw = t * group + h;
      const float inv = 1.0f / sc.l[rw];
      const float* a = sc.acc.data() + rw * dim;
      T* dst = out + ((start + it.token_begin + t) * p.num_q_heads + it.kv_head * group + h) * dim;
      for (int64_t d = 0; d < dim; ++d) dst[d] = from_float<T>(a[d] * inv);
    }
  }
}

// One work item: its rows' online softmax over the item's key range, tile by tile, then its output or partial.
template <typename T>
void run_item(Context& ctx, const Item& it, Scratch& sc) {
  const int64_t dim = ctx.p->head_dim, rows = static_cast<int64_t>(it.token_end - it.token_begin) * ctx.group;
  load_queries<T>(*ctx.p, it, ctx.group, sc.q.data());
  std::fill(sc.acc.begin(), sc.acc.begin() + rows * dim, 0.0f);
  std::fill(sc.m.begin(), sc.m.begin() + rows, kNegInf);
  std::fill(sc.l.begin(), sc.l.begin() + rows, 0.0f);
  for (int64_t t0 = it.key_begin; t0 < it.key_end; t0 += kTile) {
    const int64_t tk = std::min<int64_t>(kTile, it.key_end - t0);
    load_tile<T>(*ctx.p, it, t0, tk, sc.kt.data(), sc.v.data());
    score_rows(sc.q.data(), sc.kt.data(), rows, dim, sc.s.data());
    mask_and_softmax(ctx, it, t0, tk, sc);
    accumulate_values(sc.s.data(), sc.alpha.data(), sc.v.data(), rows, dim, sc.acc.data());
  }
  finish_item<T>(ctx, it, sc);
}

template <typename T>
void merge_group(const Context& ctx, const MergeGroup& mg, std::vector<float>& acc) {
  const TreeAttentionParams& p = *ctx.p;
  const int64_t dim = p.head_dim, group = ctx.group;
  const int64_t tokens = mg.token_end - mg.token_begin;
  const int64_t rows = tokens * group;
  const int64_t split_floats = rows * (dim + 2);
  const float* base = ctx.partial.data() + mg.partial_offset;
  const int64_t start = p.qo_indptr[mg.request];
  T* out = static_cast<T*>(p.out);
  float* __restrict a = acc.data();
  for (int64_t row = 0; row < rows; ++row) {
    float m_all = kNegInf;
    for (int64_t c = 0; c < mg.num_splits; ++c) m_all = std::max(m_all, base[c * split_floats + row]);
    float l_all = 0.0f;
    std::fill(a, a + dim, 0.0f);
    for (int64_t c = 0; c < mg.num_splits; ++c) {
      const float* part = base + c * split_floats;
      const float mc = part[row];
      if (mc == kNegInf) continue;  // this chunk saw nothing of the row
      const float w = std::exp(mc - m_all);
      l_all += w * part[rows + row];
      const float* __restrict pa = part + 2 * rows + row * dim;
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) a[d] += w * pa[d];
    }
    const float inv = 1.0f / l_all;
    const int64_t t = row / group, h = row % group;
    T* dst = out + ((start + mg.token_begin + t) * p.num_q_heads + mg.kv_head * group + h) * dim;
    for (int64_t d = 0; d < dim; ++d) dst[d] = from_float<T>(a[d] * inv);
  }
}

// Ancestor-or-self bit matrices of tree requests: row i = row parents[i] | bit i (chains need none).
void build_ancestor_masks(Context& ctx) {
  const TreeAttentionParams& p = *ctx.p;
  const int64_t R = p.num_requests;
  ctx.mask_offset.assign(R, -1);
  ctx.mask_words.assign(R, 0);
  if (p.parents == nullptr) return;
  int64_t total = 0;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t n = p.qo_indptr[r + 1] - p.qo_indptr[r];
    if (n == 0) continue;
    ctx.mask_words[r] = (n + 63) / 64;
    ctx.mask_offset[r] = total;
    total += n * ctx.mask_words[r];
  }
  ctx.mask.assign(total, 0);
  for (int64_t r = 0; r < R; ++r) {
    if (ctx.mask_offset[r] < 0) continue;
    const int64_t n = p.qo_indptr[r + 1] - p.qo_indptr[r];
    const int64_t words = ctx.mask_words[r];
    const int32_t* par = p.parents + p.qo_indptr[r];
    uint64_t* mk = ctx.mask.data() + ctx.mask_offset[r];
    for (int64_t i = 0; i < n; ++i) {
      uint64_t* row = mk + i * words;
      if (i > 0 && par[i] >= 0) std::copy(mk + par[i] * words, mk + (par[i] + 1) * words, row);
      row[i >> 6] |= uint64_t{1} << (i & 63);
    }
  }
}

// Work items: (request, token block, KV head), each over keys [0, L + last token of the block], split into chunks
// of kChunk keys (each a partial, merged by a MergeGroup) when longer. Sizes ctx.partial for the split ones.
void plan_items(Context& ctx, std::vector<Item>& items, std::vector<MergeGroup>& merges) {
  const TreeAttentionParams& p = *ctx.p;
  const int64_t dim = p.head_dim;
  int64_t partial_floats = 0;
  for (int64_t r = 0; r < p.num_requests; ++r) {
    const int64_t n = p.qo_indptr[r + 1] - p.qo_indptr[r];
    const int64_t committed = p.cache_seqlens[r];
    for (int64_t b = 0; b < n; b += ctx.block_tokens) {
      const int64_t e = std::min(n, b + ctx.block_tokens);
      const int64_t keys = committed + (p.bidirectional_rounds ? n : e);
      const int64_t rows = (e - b) * ctx.group;
      const int64_t splits = (keys + kChunk - 1) / kChunk;  // fixed chunks, never from the round's work: batch invariance
      const auto request = static_cast<int32_t>(r), begin = static_cast<int32_t>(b), end = static_cast<int32_t>(e);
      for (int64_t g = 0; g < p.num_kv_heads; ++g) {
        const auto head = static_cast<int32_t>(g);
        if (splits == 1) {
          items.push_back({request, head, begin, end, 0, static_cast<int32_t>(keys), -1, 0});
          continue;
        }
        const int64_t split_floats = rows * (dim + 2);
        merges.push_back({request, head, begin, end, static_cast<int32_t>(splits), partial_floats});
        for (int64_t c = 0; c < splits; ++c) {
          const int64_t k0 = c * kChunk, k1 = std::min<int64_t>(keys, k0 + kChunk);
          items.push_back({request, head, begin, end, static_cast<int32_t>(k0), static_cast<int32_t>(k1),
                           static_cast<int32_t>(c), partial_floats + c * split_floats});
        }
        partial_floats += splits * split_floats;
      }
    }
  }
  ctx.partial.resize(partial_floats);
}

template <typename T>
void run(const TreeAttentionParams& p) {
  Context ctx;
  ctx.p = &p;
  ctx.group = p.num_q_heads / p.num_kv_heads;
  ctx.block_tokens = std::max<int64_t>(1, kRowsPerBlock / ctx.group);
  build_ancestor_masks(ctx);
  std::vector<Item> items;
  std::vector<MergeGroup> merges;
  plan_items(ctx, items, merges);
  if (items.empty()) return;
  const int64_t dim = p.head_dim, max_rows = ctx.block_tokens * ctx.group;
  const int64_t num_items = static_cast<int64_t>(items.size());
  const int64_t num_merges = static_cast<int64_t>(merges.size());
#pragma omp parallel if (omp_get_max_threads() > 1 && num_items > 1)
  {
    Scratch sc;
    sc.q.assign(max_rows * dim, 0.0f);
    sc.acc.resize(max_rows * dim);
    sc.m.resize(max_rows);
    sc.l.resize(max_rows);
    sc.alpha.resize(max_rows);
    sc.kt.assign(dim * kTile, 0.0f);
    sc.v.resize(kTile * dim);
    sc.s.resize(max_rows * kTile);
    sc.vis.resize(kTile);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < num_items; ++i) run_item<T>(ctx, items[i], sc);
    if (num_merges > 0) {
      std::vector<float> acc(dim);
#pragma omp for schedule(dynamic, 1)
      for (int64_t i = 0; i < num_merges; ++i) merge_group<T>(ctx, merges[i], acc);
    }
  }
}

}  // namespace

void tree_attention(const TreeAttentionParams& params) {
  // Validation (dspark/ops) refuses these; the guard keeps a direct call from dividing by a zero group.
  if (params.num_tokens <= 0 || params.head_dim <= 0 || params.num_kv_heads <= 0 ||
      params.num_q_heads < params.num_kv_heads || params.num_q_heads % params.num_kv_heads != 0) {
    return;
  }
  switch (params.dtype) {
    case DType::kFloat32: run<float>(params); break;
    case DType::kFloat16: run<Half>(params); break;
    case DType::kBFloat16: run<BFloat16>(params); break;
  }
}

}  // namespace dspark::cpu
