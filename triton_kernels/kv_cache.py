"""kv_rollback in Triton (DESIGN.md, op 3): compact each request's accepted path, in place, in one launch.

For j < m_r, slot L_r + j <- slot L_r + accepted_nodes[r, j]; then cache_seqlens[r] += m_r. Caches are
[*layers, R, S_max, H, D] (contiguous) or [*layers, num_blocks, block_size, H, D] with a block table.

Work split: one program per (request, layer, tile of the H*D slot row). Requests own disjoint slots
(and blocks), and tiles and layers are disjoint memory, so programs never touch each other's data.
Inside one program the moves of a request overlap (path [0, 2, 3] moves 2->1, then 3->2: slot 2 is
first a source, then a destination), so the program loads every move's source tile into registers
([MAX_PATH, BLOCK]), waits at a barrier, and only then stores. Because every source slot is at or
after its destination (paths are strictly increasing), "load all, then store all" equals the
sequential order. The barrier matters on the GPU: the tile's rows may be spread over several warps,
and without it one warp could store row j before another warp has loaded the same slot as row j'.

cache_seqlens: every program reads L_r, so no program may bump it while others of the same request
could still read the old value (Triton has no grid-wide barrier). The launcher therefore adds
num_accepted in a second, tiny stream-ordered op after the move kernel: still no host sync, and
capturable in a CUDA graph.

The kernel moves raw bits: caches are reinterpreted as integers of the element's width, so any dtype
(fp32/fp16/bf16/fp8/int/bool/complex) works and NaN payloads survive.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

# Integer type of each element width: the move copies bits, never converts values.
_WORD = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# A program's register tile holds MAX_PATH x BLOCK elements; about 16 KiB keeps it in registers
# with 4 warps while leaving enough programs in flight to hide memory latency.
_TILE_BYTES = 16 * 1024
_MAX_GRID_Y = 65535  # CUDA's limit on grid dims 1 and 2


@triton.jit
def _slot_offsets(r, slots, block_table_ptr, bt_stride, stride_row, stride_slot, mask,
                  BLOCK_SIZE: tl.constexpr, PAGED: tl.constexpr):
    """Element offset (int64) of request r's `slots` inside one layer of the cache."""
    if PAGED:
        blocks = tl.load(block_table_ptr + r * bt_stride + slots // BLOCK_SIZE, mask=mask, other=0)
        offsets = blocks.to(tl.int64) * stride_row + (slots % BLOCK_SIZE).to(tl.int64) * stride_slot
    else:
        offsets = r.to(tl.int64) * stride_row + slots.to(tl.int64) * stride_slot
    return offsets


@triton.jit
def _rollback_kernel(k_ptr, v_ptr, seqlens_ptr, seqlens_stride, path_ptr, path_stride_r, path_stride_j,
                     count_ptr, count_stride, block_table_ptr, bt_stride,
                     k_stride_layer, k_stride_row, k_stride_slot, k_stride_h, k_stride_d,
                     v_stride_layer, v_stride_row, v_stride_slot, v_stride_h, v_stride_d,
                     layer_start, width, row_elems, head_dim,
                     MAX_PATH: tl.constexpr, BLOCK: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                     PAGED: tl.constexpr, HAS_V: tl.constexpr, FLAT_ROW: tl.constexpr):
    r = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64) + layer_start
    tile = tl.program_id(2)
    committed = tl.load(seqlens_ptr + r * seqlens_stride)
    count = tl.load(count_ptr + r * count_stride)
    j = tl.arange(0, MAX_PATH)
    nodes = tl.load(path_ptr + r * path_stride_r + j * path_stride_j, mask=(j < count) & (j < width), other=0)
    move = (j < count) & (j < width) & (nodes != j)  # node j kept in place moves nothing
    src_slot = committed + nodes
    dst_slot = committed + j
    e = tile * BLOCK + tl.arange(0, BLOCK)
    in_row = e < row_elems
    mask = move[:, None] & in_row[None, :]
    # Within a slot row: a flat run of elements, or (H, D) with their own strides.
    if FLAT_ROW:
        k_elem = e.to(tl.int64)
        v_elem = e.to(tl.int64)
    else:
        h = (e // head_dim).to(tl.int64)
        d = (e % head_dim).to(tl.int64)
        k_elem = h * k_stride_h + d * k_stride_d
        v_elem = h * v_stride_h + d * v_stride_d
    k_layer = k_ptr + layer * k_stride_layer
    k_src = _slot_offsets(r, src_slot, block_table_ptr, bt_stride, k_stride_row, k_stride_slot, move, BLOCK_SIZE, PAGED)
    k_dst = _slot_offsets(r, dst_slot, block_table_ptr, bt_stride, k_stride_row, k_stride_slot, move, BLOCK_SIZE, PAGED)
    k_tile = tl.load(k_layer + k_src[:, None] + k_elem[None, :], mask=mask)
    if HAS_V:
        v_layer = v_ptr + layer * v_stride_layer
        v_src = _slot_offsets(r, src_slot, block_table_ptr, bt_stride, v_stride_row, v_stride_slot, move,
                              BLOCK_SIZE, PAGED)
        v_dst = _slot_offsets(r, dst_slot, block_table_ptr, bt_stride, v_stride_row, v_stride_slot, move,
                              BLOCK_SIZE, PAGED)
        v_tile = tl.load(v_layer + v_src[:, None] + v_elem[None, :], mask=mask)
    # Every source is in registers before any destination is written (see the module docstring).
    tl.debug_barrier()
    tl.store(k_layer + k_dst[:, None] + k_elem[None, :], k_tile, mask=mask)
    if HAS_V:
        tl.store(v_layer + v_dst[:, None] + v_elem[None, :], v_tile, mask=mask)


def _as_words(cache: torch.Tensor) -> torch.Tensor:
    """The cache's bits as integers of the element's width: a view, so stores land in the cache."""
    word = _WORD.get(cache.element_size())
    if word is None:  # 16-byte elements (complex128): two int64 words each, D doubles (needs unit stride)
        return cache.view(torch.int64)
    return cache if cache.dtype == word else cache.view(word)


def _layer_stack(cache: torch.Tensor) -> torch.Tensor | None:
    """[layers, rows, S, H, D] view of the cache, or None when its leading dims cannot merge into one."""
    try:
        return cache.view(-1, *cache.shape[-4:])
    except RuntimeError:
        return None


def _launch(k, v, cache_seqlens, accepted_nodes, num_accepted, block_table) -> None:
    """One launch (per 65535 layers) over [layers, rows, S, H, D] integer views."""
    layers, _, slots, heads, head_dim = k.shape
    num_requests, width = accepted_nodes.shape
    row_elems = heads * head_dim
    flat = all(t is None or (t.stride(-1) == 1 and t.stride(-2) == head_dim) for t in (k, v))
    max_path = triton.next_power_of_2(width)
    per_tile = _TILE_BYTES // (max_path * k.element_size())
    block = min(triton.next_power_of_2(row_elems), max(16, triton.next_power_of_2(per_tile)))
    paged = block_table is not None
    table = block_table.contiguous() if paged else cache_seqlens  # any int32 pointer when unused
    vs = (v if v is not None else k).stride()
    ks = k.stride()
    for start in range(0, layers, _MAX_GRID_Y):
        grid = (num_requests, min(_MAX_GRID_Y, layers - start), triton.cdiv(row_elems, block))
        _rollback_kernel[grid](
            k, k if v is None else v, cache_seqlens, cache_seqlens.stride(0),
            accepted_nodes, accepted_nodes.stride(0), accepted_nodes.stride(1), num_accepted, num_accepted.stride(0),
            table, table.stride(0) if paged else 0,
            ks[0], ks[1], ks[2], ks[3], ks[4], vs[0], vs[1], vs[2], vs[3], vs[4],
            start, width, row_elems, head_dim,
            MAX_PATH=max_path, BLOCK=block, BLOCK_SIZE=slots if paged else 1,
            PAGED=paged, HAS_V=v is not None, FLAT_ROW=flat)


def kv_rollback(k_cache: torch.Tensor, v_cache: torch.Tensor | None, cache_seqlens: torch.Tensor,
                accepted_nodes: torch.Tensor, num_accepted: torch.Tensor,
                block_table: torch.Tensor | None = None) -> None:
    """In place: for j < m_r, slot L_r + j <- slot L_r + accepted_nodes[r, j]; then cache_seqlens[r] += m_r.

    Inputs were validated by dspark.ops. Every layer of a stacked cache moves in the same launch; only
    caches whose leading dims cannot be viewed as one dim (a strided slice across layers) fall back to
    one launch per leading index.
    """
    num_requests, width = accepted_nodes.shape
    if num_requests and width and k_cache.numel():
        k = _as_words(k_cache)
        v = None if v_cache is None else _as_words(v_cache)
        k_stack = _layer_stack(k)
        v_stack = None if v is None else _layer_stack(v)
        if k_stack is not None and (v is None or v_stack is not None):
            _launch(k_stack, v_stack, cache_seqlens, accepted_nodes, num_accepted, block_table)
        else:
            for index in itertools.product(*(range(n) for n in k.shape[:-4])):
                _launch(k[index].unsqueeze(0), None if v is None else v[index].unsqueeze(0), cache_seqlens,
                        accepted_nodes, num_accepted, block_table)
    # After the move kernel in stream order, so every program read the old lengths (module docstring).
    cache_seqlens.add_(num_accepted)
