"""Long causal prefills on CUDA through flash-attn, when it is installed (`pip install dspark[flash]`).

A fresh prefill (every request a chain written into an empty cache row) is plain causal attention over
the round's own tokens, which flash-attn's varlen kernel computes from the new K/V directly. Everything
else (decoding, verification, prefills over a committed prefix) goes through dspark.ops.tree_attention.
DSPARK_FLASH_PREFILL=0 turns it off.
"""

from __future__ import annotations

import functools
import os

import torch

from dspark.batch import Round

# Below this, tree_attention's prefill is as fast and launches no extra library.
MIN_TOKENS = 1024


@functools.cache
def _varlen_kernel():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:  # an optional extra: without it tree_attention does the prefill
        return None
    return flash_attn_varlen_func


def applies(q: torch.Tensor, rnd: Round) -> bool:
    return (rnd.fresh_prefill_len >= MIN_TOKENS and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and os.environ.get("DSPARK_FLASH_PREFILL", "1") != "0" and _varlen_kernel() is not None)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rnd: Round, sm_scale: float) -> torch.Tensor:
    """Causal attention of each request's new tokens over themselves: q [T, H_q, D], k/v [T, H_kv, D]."""
    return _varlen_kernel()(q, k, v, rnd.qo_indptr, rnd.qo_indptr, rnd.fresh_prefill_len, rnd.fresh_prefill_len,
                            softmax_scale=sm_scale, causal=True)
