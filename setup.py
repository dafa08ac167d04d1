"""Builds the C++ CPU kernels as the torch extension `dspark._C`.

`triton_kernels/` installs as `dspark.triton_kernels`, never as a top-level package (DESIGN.md).
Set DSPARK_CPU_ARCH to pass a -march value (default: native, since the extension is built on the
machine that runs it; use e.g. x86-64-v2 for a portable wheel).
"""

import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

arch = os.environ.get("DSPARK_CPU_ARCH", "native")
cxx_flags = ["-O3", "-fopenmp", "-std=c++17", "-ffp-contract=fast"]
if arch:
    cxx_flags.append(f"-march={arch}")

setup(
    packages=["dspark", "dspark.ops", "dspark.reference", "dspark.models", "dspark.drafters", "dspark.train",
              "dspark.triton_kernels"],
    package_dir={"dspark.triton_kernels": "triton_kernels"},
    ext_modules=[
        CppExtension(
            name="dspark._C",
            sources=["csrc/torch_bindings.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))],
            include_dirs=[os.path.abspath("csrc")],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
