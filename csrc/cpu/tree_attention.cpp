// Tree attention on CPU (contract: DESIGN.md, op 1; executable spec: dspark/reference/tree_attention.py).
//
// Work decomposition. A work item is (request r, block of the request's tokens, KV head g, chunk of
// the key range). The rows of an item are the block's tokens times the `group` query heads that
// share KV head g (GQA), so every K/V element converted to fp32 serves all of them. Keys are walked
// in tiles of kTile slots: each tile is converted once into a float scratch buffer (fp32 caches are
// read in place), then every row updates its online softmax (running max, running sum, rescaled
// accumulator). A token block needs keys [0, L_r + last token], so causal prefill skips the tiles
// above the diagonal. When there are too few (request, block, head) items to occupy every thread, or
// their key ranges are uneven, long key ranges are split into chunks whose partial (max, sum, acc)
// are merged afterwards (flash-decoding).
//
// Round slots L_r + j are visible to token i when j is i or an ancestor of i: a per-request bit
// matrix built from parents (a chain needs none: j <= i).
#include "tree_attention.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace dspark::cpu {

namespace {

constexpr int64_t kTile = 32;          // key slots per tile
constexpr int64_t kRowsPerBlock = 64;  // target rows (tokens x group) per work item
constexpr int64_t kMinChunk = 256;     // never split a key range into chunks shorter than this
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Element loads. Half -> float without branches so that tile conversion vectorises; exact for every
// input (normals, subnormals, infinities, NaN payloads), like to_float(Half).
inline float load_float(const float* p) { return *p; }
inline float load_float(const BFloat16* p) { return bits_to_float(static_cast<uint32_t>(p->bits) << 16); }
inline float load_float(const Half* p) {
  const uint32_t h = p->bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  const uint32_t normal = (em << 13) + (112u << 23);
  const uint32_t special = (em << 13) | 0x7f800000u;
  const uint32_t subnormal = float_to_bits(static_cast<float>(static_cast<int32_t>(em)) * 5.9604644775390625e-08f);
  uint32_t bits = em >= 0x7c00u ? special : normal;
  bits = em < 0x400u ? subnormal : bits;
  return bits_to_float(bits | sign);
}

template <typename T>
inline void convert_row(const T* __restrict src, float* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) dst[d] = load_float(src + d);
}

// exp(x) for x <= 0 (x = score - running max), branch-free so that it vectorises; relative error
// about 2 ulp. Inputs below -87 (including -inf for masked slots) give exactly 0.
inline float exp_nonpositive(float x) {
  const float xc = x < -87.0f ? -87.0f : x;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (xc * 1.44269504088896341f + magic) - magic;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const float scale = bits_to_float(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
  return x < -87.0f ? 0.0f : y * scale;
}

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
  std::vector<float> q, acc, m, l, kbuf, vbuf, s;
  std::vector<uint8_t> vis;  // [tokens in block, kTile]
};

