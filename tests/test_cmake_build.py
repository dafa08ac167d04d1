"""CMakeLists.txt builds the framework-free CPU kernels as a library, and its C++ smoke test passes."""

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_builds_the_cpu_kernels_and_the_smoke_test_passes(tmp_path):
    build = tmp_path / "build"
    # The CUDA kernels compile in tests/test_cuda_compile.py; building them here too would double the time.
    for command in (["cmake", "-S", str(ROOT), "-B", str(build), "-DDSPARK_CUDA=OFF"],
                    ["cmake", "--build", str(build), "-j2"],
                    ["ctest", "--test-dir", str(build), "--output-on-failure"]):
        result = subprocess.run(command, capture_output=True, text=True)
        assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
    assert (build / "libdspark_cpu_kernels.a").exists()
