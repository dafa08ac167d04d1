"""tree_attention: every backend against a float64 reference, and the reference against plain attention."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from dspark import ops
from dspark.reference.tree_attention import tree_attention as reference_tree_attention
from builders import random_cache, random_parents, random_round
from conftest import INTERPRETED, device_of


def _attend(backend, q, k_cache, v_cache, *args, **kwargs):
    """ops.tree_attention on the backend's device (Triton: the GPU when there is one); result on CPU."""
    device = device_of(backend)
    moved = [None if t is None else t.to(device) for t in (q, k_cache, v_cache, *args)]
    return ops.tree_attention(*moved, backend=backend, **kwargs).cpu()

# Error bound |out - truth| <= atol + rtol * |truth| against the float64 truth computed from the same
# (already rounded) inputs. What remains is the rounding of the output to the dtype (unit roundoff:
# 2^-8 bf16, 2^-11 fp16) and fp32 accumulation over <= 2,100 keys (~1e-6 for O(1) values).
TOLERANCE = {
    torch.float32: dict(rtol=1e-5, atol=2e-5),
    torch.float16: dict(rtol=2.0**-11, atol=1e-4),
    torch.bfloat16: dict(rtol=2.0**-8, atol=1e-4),
}

CASES = list(itertools.product(
    [torch.float32, torch.float16, torch.bfloat16],
    [None, 16, 1],  # contiguous, paged with 16-slot blocks, paged with 1-slot blocks
    [1, 4, 8],  # GQA ratio
    [64, 128],
))


def _run_case(backend, dtype, block_size, group, head_dim, seed, chain, num_requests, max_nodes, max_committed,
              min_nodes=0):
    gen = torch.Generator().manual_seed(seed)
    if backend == "triton" and INTERPRETED:  # Python runs every program: shorter prefixes, same tiling paths
        max_committed, max_nodes = min(max_committed, 100), min(max_nodes, 40)  # 40 > 32: two mask words
    num_kv_heads = 8 // group
    rnd = random_round(gen, num_requests, max_nodes, max_committed, chain, min_nodes=min_nodes)
    needed = [c + n for c, n in zip(rnd.cache_seqlens.tolist(), rnd.counts)]
    cache = random_cache(gen, needed, num_kv_heads, head_dim, dtype, block_size)
    q = torch.randn(int(rnd.qo_indptr[-1]), 8, head_dim, generator=gen).to(dtype)
    args = (rnd.qo_indptr, rnd.cache_seqlens, rnd.parents, cache.block_table)
    out = _attend(backend, q, cache.k, cache.v, *args)
    truth = reference_tree_attention(q.double(), cache.k.double(), cache.v.double(), *args)
    return out, truth, (q, cache, rnd)


@pytest.mark.parametrize("dtype,block_size,group,head_dim", CASES)
def test_matches_float64_reference(backend, dtype, block_size, group, head_dim):
    seed = CASES.index((dtype, block_size, group, head_dim))
    chain = group == 4  # chains and random trees across the sweep
    out, truth, _ = _run_case(backend, dtype, block_size, group, head_dim, seed, chain, num_requests=1 + seed % 8,
                              max_nodes=64 if head_dim == 64 else 17, max_committed=2048 if group == 1 else 300)
    assert out.dtype == dtype and out.shape == truth.shape
    torch.testing.assert_close(out.double(), truth, **TOLERANCE[dtype])


@pytest.mark.parametrize("head_dim", [8, 40, 48])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_head_dims_off_the_vector_width(dtype, head_dim):
    """Head sizes off the CPU kernel's widest paths: not a multiple of 16 (8, 40: scalar key transposition, values
    partly outside the 16-lane loop), or bf16 keys not a multiple of 32 (48: floats transposed, not pairs of dims)."""
    out, truth, _ = _run_case("cpu", dtype, 16, 4, head_dim, head_dim, False, num_requests=3, max_nodes=20,
                              max_committed=90)
    torch.testing.assert_close(out.double(), truth, **TOLERANCE[dtype])


