"""Random cases for the op fuzzer (tests/opfuzz/runner.py): one seed -> one call of one op, valid or broken
in one named way, with every tensor placed inside a larger sentinel-filled buffer.

A case is fully determined by (op, seed, backend): `python tests/opfuzz/runner.py --op OP --backend B
--seed S` replays it. Valid cases draw random shapes, dtypes, trees, sampling parameters and layouts
(tight, offset into a buffer, strided views); cache slots and blocks that no request owns hold NaN
(or an integer sentinel), and unused block-table entries hold ids far outside the cache, so a stray
read shows in the output. Invalid cases break exactly one thing and say which argument the
ValueError must name, and whether the check needs tensor values (those are skipped for meta tensors).
"""

from __future__ import annotations

import dataclasses
import math
import random

import torch

I32, I64 = torch.int32, torch.int64
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
CACHE_DTYPES = FLOATS + (torch.float64, torch.int32, torch.int64, torch.uint8)
INT_SENTINEL = -(2**31) + 7  # read as an index, it points far outside anything


@dataclasses.dataclass
class Broken:
    """What an invalid case must raise: a ValueError naming one of `names`. `needs_values`: the
    check reads tensor data, so it cannot fire on meta tensors (shapes only)."""
    label: str
    names: tuple[str, ...]
    needs_values: bool


@dataclasses.dataclass
class Case:
    op: str
    seed: int
    entry: str  # "wrapper", "custom_op" or "plan"
    args: dict  # argument name -> value, in the entry's order
    label: str  # what the valid part looks like
    broken: Broken | None = None
    mutated: tuple[str, ...] = ()
    buffers: dict = dataclasses.field(default_factory=dict)  # argument name -> the buffer holding it


@dataclasses.dataclass(frozen=True)
class GeneratorSeed:
    """A torch.Generator argument: the oracle makes a fresh one from this seed for every call, so the
    backend and the reference draw the same uniforms."""
    seed: int


def sentinel(dtype: torch.dtype):
    if dtype.is_floating_point:
        return float("nan")
    return 255 if dtype == torch.uint8 else INT_SENTINEL


