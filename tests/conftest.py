"""Fixtures shared by the tests.

Without a GPU, Triton kernels run under Triton's interpreter on CPU tensors; the variable must be set
before any Triton kernel is imported, hence here. With a GPU the "triton" backend's tests run on
CUDA tensors at the same shapes (see `device_of`).
"""

import os

import pytest
import torch

GPU = torch.cuda.is_available()
if not GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# Every backend this machine can run. The C++ one must be built and Triton installed (the dev extra
# brings it): a missing one fails its tests instead of silently testing the reference twice.
BACKENDS = ["reference", "cpu", "triton"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def device_of(backend: str) -> torch.device:
    """Where a backend's inputs live in the tests: Triton on the GPU when there is one."""
    return torch.device("cuda" if backend == "triton" and GPU and not INTERPRETED else "cpu")
