"""Peers timed beside dspark by bench/gpu_suite.py, each at the same case and on the same inputs.

Every optional library is imported inside its runner's set-up: a missing one raises Unavailable and
shows as "unavailable" in the report, never as a crash. torch SDPA (an explicit mask over the gathered
prefix) and plain-torch baselines are always there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dspark.tree import ancestor_mask, depths
from gpu_cases import AttnInputs, RollbackInputs, Runner, SampleInputs, Unavailable


def _gather(cache: torch.Tensor, x: AttnInputs, slots: int) -> torch.Tensor:
    """[R, slots, H, D]: a view of a contiguous cache, a gather (part of the peer's cost) of a paged one."""
    if x.block_table is None:
        return cache[:, :slots]
    return cache[x.block_table.long()].flatten(1, 2)[:, :slots]


def _sdpa(x: AttnInputs):
    """torch SDPA over the gathered prefix with an explicit [prefix | ancestors] mask. Queries are grouped
    per KV head ([R, H_kv, G*n, D]) so K/V are never repeated for GQA."""
    R, n, L = x.cache_seqlens.numel(), len(x.parent_list), x.committed
    heads, dim = x.q.shape[1:]
    kv_heads = x.k_cache.shape[-2]
    group = heads // kv_heads
    mask = torch.ones(n, L + n, dtype=torch.bool, device=x.q.device)
    mask[:, L:] = ancestor_mask(x.parent_list).to(x.q.device)
    mask = mask.repeat(group, 1)  # rows follow the (group, node) order of the grouped queries

    def call():
        k = _gather(x.k_cache, x, L + n).transpose(1, 2)
        v = _gather(x.v_cache, x, L + n).transpose(1, 2)
        q = x.q.view(R, n, kv_heads, group, dim).permute(0, 2, 3, 1, 4).reshape(R, kv_heads, group * n, dim)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.view(R, kv_heads, group, n, dim).permute(0, 3, 1, 2, 4).reshape(R * n, heads, dim)

    return call


def _is_chain(x: AttnInputs) -> bool:
    return x.parent_list == list(range(-1, len(x.parent_list) - 1))


def _flash_with_kvcache(x: AttnInputs, module: str):
    """flash_attn_with_kvcache (flash-attn, or vLLM's fork): causal over cache_seqlens = L + n verifies a chain."""
    try:
        if module == "vllm":
            from vllm.vllm_flash_attn import flash_attn_with_kvcache
        else:
            from flash_attn import flash_attn_with_kvcache
    except Exception as error:  # ImportError, or a broken install raising anything at import
        raise Unavailable(f"{module}: {type(error).__name__}: {error}") from None
    if not _is_chain(x):
        raise Unavailable("flash_attn_with_kvcache has no tree mask (chains only)")
    if module != "vllm" and x.block_size is not None and x.block_size % 256:
        raise Unavailable("flash-attn's paged KV needs a block size divisible by 256")
    R, n = x.cache_seqlens.numel(), len(x.parent_list)
    heads, dim = x.q.shape[1:]
    total = (x.cache_seqlens + n).to(torch.int32)  # the round's K/V are already in the cache
    return lambda: flash_attn_with_kvcache(x.q.view(R, n, heads, dim), x.k_cache, x.v_cache, cache_seqlens=total,
                                           block_table=x.block_table, causal=True).view(R * n, heads, dim)


def _flashinfer(x: AttnInputs):
    """FlashInfer's batch prefill over a paged cache with a custom (tree) mask, or causal for a chain. A
    contiguous cache is R pages of S_max slots."""
    try:
        import flashinfer
    except Exception as error:
        raise Unavailable(f"flashinfer: {type(error).__name__}: {error}") from None
    device = x.q.device
    R, n, L = x.cache_seqlens.numel(), len(x.parent_list), x.committed
    heads, dim = x.q.shape[1:]
    kv_heads, slots = x.k_cache.shape[-2], L + n
    if x.block_table is None:
        page, indices, per = x.k_cache.shape[1], torch.arange(R, dtype=torch.int32, device=device), 1
    else:
        page, per = x.block_size, x.block_table.shape[1]
        indices = x.block_table.flatten().contiguous()
    kv_indptr = (torch.arange(R + 1, device=device) * per).to(torch.int32)
    last = torch.full((R,), slots - (per - 1) * page, dtype=torch.int32, device=device)
    workspace = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD")
    args = (x.qo_indptr, kv_indptr, indices, last, heads, kv_heads, dim, page)
    extra = {"causal": True} if _is_chain(x) else {}
    if not _is_chain(x):
        mask = torch.ones(n, slots, dtype=torch.bool, device=device)
        mask[:, L:] = ancestor_mask(x.parent_list).to(device)
        extra["custom_mask"] = mask.flatten().repeat(R)
    plan = getattr(wrapper, "plan", None) or wrapper.begin_forward
    plan(*args, q_data_type=x.q.dtype, **extra)
    run = getattr(wrapper, "run", None) or wrapper.forward
    return lambda: run(x.q, (x.k_cache, x.v_cache))


def attention_peers() -> list[Runner]:
    return [Runner("torch-sdpa", _sdpa), Runner("flashinfer", _flashinfer),
            Runner("flash-attn", lambda x: _flash_with_kvcache(x, "flash_attn")),
            Runner("vllm-flash-attn", lambda x: _flash_with_kvcache(x, "vllm"))]


def _torch_greedy(x: SampleInputs):
    """Greedy tree verification in plain torch: argmax per node, accept a node when its token is its
    parent's argmax and its parent was accepted; the path length is the deepest accepted depth + 1."""
    if x.kwargs.get("temperature") != 0.0:
        raise Unavailable("a greedy baseline (temperature 0 only)")
    device, n = x.logits.device, x.nodes
    R = x.qo_indptr.numel() - 1
    base = torch.arange(R, device=device)[:, None] * n
    parent_rows = (base + torch.tensor(x.parent_list, device=device).clamp_min(0)).flatten()
    root = (torch.arange(R * n, device=device) % n) == 0
    depth = torch.tensor(depths(x.parent_list), device=device).repeat(R)
    steps = max(depths(x.parent_list))

    def call():
        ok = (x.tokens == x.logits.argmax(-1)[parent_rows]) | root
        accepted = ok
        for _ in range(steps):
            accepted = ok & accepted[parent_rows]
        return None, (torch.where(accepted, depth, -1).view(R, n).amax(1) + 1).to(torch.int32)

    return call


def _flashinfer_chain_sampling(x: SampleInputs):
    """FlashInfer's chain_speculative_sampling after a softmax of the target logits (which it needs) and,
    with top-k/top-p, its renormalising filters (top-k, then top-p on the renormalised top-k, as ours)."""
    try:
        import flashinfer.sampling
    except Exception as error:
        raise Unavailable(f"flashinfer: {type(error).__name__}: {error}") from None
    if x.parents is not None or x.draft_probs is None or set(x.kwargs) - {"top_k", "top_p"}:
        raise Unavailable("sampled chains only")
    R, n, V = x.qo_indptr.numel() - 1, x.nodes, x.logits.shape[1]
    draft_ids = x.tokens.view(R, n)[:, 1:].to(torch.int32).contiguous()
    draft_probs = x.draft_probs.view(R, n, V)[:, :-1].contiguous()  # node i's token came from row i - 1
    top_k, top_p = x.kwargs.get("top_k"), x.kwargs.get("top_p")

    def call():
        target = torch.softmax(x.logits, -1)
        if top_k is not None:
            target = flashinfer.sampling.top_k_renorm_probs(target, top_k)
        if top_p is not None:
            target = flashinfer.sampling.top_p_renorm_probs(target, top_p)
        return flashinfer.sampling.chain_speculative_sampling(draft_probs, draft_ids, target.view(R, n, V))

    return call


def sampling_peers() -> list[Runner]:
    return [Runner("torch-greedy", _torch_greedy),
            Runner("flashinfer", _flashinfer_chain_sampling, checked=False)]


def _torch_rollback(x: RollbackInputs):
    """Advanced indexing: gather every path slot (the right side is a copy, so overlaps are safe), scatter
    it to L + j. Slots past m_r copy onto themselves, which keeps the index shapes static."""
    device = x.k_cache.device
    R, width = x.accepted.shape
    j = torch.arange(width, device=device)
    node = torch.where(j[None] < x.counts[:, None], x.accepted, j[None]).long()
    rows = torch.arange(R, device=device)[:, None].expand(R, width)
    table = None if x.block_table is None else x.block_table.long()

    def call():
        x.cache_seqlens.copy_(x.base)
        committed = x.cache_seqlens.long()[:, None]
        src, dst = committed + node, committed + j
        for cache in (x.k_cache, x.v_cache):
            if table is None:
                cache[:, rows, dst] = cache[:, rows, src]
            else:
                bs = x.block_size
                cache[:, table[rows, dst // bs], dst % bs] = cache[:, table[rows, src // bs], src % bs]
        x.cache_seqlens.add_(x.counts)

    return call


def rollback_peers() -> list[Runner]:
    return [Runner("torch-index", _torch_rollback)]
