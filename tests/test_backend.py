"""Backend choice: the C++ extension by default on CPU, `backend=` per call, DSPARK_BACKEND otherwise."""

import pytest
import torch

from dspark import ops


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
