"""Fixtures shared by the tests.

Without a GPU, Triton kernels run under Triton's interpreter on CPU tensors; the variable must be set
before any Triton kernel is imported, hence here. With a GPU the "triton" backend's tests run on
CUDA tensors at the same shapes (see `device_of`).
"""

import importlib
import os

import pytest
import torch

GPU = torch.cuda.is_available()
if not GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# Every backend this machine can run. The C++ one must be built and Triton installed (the dev extra
# brings it): a missing one fails its tests instead of silently testing the reference twice. The CUDA
# kernels join on a GPU machine whose dspark._C was built with CUDA (setup.py does so when torch has
# CUDA and nvcc is found).
CUDA_KERNELS = GPU and bool(getattr(importlib.import_module("dspark._C"), "with_cuda", False))
BACKENDS = ["reference", "cpu", "triton"] + (["cuda"] if CUDA_KERNELS else [])


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def device_of(backend: str) -> torch.device:
    """Where a backend's inputs live in the tests: Triton on the GPU when there is one, CUDA always."""
    if backend == "cuda":
        return torch.device("cuda")
    return torch.device("cuda" if backend == "triton" and GPU and not INTERPRETED else "cpu")


@pytest.fixture(scope="session", autouse=True)
def private_profile_cache(tmp_path_factory):
    """SPS profiles the tests measure stay in a temp dir, never in the user's ~/.cache."""
    if "DSPARK_CACHE_DIR" not in os.environ:
        os.environ["DSPARK_CACHE_DIR"] = str(tmp_path_factory.mktemp("dspark-cache"))
    yield
