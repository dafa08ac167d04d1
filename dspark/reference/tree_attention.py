"""Reference tree attention (DESIGN.md, op 1)."""

from __future__ import annotations

import math

import torch

from dspark import tree
from dspark.reference.cache_slots import slot_index


def tree_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    qo_indptr: torch.Tensor,
    cache_seqlens: torch.Tensor,
    parents: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    sm_scale: float | None = None,
) -> torch.Tensor:
    """Token i of request r attends to committed slots [0, L_r) and to the round slots L_r + j of
    its ancestors-or-self j. Softmax in at least fp32; output in q's dtype."""
    compute = torch.promote_types(q.dtype, torch.float32)
    head_dim = q.shape[-1]
    group = q.shape[1] // k_cache.shape[-2]
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    out = torch.empty_like(q)
    for r in range(qo_indptr.numel() - 1):
        start, end = int(qo_indptr[r]), int(qo_indptr[r + 1])
        if end == start:
            continue
        n, committed = end - start, int(cache_seqlens[r])
        slots = torch.arange(committed + n, device=q.device)
        keys = k_cache[slot_index(k_cache, r, slots, block_table)].to(compute)  # [L + n, H_kv, D]
        values = v_cache[slot_index(v_cache, r, slots, block_table)].to(compute)
        keys = keys.repeat_interleave(group, dim=1)  # one K/V head serves `group` query heads
        values = values.repeat_interleave(group, dim=1)
        visible = torch.ones(n, committed + n, dtype=torch.bool, device=q.device)
        visible[:, committed:] = tree.ancestor_mask(tree.request_parents(parents, qo_indptr, r)).to(q.device)
        scores = torch.einsum("ihd,jhd->hij", q[start:end].to(compute), keys) * scale
        scores = scores.masked_fill(~visible, float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        out[start:end] = torch.einsum("hij,jhd->ihd", weights, values).to(q.dtype)
    return out
