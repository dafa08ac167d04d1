// Torch side of the CUDA kernels, compiled only into CUDA builds of dspark._C (setup.py defines
// DSPARK_WITH_CUDA and csrc/torch_bindings.cpp then calls register_cuda_kernels).
//
// Like the CPU entry points, these are raw functions on the extension module, not dispatcher
// kernels: the ops are torch.library custom ops defined in Python (dspark/ops), which validate the
// inputs and choose the backend per call, so there is no C++ schema to attach a CUDA key to.
// Outputs are allocated by the caller (Python); scratch comes from torch's caching allocator, and
// kernels run on the current stream of the inputs' device, so a round can be captured in a CUDA graph.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/extension.h>

#include <algorithm>

#include "cuda/launchers.h"

namespace dspark {

namespace {

namespace kernels = dspark::cuda;

kernels::DType element_type(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return kernels::DType::kFloat32;
    case at::kHalf: return kernels::DType::kFloat16;
    case at::kBFloat16: return kernels::DType::kBFloat16;
    default: TORCH_CHECK_VALUE(false, name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

void expect_on(const at::Tensor& t, const at::Device& device, const char* name) {
  TORCH_CHECK_VALUE(t.device() == device, name, " must be on ", device, ", got ", t.device());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

void expect(const at::Tensor& t, const at::Device& device, at::ScalarType dtype, const char* name) {
  expect_on(t, device, name);
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
}

template <typename T>
const T* optional_ptr(const std::optional<at::Tensor>& t, const at::Device& device, at::ScalarType dtype,
                      const char* name) {
  if (!t.has_value()) return nullptr;
  expect(*t, device, dtype, name);
  return t->data_ptr<T>();
}

// Scratch of `bytes` on the device (never empty, so its pointer is a valid, aligned address).
at::Tensor workspace(size_t bytes, const at::Device& device) {
  return at::empty({static_cast<int64_t>(std::max<size_t>(bytes, 16))}, at::TensorOptions().dtype(at::kByte).device(device));
}

void check_launch(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, "dspark CUDA ", op, " failed: ", cudaGetErrorString(status));
}

int multiprocessors(const at::Device& device) {
  int count = 0;
  check_launch(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device.index()), "device query");
  return count;
}

void tree_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                         const at::Tensor& qo_indptr, const at::Tensor& cache_seqlens,
                         const std::optional<at::Tensor>& parents, const std::optional<at::Tensor>& block_table,
                         double sm_scale, at::Tensor& out) {
  TORCH_CHECK_VALUE(q.is_cuda(), "q must be a CUDA tensor");
  const at::Device device = q.device();
  expect_on(q, device, "q");
  expect(k_cache, device, q.scalar_type(), "k_cache");
  expect(v_cache, device, q.scalar_type(), "v_cache");
  expect(out, device, q.scalar_type(), "out");
  expect(qo_indptr, device, at::kInt, "qo_indptr");
  expect(cache_seqlens, device, at::kInt, "cache_seqlens");
  TORCH_CHECK_VALUE(q.dim() == 3 && k_cache.dim() == 4 && out.sizes() == q.sizes() &&
                        v_cache.sizes() == k_cache.sizes(), "bad tensor ranks or shapes");
  TORCH_CHECK_VALUE(q.size(2) <= 256, "the CUDA tree_attention supports head_dim <= 256, got ", q.size(2));
  const c10::cuda::CUDAGuard guard(device);
  kernels::TreeAttentionParams p{};
  p.dtype = element_type(q, "q");
  p.q = q.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.out = out.data_ptr();
  p.qo_indptr = qo_indptr.data_ptr<int32_t>();
  p.cache_seqlens = cache_seqlens.data_ptr<int32_t>();
  p.parents = optional_ptr<int32_t>(parents, device, at::kInt, "parents");
  p.block_table = optional_ptr<int32_t>(block_table, device, at::kInt, "block_table");
  p.num_requests = cache_seqlens.numel();
  p.num_tokens = q.size(0);
  p.num_q_heads = q.size(1);
  p.num_kv_heads = k_cache.size(2);
  p.head_dim = q.size(2);
  p.slots_per_row = k_cache.size(1);
  p.cache_rows = k_cache.size(0);
  p.max_blocks = block_table.has_value() ? block_table->size(1) : 0;
  p.sm_scale = static_cast<float>(sm_scale);
  p.num_sms = multiprocessors(device);
  const at::Tensor scratch = workspace(kernels::tree_attention_workspace_bytes(p), device);
  check_launch(kernels::tree_attention(p, scratch.data_ptr(), c10::cuda::getCurrentCUDAStream()), "tree_attention");
}

void rejection_sample_cuda(const at::Tensor& target_logits, const at::Tensor& draft_tokens,
                           const at::Tensor& qo_indptr, const std::optional<at::Tensor>& parents,
                           const std::optional<at::Tensor>& draft_probs, const at::Tensor& temperature,
                           const at::Tensor& top_k, const at::Tensor& top_p,
                           const std::optional<at::Tensor>& uniforms, const std::optional<at::Tensor>& seed,
                           const std::optional<at::Tensor>& offset, at::Tensor& accepted_nodes,
                           at::Tensor& num_accepted, at::Tensor& output_tokens) {
  TORCH_CHECK_VALUE(target_logits.is_cuda(), "target_logits must be a CUDA tensor");
  const at::Device device = target_logits.device();
  expect_on(target_logits, device, "target_logits");
  expect(draft_tokens, device, at::kLong, "draft_tokens");
  expect(qo_indptr, device, at::kInt, "qo_indptr");
  expect(temperature, device, at::kFloat, "temperature");
  expect(top_k, device, at::kInt, "top_k");
  expect(top_p, device, at::kFloat, "top_p");
  expect(accepted_nodes, device, at::kInt, "accepted_nodes");
  expect(num_accepted, device, at::kInt, "num_accepted");
  expect(output_tokens, device, at::kLong, "output_tokens");
  const c10::cuda::CUDAGuard guard(device);
  kernels::RejectionSampleParams p{};
  p.logits_dtype = element_type(target_logits, "target_logits");
  p.target_logits = target_logits.data_ptr();
  if (draft_probs.has_value()) {
    expect_on(*draft_probs, device, "draft_probs");
    p.draft_probs_dtype = element_type(*draft_probs, "draft_probs");
    p.draft_probs = draft_probs->data_ptr();
  }
  p.draft_tokens = draft_tokens.data_ptr<int64_t>();
  p.qo_indptr = qo_indptr.data_ptr<int32_t>();
  p.parents = optional_ptr<int32_t>(parents, device, at::kInt, "parents");
  p.temperature = temperature.data_ptr<float>();
  p.top_k = top_k.data_ptr<int32_t>();
  p.top_p = top_p.data_ptr<float>();
  p.uniforms = optional_ptr<double>(uniforms, device, at::kDouble, "uniforms");
  p.seed = optional_ptr<int64_t>(seed, device, at::kLong, "seed");
  p.offset = optional_ptr<int64_t>(offset, device, at::kLong, "offset");
  p.num_requests = qo_indptr.numel() - 1;
  p.num_tokens = target_logits.size(0);
  p.vocab_size = target_logits.size(1);
  p.path_width = accepted_nodes.size(1);
  p.accepted_nodes = accepted_nodes.data_ptr<int32_t>();
  p.num_accepted = num_accepted.data_ptr<int32_t>();
  p.output_tokens = output_tokens.data_ptr<int64_t>();
  const at::Tensor scratch = workspace(kernels::rejection_sample_workspace_bytes(p), device);
  check_launch(kernels::rejection_sample(p, scratch.data_ptr(), c10::cuda::getCurrentCUDAStream()),
               "rejection_sample");
}

// Caches are [*layers, rows, slots, H, D], contiguous, of any element type (the moves copy bytes).
void kv_rollback_cuda(at::Tensor& k_cache, const std::optional<at::Tensor>& v_cache, at::Tensor& cache_seqlens,
                      const at::Tensor& accepted_nodes, const at::Tensor& num_accepted,
                      const std::optional<at::Tensor>& block_table) {
  TORCH_CHECK_VALUE(k_cache.is_cuda() && k_cache.dim() >= 4, "k_cache must be a CUDA tensor of rank >= 4");
  const at::Device device = k_cache.device();
  expect_on(k_cache, device, "k_cache");
  if (v_cache.has_value()) {
    expect(*v_cache, device, k_cache.scalar_type(), "v_cache");
    TORCH_CHECK_VALUE(v_cache->sizes() == k_cache.sizes(), "v_cache must be shaped like k_cache");
  }
  expect(cache_seqlens, device, at::kInt, "cache_seqlens");
  expect(accepted_nodes, device, at::kInt, "accepted_nodes");
  expect(num_accepted, device, at::kInt, "num_accepted");
  const c10::cuda::CUDAGuard guard(device);
  const int64_t d = k_cache.dim();
  kernels::KVRollbackParams p{};
  p.k_cache = static_cast<char*>(k_cache.data_ptr());
  p.v_cache = v_cache.has_value() ? static_cast<char*>(v_cache->data_ptr()) : nullptr;
  p.rows = k_cache.size(d - 4);
  p.slots_per_row = k_cache.size(d - 3);
  p.row_bytes = k_cache.size(d - 2) * k_cache.size(d - 1) * k_cache.element_size();
  p.num_layers = 1;
  for (int64_t i = 0; i < d - 4; ++i) p.num_layers *= k_cache.size(i);
  p.cache_seqlens = cache_seqlens.data_ptr<int32_t>();
  p.accepted_nodes = accepted_nodes.data_ptr<int32_t>();
  p.num_accepted = num_accepted.data_ptr<int32_t>();
  p.block_table = optional_ptr<int32_t>(block_table, device, at::kInt, "block_table");
  p.num_requests = cache_seqlens.numel();
  p.path_width = accepted_nodes.size(1);
  p.max_blocks = block_table.has_value() ? block_table->size(1) : 0;
  check_launch(kernels::kv_rollback(p, c10::cuda::getCurrentCUDAStream()), "kv_rollback");
}

}  // namespace

void register_cuda_kernels(pybind11::module_& m) {
  m.def("tree_attention_cuda", &tree_attention_cuda);
  m.def("rejection_sample_cuda", &rejection_sample_cuda);
  m.def("kv_rollback_cuda", &kv_rollback_cuda);
}

}  // namespace dspark
