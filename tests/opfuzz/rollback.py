"""kv_rollback cases: random paths over contiguous or paged caches of any dtype, with layer dims, with
or without v_cache (also k and v as two halves of one buffer, which is allowed), and the ways to break
one (aliasing among them)."""

from __future__ import annotations

import random

import torch

from opfuzz.common import CACHE_DTYPES, I32, I64, Broken, make_caches


def kv_rollback_case(rng: random.Random, gen: torch.Generator, backend: str, entry: str) -> tuple[dict, str]:
    num_requests = rng.randint(1, 4)
    lead = rng.choice([(), (), (2,), (2, 3)])
    round_sizes = [rng.randint(1, 8) for _ in range(num_requests)]
    committed = [rng.choice([0, rng.randint(0, 10), rng.randint(0, 40)]) for _ in range(num_requests)]
    width = max(round_sizes) + rng.randint(0, 2)
    paths, counts = [], []
    for n in round_sizes:
        m = rng.randint(0, n)
        nodes = sorted(rng.sample(range(n), m))
        if nodes and rng.random() < 0.7:
            nodes[0] = 0  # a real accepted path starts at the anchor
            nodes = sorted(set(nodes))
        paths.append(nodes + [rng.choice([-1, 0, 2**20, -(2**31)]) for _ in range(width - len(nodes))])
        counts.append(len(nodes))
    dtype = rng.choice(CACHE_DTYPES)
    heads, dim = rng.choice([1, 2, 3]), rng.choice([1, 2, 5, 8, 16])
    needed = [c + n for c, n in zip(committed, round_sizes)]
    paged = rng.random() < 0.5
    k, v, table = make_caches(rng, gen, needed, heads, dim, dtype, paged, lead)
    values = rng.choice(["separate", "separate", "none", "halves"])
    if values == "none":
        v = None
    args = dict(k_cache=k, v_cache=v, cache_seqlens=torch.tensor(committed, dtype=I32),
                accepted_nodes=torch.tensor(paths, dtype=I32), num_accepted=torch.tensor(counts, dtype=I32),
                block_table=table, halves=values == "halves")
    label = (f"R={num_requests} lead={lead} L={committed} paths={[p[:m] for p, m in zip(paths, counts)]} {dtype} "
             f"H={heads} D={dim} {'paged' if paged else 'contiguous'} v={values}")
    return args, label


