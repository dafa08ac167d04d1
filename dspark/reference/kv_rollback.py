"""Reference KV rollback (DESIGN.md, op 3)."""

from __future__ import annotations

import torch

from dspark.reference.cache_slots import slot_index


def kv_rollback(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor | None,
    cache_seqlens: torch.Tensor,
    accepted_nodes: torch.Tensor,
    num_accepted: torch.Tensor,
    block_table: torch.Tensor | None = None,
) -> None:
    """In place, per request r and in order j = 0..m_r-1: slot L_r + j <- slot L_r + accepted_nodes[r, j];
    then cache_seqlens[r] += m_r. Leading dims of the caches (layers) are compacted together."""
    for r in range(cache_seqlens.numel()):
        committed, m = int(cache_seqlens[r]), int(num_accepted[r])
        for j in range(m):
            source = torch.tensor([committed + int(accepted_nodes[r, j])], device=k_cache.device)
            dest = torch.tensor([committed + j], device=k_cache.device)
            for cache in (k_cache, v_cache):
                if cache is not None:
                    cache[slot_index(cache, r, dest, block_table)] = cache[slot_index(cache, r, source, block_table)]
        cache_seqlens[r] += m
