"""Which implementation runs an op: the fastest available for the tensors' device (triton > cuda >
reference on GPU, the C++ extension > reference on CPU), overridden per call by `backend=` or by
DSPARK_BACKEND.

The "cuda" backend (csrc/cuda) exists when dspark._C was built with CUDA (`dspark._C.with_cuda`) and
runs on CUDA tensors only. The order between the two GPU backends comes from the GPU suite on an H100
(bench/results/gpu-nvidia-h100-80gb-hbm3-2026-11-23.md): Triton is faster for tree_attention (3.3x at
the headline shape), kv_rollback (1.07-1.35x) and unfiltered sampling (1.1-1.3x), so it ranks first;
the CUDA sampler is 6.5-8.5x faster once top-k or top-p is on, so rejection_sample prefers it when the
caller's filters are known on the host (`preferred_backend`).

The Triton backend also runs on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, set
before the first Triton kernel is imported); it is then chosen only when asked for by name.
"""

from __future__ import annotations

import importlib
import importlib.util
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

cuda_extension_built = bool(getattr(cpu_extension, "with_cuda", False))
triton_installed = importlib.util.find_spec("triton") is not None
_warned_fallback = False


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _available(device: torch.device) -> list[str]:
    """Backends that can run on `device`, fastest first."""
    if device.type == "cpu":
        names = (["cpu"] if cpu_extension is not None else []) + ["reference"]
        return names + (["triton"] if triton_installed and triton_interpreted() else [])
    if device.type == "cuda":
        triton = ["triton"] if triton_installed and not triton_interpreted() else []
        return triton + (["cuda"] if cuda_extension_built else []) + ["reference"]
    return ["reference"]


def _why_unavailable(requested: str, device: torch.device) -> str:
    if requested == "cpu" and cpu_extension is None:
        return f" ({_cpu_extension_error})"
    if requested == "cuda" and device.type != "cuda":
        return " (the CUDA kernels run on CUDA tensors only)"
    if requested == "cuda" and not cuda_extension_built:
        reason = _cpu_extension_error if cpu_extension is None else "dspark._C was built without CUDA"
        return f" ({reason}; rebuild with a CUDA build of torch and nvcc, see setup.py)"
    if requested == "triton" and not triton_installed:
        return " (triton is not installed)"
    if requested == "triton" and device.type == "cpu":
        return " (Triton runs on CPU tensors only under TRITON_INTERPRET=1)"
    if requested == "triton" and triton_interpreted():
        return " (TRITON_INTERPRET=1 is set: the interpreter runs on CPU tensors only)"
    return ""


def preferred_backend(op: str, device: torch.device, filtered: bool | None = None) -> str | None:
    """A measured exception to the default order, or None: the CUDA sampler when top-k/top-p is on."""
    if (op == "rejection_sample" and filtered and device.type == "cuda" and cuda_extension_built
            and not os.environ.get("DSPARK_BACKEND")):
        return "cuda"
    return None


def check_backend_name(requested: str) -> None:
    """The name alone, for the fake (meta) implementations: a typo fails while tracing too."""
    if requested != "auto" and requested not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {requested!r}")


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
    check_backend_name(requested)
    if requested not in available:
        raise ValueError(f"backend {requested!r} cannot run on {device.type} tensors here"
                         f"{_why_unavailable(requested, device)}; available: {available}")
    return requested
