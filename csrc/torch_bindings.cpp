// dspark._C: the torch entry points of the kernels (csrc/torch_bindings.h; the CUDA ones in
// csrc/cuda/torch_cuda_bindings.cpp, compiled into CUDA builds only) exposed to Python. Of the CPU sources, the one
// that includes pybind11; with op_bindings.cpp, decoder_bindings.cpp and torch_checks.h, the one place that touches
// torch's C++ API.
#include <torch/csrc/utils/pybind.h>

#include "cpu/quantized_linear.h"
#include "torch_bindings.h"

#ifdef DSPARK_WITH_CUDA
namespace dspark {
void register_cuda_kernels(pybind11::module_& m);  // csrc/cuda/torch_cuda_bindings.cpp
}  // namespace dspark
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace b = dspark::bindings;
  m.doc() = "DSpark C++ kernels (raw; call them through dspark.ops, which validates inputs)";
  // The kernels release the GIL: a server's HTTP thread (dspark serve) runs while a round computes.
  const auto release = pybind11::call_guard<pybind11::gil_scoped_release>();
  m.def("tree_attention", &b::tree_attention, release);
  m.def("rejection_sample", &b::rejection_sample, release);
  m.def("kv_rollback", &b::kv_rollback, release);
  m.def("small_batch_linear", &b::small_batch_linear, release);
  m.def("quantized_linear", &b::quantized_linear, release);
  m.def("dequantize_blocks", &b::dequantize_blocks, release);
  m.def("dequantize_rows", &b::dequantize_rows, release);
  m.def("llama_decoder_layers", &b::llama_decoder_layers, release);
  m.def("quantized_tile_rows", &dspark::cpu::quantized_tile_rows);
#ifdef DSPARK_WITH_CUDA
  dspark::register_cuda_kernels(m);  // *_cuda entry points for CUDA tensors
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
