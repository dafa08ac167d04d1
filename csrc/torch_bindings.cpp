// The one file (with its CUDA twin csrc/cuda/torch_cuda_bindings.cpp, compiled into CUDA builds only)
// that touches torch's C++ API: turns validated tensors into the plain parameter structs of the
// framework-free kernels. Validation lives in dspark/ops (Python); the checks here
// only guard the assumptions the pointer arithmetic makes (device, dtype, contiguity).
#include <torch/extension.h>

#include "cpu/kv_rollback.h"
#include "cpu/rejection_sample.h"
#include "cpu/small_batch_linear.h"
#include "cpu/tree_attention.h"

namespace {

using dspark::cpu::DType;

DType element_type(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK_VALUE(false, name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

void expect(const at::Tensor& t, at::ScalarType dtype, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

void expect_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
  element_type(t, name);
}

template <typename T>
const T* optional_ptr(const std::optional<at::Tensor>& t, at::ScalarType dtype, const char* name) {
  if (!t.has_value()) return nullptr;
  expect(*t, dtype, name);
  return t->data_ptr<T>();
}

void tree_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                    const at::Tensor& qo_indptr, const at::Tensor& cache_seqlens,
                    const std::optional<at::Tensor>& parents, const std::optional<at::Tensor>& block_table,
                    double sm_scale, at::Tensor& out) {
  expect_float(q, "q");
  expect(k_cache, q.scalar_type(), "k_cache");
  expect(v_cache, q.scalar_type(), "v_cache");
  expect(out, q.scalar_type(), "out");
  expect(qo_indptr, at::kInt, "qo_indptr");
  expect(cache_seqlens, at::kInt, "cache_seqlens");
  TORCH_CHECK_VALUE(q.dim() == 3 && k_cache.dim() == 4 && out.sizes() == q.sizes(), "bad tensor ranks");
  dspark::cpu::TreeAttentionParams p{};
  p.dtype = element_type(q, "q");
  p.q = q.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.out = out.data_ptr();
  p.qo_indptr = qo_indptr.data_ptr<int32_t>();
  p.cache_seqlens = cache_seqlens.data_ptr<int32_t>();
  p.parents = optional_ptr<int32_t>(parents, at::kInt, "parents");
  p.block_table = optional_ptr<int32_t>(block_table, at::kInt, "block_table");
  p.num_requests = cache_seqlens.numel();
  p.num_tokens = q.size(0);
  p.num_q_heads = q.size(1);
  p.num_kv_heads = k_cache.size(2);
  p.head_dim = q.size(2);
  p.slots_per_row = k_cache.size(1);
  p.max_blocks = block_table.has_value() ? block_table->size(1) : 0;
  p.sm_scale = static_cast<float>(sm_scale);
  dspark::cpu::tree_attention(p);
}

void rejection_sample(const at::Tensor& target_logits, const at::Tensor& draft_tokens,
                      const at::Tensor& qo_indptr, const std::optional<at::Tensor>& parents,
                      const std::optional<at::Tensor>& draft_probs, const at::Tensor& temperature,
                      const at::Tensor& top_k, const at::Tensor& top_p,
                      const std::optional<at::Tensor>& uniforms, const std::optional<at::Tensor>& seed,
                      const std::optional<at::Tensor>& offset, at::Tensor& accepted_nodes,
                      at::Tensor& num_accepted, at::Tensor& output_tokens) {
  expect_float(target_logits, "target_logits");
  expect(draft_tokens, at::kLong, "draft_tokens");
  expect(qo_indptr, at::kInt, "qo_indptr");
  expect(temperature, at::kFloat, "temperature");
  expect(top_k, at::kInt, "top_k");
  expect(top_p, at::kFloat, "top_p");
  expect(accepted_nodes, at::kInt, "accepted_nodes");
  expect(num_accepted, at::kInt, "num_accepted");
  expect(output_tokens, at::kLong, "output_tokens");
  if (!uniforms.has_value() && !(seed.has_value() && offset.has_value())) {
    const float* t = temperature.data_ptr<float>();
    for (int64_t r = 0; r < temperature.numel(); ++r)
      TORCH_CHECK_VALUE(t[r] == 0.f, "sampled requests need uniforms, or seed and offset");
  }
  dspark::cpu::RejectionSampleParams p{};
  p.logits_dtype = element_type(target_logits, "target_logits");
  p.target_logits = target_logits.data_ptr();
  if (draft_probs.has_value()) {
    expect_float(*draft_probs, "draft_probs");
    p.draft_probs_dtype = element_type(*draft_probs, "draft_probs");
    p.draft_probs = draft_probs->data_ptr();
  }
  p.draft_tokens = draft_tokens.data_ptr<int64_t>();
  p.qo_indptr = qo_indptr.data_ptr<int32_t>();
  p.parents = optional_ptr<int32_t>(parents, at::kInt, "parents");
  p.temperature = temperature.data_ptr<float>();
  p.top_k = top_k.data_ptr<int32_t>();
  p.top_p = top_p.data_ptr<float>();
  p.uniforms = optional_ptr<double>(uniforms, at::kDouble, "uniforms");
  p.seed = optional_ptr<int64_t>(seed, at::kLong, "seed");
  p.offset = optional_ptr<int64_t>(offset, at::kLong, "offset");
  p.num_requests = qo_indptr.numel() - 1;
  p.num_tokens = target_logits.size(0);
  p.vocab_size = target_logits.size(1);
  p.path_width = accepted_nodes.size(1);
  p.accepted_nodes = accepted_nodes.data_ptr<int32_t>();
  p.num_accepted = num_accepted.data_ptr<int32_t>();
  p.output_tokens = output_tokens.data_ptr<int64_t>();
  dspark::cpu::rejection_sample(p);
}

// Caches are [*layers, rows, slots, H_kv, D]; any element type (the copy moves bytes).
void kv_rollback(at::Tensor& k_cache, const std::optional<at::Tensor>& v_cache, at::Tensor& cache_seqlens,
                 const at::Tensor& accepted_nodes, const at::Tensor& num_accepted,
                 const std::optional<at::Tensor>& block_table) {
  TORCH_CHECK_VALUE(k_cache.device().is_cpu() && k_cache.is_contiguous() && k_cache.dim() >= 4,
                    "k_cache must be a contiguous CPU tensor of rank >= 4");
  if (v_cache.has_value()) {
    TORCH_CHECK_VALUE(v_cache->device().is_cpu() && v_cache->is_contiguous() && v_cache->sizes() == k_cache.sizes() &&
                          v_cache->scalar_type() == k_cache.scalar_type(),
                      "v_cache must be a contiguous CPU tensor shaped and typed like k_cache");
  }
  expect(cache_seqlens, at::kInt, "cache_seqlens");
  expect(accepted_nodes, at::kInt, "accepted_nodes");
  expect(num_accepted, at::kInt, "num_accepted");
  const int64_t d = k_cache.dim();
  dspark::cpu::KVRollbackParams p{};
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
  p.block_table = optional_ptr<int32_t>(block_table, at::kInt, "block_table");
  p.num_requests = cache_seqlens.numel();
  p.path_width = accepted_nodes.size(1);
  p.max_blocks = block_table.has_value() ? block_table->size(1) : 0;
  dspark::cpu::kv_rollback(p);
}

void small_batch_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        at::Tensor& out) {
  expect_float(x, "x");
  expect_float(weight, "weight");
  expect(out, x.scalar_type(), "out");
  TORCH_CHECK_VALUE(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "x [rows, in] and weight [out, in] expected");
  TORCH_CHECK_VALUE(out.dim() == 2 && out.size(0) == x.size(0) && out.size(1) == weight.size(0), "out must be [rows, out]");
  dspark::cpu::SmallBatchLinearParams p{};
  p.x_dtype = element_type(x, "x");
  p.weight_dtype = element_type(weight, "weight");
  if (bias.has_value()) {
    expect(*bias, weight.scalar_type(), "bias");
    TORCH_CHECK_VALUE(bias->numel() == weight.size(0), "bias must have out_features elements");
    p.bias = bias->data_ptr();
  }
  p.x = x.data_ptr();
  p.weight = weight.data_ptr();
  p.y = out.data_ptr();
  p.rows = x.size(0);
  p.in_features = x.size(1);
  p.out_features = weight.size(0);
  dspark::cpu::small_batch_linear(p);
}

}  // namespace

#ifdef DSPARK_WITH_CUDA
namespace dspark {
void register_cuda_kernels(pybind11::module_& m);  // csrc/cuda/torch_cuda_bindings.cpp
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "DSpark C++ kernels (raw; call them through dspark.ops, which validates inputs)";
  m.def("tree_attention", &tree_attention);
  m.def("rejection_sample", &rejection_sample);
  m.def("kv_rollback", &kv_rollback);
  m.def("small_batch_linear", &small_batch_linear);
#ifdef DSPARK_WITH_CUDA
  dspark::register_cuda_kernels(m);  // *_cuda entry points for CUDA tensors
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
