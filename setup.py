"""Builds the C++ kernels as the torch extension `dspark._C`: the CPU kernels always, and the CUDA kernels
(csrc/cuda) too when torch was built with CUDA and nvcc is found (CUDA_HOME); the build machine needs
no GPU. DSPARK_CUDA=0 forces the CPU-only extension, DSPARK_CUDA=1 makes a missing toolkit an error.

`triton_kernels/` installs as `dspark.triton_kernels`, never as a top-level package (DESIGN.md).
Set DSPARK_CPU_ARCH to pass a -march value (default: native, since the extension is built on the
machine that runs it; use e.g. x86-64-v2 for a portable wheel).
"""

import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

arch = os.environ.get("DSPARK_CPU_ARCH", "native")
cxx_flags = ["-O3", "-fopenmp", "-std=c++17", "-ffp-contract=fast"]
if arch:
    cxx_flags.append(f"-march={arch}")

# The architectures CMakeLists.txt compile-checks (sm_80, sm_90a), plus compute_80 PTX so that newer
# GPUs can JIT the kernels. Explicit -gencode flags also stop torch from adding its own arch list.
# DSPARK_CUDA_ARCHS=90a (say) builds for the named architectures only: a quicker build for one machine.
DEFAULT_GENCODE = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a",
                   "-gencode=arch=compute_80,code=compute_80"]
ARCHS = os.environ.get("DSPARK_CUDA_ARCHS", "").split(",")
GENCODE = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS if a] or DEFAULT_GENCODE
NVCC_FLAGS = ["-O3", "-std=c++17", "-lineinfo", *GENCODE]


def build_cuda() -> bool:
    wanted = os.environ.get("DSPARK_CUDA", "auto")
    possible = torch.version.cuda is not None and CUDA_HOME is not None
    if wanted == "1" and not possible:
        raise RuntimeError(f"DSPARK_CUDA=1 needs a CUDA build of torch (torch.version.cuda = {torch.version.cuda}) "
                           f"and the CUDA toolkit (CUDA_HOME = {CUDA_HOME})")
    return wanted != "0" and possible


sources = ["csrc/torch_bindings.cpp", "csrc/op_bindings.cpp", "csrc/decoder_bindings.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
common = dict(name="dspark._C", include_dirs=[os.path.abspath("csrc")], extra_link_args=["-fopenmp"])
if build_cuda():
    extension = CUDAExtension(
        sources=sources + ["csrc/cuda/torch_cuda_bindings.cpp", *sorted(glob.glob("csrc/cuda/*.cu"))],
        define_macros=[("DSPARK_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": NVCC_FLAGS},
        **common,
    )
else:
    extension = CppExtension(sources=sources, extra_compile_args={"cxx": cxx_flags}, **common)

setup(
    packages=["dspark", "dspark.cli", "dspark.serve", "dspark.ops", "dspark.reference", "dspark.models", "dspark.drafters",
              "dspark.train", "dspark.triton_kernels"],
    package_dir={"dspark.triton_kernels": "triton_kernels"},
    # Trained drafters shipped for the default target (config.json, model.safetensors, draft_vocab.json).
    package_data={"dspark": ["py.typed"], "dspark.drafters": ["pretrained/*/*.json", "pretrained/*/*.safetensors"]},
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension},
)
