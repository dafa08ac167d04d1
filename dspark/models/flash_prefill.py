"""Fresh causal prefills through a library's fused attention: flash-attn on CUDA when it is installed
(`pip install dspark[flash]`), torch's scaled_dot_product_attention (its flash kernel) on CPU.

A fresh prefill (every request a chain written into an empty cache row) is plain causal attention over
each request's own tokens, which these kernels compute from the new K/V directly. Everything else
(decoding, verification, prefills over a committed prefix) goes through dspark.ops.tree_attention.
DSPARK_FLASH_PREFILL=0 turns both off.

On CPU, SDPA runs once per request, so a request's result depends on its own tokens alone; it is still
not tree_attention's arithmetic, and whether a prompt is prefilled fresh depends on what shares its step
(a continuing chunk of another prompt makes the round non-fresh). So batch-invariant prefills
(LlamaModel.batch_invariant_prefill) keep tree_attention. Measured on the 2-vCPU Xeon (bf16, SmolLM2's 9
query and 3 KV heads of 64), one layer's causal attention over 40 / 170 / 512 tokens: tree_attention
0.063 / 0.44 / 3.5 ms, SDPA 0.046 / 0.23 / 0.90 ms; SmolLM2's whole prefill of one 1,000-token prompt 605 ms
and 306 ms.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from dspark.batch import Round

# Below this, tree_attention's prefill is as fast and launches no extra library.
MIN_TOKENS = 1024
# On CPU, from a round's longest fresh prompt of this many tokens: below it one tree_attention call over every
# request costs about what the per-request calls' overhead does (SmolLM2, 8 prompts of 60 tokens: a prefill
# took 128 ms with tree_attention, 133 with SDPA; 5 of 100: 150 and 145; one of 512: 213 and 143).
CPU_MIN_TOKENS = 64


@functools.cache
def _varlen_kernel():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:  # an optional extra: without it tree_attention does the prefill
        return None
    return flash_attn_varlen_func


def applies(q: torch.Tensor, rnd: Round, batch_invariant: bool = False) -> bool:
    if rnd.fresh_prefill_len == 0 or os.environ.get("DSPARK_FLASH_PREFILL", "1") == "0":
        return False
    if q.is_cuda:
        return (rnd.fresh_prefill_len >= MIN_TOKENS and q.dtype in (torch.float16, torch.bfloat16)
                and _varlen_kernel() is not None)
    return q.device.type == "cpu" and not batch_invariant and rnd.fresh_prefill_len >= CPU_MIN_TOKENS


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rnd: Round, sm_scale: float) -> torch.Tensor:
    """Causal attention of each request's new tokens over themselves: q [T, H_q, D], k/v [T, H_kv, D]."""
    if q.is_cuda:
        return _varlen_kernel()(q, k, v, rnd.qo_indptr, rnd.qo_indptr, rnd.fresh_prefill_len,
                                rnd.fresh_prefill_len, softmax_scale=sm_scale, causal=True)
    out = torch.empty_like(q)
    bounds = rnd.qo_indptr.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:  # [1, H, n, D]: with no batch dimension torch takes its slow math path (4x here)
            heads_first = [t[start:end].transpose(0, 1)[None] for t in (q, k, v)]
            out[start:end] = F.scaled_dot_product_attention(*heads_first, is_causal=True, scale=sm_scale,
                                                            enable_gqa=True)[0].transpose(0, 1)
    return out
