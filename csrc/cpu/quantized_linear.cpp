#include "cpu/quantized_linear.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/quantized_dots.h"
#include "cpu/quantized_tiles.h"

namespace dspark::cpu {
namespace {

using namespace quantized_tiles;

template <typename X>
void quantize_x(const X* x, int64_t rows, int64_t in, QuantizedX& out) {
  const int64_t blocks = in / kBlockWeights;
  out.q.resize(rows * in);
  out.scale.resize(rows * blocks);
  out.sum.resize(rows * blocks);
  out.codes.resize(rows * blocks);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b = 0; b < blocks; ++b) {
      const X* src = x + r * in + b * kBlockWeights;
      int8_t* q = out.q.data() + r * in + b * kBlockWeights;
      float v[kBlockWeights];
      float amax = 0.f;
      int finite = 1;
#pragma omp simd reduction(max : amax) reduction(& : finite)
      for (int i = 0; i < kBlockWeights; ++i) {
        v[i] = to_float(src[i]);
        amax = std::max(amax, std::fabs(v[i]));
        finite &= std::isfinite(v[i]) ? 1 : 0;
      }
      if (!finite) {  // a NaN or inf in the block: every output it touches becomes NaN
        std::fill(q, q + kBlockWeights, int8_t{0});
        out.scale[r * blocks + b] = out.sum[r * blocks + b] = std::nanf("");
        out.codes[r * blocks + b] = 0;
        continue;
      }
      // A block too small for 127 / max|x| to be finite (max|x| < ~3.7e-37) quantises to zeros.
      const float ratio = 127.f / amax;
      const float inverse = amax > 0.f && std::isfinite(ratio) ? ratio : 0.f;
      int32_t codes = 0;
#pragma omp simd reduction(+ : codes)
      for (int i = 0; i < kBlockWeights; ++i) {
        // |x| <= max|x| puts every code in [-127, 127] with no clamp. Ties to even, as torch.round.
        const int32_t code = static_cast<int32_t>(std::nearbyint(v[i] * inverse));
        q[i] = static_cast<int8_t>(code);
        codes += code;
      }
      const float scale = amax / 127.f;
      out.scale[r * blocks + b] = scale;
      // The quantised x's sum, not x's: then every term is w_i * xhat_i, whose rounding errors meet the
      // centred w = d q + m rather than the all-positive d q (measured on SmolLM2: 0.7% against 1.8%
      // relative error of a projection with the exact sum).
      out.sum[r * blocks + b] = scale * static_cast<float>(codes);
      out.codes[r * blocks + b] = codes;
    }
  }
}

// MR rows of x against `count` prepared blocks (blocks first_block ...), lanes carried in io.
template <BlockFormat F, int MR>
void sweep(const TileBlock* chunk, int64_t first_block, int64_t count, const QuantizedX& qx, int64_t first_row,
           int64_t in, Lanes* io) {
  Accumulators<MR> a(io);
  for (int64_t i = 0; i < count; ++i) accumulate<F, MR>(chunk[i], first_block + i, qx, first_row, in, a);
  a.store(io);
}

// A tile's rows are one contiguous run of bytes, read block by block across its 8 rows, which the
// hardware prefetchers do not follow. So each block step asks for as many bytes of the next tile as it
// consumes of this one: the next tile is in cache when it starts.
inline void prefetch_step(const uint8_t* p, int64_t bytes) {
#ifdef DSPARK_QL_AVX2
  for (int64_t i = 0; i < bytes; i += 64) _mm_prefetch(reinterpret_cast<const char*>(p + i), _MM_HINT_T0);
#else
  (void)p;
  (void)bytes;
#endif
}

// A tile's blocks, as the file stores its rows (transposed block by block as they are used) or packed.
template <BlockFormat F>
struct FileRows {
  const uint8_t* rows[kTileRows];
  DSPARK_QL_INLINE void block(int64_t b, TileBlock& out) const { prepare_block<F>(rows, b, out); }
};
template <BlockFormat F>
struct PackedTile {
  const uint8_t* tile;
  DSPARK_QL_INLINE void block(int64_t b, TileBlock& out) const {
    load_block<F>(tile + b * kTileRows * block_bytes(F), out);
  }
};

// Every row of x (at most kFusedRows) against one tile, each block prepared and used at once.
template <BlockFormat F, int MR, typename Tile>
void fused(const Tile& tile, const uint8_t* next_tile, int64_t blocks, const QuantizedX& qx, int64_t in, Lanes* io) {
  Accumulators<MR> a(io);
  for (int64_t b = 0; b < blocks; ++b) {
    prefetch_step(next_tile + b * kTileRows * block_bytes(F), kTileRows * block_bytes(F));
    TileBlock block;
    tile.block(b, block);
    accumulate<F, MR>(block, b, qx, 0, in, a);
  }
  a.store(io);
}

