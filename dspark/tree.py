"""Draft trees in the flattened layout of DESIGN.md: per-request local `parents`, located by `qo_indptr`.

Node 0 of each request is its anchor (parent -1); every other node's parent has a smaller index.
`parents=None` means a chain. These helpers turn parents into depths, positions and ancestor masks.
"""

from __future__ import annotations

import torch


def request_parents(parents: torch.Tensor | None, qo_indptr: torch.Tensor, r: int) -> list[int]:
    """The local parent list of request r (a chain when parents is None)."""
    start, end = int(qo_indptr[r]), int(qo_indptr[r + 1])
    if parents is None:
        return list(range(-1, end - start - 1))
    return [int(p) for p in parents[start:end]]


def depths(parents: list[int]) -> list[int]:
    """Depth of each node of one request (node 0 has depth 0)."""
    depth = [0] * len(parents)
    for i in range(1, len(parents)):
        depth[i] = depth[parents[i]] + 1
    return depth


def ancestor_mask(parents: list[int]) -> torch.Tensor:
    """[n, n] bool: mask[i, j] is True when node j is node i or one of its ancestors."""
    n = len(parents)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        mask[i, i] = True
        if i > 0:
            mask[i] |= mask[parents[i]]
    return mask


def children(parents: list[int]) -> list[list[int]]:
    """children[u]: the children of node u in index order."""
    kids: list[list[int]] = [[] for _ in parents]
    for i in range(1, len(parents)):
        kids[parents[i]].append(i)
    return kids


def positions(parents: torch.Tensor | None, qo_indptr: torch.Tensor, cache_seqlens: torch.Tensor) -> torch.Tensor:
    """RoPE position of every round token: cache_seqlens[r] + depth(i)."""
    out = []
    for r in range(qo_indptr.numel() - 1):
        base = int(cache_seqlens[r])
        out.extend(base + d for d in depths(request_parents(parents, qo_indptr, r)))
    return torch.tensor(out, dtype=torch.int64, device=qo_indptr.device)
