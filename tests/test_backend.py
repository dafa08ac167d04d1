"""Backend choice: the C++ extension by default on CPU, `backend=` per call, DSPARK_BACKEND otherwise."""

import pytest
import torch

from dspark import ops
from dspark.ops import _backend


def test_cpu_extension_is_built_and_chosen_by_default(monkeypatch):
    monkeypatch.delenv("DSPARK_BACKEND", raising=False)
    assert ops.choose_backend(None, torch.device("cpu")) == "cpu"


def test_environment_variable_selects_the_backend(monkeypatch):
    monkeypatch.setenv("DSPARK_BACKEND", "reference")
    assert ops.choose_backend(None, torch.device("cpu")) == "reference"
    assert ops.choose_backend("cpu", torch.device("cpu")) == "cpu"  # the call's argument wins


def test_unavailable_backend_is_an_error_not_a_fallback(monkeypatch):
    monkeypatch.setenv("DSPARK_BACKEND", "cuda")
    with pytest.raises(ValueError, match="backend 'cuda' cannot run on cpu"):
        ops.kv_rollback(torch.zeros(1, 4, 1, 2), None, torch.zeros(1, dtype=torch.int32),
                        torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32))
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.choose_backend("fastest", torch.device("cpu"))


def test_cuda_backend_refuses_cpu_tensors_with_the_reason():
    with pytest.raises(ValueError, match=r"backend 'cuda' cannot run on cpu tensors.*CUDA tensors only"):
        ops.choose_backend("cuda", torch.device("cpu"))
    with pytest.raises(ValueError, match="CUDA tensors only"):
        ops.tree_attention(torch.zeros(1, 1, 8), torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 1, 8),
                           torch.tensor([0, 1], dtype=torch.int32), torch.zeros(1, dtype=torch.int32), backend="cuda")


def test_cuda_backend_without_a_cuda_build_names_the_reason(monkeypatch):
    # torch.device("cuda") needs no GPU: the choice is made from the device type and the build.
    monkeypatch.setattr(_backend, "cuda_extension_built", False)
    with pytest.raises(ValueError, match="backend 'cuda' cannot run on cuda tensors.*built without CUDA"):
        ops.choose_backend("cuda", torch.device("cuda"))


def test_cuda_build_joins_after_triton_on_cuda_tensors(monkeypatch):
    # Triton first until the GPU suite has timed both (dspark/ops/_backend.py).
    monkeypatch.delenv("DSPARK_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "cuda_extension_built", True)
    monkeypatch.setattr(_backend, "triton_installed", True)
    monkeypatch.setattr(_backend, "triton_interpreted", lambda: False)
    cuda = torch.device("cuda")
    assert _backend._available(cuda) == ["triton", "cuda", "reference"]
    assert ops.choose_backend(None, cuda) == "triton" and ops.choose_backend("cuda", cuda) == "cuda"
    monkeypatch.setattr(_backend, "triton_installed", False)
    assert ops.choose_backend(None, cuda) == "cuda"


def test_sampling_prefers_the_cuda_kernel_only_when_filters_are_on_and_known(monkeypatch):
    # Measured on an H100: the CUDA sampler is 6.5-8.5x faster with top-k/top-p, Triton faster without.
    from dspark.ops.rejection_sample import _filters_on

    monkeypatch.delenv("DSPARK_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "cuda_extension_built", True)
    gpu = torch.device("cuda")
    assert _backend.preferred_backend("rejection_sample", gpu, filtered=True) == "cuda"
    assert _backend.preferred_backend("rejection_sample", gpu, filtered=False) is None
    assert _backend.preferred_backend("rejection_sample", gpu, filtered=None) is None  # unknown: default order
    assert _backend.preferred_backend("tree_attention", gpu, filtered=True) is None
    assert _backend.preferred_backend("rejection_sample", torch.device("cpu"), filtered=True) is None
    monkeypatch.setenv("DSPARK_BACKEND", "triton")  # the user's choice wins
    assert _backend.preferred_backend("rejection_sample", gpu, filtered=True) is None
    monkeypatch.setattr(_backend, "cuda_extension_built", False)
    monkeypatch.delenv("DSPARK_BACKEND")
    assert _backend.preferred_backend("rejection_sample", gpu, filtered=True) is None
    assert _filters_on(None, None) is False and _filters_on(0, 1.0) is False
    assert _filters_on(5, None) is True and _filters_on(None, 0.9) is True
    assert _filters_on(torch.tensor([0, 3], dtype=torch.int32), torch.ones(2)) is True
    assert _filters_on(torch.zeros(2, dtype=torch.int32), torch.ones(2)) is False