// The rows of x against one tile into `lanes` (per x row: acc, mins).
template <BlockFormat F, typename Tile>
void tile_dots(const Tile& tile, const uint8_t* next_tile, int64_t blocks, const QuantizedX& qx, int64_t rows,
               int64_t in, TileBlock* chunk, Lanes* lanes) {
  std::fill(lanes, lanes + 2 * rows, Lanes{});
  if (rows <= kFusedRows) {  // one pass: each block is used as soon as it is prepared
    switch (rows) {
      case 8: return fused<F, 8>(tile, next_tile, blocks, qx, in, lanes);
      case 7: return fused<F, 7>(tile, next_tile, blocks, qx, in, lanes);
      case 6: return fused<F, 6>(tile, next_tile, blocks, qx, in, lanes);
      case 5: return fused<F, 5>(tile, next_tile, blocks, qx, in, lanes);
      case 4: return fused<F, 4>(tile, next_tile, blocks, qx, in, lanes);
      case 3: return fused<F, 3>(tile, next_tile, blocks, qx, in, lanes);
      case 2: return fused<F, 2>(tile, next_tile, blocks, qx, in, lanes);
      default: return fused<F, 1>(tile, next_tile, blocks, qx, in, lanes);
    }
  }
  for (int64_t b0 = 0; b0 < blocks; b0 += kChunkBlocks) {
    const int64_t count = std::min<int64_t>(kChunkBlocks, blocks - b0);
    for (int64_t i = 0; i < count; ++i) {
      prefetch_step(next_tile + (b0 + i) * kTileRows * block_bytes(F), kTileRows * block_bytes(F));
      tile.block(b0 + i, chunk[i]);
    }
    for (int64_t m0 = 0; m0 < rows; m0 += kRowsPerPass) {
      switch (std::min<int64_t>(kRowsPerPass, rows - m0)) {
        case 4: sweep<F, 4>(chunk, b0, count, qx, m0, in, &lanes[2 * m0]); break;
        case 3: sweep<F, 3>(chunk, b0, count, qx, m0, in, &lanes[2 * m0]); break;
        case 2: sweep<F, 2>(chunk, b0, count, qx, m0, in, &lanes[2 * m0]); break;
        default: sweep<F, 1>(chunk, b0, count, qx, m0, in, &lanes[2 * m0]); break;
      }
    }
  }
}

template <typename X, BlockFormat F>
void run(const QuantizedLinearParams& p, const QuantizedX& qx) {
  const int64_t rows = p.rows, in = p.in_features, n_out = p.out_features;
  const int64_t blocks = in / kBlockWeights, row_bytes = blocks * block_bytes(F);
  const int64_t tiles = (n_out + kTileRows - 1) / kTileRows;
  const X* bias = static_cast<const X*>(p.bias);
  X* y = static_cast<X*>(p.y);
  // Rows past out_features (the last tile) read a block of zeros: d = m = 0, so their lanes are 0 and unused
  // (a packed weight holds such rows itself).
  // Kept per calling thread: decoding calls this ~200 times a token, and only grows it for wider rows.
  thread_local std::vector<uint8_t> zero_row;
  if (zero_row.size() < static_cast<size_t>(row_bytes + 32)) zero_row.assign(static_cast<size_t>(row_bytes + 32), 0);
  const uint8_t* const zeros = zero_row.data();  // the calling thread's buffer: the workers' own are empty
  // Each thread prepares and sweeps one contiguous run of tiles (static schedule), which the prefetcher follows.
#pragma omp parallel if (n_out * in * rows >= 16384)
  {
    thread_local std::vector<TileBlock> chunk;
    chunk.resize(kChunkBlocks);
    thread_local std::vector<Lanes> lanes_buffer;  // per x row: acc, mins
    lanes_buffer.resize(static_cast<size_t>(2 * rows));
    Lanes* const lanes = lanes_buffer.data();
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles; ++t) {
      // Both layouts hold a tile's rows in one run of bytes; the next one's is prefetched only (even past the end).
      const uint8_t* next_tile = p.weight + (t + 1) * kTileRows * row_bytes;
      if (p.packed) {
        tile_dots<F>(PackedTile<F>{p.weight + t * kTileRows * row_bytes}, next_tile, blocks, qx, rows, in,
                     chunk.data(), lanes);
      } else {
        FileRows<F> tile;
        for (int j = 0; j < kTileRows; ++j) {
          const int64_t o = t * kTileRows + j;
          tile.rows[j] = o < n_out ? p.weight + o * row_bytes : zeros;
        }
        tile_dots<F>(tile, next_tile, blocks, qx, rows, in, chunk.data(), lanes);
      }
      const int valid = static_cast<int>(std::min<int64_t>(kTileRows, n_out - t * kTileRows));
      for (int64_t m = 0; m < rows; ++m) {
        X* out = y + m * n_out + t * kTileRows;
        for (int j = 0; j < valid; ++j) {
          const float b = bias ? to_float(bias[t * kTileRows + j]) : 0.f;
          out[j] = from_float<X>((lanes[2 * m].v[j] + lanes[2 * m + 1].v[j]) + b);
        }
      }
    }
  }
}

template <typename X>
void dispatch(const QuantizedLinearParams& p) {
  // Thread-local: decoding calls this ~200 times a token; the buffers stay warm and never reallocate.
  thread_local QuantizedX qx;
  quantize_x(static_cast<const X*>(p.x), p.rows, p.in_features, qx);
  switch (p.format) {
    case BlockFormat::kQ4_0: return run<X, BlockFormat::kQ4_0>(p, qx);
    case BlockFormat::kQ4_1: return run<X, BlockFormat::kQ4_1>(p, qx);
    case BlockFormat::kQ8_0: return run<X, BlockFormat::kQ8_0>(p, qx);
  }
}

}  // namespace

int64_t quantized_tile_rows() { return kTileRows; }

void quantized_linear(const QuantizedLinearParams& p) {
  if (p.rows == 0 || p.out_features == 0) return;
  switch (p.x_dtype) {
    case DType::kFloat32: return dispatch<float>(p);
    case DType::kFloat16: return dispatch<Half>(p);
    case DType::kBFloat16: return dispatch<BFloat16>(p);
  }
}

}  // namespace dspark::cpu
