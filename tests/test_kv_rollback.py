"""kv_rollback: overlapping moves, stacked layers, paged paths across blocks, committed slots untouched.

Inputs are built on the CPU, moved to the backend's device (the GPU for Triton when there is one) and
compared back on the CPU."""

from __future__ import annotations

import pytest
import torch

from builders import random_cache
from conftest import BACKENDS, device_of
from dspark import ops


def _slot(cache: torch.Tensor, r: int, slot: int, block_table: torch.Tensor | None) -> torch.Tensor:
    if block_table is None:
        return cache[..., r, slot, :, :]
    block_size = cache.shape[-3]
    return cache[..., int(block_table[r, slot // block_size]), slot % block_size, :, :]


def _check_rollback(backend, committed, paths, block_size, dtype=torch.float32, lead=(), side_cache=False):
    gen = torch.Generator().manual_seed(len(paths) * 31 + (block_size or 0))
    round_nodes = [max(p, default=0) + 2 for p in paths]  # the round wrote a few more nodes than it kept
    needed = [c + n for c, n in zip(committed, round_nodes)]
    cache = random_cache(gen, needed, 2, 8, dtype, block_size, lead=lead)
    before_k, before_v = cache.k, None if side_cache else cache.v
    accepted, counts = _accepted(paths, max(len(p) for p in paths) + 1)
    device = device_of(backend)
    k, v = before_k.to(device, copy=True), None if before_v is None else before_v.to(device, copy=True)
    seqlens = torch.tensor(committed, dtype=torch.int32, device=device)
    table = None if cache.block_table is None else cache.block_table.to(device)
    ops.kv_rollback(k, v, seqlens, accepted.to(device), counts.to(device), table, backend=backend)
    k, v = k.cpu(), None if v is None else v.cpu()
    assert seqlens.tolist() == [c + len(p) for c, p in zip(committed, paths)]
    for r, (base, path) in enumerate(zip(committed, paths)):
        for new, old in ((before_k, k), (before_v, v)):
            if old is None:
                continue
            for slot in range(base):  # committed slots untouched
                assert torch.equal(_slot(old, r, slot, cache.block_table), _slot(new, r, slot, cache.block_table))
            for j, node in enumerate(path):  # the kept path, in order, right after the prefix
                assert torch.equal(_slot(old, r, base + j, cache.block_table),
                                   _slot(new, r, base + node, cache.block_table))
    return k, before_k, cache


def _accepted(paths: list[list[int]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Paths padded with -1 to `width` columns, and their lengths."""
    accepted = torch.full((len(paths), width), -1, dtype=torch.int32)
    for r, path in enumerate(paths):
        accepted[r, : len(path)] = torch.tensor(path, dtype=torch.int32)
    return accepted, torch.tensor([len(p) for p in paths], dtype=torch.int32)


@pytest.mark.parametrize("block_size", [None, 1, 16])
def test_overlapping_paths(backend, block_size):
    _check_rollback(backend, [5, 0, 13, 2], [[0, 2, 3], [0, 1, 3], [0], [0, 1, 2, 4, 7]], block_size)


def test_stacked_layers_in_one_call(backend):
    k, before, cache = _check_rollback(backend, [3, 30], [[0, 2, 5], [0, 4]], 16, dtype=torch.bfloat16, lead=(3, 2))
    # Layer 2 of group 1 moved too: every layer is compacted by the same launch.
    assert not torch.equal(k[2, 1], before[2, 1])


def test_paged_path_crosses_block_boundaries(backend):
    # committed 14 with 16-slot blocks: slots 14..20 span two blocks; the source slot 21 is a third away.
    _check_rollback(backend, [14, 31], [[0, 3, 5, 6, 7], [0, 1, 2]], 16)
    _check_rollback(backend, [14], [[0, 18, 19]], 4)


def test_side_cache_without_values(backend):
    _check_rollback(backend, [4, 9], [[0, 1, 3], [0, 2]], None, side_cache=True)


def test_nothing_accepted_leaves_the_cache(backend):
    k, before, _ = _check_rollback(backend, [4, 9], [[], [0]], None)
    assert torch.equal(k, before)  # [0] moves nothing either


def test_any_dtype_moves_bits_exactly(backend):
    # Integers, bool and 8-byte elements move too; float NaNs keep their payload (bits are copied).
    for dtype in (torch.int8, torch.bool, torch.int64, torch.float64):
        _check_rollback(backend, [2, 7], [[0, 2, 3], [1, 4]], 4, dtype=dtype)
    k, before, _ = _check_rollback(backend, [1], [[0, 3]], None, dtype=torch.float16)
    assert torch.equal(k.view(torch.int16)[0, 2], before.view(torch.int16)[0, 4])


def test_long_path_and_strided_caches(backend):
    # A 20-node path (a 32-wide register tile), and K/V that are strided views of one stacked buffer.
    device = device_of(backend)
    gen = torch.Generator().manual_seed(5)
    committed, path = [3, 0], [[0] + list(range(2, 40, 2)), [0, 1, 5]]
    both = torch.randn(2, 2, 2, 50, 3, 4, generator=gen)  # [layer, k/v, R, S, H, D]
    accepted, counts = _accepted(path, 24)
    expected_k, expected_v, seqlens = both[:, 0].clone(), both[:, 1].clone(), torch.tensor(committed, dtype=torch.int32)
    ops.kv_rollback(expected_k, expected_v, seqlens, accepted, counts, backend="reference")
    on_device = both.to(device)
    k, v = on_device[:, 0], on_device[:, 1].transpose(-1, -2).contiguous().transpose(-1, -2)  # D strided
    seqlens = torch.tensor(committed, dtype=torch.int32, device=device)
    if backend in ("cpu", "cuda"):  # the C++ and CUDA kernels read by pointer and ask for contiguous caches
        with pytest.raises(ValueError, match="must be contiguous"):
            ops.kv_rollback(k, v, seqlens, accepted.to(device), counts.to(device), backend=backend)
        return
    ops.kv_rollback(k, v, seqlens, accepted.to(device), counts.to(device), backend=backend)
    assert torch.equal(k.cpu(), expected_k) and torch.equal(v.cpu(), expected_v)
    assert seqlens.tolist() == [3 + 20, 3]


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_matches_reference_on_random_paths(backend):
    device = device_of(backend)
    gen = torch.Generator().manual_seed(0)
    committed = torch.randint(0, 40, (8,), generator=gen).to(torch.int32)
    paths = []
    for _ in range(8):
        length = int(torch.randint(1, 9, (1,), generator=gen))
        paths.append([0] + sorted(torch.randperm(15, generator=gen)[: length - 1].add(1).tolist()))
    needed = [int(c) + max(p) + 1 for c, p in zip(committed, paths)]
    cache = random_cache(gen, needed, 4, 16, torch.float16, 16, lead=(2,))
    accepted, counts = _accepted(paths, 10)
    table = cache.block_table
    expected = cache.k.clone(), cache.v.clone(), committed.clone()
    ops.kv_rollback(*expected, accepted, counts, table, backend="reference")
    k, v, seqlens = cache.k.to(device), cache.v.to(device), committed.to(device)
    ops.kv_rollback(k, v, seqlens, accepted.to(device), counts.to(device), table.to(device), backend=backend)
    for got, want in zip((k, v, seqlens), expected):
        assert torch.equal(got.cpu(), want)
