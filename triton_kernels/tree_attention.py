"""tree_attention in Triton: flash-attention over each request's committed prefix plus its draft tree.

One program owns (a tile of a request's nodes, one KV head, one split of the prefix). Its rows are
(node, query head) pairs of every query head sharing that KV head, so each K/V tile is read once
for the whole GQA group and for all of the request's nodes. The committed prefix is read in tiles
with no mask work; only the round's own slots apply the tree mask, a test of packed ancestor bits
built once per round by `_ancestor_words_kernel`. Long prefixes with few queries are split across
programs (flash-decoding) and merged by their log-sum-exp in `_merge_splits_kernel`.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import triton
import triton.language as tl

WORD_BITS = 32
_WORD = tl.constexpr(WORD_BITS)  # the same, as kernels must see a global


@triton.jit
def _ancestor_words_kernel(parents_ptr, qo_indptr_ptr, words_ptr, num_words,
                           BLOCK_NODES: tl.constexpr, BLOCK_WORDS: tl.constexpr):
    """words[t, w] bit b: node 32 w + b of t's request is t or an ancestor of t."""
    r = tl.program_id(0)
    start = tl.load(qo_indptr_ptr + r)
    n = tl.load(qo_indptr_ptr + r + 1) - start
    node = tl.program_id(1) * BLOCK_NODES + tl.arange(0, BLOCK_NODES)
    valid = node < n
    word = tl.arange(0, BLOCK_WORDS)
    bits = tl.zeros((BLOCK_NODES, BLOCK_WORDS), dtype=tl.int32)
    cur = tl.where(valid, node, -1)
    # parents[i] < i, so a walk ends within n steps; the bound also stops a corrupt cycle.
    for _ in range(0, n):
        here = cur >= 0
        bit = (tl.full((BLOCK_NODES,), 1, tl.int32) << (cur % _WORD).to(tl.int32))
        hit = (word[None, :] == (cur // _WORD)[:, None]) & here[:, None]
        bits = bits | tl.where(hit, bit[:, None], 0)
        cur = tl.load(parents_ptr + start + cur, mask=here, other=-1)
    ptrs = words_ptr + (start + node)[:, None] * num_words + word[None, :]
    tl.store(ptrs, bits, mask=valid[:, None] & (word[None, :] < num_words))


@triton.jit
def _round_for_bf16(x):
    """fp32 rounded to the nearest bf16 (ties to even), still in fp32: the interpreter's own
    conversion truncates, which costs a whole ulp (finite values only)."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _kv_offsets(r, slots, block_table_ptr, stride_bt, stride_kb, stride_ks, mask,
                PAGED: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Element offsets of cache slots `slots` of request r (head 0, dim 0)."""
    if PAGED:
        block = tl.load(block_table_ptr + r * stride_bt + slots // BLOCK_SIZE, mask=mask, other=0)
        return block.to(tl.int64) * stride_kb + (slots % BLOCK_SIZE).to(tl.int64) * stride_ks
    return r.to(tl.int64) * stride_kb + slots.to(tl.int64) * stride_ks


@triton.jit
def _attend_tile(q, k_ptr, v_ptr, offsets, kv_mask, visible, dims, dim_ok, m_i, l_i, acc, scale_log2,
                 MASKED: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """One online-softmax step over a tile of keys (scores in base 2)."""
    kv_load_mask = dim_ok[None, :]
    if MASKED:
        kv_load_mask = kv_mask[:, None] & dim_ok[None, :]
    k = tl.load(k_ptr + offsets[:, None] + dims[None, :], mask=kv_load_mask, other=0.0)
    v = tl.load(v_ptr + offsets[:, None] + dims[None, :], mask=kv_load_mask, other=0.0)
    if UPCAST:  # the interpreter: its bf16 dot is wrong, fp16 rounds; fp32 is exact
        k = k.to(tl.float32)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * scale_log2
    if MASKED:
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    if IEEE:
        pv = tl.dot(p, v, input_precision="ieee")
    else:
        # p split into two 16-bit halves: P.V at about 16 mantissa bits, not 8 (bf16) or 11 (fp16),
        # so the output's error is its own rounding. Decoding is memory-bound; the second MMA is free.
        p_hi = p.to(v.dtype)
        p_lo = (p - p_hi.to(tl.float32)).to(v.dtype)
        if UPCAST:
            v = v.to(tl.float32)
            p_hi = p_hi.to(tl.float32)
            p_lo = p_lo.to(tl.float32)
        pv = tl.dot(p_hi, v) + tl.dot(p_lo, v)
    return m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None] + pv


@triton.jit
def _tree_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr,
    qo_indptr_ptr, cache_seqlens_ptr, words_ptr, block_table_ptr, items_ptr,
    scale_log2, num_items, num_words, chunk,
    stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_bt,
    stride_os, stride_ot, stride_oh, stride_ls, stride_lt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    PAGED: tl.constexpr, TREE: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    # Work item: (request, first node of its tile); spare items of the shape-only plan hold -1.
    r = tl.load(items_ptr + tl.program_id(0))
    if r < 0:
        return
    first_node = tl.load(items_ptr + num_items + tl.program_id(0))
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    start = tl.load(qo_indptr_ptr + r)
    n = tl.load(qo_indptr_ptr + r + 1) - start
    NODES: tl.constexpr = BLOCK_M // GROUP
    rows = tl.arange(0, BLOCK_M)
    node = first_node + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < NODES * GROUP) & (node < n)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    token = (start + node).to(tl.int64)
    q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_head = k_ptr + kv_head * stride_kh
    v_head = v_ptr + kv_head * stride_kh
    committed = tl.load(cache_seqlens_ptr + r)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    cols = tl.arange(0, BLOCK_N)

    # The committed prefix: every node sees all of it; only the last tile checks bounds.
    lo = split * chunk
    hi = tl.minimum(committed, lo + chunk)
    full_end = lo + tl.maximum(hi - lo, 0) // BLOCK_N * BLOCK_N
    for tile in range(lo, full_end, BLOCK_N):
        slots = tile + cols
        offsets = _kv_offsets(r, slots, block_table_ptr, stride_bt, stride_kb, stride_ks, slots < hi,
                              PAGED, BLOCK_SIZE)
        m_i, l_i, acc = _attend_tile(q, k_head, v_head, offsets, slots < hi, slots[None, :] < hi, dims, dim_ok,
                                     m_i, l_i, acc, scale_log2, False, IEEE, UPCAST)
    if full_end < hi:
        slots = full_end + cols
        in_range = slots < hi
        offsets = _kv_offsets(r, slots, block_table_ptr, stride_bt, stride_kb, stride_ks, in_range,
                              PAGED, BLOCK_SIZE)
        m_i, l_i, acc = _attend_tile(q, k_head, v_head, offsets, in_range, in_range[None, :], dims, dim_ok,
                                     m_i, l_i, acc, scale_log2, True, IEEE, UPCAST)

    # The round's own slots (the last split's job): node i sees node j iff j is i or an ancestor.
    if split == tl.num_programs(2) - 1:
        last = tl.minimum(first_node + NODES, n)  # ancestors precede their descendants
        for tile in range(0, last, BLOCK_N):
            j = tile + cols
            in_range = j < last
            offsets = _kv_offsets(r, committed + j, block_table_ptr, stride_bt, stride_kb, stride_ks, in_range,
                                  PAGED, BLOCK_SIZE)
            if TREE:
                word = tl.load(words_ptr + token[:, None] * num_words + (j // _WORD)[None, :],
                               mask=row_ok[:, None] & in_range[None, :], other=0)
                visible = ((word >> (j % _WORD)[None, :]) & 1) != 0
            else:
                visible = j[None, :] <= node[:, None]
            visible = visible & in_range[None, :]
            m_i, l_i, acc = _attend_tile(q, k_head, v_head, offsets, in_range, visible, dims, dim_ok,
                                         m_i, l_i, acc, scale_log2, True, IEEE, UPCAST)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # only an empty split has l = 0
    out = acc / l_safe[:, None]
    if UPCAST and (out_ptr.dtype.element_ty == tl.bfloat16):
        out = _round_for_bf16(out)
    out_ptrs = out_ptr + split * stride_os + token[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
    if SPLIT:
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
        tl.store(lse_ptr + split * stride_ls + token * stride_lt + head, lse, mask=row_ok)


@triton.jit
def _merge_splits_kernel(part_ptr, lse_ptr, out_ptr, num_splits, num_heads,
                         stride_ps, stride_ls, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_S: tl.constexpr, UPCAST: tl.constexpr):
    """out[t, h] = sum_s 2^(lse_s - lse) part_s: the splits' partial softmaxes made one."""
    row = tl.program_id(0).to(tl.int64)  # t * num_heads + h
    splits = tl.arange(0, BLOCK_S)
    lse = tl.load(lse_ptr + splits * stride_ls + row, mask=splits < num_splits, other=float("-inf"))
    weights = tl.exp2(lse - tl.max(lse, 0))
    weights = weights / tl.sum(weights, 0)
    dims = tl.arange(0, BLOCK_D)
    parts = tl.load(part_ptr + splits[:, None] * stride_ps + row * HEAD_DIM + dims[None, :],
                    mask=(splits[:, None] < num_splits) & (dims[None, :] < HEAD_DIM), other=0.0)
    out = tl.sum(parts * weights[:, None], 0)
    if UPCAST and (out_ptr.dtype.element_ty == tl.bfloat16):
        out = _round_for_bf16(out)
    tl.store(out_ptr + row * HEAD_DIM + dims, out.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


def _gpu_configs():
    return [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s)
            for n in (32, 64, 128) for w in (4, 8) for s in (2, 3)]


_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Under the interpreter each config would be "benchmarked" in Python: one fixed tile instead. On a GPU,
# DSPARK_TRITON_AUTOTUNE=0 also takes one fixed tile: autotuning compiles all 12 configs for every new
# shape key (~1-2 min each on an H100), which the GPU tests, sweeping shapes, cannot afford.
_AUTOTUNE = not _INTERPRETED and os.environ.get("DSPARK_TRITON_AUTOTUNE", "1") != "0"
_FIXED_TILE = {"BLOCK_N": 64} if _INTERPRETED else {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
_attention = _tree_attention_kernel if not _AUTOTUNE else triton.autotune(
    _gpu_configs(), key=["GROUP", "HEAD_DIM", "BLOCK_M", "PAGED", "TREE", "SPLIT", "IEEE", "UPCAST"])(_tree_attention_kernel)
# Tests turn this off to run, on CPU, the shape-only plan (with spare work items) that CUDA tensors get.
EXACT_PLAN_ON_HOST = True


def ancestor_words(parents: torch.Tensor, qo_indptr: torch.Tensor, largest: int | None = None) -> torch.Tensor:
    """Packed ancestor-or-self bits, int32 [T, ceil(T / 32)]: one small kernel, once per round (plan)."""
    num_tokens = parents.shape[0]
    num_words = max(triton.cdiv(num_tokens, WORD_BITS), 1)
    words = torch.empty(num_tokens, num_words, dtype=torch.int32, device=parents.device)
    block_nodes = 16
    grid = (qo_indptr.shape[0] - 1, max(triton.cdiv(num_tokens if largest is None else largest, block_nodes), 1))
    _ancestor_words_kernel[grid](parents, qo_indptr, words, num_words, BLOCK_NODES=block_nodes,
                                 BLOCK_WORDS=triton.next_power_of_2(num_words))
    return words


def work_items(qo_indptr: torch.Tensor, nodes_per_tile: int, num_items: int) -> torch.Tensor:
    """int32 [2, num_items]: each item's request (-1 for spares) and first node, built on the device
    (no host sync) once per round. num_items bounds sum_r ceil(n_r / nodes_per_tile)."""
    counts = qo_indptr[1:] - qo_indptr[:-1]
    tiles = (counts + nodes_per_tile - 1) // nodes_per_tile
    ends = torch.cumsum(tiles, 0)
    item = torch.arange(num_items, device=qo_indptr.device)
    request = torch.searchsorted(ends, item, right=True)  # requests without nodes own no item
    last = counts.shape[0] - 1
    first_node = (item - (ends - tiles)[request.clamp(max=last)]) * nodes_per_tile
    return torch.stack([torch.where(request <= last, request, -1), first_node]).to(torch.int32)


def _num_processors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # the interpreter: still exercise the split path on small shapes


def plan(num_tokens: int, num_requests: int, num_kv_heads: int, group: int, capacity: int,
         device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_M, splits, keys per split) from shapes alone: no host sync. BLOCK_M fits the average
    request's rows; splits fill the machine when few programs exist."""
    rows = triton.cdiv(num_tokens * group, max(num_requests, 1))
    block_m = min(max(triton.next_power_of_2(rows), 16, triton.next_power_of_2(group)), 128)
    programs = num_requests * num_kv_heads * triton.cdiv(rows, block_m)
    splits = max(1, min(triton.cdiv(2 * _num_processors(device), programs), triton.cdiv(capacity, 512)))
    chunk = triton.cdiv(triton.cdiv(capacity, splits), 128) * 128 if splits > 1 else max(capacity, 1)
    return block_m, splits, chunk


@dataclasses.dataclass
class Prepared:
    """What one round's layers share: contiguous index tensors, tile plan, work list, ancestor bits."""
    qo_indptr: torch.Tensor
    cache_seqlens: torch.Tensor
    block_table: torch.Tensor | None
    words: torch.Tensor  # ancestor bits [T, W] for trees, else any int32 tensor (unused)
    items: torch.Tensor
    tree: bool
    block_m: int
    splits: int
    chunk: int
    block_size: int


def prepare(num_tokens: int, num_q_heads: int, k_cache_shape: tuple[int, ...], qo_indptr: torch.Tensor,
            cache_seqlens: torch.Tensor, parents: torch.Tensor | None, block_table: torch.Tensor | None,
            num_splits: int | None = None) -> Prepared:
    """The per-round part of the launch (plan once, launch per layer). `num_splits` overrides the plan (tests)."""
    # The kernels read the index tensors by flat offsets: a strided view (every other element of a
    # larger tensor) would make them read the gaps. .contiguous() is free for the usual contiguous ones.
    qo_indptr, cache_seqlens = qo_indptr.contiguous(), cache_seqlens.contiguous()
    parents = None if parents is None else parents.contiguous()
    block_table = None if block_table is None else block_table.contiguous()
    num_kv_heads = k_cache_shape[2]
    group = num_q_heads // num_kv_heads
    num_requests = qo_indptr.shape[0] - 1
    paged = block_table is not None
    block_size = k_cache_shape[1] if paged else 1
    capacity = block_table.shape[1] * block_size if paged else k_cache_shape[1]
    if num_tokens == 0:  # an idle round: launch returns before reading any of this
        return Prepared(qo_indptr, cache_seqlens, block_table, qo_indptr, qo_indptr, parents is not None, 16, 1, 1,
                        block_size)
    block_m, splits, chunk = plan(num_tokens, num_requests, num_kv_heads, group, capacity, qo_indptr.device)
    nodes_per_tile = block_m // group
    if qo_indptr.device.type == "cpu" and EXACT_PLAN_ON_HOST:  # host data already: an exact plan costs nothing
        counts = (qo_indptr[1:] - qo_indptr[:-1]).tolist()
        largest, num_items = max(counts), sum(triton.cdiv(c, nodes_per_tile) for c in counts)
    else:  # sum_r ceil(n_r / k) <= T / k + R
        largest, num_items = None, triton.cdiv(num_tokens, nodes_per_tile) + num_requests
    items = work_items(qo_indptr, nodes_per_tile, max(num_items, 1))
    if num_splits is not None:
        splits, chunk = num_splits, triton.cdiv(capacity, num_splits)
    tree = parents is not None
    words = ancestor_words(parents, qo_indptr, largest) if tree else qo_indptr
    return Prepared(qo_indptr, cache_seqlens, block_table, words, items, tree, block_m, splits, chunk, block_size)


def launch(prepared: Prepared, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           sm_scale: float) -> torch.Tensor:
    """One layer of a prepared round; q, k_cache and v_cache have the shapes the round was prepared for."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.stride(-1) != 1 or cache.stride() != k_cache.stride():
            raise ValueError(f"{name} must have contiguous head_dim and the same strides as k_cache")
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if num_tokens == 0:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()
    p = prepared
    splits = p.splits
    num_words = p.words.shape[1] if p.tree else 0
    if splits > 1:
        dest = torch.empty(splits, *q.shape, dtype=torch.float32, device=q.device)
        lse = torch.empty(splits, num_tokens, num_q_heads, dtype=torch.float32, device=q.device)
    else:
        dest, lse = out.unsqueeze(0), out
    paged = p.block_table is not None
    table = p.block_table if paged else p.qo_indptr
    grid = (p.items.shape[1], num_kv_heads, splits)
    extra = {} if _AUTOTUNE else _FIXED_TILE
    # BLOCK_D >= 16: tl.dot needs K >= 16 on a GPU (the interpreter does not), padded dims are masked.
    _attention[grid](
        q, k_cache, v_cache, dest, lse, p.qo_indptr, p.cache_seqlens, p.words, table, p.items,
        sm_scale * 1.4426950408889634, p.items.shape[1], num_words, p.chunk,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        table.stride(0) if paged else 0,
        dest.stride(0), dest.stride(1), dest.stride(2), lse.stride(0) if splits > 1 else 0,
        lse.stride(1) if splits > 1 else 0,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=max(triton.next_power_of_2(head_dim), 16), BLOCK_M=p.block_m,
        BLOCK_SIZE=p.block_size, PAGED=paged, TREE=p.tree, SPLIT=splits > 1, IEEE=q.dtype == torch.float32,
        UPCAST=_INTERPRETED and q.dtype != torch.float32, **extra,
    )
    if splits > 1:
        _merge_splits_kernel[(num_tokens * num_q_heads,)](
            dest, lse, out, splits, num_q_heads, dest.stride(0), lse.stride(0), HEAD_DIM=head_dim,
            BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_S=triton.next_power_of_2(splits),
            UPCAST=_INTERPRETED)
    return out


def tree_attention(q, k_cache, v_cache, qo_indptr, cache_seqlens, parents, block_table, sm_scale,
                   num_splits: int | None = None) -> torch.Tensor:
    """One call without a plan: prepare and launch. Inputs validated by dspark.ops."""
    prepared = prepare(q.shape[0], q.shape[1], tuple(k_cache.shape), qo_indptr, cache_seqlens, parents,
                       block_table, num_splits)
    return launch(prepared, q, k_cache, v_cache, sm_scale)