def break_kv_rollback(rng: random.Random, args: dict, entry: str) -> Broken:
    k = args["k_cache"]
    num_requests = args["cache_seqlens"].numel()
    width = args["accepted_nodes"].shape[1]
    counts = args["num_accepted"].tolist()
    choices = ["alias_kv", "alias_lengths", "expanded_cache", "path_order", "path_negative", "count_large",
               "count_negative", "capacity", "seqlens_negative", "seqlens_dtype", "seqlens_rank", "nodes_dtype",
               "nodes_rows", "count_dtype", "count_shape", "v_dtype", "v_shape", "cache_rank", "device", "backend"]
    choices += ["table_id", "table_dtype", "table_rows"] if args["block_table"] is not None else ["cache_rows"]
    if entry == "wrapper":
        choices += ["list_arg"]
    kind = rng.choice(choices)
    if kind == "alias_kv":
        args["v_cache"] = k if rng.random() < 0.5 else k[...]
        return Broken(kind, ("v_cache", "k_cache"), True)
    if kind == "alias_lengths":
        args["num_accepted"] = args["cache_seqlens"]
        return Broken(kind, ("num_accepted", "cache_seqlens"), True)
    if kind == "expanded_cache":  # a broadcast view: writing one element writes many
        dims = [d for d in range(k.dim() - 4, k.dim()) if k.shape[d] > 1]
        if not dims:
            return _capacity(args, rng, num_requests, width, counts)
        args["k_cache"] = k.narrow(rng.choice(dims), 0, 1).expand(k.shape)
        return Broken(kind, ("k_cache",), True)
    if kind in ("path_order", "path_negative"):
        candidates = [r for r, m in enumerate(counts) if m >= (2 if kind == "path_order" else 1)]
        if not candidates:
            return _capacity(args, rng, num_requests, width, counts)
        r = rng.choice(candidates)
        bad = args["accepted_nodes"].clone()
        if kind == "path_order":
            j = rng.randrange(1, counts[r])
            bad[r, j] = bad[r, j - 1] - rng.choice([0, 1])
        else:
            bad[r, 0] = rng.choice([-1, -(2**31)])
        args["accepted_nodes"] = bad
        return Broken(kind, ("accepted_nodes",), True)
    if kind in ("count_large", "count_negative"):
        bad = args["num_accepted"].clone()
        bad[rng.randrange(num_requests)] = width + 1 if kind == "count_large" else -1
        args["num_accepted"] = bad
        return Broken(kind, ("num_accepted",), True)
    if kind == "capacity":
        return _capacity(args, rng, num_requests, width, counts)
    if kind == "seqlens_negative":
        bad = args["cache_seqlens"].clone()
        bad[rng.randrange(num_requests)] = rng.choice([-1, -(2**31)])
        args["cache_seqlens"] = bad
        return Broken(kind, ("cache_seqlens",), True)
    shape_breaks = {
        "seqlens_dtype": ("cache_seqlens", lambda t: t.to(I64)),
        "seqlens_rank": ("cache_seqlens", lambda t: t.reshape(1, -1)),
        "nodes_dtype": ("accepted_nodes", lambda t: t.to(I64)),
        "nodes_rows": ("accepted_nodes", lambda t: torch.cat([t, t[:1]])),
        "count_dtype": ("num_accepted", lambda t: t.to(I64)),
        "count_shape": ("num_accepted", lambda t: torch.cat([t, t[:1]])),
        "v_dtype": ("v_cache", lambda t: t.to(torch.float32 if t.dtype != torch.float32 else torch.float16)),
        "v_shape": ("v_cache", lambda t: t[..., :-1] if t.shape[-1] > 1 else torch.cat([t, t], -1)),
        "cache_rank": ("k_cache", lambda t: t[(0,) * (t.dim() - 3)]),
        "table_dtype": ("block_table", lambda t: t.to(I64)),
        "table_rows": ("block_table", lambda t: torch.cat([t, t[:1]])),
        "cache_rows": ("k_cache", lambda t: t[..., :-1, :, :, :]),
    }
    if kind in shape_breaks:
        name, change = shape_breaks[kind]
        if args[name] is None:  # no v_cache to break
            name, change = shape_breaks["seqlens_dtype"]
        args[name] = change(args[name])
        if kind == "cache_rows" and args["v_cache"] is not None:
            args["v_cache"] = args["v_cache"][..., :-1, :, :, :]
        names = (name, "v_cache", "k_cache") if name in ("k_cache", "v_cache") else (name,)
        return Broken(kind, names, False)
    if kind == "table_id":
        owners = [r for r, m in enumerate(counts) if m > 0]
        if not owners:
            return _capacity(args, rng, num_requests, width, counts)
        r = rng.choice(owners)
        block_size = k.shape[-3]
        last = int(args["cache_seqlens"][r]) + int(args["accepted_nodes"][r, counts[r] - 1])
        bad = args["block_table"].clone()
        bad[r, rng.randint(0, last // block_size)] = rng.choice([-1, k.shape[-4], 10**6])
        args["block_table"] = bad
        return Broken(kind, ("block_table",), True)
    if kind == "device":
        name = rng.choice([n for n in ("v_cache", "cache_seqlens", "accepted_nodes", "num_accepted", "block_table")
                           if args.get(n) is not None])
        args[name] = args[name].to("meta")
        return Broken(kind, (name,), False)
    if kind == "backend":
        args["backend"] = rng.choice(["tpu", "x"])
        return Broken(kind, ("backend",), False)
    name = rng.choice(["cache_seqlens", "accepted_nodes", "num_accepted"])
    args[name] = args[name].tolist()
    return Broken("list_arg", (name,), False)


def _capacity(args, rng, num_requests, width, counts) -> Broken:
    """A path node past the request's slots: the op must refuse rather than read outside them."""
    k = args["k_cache"]
    r = rng.randrange(num_requests)
    paged = args["block_table"] is not None
    capacity = args["block_table"].shape[1] * k.shape[-3] if paged else k.shape[-3]
    bad_nodes, bad_counts = args["accepted_nodes"].clone(), args["num_accepted"].clone()
    committed = int(args["cache_seqlens"][r])
    bad_nodes[r, 0] = max(capacity - committed, 0) + rng.randint(0, 3)
    bad_counts[r] = 1
    args["accepted_nodes"], args["num_accepted"] = bad_nodes, bad_counts
    return Broken("capacity", ("k_cache", "block_table"), True)
