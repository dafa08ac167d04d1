"""kv_rollback: compact 4 stacked layers of K and V to a 4-node accepted path per request."""

import pytest
import torch

from dspark import ops
from shapes import BACKENDS, COMMITTED, HEAD_DIM, KV_HEADS, NODES, REQUESTS

LAYERS = 4
GPU = torch.cuda.is_available()
# Triton is timed on the GPU only: on CPU its interpreter would measure Python, not the kernel.
TRITON = pytest.param("triton", marks=pytest.mark.skipif(not GPU, reason="Triton is timed on a CUDA GPU"))


@pytest.mark.parametrize("backend", BACKENDS + [TRITON])
@pytest.mark.parametrize("committed", COMMITTED)
@pytest.mark.parametrize("num_requests", REQUESTS)
def test_kv_rollback(benchmark, backend, committed, num_requests):
    device = "cuda" if backend == "triton" else "cpu"
    shape = (LAYERS, num_requests, committed + NODES, KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape).to(torch.bfloat16).to(device)
    v_cache = torch.randn(shape).to(torch.bfloat16).to(device)
    path = torch.tensor([[0, 2, 3, 6] + [-1] * (NODES - 4)] * num_requests, dtype=torch.int32, device=device)
    count = torch.full((num_requests,), 4, dtype=torch.int32, device=device)
    seqlens = torch.full((num_requests,), committed, dtype=torch.int32, device=device)

    def rollback():
        seqlens.fill_(committed)  # every round starts from the same committed length
        ops.kv_rollback(k_cache, v_cache, seqlens, path, count, backend=backend)
        if device == "cuda":  # the host clock must wait for the kernel (bench/gpu_suite.py uses CUDA events)
            torch.cuda.synchronize()

    benchmark.extra_info.update(op="kv_rollback", backend=backend, R=num_requests, L=committed, layers=LAYERS)
    benchmark.pedantic(rollback, rounds=10, warmup_rounds=1)
