"""CMakeLists.txt compiles every CUDA source (csrc/cuda/*.cu) with nvcc for sm_80 and sm_90a, without
torch and without a GPU, so a kernel that does not compile fails CI; then the host-side checks run
(Philox bit-exact with the reference, the attention plan). Skipped where nvcc is absent."""

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc")


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: the CUDA kernels cannot be compiled here")
def test_every_cuda_source_compiles_for_sm80_and_sm90a(tmp_path):
    build = tmp_path / "build"
    # One job: the machines running CI are small, and nvcc holds a lot of memory per translation unit.
    for command in (["cmake", "-S", str(ROOT), "-B", str(build), f"-DCMAKE_CUDA_COMPILER={NVCC}"],
                    ["cmake", "--build", str(build), "--target", "dspark_cuda_host_checks", "-j1"],
                    [str(build / "dspark_cuda_host_checks")]):
        result = subprocess.run(command, capture_output=True, text=True)
        assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-8000:]}\n{result.stderr[-8000:]}"
    assert (build / "libdspark_cuda_kernels.a").exists()
    sources = sorted(p.name for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
    library_objects = build / "CMakeFiles" / "dspark_cuda_kernels.dir"
    objects = sorted(p.name.removesuffix(".o") for p in library_objects.rglob("*.cu.o"))
    assert sources and objects == sources, (sources, objects)
    # Both architectures are in the library: every object's embedded ptxas options name each target.
    library = (build / "libdspark_cuda_kernels.a").read_bytes()
    for arch in (b"-arch sm_80 ", b"-arch sm_90a "):
        assert library.count(arch) == len(sources), arch