class Placer:
    """Puts tensors into larger buffers full of sentinels: tight, at an offset, or strided."""

    def __init__(self, rng: random.Random, device: torch.device, layouts=("tight", "offset", "strided")):
        self.rng, self.device, self.layouts = rng, device, layouts

    def place(self, t: torch.Tensor, layout: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        layout = layout or self.rng.choice(self.layouts)
        if layout == "strided" and t.dim() and t.numel():
            dim = self.rng.randrange(t.dim())
            wide = list(t.shape)
            wide[dim] *= 2
            view_shape, index = wide, [slice(None)] * t.dim()
            index[dim] = slice(self.rng.randrange(2), None, 2)
        else:
            view_shape, index = list(t.shape), None
        before = 0 if layout == "tight" else self.rng.randint(1, 9)
        after = 0 if layout == "tight" else self.rng.randint(1, 9)
        size = math.prod(view_shape)
        buffer = torch.full((before + size + after,), sentinel(t.dtype), dtype=t.dtype, device=self.device)
        view = buffer[before: before + size].view(view_shape)
        if index is not None:
            view = view[tuple(index)]
        view.copy_(t.to(self.device))
        return view, buffer


def random_values(gen, shape, dtype):
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    high = 256 if dtype == torch.uint8 else 1000
    return torch.randint(0, high, shape, generator=gen).to(dtype)


def random_tree(rng: random.Random, n: int, shape: str) -> list[int]:
    if n == 0:
        return []
    if shape == "chain":
        return list(range(-1, n - 1))
    return [-1] + [rng.randrange(i) for i in range(1, n)]


def depths(parents: list[int]) -> list[int]:
    depth = []
    for i, p in enumerate(parents):
        depth.append(0 if p < 0 else depth[p] + 1)
    return depth


def make_indptr(counts: list[int]) -> torch.Tensor:
    return torch.tensor([0] + [sum(counts[: i + 1]) for i in range(len(counts))], dtype=I32)


def _block_table(rng, needed: list[int], block_size: int, spare: int):
    """Shuffled block ids for the needed slots, spare blocks nobody owns, and far-out ids in the
    unused tail of each row (a kernel that reads them crashes or reads the wrong block)."""
    per_request = [(n + block_size - 1) // block_size for n in needed]
    num_blocks = sum(per_request) + spare
    ids = list(range(num_blocks))
    rng.shuffle(ids)
    width = max(per_request + [0]) + rng.randint(0, 2)
    width = max(width, 1)
    table, used = [], 0
    for count in per_request:
        tail = [rng.choice([-1, 10**6, INT_SENTINEL]) for _ in range(width - count)]
        table.append(ids[used: used + count] + tail)
        used += count
    return torch.tensor(table, dtype=I32), num_blocks


def _fill_unowned(cache: torch.Tensor, needed: list[int], block_table, block_size: int) -> None:
    """Sentinel into every slot no request owns ([..., R or blocks, S, H, D] caches)."""
    value = sentinel(cache.dtype)
    if block_table is None:
        for r, n in enumerate(needed):
            cache[..., r, n:, :, :] = value
        return
    owned = torch.zeros(cache.shape[-4], block_size, dtype=torch.bool)
    for r, n in enumerate(needed):
        for slot in range(n):
            owned[int(block_table[r, slot // block_size]), slot % block_size] = True
    cache[..., ~owned, :, :] = value


def make_caches(rng, gen, needed, heads, dim, dtype, paged, lead=()):
    if paged:
        block_size = rng.choice([1, 2, 4, 8, 16])
        table, num_blocks = _block_table(rng, needed, block_size, spare=rng.randint(0, 3))
        shape = (*lead, num_blocks, block_size, heads, dim)
    else:
        block_size, table = None, None
        shape = (*lead, len(needed), max(needed + [0]) + rng.randint(0, 5), heads, dim)
    k, v = random_values(gen, shape, dtype), random_values(gen, shape, dtype)
    for cache in (k, v):
        _fill_unowned(cache, needed, table, block_size)
    return k, v, table


def draw_round(rng, num_requests, max_nodes, min_nodes):
    counts = [rng.randint(min_nodes, max_nodes) for _ in range(num_requests)]
    committed = [rng.choice([0, rng.randint(0, 12), rng.randint(0, 70)]) for _ in range(num_requests)]
    shape = rng.choice(["chain", "tree", "tree"])
    parent_lists = [random_tree(rng, n, shape) for n in counts]
    return counts, committed, shape, parent_lists


def break_parents(rng, args, kind) -> Broken | None:
    """Break `parents` as `kind` says; None when this round has no node to break that way."""
    parents = args["parents"]
    T = parents.numel()
    if kind == "parents_shape":
        args["parents"] = torch.cat([parents, torch.tensor([-1], dtype=I32)])
        return Broken(kind, ("parents",), False)
    if kind == "parents_dtype":
        args["parents"] = parents.to(I64)
        return Broken(kind, ("parents",), False)
    offsets = args["qo_indptr"].tolist()
    starts = [a for a, b in zip(offsets, offsets[1:]) if b > a]
    bad = parents.clone()
    if kind == "parents_root" and starts:
        bad[rng.choice(starts)] = rng.choice([0, 1, -2, 2**30])
    else:
        later = [i for i in range(T) if i not in starts]
        if not later:
            return None
        i = rng.choice(later)
        start = max(a for a in starts if a <= i)
        local = i - start
        bad[i] = {"parents_forward": local + rng.randint(1, 3), "parents_self": local}.get(kind, -1)
        if kind == "parents_root":  # a non-root node pointing back before its request (cross-request)
            bad[i] = rng.choice([-1, -5])
    args["parents"] = bad
    return Broken(kind, ("parents",), True)
