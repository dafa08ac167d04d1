"""kv_rollback: keeps only each request's accepted path in its KV cache, in place (DESIGN.md, op 3).

Registered as `torch.ops.dspark.kv_rollback`; `dspark.ops.kv_rollback` is the friendly wrapper.
"""

from __future__ import annotations

import torch

from dspark.reference.kv_rollback import kv_rollback as reference_kv_rollback
from dspark.ops import _validation as v
from dspark.ops._backend import check_backend_name, choose_backend, cpu_extension


def _check_shapes(k_cache, v_cache, cache_seqlens, accepted_nodes, num_accepted, block_table) -> None:
    if not isinstance(k_cache, torch.Tensor):
        v.fail(f"k_cache must be a torch.Tensor, got {type(k_cache).__name__}")
    v.check_tensor("k_cache", k_cache, dtypes=(k_cache.dtype,), min_ndim=4)
    device = k_cache.device
    if v_cache is not None:
        v.check_tensor("v_cache", v_cache, dtypes=(k_cache.dtype,), ndim=k_cache.dim(), shape=tuple(k_cache.shape),
                       device=device)
    v.check_tensor("cache_seqlens", cache_seqlens, dtypes=(torch.int32,), ndim=1, device=device)
    num_requests = cache_seqlens.shape[0]
    v.check_tensor("accepted_nodes", accepted_nodes, dtypes=(torch.int32,), ndim=2, shape=(num_requests, None),
                   device=device)
    v.check_tensor("num_accepted", num_accepted, dtypes=(torch.int32,), ndim=1, shape=(num_requests,), device=device)
    v.check_block_table(block_table, num_requests, device)
    v.check_no_aliasing(dict(k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens),
                        dict(accepted_nodes=accepted_nodes, num_accepted=num_accepted, block_table=block_table))
    if block_table is None and k_cache.shape[-4] != num_requests:
        v.fail(f"contiguous k_cache must have one row per request ({num_requests}) in dim -4, got shape "
               f"{tuple(k_cache.shape)}")


def _check_values(k_cache, cache_seqlens, accepted_nodes, num_accepted, block_table) -> None:
    if not v.values_checked(k_cache):
        return
    width = accepted_nodes.shape[1]
    committed, counts, paths = cache_seqlens.tolist(), num_accepted.tolist(), accepted_nodes.tolist()
    needed = []
    for r, (base, m, path) in enumerate(zip(committed, counts, paths)):
        if base < 0:
            v.fail(f"cache_seqlens[{r}] must be >= 0, got {base}")
        if not 0 <= m <= width:
            v.fail(f"num_accepted[{r}] must lie in [0, {width}], got {m}")
        kept = path[:m]
        if kept and (kept[0] < 0 or any(b <= a for a, b in zip(kept, kept[1:]))):
            v.fail(f"accepted_nodes[{r}] must list m = {m} non-negative, strictly increasing nodes, got {kept}")
        needed.append(base + (kept[-1] + 1 if kept else 0))
    v.check_cache_capacity("k_cache", k_cache, needed, block_table)


@torch.library.custom_op("dspark::kv_rollback", mutates_args=("k_cache", "v_cache", "cache_seqlens"))
def _kv_rollback_op(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor | None,
    cache_seqlens: torch.Tensor,
    accepted_nodes: torch.Tensor,
    num_accepted: torch.Tensor,
    block_table: torch.Tensor | None = None,
    backend: str = "auto",
) -> None:
    _check_shapes(k_cache, v_cache, cache_seqlens, accepted_nodes, num_accepted, block_table)
    _check_values(k_cache, cache_seqlens, accepted_nodes, num_accepted, block_table)
    chosen = choose_backend(None if backend == "auto" else backend, k_cache.device)
    if chosen == "reference":
        reference_kv_rollback(k_cache, v_cache, cache_seqlens, accepted_nodes, num_accepted, block_table)
        return
    if chosen == "triton":
        from dspark.triton_kernels.kv_cache import kv_rollback as triton_kv_rollback

        triton_kv_rollback(k_cache, v_cache, cache_seqlens, accepted_nodes, num_accepted, block_table)
        return
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("cache_seqlens", cache_seqlens)):
        if t is not None:
            v.check_contiguous(name, t)
    kernel = cpu_extension.kv_rollback_cuda if chosen == "cuda" else cpu_extension.kv_rollback
    kernel(k_cache, v_cache, cache_seqlens, accepted_nodes.contiguous(), num_accepted.contiguous(),
           None if block_table is None else block_table.contiguous())


@_kv_rollback_op.register_fake
def _(k_cache, v_cache, cache_seqlens, accepted_nodes, num_accepted, block_table=None, backend="auto"):
    check_backend_name(backend)
    _check_shapes(k_cache, v_cache, cache_seqlens, accepted_nodes, num_accepted, block_table)


def kv_rollback(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor | None,
    cache_seqlens: torch.Tensor,
    accepted_nodes: torch.Tensor,
    num_accepted: torch.Tensor,
    block_table: torch.Tensor | None = None,
    backend: str | None = None,
) -> None:
    """In place: for j < m_r, slot L_r + j <- slot L_r + accepted_nodes[r, j], then cache_seqlens[r] += m_r.

    Caches are [*layers, R, S_max, H, D] (contiguous) or [*layers, num_blocks, block_size, H, D] with
    block_table [R, max_blocks]; leading dims are compacted in the same call. v_cache may be None, so
    that any per-token side cache (such as hidden states viewed as [R, S, 1, hidden]) compacts too.
    """
    v.check_tensors(k_cache=k_cache, cache_seqlens=cache_seqlens, accepted_nodes=accepted_nodes,
                    num_accepted=num_accepted, **({} if v_cache is None else {"v_cache": v_cache}),
                    **({} if block_table is None else {"block_table": block_table}))
    torch.ops.dspark.kv_rollback(k_cache, v_cache, cache_seqlens, accepted_nodes, num_accepted, block_table,
                                 backend or "auto")
