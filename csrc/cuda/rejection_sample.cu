// Launcher of rejection_sample (kernels: rejection_sample.cuh, sampling_distribution.cuh).
#include "launchers.h"
#include "rejection_sample.cuh"

namespace dspark::cuda {

size_t rejection_sample_workspace_bytes(const RejectionSampleParams& p) {
  return p.draft_probs != nullptr ? static_cast<size_t>(p.num_tokens) * sizeof(double) : 0;
}

cudaError_t rejection_sample(const RejectionSampleParams& p, void* workspace, cudaStream_t stream) {
  if (p.num_requests < 0 || p.vocab_size < 1 || p.vocab_size > 0x7fffffffLL || p.path_width < 1) {
    return cudaErrorInvalidValue;
  }
  if (p.draft_probs != nullptr && workspace == nullptr && p.num_tokens > 0) return cudaErrorInvalidValue;
  if (p.num_requests == 0) return cudaSuccess;
  const RejectionSampleArgs args{static_cast<int>(p.draft_probs_dtype), p.draft_probs, p.draft_tokens, p.qo_indptr,
                                 p.parents, p.temperature, p.top_k, p.top_p, p.uniforms, p.seed, p.offset,
                                 static_cast<double*>(workspace), p.num_tokens, p.vocab_size, p.path_width,
                                 p.accepted_nodes, p.num_accepted, p.output_tokens};
  const dim3 grid(static_cast<unsigned>(p.num_requests));
  switch (p.logits_dtype) {
    case DType::kFloat16:
      rejection_sample_kernel<__half><<<grid, kSamplerThreads, 0, stream>>>(
          args, static_cast<const __half*>(p.target_logits));
      break;
    case DType::kBFloat16:
      rejection_sample_kernel<__nv_bfloat16><<<grid, kSamplerThreads, 0, stream>>>(
          args, static_cast<const __nv_bfloat16*>(p.target_logits));
      break;
    default:
      rejection_sample_kernel<float><<<grid, kSamplerThreads, 0, stream>>>(
          args, static_cast<const float*>(p.target_logits));
      break;
  }
  return cudaGetLastError();
}

}  // namespace dspark::cuda
