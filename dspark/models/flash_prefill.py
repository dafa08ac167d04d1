"""Prefills through a library's fused attention: flash-attn on CUDA for fresh prompts when it is installed
(`pip install dspark[flash]`), torch's scaled_dot_product_attention (its flash kernel) on CPU for prompts
fresh or over their cached prefix. Everything else (decoding, verification, short or batch-invariant
prefills, paged caches on CPU) goes through dspark.ops.tree_attention. DSPARK_FLASH_PREFILL=0 turns both off.

On CUDA a fresh prefill (every request a chain written into an empty cache row) is plain causal attention
over each request's own tokens, which flash-attn's varlen kernel computes from the new K/V directly.

On CPU, SDPA runs once per request over its cache row (the prompt's committed prefix, then the K/V the layer
just wrote), with the causal diagonal moved right by the prefix. A request's result depends on its own
tokens alone, but it is not tree_attention's arithmetic, and whether a prompt's round takes this path
depends on what shares it; so batch-invariant prefills (LlamaModel.batch_invariant_prefill) keep
tree_attention. Measured on the 2-vCPU Xeon (bf16, SmolLM2's 9 query and 3 KV heads of 64), one layer's
causal attention over 40 / 170 / 512 fresh tokens: tree_attention 0.063 / 0.44 / 3.5 ms, SDPA 0.046 / 0.23 /
0.90 ms; 512 tokens over a 1,536-token prefix: 20.7 and 4.1 ms.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from dspark.batch import Round

# Below this, tree_attention's prefill is as fast and launches no extra library.
MIN_TOKENS = 1024
# On CPU, from a round whose longest request has this many tokens: below it one tree_attention call over every
# request costs about what the per-request calls' overhead does (SmolLM2, 8 prompts of 60 tokens: a prefill
# took 128 ms with tree_attention, 133 with SDPA; 5 of 100: 150 and 145; one of 512: 213 and 143).
CPU_MIN_TOKENS = 64


def enabled() -> bool:
    return os.environ.get("DSPARK_FLASH_PREFILL", "1") != "0"


@functools.cache
def _varlen_kernel():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:  # an optional extra: without it tree_attention does the prefill
        return None
    return flash_attn_varlen_func


def applies(q: torch.Tensor, rnd: Round) -> bool:
    """CUDA: whether flash-attn takes this fresh prefill."""
    return (rnd.fresh_prefill_len >= MIN_TOKENS and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and enabled() and _varlen_kernel() is not None)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rnd: Round, sm_scale: float) -> torch.Tensor:
    """CUDA: causal attention of each request's new tokens over themselves: q [T, H_q, D], k/v [T, H_kv, D]."""
    return _varlen_kernel()(q, k, v, rnd.qo_indptr, rnd.qo_indptr, rnd.fresh_prefill_len, rnd.fresh_prefill_len,
                            softmax_scale=sm_scale, causal=True)


class CPUPrefill:
    """A CPU prefill round's attention by SDPA, planned once per forward (the host reads its bounds and
    prefix lengths, and the masks are built, once for every layer)."""

    def __init__(self, rnd: Round, committed: list[int], sm_scale: float):
        bounds = rnd.qo_indptr.tolist()
        self.sm_scale = sm_scale
        self.requests = []  # (cache row, first token, end, prefix length, mask or None for a fresh prompt)
        for row, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
            if end > start:
                n, prefix = end - start, committed[row]
                mask = torch.ones(n, prefix + n, dtype=torch.bool).tril(prefix) if prefix else None
                self.requests.append((row, start, end, prefix, mask))

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """q [T, H_q, D]; k_cache / v_cache one layer's contiguous cache [rows, S, H_kv, D], the round's K/V
        already written."""
        out = torch.empty_like(q)
        for row, start, end, prefix, mask in self.requests:
            # [1, H, n, D]: with no batch dimension torch takes its slow math path (4x here)
            keys, values = (c[row, : prefix + end - start].transpose(0, 1)[None] for c in (k_cache, v_cache))
            out[start:end] = F.scaled_dot_product_attention(
                q[start:end].transpose(0, 1)[None], keys, values, attn_mask=mask, is_causal=mask is None,
                scale=self.sm_scale, enable_gqa=True)[0].transpose(0, 1)
        return out


def plan_cpu(rnd: Round, cache, dtype: torch.dtype, sm_scale: float, batch_invariant: bool) -> CPUPrefill | None:
    """The SDPA plan of a CPU prefill round (fresh prompts or later chunks over their prefix) whose longest
    request has CPU_MIN_TOKENS tokens or more, in a contiguous cache of the compute dtype; else None."""
    if not (rnd.prefill and not batch_invariant and enabled() and cache.block_table is None
            and cache.k.device.type == "cpu" and cache.k.dtype == dtype and rnd.parents is None):
        return None
    counts = rnd.qo_indptr.diff()
    if int(counts.max()) < CPU_MIN_TOKENS:
        return None
    return CPUPrefill(rnd, cache.seqlens.tolist(), sm_scale)