struct Context {
  const TreeAttentionParams* p;
  int64_t group;
  int64_t block_tokens;
  std::vector<int64_t> mask_offset;  // per request, into mask (words); -1: chain
  std::vector<int64_t> mask_words;   // per request: words per mask row
  std::vector<uint64_t> mask;
  std::vector<float> partial;  // split items' (m, l, acc), written by distinct items
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

// s[j] = dot(q, k_j) for four keys at once: q is loaded once per four products.
inline void dot4(const float* __restrict q, const float* __restrict k0, const float* __restrict k1,
                 const float* __restrict k2, const float* __restrict k3, int64_t n, float* out) {
  float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
  for (int64_t d = 0; d < n; ++d) {
    const float x = q[d];
    a0 += x * k0[d];
    a1 += x * k1[d];
    a2 += x * k2[d];
    a3 += x * k3[d];
  }
  out[0] = a0;
  out[1] = a1;
  out[2] = a2;
  out[3] = a3;
}

// Two query rows against four keys: each key load serves two rows.
inline void dot2x4(const float* __restrict q0, const float* __restrict q1, const float* __restrict k0,
                   const float* __restrict k1, const float* __restrict k2, const float* __restrict k3, int64_t n,
                   float* out0, float* out1) {
  float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
  float b0 = 0.0f, b1 = 0.0f, b2 = 0.0f, b3 = 0.0f;
#pragma omp simd reduction(+ : a0, a1, a2, a3, b0, b1, b2, b3)
  for (int64_t d = 0; d < n; ++d) {
    const float x = q0[d], y = q1[d];
    const float c0 = k0[d], c1 = k1[d], c2 = k2[d], c3 = k3[d];
    a0 += x * c0;
    a1 += x * c1;
    a2 += x * c2;
    a3 += x * c3;
    b0 += y * c0;
    b1 += y * c1;
    b2 += y * c2;
    b3 += y * c3;
  }
  out0[0] = a0;
  out0[1] = a1;
  out0[2] = a2;
  out0[3] = a3;
  out1[0] = b0;
  out1[1] = b1;
  out1[2] = b2;
  out1[3] = b3;
}

inline float dot1(const float* __restrict q, const float* __restrict k, int64_t n) {
  float a = 0.0f;
#pragma omp simd reduction(+ : a)
  for (int64_t d = 0; d < n; ++d) a += q[d] * k[d];
  return a;
}

// Online-softmax update of one row with the scores s[0, tk) of one tile (masked scores are -inf).
inline void update_row(float* __restrict s, int64_t tk, const float* const* vp, int64_t dim, float* __restrict acc,
                       float& m, float& l) {
  float tile_max = kNegInf;
#pragma omp simd reduction(max : tile_max)
  for (int64_t j = 0; j < tk; ++j) tile_max = std::max(tile_max, s[j]);
  if (tile_max == kNegInf) return;  // nothing visible in this tile
  const float m_new = std::max(m, tile_max);
  const float alpha = m == kNegInf ? 0.0f : (m == m_new ? 1.0f : std::exp(m - m_new));
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < tk; ++j) {
    const float e = exp_nonpositive(s[j] - m_new);
    s[j] = e;
    sum += e;
  }
  l = l * alpha + sum;
  m = m_new;
  // acc = alpha * acc + sum_j p_j v_j, four keys per pass over acc.
  int64_t j = 0;
  if (alpha != 1.0f) {
    if (tk >= 4) {
      const float p0 = s[0], p1 = s[1], p2 = s[2], p3 = s[3];
      const float *__restrict v0 = vp[0], *__restrict v1 = vp[1], *__restrict v2 = vp[2], *__restrict v3 = vp[3];
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) acc[d] = alpha * acc[d] + p0 * v0[d] + p1 * v1[d] + p2 * v2[d] + p3 * v3[d];
      j = 4;
    } else {
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) acc[d] *= alpha;
    }
  }
  for (; j + 4 <= tk; j += 4) {
    const float p0 = s[j], p1 = s[j + 1], p2 = s[j + 2], p3 = s[j + 3];
    const float *__restrict v0 = vp[j], *__restrict v1 = vp[j + 1], *__restrict v2 = vp[j + 2],
                            *__restrict v3 = vp[j + 3];
#pragma omp simd
    for (int64_t d = 0; d < dim; ++d) acc[d] += p0 * v0[d] + p1 * v1[d] + p2 * v2[d] + p3 * v3[d];
  }
  for (; j < tk; ++j) {
    const float pj = s[j];
    const float* __restrict v = vp[j];
#pragma omp simd
    for (int64_t d = 0; d < dim; ++d) acc[d] += pj * v[d];
  }
}

