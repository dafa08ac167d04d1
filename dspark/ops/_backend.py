"""Which implementation runs an op: the fastest available for the tensors' device (cuda > triton on
GPU, the C++ extension > reference on CPU), overridden per call by `backend=` or by DSPARK_BACKEND."""

from __future__ import annotations

import importlib
import os
import warnings

import torch

BACKENDS = ("reference", "cpu", "triton", "cuda")

try:
    cpu_extension = importlib.import_module("dspark._C")

    _cpu_extension_error = None
except ImportError as error:  # a source checkout without a build: only the reference can run
    cpu_extension = None
    _cpu_extension_error = error

_warned_fallback = False


def _available(device: torch.device) -> list[str]:
    """Backends that can run on `device`, fastest first. Triton and CUDA kernels are not built yet."""
    if device.type == "cpu":
        return (["cpu"] if cpu_extension is not None else []) + ["reference"]
    return ["reference"]


def choose_backend(requested: str | None, device: torch.device) -> str:
    requested = requested or os.environ.get("DSPARK_BACKEND") or "auto"
    available = _available(device)
    if requested == "auto":
        if device.type == "cpu" and cpu_extension is None:
            global _warned_fallback
            if not _warned_fallback:
                warnings.warn(f"dspark._C is not built ({_cpu_extension_error}); using the slow reference backend")
                _warned_fallback = True
        return available[0]
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {requested!r}")
    if requested not in available:
        why = f" ({_cpu_extension_error})" if requested == "cpu" and cpu_extension is None else ""
        raise ValueError(f"backend {requested!r} cannot run on {device.type} tensors here{why}; available: {available}")
    return requested
