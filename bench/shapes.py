"""Realistic shapes shared by the microbenchmarks (Llama-3-8B-like attention, 8-node drafts)."""

import torch

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
NODES = 8
REQUESTS = [1, 8, 32]
COMMITTED = [512, 4096]
VOCABS = [32_000, 128_256]
TREE = [-1, 0, 0, 1, 1, 2, 3, 4]  # 8 nodes: two branches at the anchor and at node 1

BACKENDS = ["reference", "cpu"]  # what runs on a CPU machine; GPU backends join with their issues


def indptr(num_requests: int, nodes: int = NODES) -> torch.Tensor:
    return (torch.arange(num_requests + 1) * nodes).to(torch.int32)