template <typename T>
void run_item(const Context& ctx, const Item& it, Scratch& sc) {
  const TreeAttentionParams& p = *ctx.p;
  const int64_t dim = p.head_dim, group = ctx.group, r = it.request, g = it.kv_head;
  const int64_t start = p.qo_indptr[r];
  const int64_t committed = p.cache_seqlens[r];
  const int64_t tokens = it.token_end - it.token_begin;
  const int64_t rows = tokens * group;
  const T* q = static_cast<const T*>(p.q);
  const T* k_cache = static_cast<const T*>(p.k_cache);
  const T* v_cache = static_cast<const T*>(p.v_cache);
  const float scale = p.sm_scale;

  float* __restrict qf = sc.q.data();
  float* __restrict acc = sc.acc.data();
  float* m = sc.m.data();
  float* l = sc.l.data();
  for (int64_t t = 0; t < tokens; ++t) {
    const T* src = q + ((start + it.token_begin + t) * p.num_q_heads + g * group) * dim;
    float* dst = qf + t * group * dim;
#pragma omp simd
    for (int64_t e = 0; e < group * dim; ++e) dst[e] = load_float(src + e) * scale;
  }
  std::fill(acc, acc + rows * dim, 0.0f);
  std::fill(m, m + rows, kNegInf);
  std::fill(l, l + rows, 0.0f);

  const bool chain = ctx.mask_offset[r] < 0;
  const uint64_t* mask = chain ? nullptr : ctx.mask.data() + ctx.mask_offset[r];
  const int64_t words = ctx.mask_words[r];

  const float* kp[kTile];
  const float* vp[kTile];
  float* __restrict s = sc.s.data();
  uint8_t* vis = sc.vis.data();

  for (int64_t t0 = it.key_begin; t0 < it.key_end; t0 += kTile) {
    const int64_t tk = std::min<int64_t>(kTile, it.key_end - t0);
    for (int64_t j = 0; j < tk; ++j) {
      const int64_t off = slot_offset(p, r, t0 + j, g);
      if constexpr (std::is_same_v<T, float>) {
        kp[j] = k_cache + off;
        vp[j] = v_cache + off;
      } else {
        float* kd = sc.kbuf.data() + j * dim;
        float* vd = sc.vbuf.data() + j * dim;
        convert_row(k_cache + off, kd, dim);
        convert_row(v_cache + off, vd, dim);
        kp[j] = kd;
        vp[j] = vd;
      }
    }
    // Round slots in this tile: visibility per token of the block.
    const bool has_round = t0 + tk > committed;
    if (has_round) {
      for (int64_t t = 0; t < tokens; ++t) {
        const int64_t i = it.token_begin + t;
        uint8_t* v = vis + t * kTile;
        for (int64_t j = 0; j < tk; ++j) {
          const int64_t slot = t0 + j;
          bool visible;
          if (slot < committed) {
            visible = true;
          } else {
            const int64_t jj = slot - committed;
            if (jj > i) {
              visible = false;
            } else if (chain) {
              visible = true;
            } else {
              visible = (mask[i * words + (jj >> 6)] >> (jj & 63)) & 1u;
            }
          }
          v[j] = visible;
        }
      }
    }
    for (int64_t t = 0; t < tokens; ++t) {
      // The last slot token i can see is committed + i.
      if (has_round && t0 > committed + it.token_begin + t) continue;  // sees nothing in this tile
      const uint8_t* v = vis + t * kTile;
      int64_t h = 0;
      for (; h + 2 <= group; h += 2) {
        const int64_t row = t * group + h;
        const float* q0 = qf + row * dim;
        const float* q1 = q0 + dim;
        float* s0 = s;
        float* s1 = s + kTile;
        int64_t j = 0;
        for (; j + 4 <= tk; j += 4) dot2x4(q0, q1, kp[j], kp[j + 1], kp[j + 2], kp[j + 3], dim, s0 + j, s1 + j);
        for (; j < tk; ++j) {
          s0[j] = dot1(q0, kp[j], dim);
          s1[j] = dot1(q1, kp[j], dim);
        }
        if (has_round) {
          for (int64_t jj = 0; jj < tk; ++jj) {
            if (!v[jj]) {
              s0[jj] = kNegInf;
              s1[jj] = kNegInf;
            }
          }
        }
        update_row(s0, tk, vp, dim, acc + row * dim, m[row], l[row]);
        update_row(s1, tk, vp, dim, acc + (row + 1) * dim, m[row + 1], l[row + 1]);
      }
      for (; h < group; ++h) {
        const int64_t row = t * group + h;
        const float* q0 = qf + row * dim;
        int64_t j = 0;
        for (; j + 4 <= tk; j += 4) dot4(q0, kp[j], kp[j + 1], kp[j + 2], kp[j + 3], dim, s + j);
        for (; j < tk; ++j) s[j] = dot1(q0, kp[j], dim);
        if (has_round) {
          for (int64_t jj = 0; jj < tk; ++jj)
            if (!v[jj]) s[jj] = kNegInf;
        }
        update_row(s, tk, vp, dim, acc + row * dim, m[row], l[row]);
      }
    }
  }

  if (it.split < 0) {
    T* out = static_cast<T*>(p.out);
    for (int64_t t = 0; t < tokens; ++t) {
      for (int64_t h = 0; h < group; ++h) {
        const int64_t row = t * group + h;
        const float inv = 1.0f / l[row];
        const float* a = acc + row * dim;
        T* dst = out + ((start + it.token_begin + t) * p.num_q_heads + g * group + h) * dim;
        for (int64_t d = 0; d < dim; ++d) dst[d] = from_float<T>(a[d] * inv);
      }
    }
  } else {
    // Partial layout per split: m[rows], l[rows], acc[rows, dim].
    float* part = const_cast<float*>(ctx.partial.data()) + it.partial_offset;  // disjoint per item
    std::copy(m, m + rows, part);
    std::copy(l, l + rows, part + rows);
    std::copy(acc, acc + rows * dim, part + 2 * rows);
  }
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

template <typename T>
void run(const TreeAttentionParams& p) {
  Context ctx;
  ctx.p = &p;
  ctx.group = p.num_q_heads / p.num_kv_heads;
  const int64_t dim = p.head_dim, group = ctx.group, R = p.num_requests;
  ctx.block_tokens = std::max<int64_t>(1, kRowsPerBlock / group);

  // Ancestor-or-self bit matrices of tree requests: row i = row parents[i] | bit i.
  ctx.mask_offset.assign(R, -1);
  ctx.mask_words.assign(R, 0);
  if (p.parents != nullptr) {
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

  // Work items: (request, token block, kv head), each over keys [0, L + last token of the block].
  struct Base {
    int32_t request, token_begin, token_end, keys;
  };
  std::vector<Base> bases;
  double total_work = 0.0;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t n = p.qo_indptr[r + 1] - p.qo_indptr[r];
    const int64_t committed = p.cache_seqlens[r];
    for (int64_t b = 0; b < n; b += ctx.block_tokens) {
      const int64_t e = std::min(n, b + ctx.block_tokens);
      const int64_t keys = committed + e;
      bases.push_back({static_cast<int32_t>(r), static_cast<int32_t>(b), static_cast<int32_t>(e),
                       static_cast<int32_t>(keys)});
      total_work += static_cast<double>(keys) * static_cast<double>((e - b) * group) * p.num_kv_heads;
    }
  }
  if (bases.empty()) return;

  const int threads = omp_get_max_threads();
  // Aim for about four pieces of work per thread; chunks no shorter than kMinChunk keys.
  const double target = threads > 1 ? total_work / (4.0 * threads) : 0.0;
  std::vector<Item> items;
  std::vector<MergeGroup> merges;
  int64_t partial_floats = 0;
  for (const Base& b : bases) {
    const int64_t rows = static_cast<int64_t>(b.token_end - b.token_begin) * group;
    int64_t splits = 1;
    if (target > 0.0 && static_cast<double>(b.keys) * rows > target && b.keys > 2 * kMinChunk) {
      const int64_t chunk = std::max<int64_t>(kMinChunk, static_cast<int64_t>(target / rows));
      splits = std::min<int64_t>((b.keys + chunk - 1) / chunk, b.keys / kMinChunk);
      splits = std::max<int64_t>(splits, 1);
    }
    int64_t chunk_len = (b.keys + splits - 1) / splits;
    chunk_len = (chunk_len + kTile - 1) / kTile * kTile;
    splits = (b.keys + chunk_len - 1) / chunk_len;
    for (int64_t g = 0; g < p.num_kv_heads; ++g) {
      if (splits == 1) {
        items.push_back({b.request, static_cast<int32_t>(g), b.token_begin, b.token_end, 0, b.keys, -1, 0});
        continue;
      }
      const int64_t split_floats = rows * (dim + 2);
      merges.push_back({b.request, static_cast<int32_t>(g), b.token_begin, b.token_end,
                        static_cast<int32_t>(splits), partial_floats});
      for (int64_t c = 0; c < splits; ++c) {
        const int64_t k0 = c * chunk_len, k1 = std::min<int64_t>(b.keys, k0 + chunk_len);
        items.push_back({b.request, static_cast<int32_t>(g), b.token_begin, b.token_end, static_cast<int32_t>(k0),
                         static_cast<int32_t>(k1), static_cast<int32_t>(c), partial_floats + c * split_floats});
      }
      partial_floats += splits * split_floats;
    }
  }
  ctx.partial.resize(partial_floats);

  const int64_t max_rows = ctx.block_tokens * group;
  const int64_t num_items = static_cast<int64_t>(items.size());
  const int64_t num_merges = static_cast<int64_t>(merges.size());
#pragma omp parallel if (threads > 1 && num_items > 1)
  {
    Scratch sc;
    sc.q.resize(max_rows * dim);
    sc.acc.resize(max_rows * dim);
    sc.m.resize(max_rows);
    sc.l.resize(max_rows);
    if (!std::is_same_v<T, float>) {
      sc.kbuf.resize(kTile * dim);
      sc.vbuf.resize(kTile * dim);
    }
    sc.s.resize(2 * kTile);
    sc.vis.resize(ctx.block_tokens * kTile);
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
  switch (params.dtype) {
    case DType::kFloat32: run<float>(params); break;
    case DType::kFloat16: run<Half>(params); break;
    case DType::kBFloat16: run<BFloat16>(params); break;
  }
}

}  // namespace dspark::cpu