@pytest.mark.parametrize("chain", [True, False])
def test_eight_ragged_requests_including_empty_rounds(backend, chain):
    # n_r = 0 (a request idle this round) and committed length 0 appear in one call.
    out, truth, _ = _run_case(backend, torch.float32, 16, 4, 64, seed=7, chain=chain, num_requests=8, max_nodes=33,
                              max_committed=2048, min_nodes=0)
    torch.testing.assert_close(out.double(), truth, **TOLERANCE[torch.float32])


def test_single_node_is_plain_decoding(backend):
    out, truth, _ = _run_case(backend, torch.bfloat16, None, 8, 128, seed=3, chain=True, num_requests=5, max_nodes=1,
                              max_committed=700, min_nodes=1)
    torch.testing.assert_close(out.double(), truth, **TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("chain", [True, False])
def test_every_node_equals_causal_attention_over_prefix_and_root_path(backend, chain):
    out, _, (q, cache, rnd) = _run_case(backend, torch.float32, 16, 4, 64, seed=11, chain=chain, num_requests=4,
                                        max_nodes=24, max_committed=200, min_nodes=1)
    k, v, table = cache.k.double(), cache.v.double(), cache.block_table
    block_size = k.shape[1]
    for r, parents in enumerate(rnd.parent_lists):
        start, committed = int(rnd.qo_indptr[r]), int(rnd.cache_seqlens[r])
        for node in range(len(parents)):
            path = [node]
            while parents[path[-1]] >= 0:
                path.append(parents[path[-1]])
            slots = torch.tensor(list(range(committed)) + [committed + j for j in reversed(path)])
            blocks = table[r].long()[slots // block_size]
            keys = k[blocks, slots % block_size].transpose(0, 1).repeat_interleave(4, 0)  # [H_q, S, D]
            values = v[blocks, slots % block_size].transpose(0, 1).repeat_interleave(4, 0)
            query = q[start + node].double().unsqueeze(1)  # [H_q, 1, D]: the last position sees everything
            expected = F.scaled_dot_product_attention(query, keys, values).squeeze(1)
            torch.testing.assert_close(out[start + node].double(), expected, **TOLERANCE[torch.float32])


def test_chain_with_empty_prefix_is_causal_prefill(backend):
    gen = torch.Generator().manual_seed(5)
    n, heads, kv_heads, dim = 37, 8, 2, 64
    k = torch.randn(1, n, kv_heads, dim, generator=gen)
    v = torch.randn(1, n, kv_heads, dim, generator=gen)
    q = torch.randn(n, heads, dim, generator=gen)
    out = _attend(backend, q, k, v, torch.tensor([0, n], dtype=torch.int32), torch.zeros(1, dtype=torch.int32))
    expected = F.scaled_dot_product_attention(
        q.double().transpose(0, 1), k[0].double().transpose(0, 1).repeat_interleave(4, 0),
        v[0].double().transpose(0, 1).repeat_interleave(4, 0), is_causal=True,
    ).transpose(0, 1)
    torch.testing.assert_close(out.double(), expected, **TOLERANCE[torch.float32])


def test_custom_sm_scale(backend):
    out, _, (q, cache, rnd) = _run_case(backend, torch.float32, None, 1, 64, seed=2, chain=False, num_requests=2,
                                        max_nodes=5, max_committed=9, min_nodes=1)
    args = (rnd.qo_indptr, rnd.cache_seqlens, rnd.parents, None)
    scaled = _attend(backend, q, cache.k, cache.v, *args, sm_scale=0.3)
    truth = reference_tree_attention(q.double(), cache.k.double(), cache.v.double(), *args, sm_scale=0.3)
    torch.testing.assert_close(scaled.double(), truth, **TOLERANCE[torch.float32])
    assert not torch.allclose(scaled, out)


# Triton's own machinery: the split-KV merge and the per-round ancestor mask.
@pytest.mark.parametrize("splits,exact_plan", [(1, True), (3, True), (2, False)])
def test_triton_split_kv_merge(monkeypatch, splits, exact_plan):
    from dspark.triton_kernels import tree_attention as module
    from dspark.triton_kernels.tree_attention import tree_attention as triton_tree_attention

    monkeypatch.setattr(module, "EXACT_PLAN_ON_HOST", exact_plan)  # False: spare work items, as on CUDA

    gen = torch.Generator().manual_seed(21)
    rnd = random_round(gen, 3, 6, 150, chain=False)
    needed = [c + n for c, n in zip(rnd.cache_seqlens.tolist(), rnd.counts)]
    cache = random_cache(gen, needed, 2, 64, torch.bfloat16, 16)
    q = torch.randn(int(rnd.qo_indptr[-1]), 8, 64, generator=gen).to(torch.bfloat16)
    args = [rnd.qo_indptr, rnd.cache_seqlens, rnd.parents, cache.block_table]
    device = device_of("triton")
    out = triton_tree_attention(*[t.to(device) for t in (q, cache.k, cache.v, *args)], 0.125, num_splits=splits)
    truth = reference_tree_attention(q.double(), cache.k.double(), cache.v.double(), *args, sm_scale=0.125)
    torch.testing.assert_close(out.cpu().double(), truth, **TOLERANCE[torch.bfloat16])


def test_triton_ancestor_mask_follows_in_place_changes_of_parents():
    gen = torch.Generator().manual_seed(4)
    device = device_of("triton")
    qo_indptr = torch.tensor([0, 5], dtype=torch.int32, device=device)
    parents = torch.tensor([-1, 0, 0, 1, 2], dtype=torch.int32, device=device)
    committed = torch.tensor([7], dtype=torch.int32, device=device)
    k, v = (torch.randn(1, 12, 2, 64, generator=gen).to(device) for _ in range(2))
    q = torch.randn(5, 4, 64, generator=gen).to(device)
    for _ in range(2):  # the second call must not reuse the first round's mask
        out = ops.tree_attention(q, k, v, qo_indptr, committed, parents, backend="triton")
        truth = reference_tree_attention(q.cpu().double(), k.cpu().double(), v.cpu().double(), qo_indptr.cpu(),
                                         committed.cpu(), parents.cpu())
        torch.testing.assert_close(out.cpu().double(), truth, **TOLERANCE[torch.float32])
        parents.copy_(torch.tensor([-1, 0, 1, 2, 3], dtype=torch.int32))


def test_triton_work_items_cover_every_node_tile_once():
    from dspark.triton_kernels.tree_attention import work_items

    counts = [5, 0, 17, 1, 8]
    qo_indptr = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
    items = work_items(qo_indptr, 4, 4 * 10)  # a generous bound, as without a host read
    expected = [(r, first) for r, n in enumerate(counts) for first in range(0, n, 4)]
    got = [(r, first) for r, first in items.t().tolist() if r >= 0]
    assert got == expected and (items[0, len(expected):] == -1).all()


@pytest.mark.parametrize("dtype,block_size,group", [(torch.float32, None, 3), (torch.bfloat16, 16, 3),
                                                    (torch.float16, None, 1), (torch.bfloat16, None, 8)])
def test_cpu_rows_are_batch_invariant(dtype, block_size, group):
    """A row's output is bit for bit the same however many draft nodes and other requests share its
    round: the first k nodes of a request verified alone equal the same nodes inside a longer chain or
    tree, next to other requests, across tile (32) and chunk (128) boundaries. Greedy speculative
    decoding is token-identical to plain decoding only because of this."""
    gen = torch.Generator().manual_seed(int(dtype.itemsize) * 10 + group)
    head_dim, num_kv_heads, n = 64, 2, 9
    committed = [0, 5, 31, 32, 62, 127, 128, 509, 511, 512, 700, 1030]
    for chain in (True, False):
        parent_lists = [random_parents(n, gen, chain) for _ in committed]
        cache = random_cache(gen, [c + n for c in committed], num_kv_heads, head_dim, dtype, block_size)
        q = torch.randn(len(committed) * n, num_kv_heads * group, head_dim, generator=gen).to(dtype)

        def attend(counts):
            indptr = torch.tensor([0] + list(torch.tensor(counts).cumsum(0)), dtype=torch.int32)
            rows = torch.cat([torch.arange(r * n, r * n + c) for r, c in enumerate(counts)])
            parents = None if chain else torch.tensor([p for ps, c in zip(parent_lists, counts) for p in ps[:c]],
                                                      dtype=torch.int32)
            out = ops.tree_attention(q[rows], cache.k, cache.v, indptr, torch.tensor(committed, dtype=torch.int32),
                                     parents, cache.block_table, backend="cpu")
            return out.split(counts)

        full = attend([n] * len(committed))
        for k in (1, 2, 3, 4, 8):
            alone = attend([k] * len(committed))  # every request verifies its first k nodes only
            mixed = attend([k if r % 2 else n for r in range(len(committed))])
            for r in range(len(committed)):
                assert torch.equal(alone[r], full[r][:k]), (chain, k, committed[r])
                assert torch.equal(mixed[r], full[r][: mixed[r].shape[0]]), (chain, k, committed[r])
        for r in range(len(committed)):  # one request alone in the round: the shape of plain decoding
            if cache.block_table is None:
                k_cache, v_cache, table = cache.k[r: r + 1], cache.v[r: r + 1], None
            else:
                k_cache, v_cache, table = cache.k, cache.v, cache.block_table[r: r + 1]
            single = ops.tree_attention(q[r * n: r * n + 1], k_cache, v_cache, torch.tensor([0, 1], dtype=torch.int32),
                                        torch.tensor([committed[r]], dtype=torch.int32), None, table, backend="cpu")
            assert torch.equal(single, full[r][:1]), (chain, committed[r])


# Plan once per round, run per layer.
@pytest.mark.parametrize("block_size", [None, 4])
def test_plan_runs_every_layer_like_the_op(backend, block_size):
    gen = torch.Generator().manual_seed(31)
    rnd = random_round(gen, 3, 7, 40, chain=False)
    needed = [c + n for c, n in zip(rnd.cache_seqlens.tolist(), rnd.counts)]
    device = device_of(backend)
    layers = [random_cache(gen, needed, 2, 32, torch.float32, block_size) for _ in range(3)]
    meta = [None if t is None else t.to(device) for t in (rnd.qo_indptr, rnd.cache_seqlens, rnd.parents,
                                                          layers[0].block_table)]
    num_tokens = int(rnd.qo_indptr[-1])
    plan = ops.plan_tree_attention(*meta, num_tokens=num_tokens, num_q_heads=8, k_cache=layers[0].k.to(device),
                                   backend=backend)
    assert plan.backend == backend
    for cache in layers:  # same metadata, different caches and queries: the layers of one forward
        q = torch.randn(num_tokens, 8, 32, generator=gen)
        out = plan.run(q.to(device), cache.k.to(device), cache.v.to(device)).cpu()
        truth = reference_tree_attention(q.double(), cache.k.double(), cache.v.double(), rnd.qo_indptr,
                                         rnd.cache_seqlens, rnd.parents, layers[0].block_table)
        torch.testing.assert_close(out.double(), truth, **TOLERANCE[torch.float32])


def test_plan_validates_once_and_run_checks_shapes():
    k = torch.randn(2, 12, 2, 8)
    qo_indptr, seqlens = torch.tensor([0, 3, 5], dtype=torch.int32), torch.tensor([4, 9], dtype=torch.int32)
    with pytest.raises(ValueError, match="parents"):
        ops.plan_tree_attention(qo_indptr, seqlens, torch.tensor([-1, 0, 2, -1, 0], dtype=torch.int32),
                                num_tokens=5, num_q_heads=4, k_cache=k)
    with pytest.raises(ValueError, match="k_cache"):
        ops.plan_tree_attention(qo_indptr, torch.tensor([4, 11], dtype=torch.int32), num_tokens=5, num_q_heads=4,
                                k_cache=k)
    plan = ops.plan_tree_attention(qo_indptr, seqlens, num_tokens=5, num_q_heads=4, k_cache=k)
    for q, cache in ((torch.randn(5, 2, 8), k), (torch.randn(5, 4, 8).double(), k), (torch.randn(5, 4, 8), k[:1])):
        with pytest.raises(ValueError, match="the plan is for"):
            plan.run(q, cache, cache)
