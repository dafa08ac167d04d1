"""Weight dtypes by name, and the fastest one for decoding on this machine."""

from __future__ import annotations

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


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
