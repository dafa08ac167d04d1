"""Weight dtypes by name, the fastest one for decoding on this machine, and whether a GGUF file's
quantized matrices stay in their blocks."""

from __future__ import annotations

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def compute_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype matrix products run in: autocast's when it is on for this device type, else `dtype`."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else dtype


def default_dtype(device: str) -> torch.dtype:
    """bf16 on accelerators. On CPUs, time a verification-sized matmul through the model's own linear
    layer in both and take the faster. Its weight (32,768 x 576) outgrows the caches as a model's do, so
    the timing sees what decoding sees, memory streaming: with dspark._C's small-batch kernel bf16 wins
    on AVX2 too (half the bytes), while F.linear runs bf16 GEMMs of a few rows up to 5x slower than fp32
    on AVX2-only machines."""
    if device != "cpu":
        return torch.bfloat16
    import time

    from dspark.models.linear import linear

    best, best_time = torch.float32, float("inf")
    for dtype in (torch.float32, torch.bfloat16):
        x, w = torch.randn(8, 576).to(dtype), torch.randn(32768, 576).to(dtype)
        linear(x, w)
        start = time.perf_counter()
        for _ in range(5):
            linear(x, w)
        elapsed = time.perf_counter() - start
        if elapsed < best_time:
            best, best_time = dtype, elapsed
    return best


WEIGHTS = ("native", "bf16", "fp16", "fp32")


def resolve_weights(weights: str | None, dtype_name: str | None, path: str | None, device: str) -> tuple[torch.dtype, bool]:
    """(compute dtype, native) from the CLI's --weights and --dtype. native keeps a GGUF file's Q4_0 / Q4_1
    / Q8_0 matrices as blocks, computing in --dtype (default bf16); the default for GGUF files on a
    CPU (the default model is one). bf16 / fp16 / fp32 dequantise every matrix to that dtype."""
    if weights is not None and weights not in WEIGHTS:
        raise ValueError(f"--weights must be one of {WEIGHTS}, got {weights!r}")
    gguf = path is None or path.endswith(".gguf")
    if weights is None:
        weights = "native" if gguf and device == "cpu" else None
    if weights == "native":
        if not gguf:
            raise ValueError("--weights native needs a GGUF file (a Hugging Face folder loads dense)")
        if device != "cpu":
            raise ValueError(f"--weights native runs on the CPU only, not on {device}")
        return DTYPES[dtype_name or "bf16"], True
    if weights is not None:
        if dtype_name is not None and dtype_name != weights:
            raise ValueError(f"--weights {weights} and --dtype {dtype_name} disagree")
        return DTYPES[weights], False
    return (DTYPES[dtype_name] if dtype_name else default_dtype(device)), False
