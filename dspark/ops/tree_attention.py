"""tree_attention: the target verifies every request's draft chain or tree in one pass (DESIGN.md, op 1).

Registered as `torch.ops.dspark.tree_attention`; `dspark.ops.tree_attention` is the friendly wrapper.
`plan_tree_attention` validates and prepares a round's metadata once; its `run` serves every layer with
no validation and no host reads (FlashInfer's plan/run split).
"""

from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass(frozen=True, eq=False)
class TreeAttentionPlan:
    """One round's validated metadata and the chosen backend's per-round preparation. `run` is the
    per-layer call: it checks only that q and the caches have the shapes, dtype and device planned for
    (attribute comparisons), so a forward pays validation once, not once per layer."""

    backend: str
    q_shape: tuple[int, int, int]
    cache_shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    qo_indptr: torch.Tensor
    cache_seqlens: torch.Tensor
    parents: torch.Tensor | None
    block_table: torch.Tensor | None
    prepared: object = None  # the Triton launcher's work list and ancestor bits

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
            sm_scale: float | None = None) -> torch.Tensor:
        if (q.shape != self.q_shape or k_cache.shape != self.cache_shape or v_cache.shape != self.cache_shape
                or q.dtype != self.dtype or k_cache.dtype != self.dtype or v_cache.dtype != self.dtype
                or q.device != self.device or k_cache.device != self.device or v_cache.device != self.device):
            v.fail(f"the plan is for q {self.q_shape} and caches {self.cache_shape} ({self.dtype} on {self.device}); "
                   f"got q {tuple(q.shape)} {q.dtype} on {q.device}, k_cache {tuple(k_cache.shape)} {k_cache.dtype} "
                   f"on {k_cache.device}, v_cache {tuple(v_cache.shape)} {v_cache.dtype}")
        scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
        if self.backend == "triton":
            from dspark.triton_kernels.tree_attention import launch

            return launch(self.prepared, q, k_cache, v_cache, scale)
        return _run(self.backend, q, k_cache, v_cache, self.qo_indptr, self.cache_seqlens, self.parents,
                    self.block_table, scale)


def plan_tree_attention(
    qo_indptr: torch.Tensor,
    cache_seqlens: torch.Tensor,
    parents: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    *,
    num_tokens: int,
    num_q_heads: int,
    k_cache: torch.Tensor,
    backend: str | None = None,
) -> TreeAttentionPlan:
    """Validate a round's metadata (qo_indptr, cache_seqlens, parents, block_table) for queries of
    [num_tokens, num_q_heads, k_cache.shape[-1]] over caches shaped like k_cache, choose the backend and
    prepare what every layer shares. The metadata must not change until the round's last `run`."""
    v.check_tensors(qo_indptr=qo_indptr, cache_seqlens=cache_seqlens, k_cache=k_cache,
                    **({} if parents is None else {"parents": parents}),
                    **({} if block_table is None else {"block_table": block_table}))
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
        v.fail(f"num_tokens must be an integer >= 0, got {num_tokens!r}")
    if isinstance(num_q_heads, bool) or not isinstance(num_q_heads, int):
        v.fail(f"num_q_heads must be an integer, got {num_q_heads!r}")
    # A stand-in q of the planned shape (one element, broadcast): the op's own checks then apply as is.
    if k_cache.dim() != 4:
        v.fail(f"k_cache must have 4 dimensions, got shape {tuple(k_cache.shape)}")
    q = k_cache.new_empty(1).expand(num_tokens, num_q_heads, k_cache.shape[-1])
    _check_shapes(q, k_cache, k_cache, qo_indptr, cache_seqlens, parents, block_table)
    _check_values(q, k_cache, qo_indptr, cache_seqlens, block_table)
    chosen = choose_backend(backend, k_cache.device)
    contiguous = [None if t is None else t.contiguous() for t in (qo_indptr, cache_seqlens, parents, block_table)]
    prepared = None
    if chosen == "triton":
        from dspark.triton_kernels.tree_attention import prepare

        prepared = prepare(num_tokens, num_q_heads, tuple(k_cache.shape), *contiguous)
    return TreeAttentionPlan(chosen, tuple(q.shape), tuple(k_cache.shape), k_cache.dtype, k_cache.device, *contiguous,
                             prepared=prepared)
