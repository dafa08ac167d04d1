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
