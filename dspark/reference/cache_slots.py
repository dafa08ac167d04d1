"""Where a request's KV slots live in a contiguous or a paged cache."""

from __future__ import annotations

import torch


def slot_index(cache: torch.Tensor, r: int, slots: torch.Tensor, block_table: torch.Tensor | None):
    """Index tuple selecting request r's `slots` in the last four dims of `cache`."""
    if block_table is None:
        return (..., r, slots, slice(None), slice(None))
    block_size = cache.shape[-3]
    blocks = block_table[r].long()[slots // block_size]
    return (..., blocks, slots % block_size, slice(None), slice(None))
