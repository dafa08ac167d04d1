"""tree_attention: R requests verify an 8-node tree over L committed tokens (32 q heads, 8 KV heads, D 128)."""

import pytest
import torch

from dspark import ops
from shapes import BACKENDS, COMMITTED, HEAD_DIM, HEADS, KV_HEADS, NODES, REQUESTS, TREE, indptr


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("committed", COMMITTED)
@pytest.mark.parametrize("num_requests", REQUESTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_tree_attention(benchmark, backend, committed, num_requests, dtype):
    gen = torch.Generator().manual_seed(0)
    cache_shape = (num_requests, committed + NODES, KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(cache_shape, generator=gen).to(dtype)
    v_cache = torch.randn(cache_shape, generator=gen).to(dtype)
    q = torch.randn(num_requests * NODES, HEADS, HEAD_DIM, generator=gen).to(dtype)
    parents = torch.tensor(TREE * num_requests, dtype=torch.int32)
    seqlens = torch.full((num_requests,), committed, dtype=torch.int32)
    qo_indptr = indptr(num_requests)
    benchmark.extra_info.update(op="tree_attention", backend=backend, R=num_requests, L=committed,
                                dtype=str(dtype).removeprefix("torch."))
    benchmark.pedantic(ops.tree_attention, args=(q, k_cache, v_cache, qo_indptr, seqlens, parents),
                       kwargs=dict(backend=backend), rounds=5, warmup_rounds=1)
