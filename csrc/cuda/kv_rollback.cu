// Launcher of kv_rollback (kernels: kv_rollback.cuh).
#include <algorithm>

#include "kv_rollback.cuh"
#include "launchers.h"

namespace dspark::cuda {

namespace {

constexpr int64_t kMaxGridYZ = 65535;

// The widest word (16 bytes down to 1) that divides the slot row and both caches' alignment:
// 16-byte loads for any fp16/bf16 head row of 8 elements or more.
int word_bytes(const KVRollbackParams& p) {
  const auto aligned = [&](int bytes) {
    const auto misaligned = [&](const char* ptr) {
      return ptr != nullptr && reinterpret_cast<uintptr_t>(ptr) % static_cast<uintptr_t>(bytes) != 0;
    };
    return p.row_bytes % bytes == 0 && !misaligned(p.k_cache) && !misaligned(p.v_cache);
  };
  for (int bytes : {16, 8, 4, 2}) {
    if (aligned(bytes)) return bytes;
  }
  return 1;
}

template <typename Word>
void launch_moves(const KVRollbackArgs& args, cudaStream_t stream) {
  const int64_t words = args.row_bytes / static_cast<int64_t>(sizeof(Word));
  const int threads = static_cast<int>(std::min<int64_t>(256, (words + kWarpSize - 1) / kWarpSize * kWarpSize));
  const dim3 grid(static_cast<unsigned>((words + threads - 1) / threads),
                  static_cast<unsigned>(std::min(args.num_requests, kMaxGridYZ)),
                  static_cast<unsigned>(std::min(args.num_layers, kMaxGridYZ)));
  kv_rollback_kernel<Word><<<grid, threads, 0, stream>>>(args);
}

}  // namespace

cudaError_t kv_rollback(const KVRollbackParams& p, cudaStream_t stream) {
  if (p.num_requests < 0 || p.path_width < 0 || p.row_bytes < 0 || p.num_layers < 0) return cudaErrorInvalidValue;
  if (p.num_requests == 0) return cudaSuccess;
  const KVRollbackArgs args{p.k_cache,     p.v_cache,        p.num_layers,   p.rows,
                            p.slots_per_row, p.row_bytes,    p.cache_seqlens, p.accepted_nodes,
                            p.num_accepted, p.block_table,   p.num_requests, p.path_width,
                            p.max_blocks};
  if (p.path_width > 0 && p.row_bytes > 0 && p.num_layers > 0 && p.rows > 0) {
    switch (word_bytes(p)) {
      case 16: launch_moves<uint4>(args, stream); break;
      case 8: launch_moves<uint2>(args, stream); break;
      case 4: launch_moves<uint32_t>(args, stream); break;
      case 2: launch_moves<uint16_t>(args, stream); break;
      default: launch_moves<uint8_t>(args, stream); break;
    }
  }
  // Stream-ordered after the moves, which all read the old lengths.
  const int threads = 256;
  add_accepted_kernel<<<static_cast<unsigned>((p.num_requests + threads - 1) / threads), threads, 0, stream>>>(
      p.cache_seqlens, args);
  return cudaGetLastError();
}

}  // namespace dspark::cuda
