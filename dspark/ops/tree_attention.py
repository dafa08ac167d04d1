"""tree_attention: the target verifies every request's draft chain or tree in one pass (DESIGN.md, op 1).

Registered as `torch.ops.dspark.tree_attention`; `dspark.ops.tree_attention` is the friendly wrapper.
"""

from __future__ import annotations

import math

import torch

from dspark.reference.tree_attention import tree_attention as reference_tree_attention
from dspark.ops import _validation as v
from dspark.ops._backend import check_backend_name, choose_backend, cpu_extension


def _check_shapes(q, k_cache, v_cache, qo_indptr, cache_seqlens, parents, block_table) -> None:
    v.check_tensor("q", q, dtypes=v.FLOAT_DTYPES, ndim=3)
    device = q.device
    v.check_tensor("k_cache", k_cache, dtypes=(q.dtype,), ndim=4, device=device)
    v.check_tensor("v_cache", v_cache, dtypes=(q.dtype,), ndim=4, shape=tuple(k_cache.shape), device=device)
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        v.fail(f"k_cache head_dim must equal q's {head_dim}, got shape {tuple(k_cache.shape)}")
    if num_q_heads == 0 or head_dim == 0:
        v.fail(f"q must have at least one head and head_dim >= 1, got shape {tuple(q.shape)}")
    if num_kv_heads == 0 or num_q_heads % num_kv_heads:
        v.fail(f"q's {num_q_heads} heads must be a multiple of the cache's {num_kv_heads} KV heads")
    v.check_qo_indptr(qo_indptr, num_tokens, device)
    num_requests = qo_indptr.shape[0] - 1
    v.check_tensor("cache_seqlens", cache_seqlens, dtypes=(torch.int32,), ndim=1, shape=(num_requests,), device=device)
    v.check_parents(parents, qo_indptr, num_tokens, device)
    v.check_block_table(block_table, num_requests, device)
    if block_table is None and k_cache.shape[0] != num_requests:
        v.fail(f"contiguous k_cache must have one row per request ({num_requests}), got shape {tuple(k_cache.shape)}")


def _check_values(q, k_cache, qo_indptr, cache_seqlens, block_table) -> None:
    if not v.values_checked(q):
        return
    committed = cache_seqlens.tolist()
    if min(committed) < 0:
        v.fail(f"cache_seqlens must be >= 0, got {min(committed)}")
    offsets = qo_indptr.tolist()
    needed = [c + (b - a) for c, a, b in zip(committed, offsets, offsets[1:])]
    v.check_cache_capacity("k_cache", k_cache, needed, block_table)


@torch.library.custom_op("dspark::tree_attention", mutates_args=())
def _tree_attention_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    qo_indptr: torch.Tensor,
    cache_seqlens: torch.Tensor,
    parents: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    sm_scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    _check_shapes(q, k_cache, v_cache, qo_indptr, cache_seqlens, parents, block_table)
    _check_values(q, k_cache, qo_indptr, cache_seqlens, block_table)
    chosen = choose_backend(None if backend == "auto" else backend, q.device)
    return _run(chosen, q, k_cache, v_cache, qo_indptr, cache_seqlens, parents, block_table, sm_scale)


def _run(chosen, q, k_cache, v_cache, qo_indptr, cache_seqlens, parents, block_table, sm_scale):
    """The chosen backend on validated round metadata; checks what only this backend requires."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    if chosen == "reference":
        return reference_tree_attention(q, k_cache, v_cache, qo_indptr, cache_seqlens, parents, block_table, scale)
    if chosen == "triton":
        from dspark.triton_kernels.tree_attention import tree_attention as triton_tree_attention

        return triton_tree_attention(q, k_cache, v_cache, qo_indptr, cache_seqlens, parents, block_table, scale)
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        v.check_contiguous(name, cache)
    if chosen == "cuda" and q.shape[-1] > 256:
        v.fail(f"the cuda backend supports head_dim <= 256, got {q.shape[-1]}")
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    kernel = cpu_extension.tree_attention_cuda if chosen == "cuda" else cpu_extension.tree_attention
    kernel(
        q.contiguous(), k_cache, v_cache, qo_indptr.contiguous(), cache_seqlens.contiguous(),
        None if parents is None else parents.contiguous(),
        None if block_table is None else block_table.contiguous(), scale, out,
    )
    return out


@_tree_attention_op.register_fake
def _(q, k_cache, v_cache, qo_indptr, cache_seqlens, parents=None, block_table=None, sm_scale=None, backend="auto"):
    check_backend_name(backend)
    _check_shapes(q, k_cache, v_cache, qo_indptr, cache_seqlens, parents, block_table)
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def tree_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    qo_indptr: torch.Tensor,
    cache_seqlens: torch.Tensor,
    parents: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    sm_scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention of the round's T flattened tokens over their requests' caches.

    q: [T, H_q, D] fp32/fp16/bf16. k_cache, v_cache: contiguous [R, S_max, H_kv, D] or paged
    [num_blocks, block_size, H_kv, D] with block_table [R, max_blocks] int32. The round's K/V are
    already written at slots cache_seqlens[r] + i. Node i sees the committed slots and its
    ancestors-or-self (parents: int32 [T] local indices, None = chain). Returns [T, H_q, D].
    """
    v.check_tensors(q=q, k_cache=k_cache, v_cache=v_cache, qo_indptr=qo_indptr, cache_seqlens=cache_seqlens,
                    **({} if parents is None else {"parents": parents}),
                    **({} if block_table is None else {"block_table": block_table}))
    if sm_scale is not None and (isinstance(sm_scale, bool) or not isinstance(sm_scale, (int, float))):
        v.fail(f"sm_scale must be a number or None, got {type(sm_scale).__name__}")
    return torch.ops.dspark.tree_attention(
        q, k_cache, v_cache, qo_indptr, cache_seqlens, parents, block_table, sm_scale, backend or "auto"
    )


def tree_attention_same_round(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    qo_indptr: torch.Tensor,
    cache_seqlens: torch.Tensor,
    parents: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    sm_scale: float | None = None,
) -> torch.Tensor:
    """tree_attention for the second and later layers of one forward pass, whose first layer went through
    `tree_attention` with the same qo_indptr, cache_seqlens, parents and block_table and caches of the
    same shape: those were validated then, so only q and the caches are checked here, and the call skips
    the custom-op dispatch (~0.1 ms a call on a CPU, 3 ms a step for a 30-layer model). Not traceable by
    torch.compile; use `tree_attention` there."""
    if q.device.type != k_cache.device.type or q.dtype != k_cache.dtype or k_cache.shape != v_cache.shape:
        v.fail(f"q {q.dtype} on {q.device} and k_cache/v_cache {k_cache.dtype} on {k_cache.device} with equal "
               f"shapes expected, got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    return _run(choose_backend(None, q.device), q, k_cache, v_cache, qo_indptr, cache_seqlens, parents, block_table,
                sm_scale)
