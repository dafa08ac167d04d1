"""tree_attention cases: a random valid round, and the ways to break one."""

from __future__ import annotations

import random

import torch

from opfuzz.common import FLOATS, I32, I64, Broken, make_caches, make_indptr, draw_round, break_parents

def tree_attention_case(rng: random.Random, gen: torch.Generator, backend: str, entry: str) -> tuple[dict, str]:
    num_requests = rng.randint(1, 4)
    counts, committed, shape, parent_lists = draw_round(rng, num_requests, rng.choice([1, 3, 6, 9]), 0)
    kv_heads, group = rng.choice([1, 2]), rng.choice([1, 2, 4])
    dim = rng.choice([1, 2, 3, 8, 16, 24, 32, 64])
    dtype = rng.choice(FLOATS)
    paged = rng.random() < 0.5
    needed = [c + n for c, n in zip(committed, counts)]
    k, v, table = make_caches(rng, gen, needed, kv_heads, dim, dtype, paged)
    parents = None if shape == "chain" and rng.random() < 0.5 else torch.tensor(
        [p for ps in parent_lists for p in ps], dtype=I32)
    args = dict(q=torch.randn(sum(counts), kv_heads * group, dim, generator=gen).to(dtype), k_cache=k, v_cache=v,
                qo_indptr=make_indptr(counts), cache_seqlens=torch.tensor(committed, dtype=I32), parents=parents,
                block_table=table, sm_scale=rng.choice([None, None, 0.3, 1.0 / dim]))
    label = f"R={num_requests} n={counts} L={committed} {shape} H={kv_heads}x{group} D={dim} {dtype} " \
            f"{'paged' if paged else 'contiguous'}"
    return args, label


def break_tree_attention(rng: random.Random, args: dict, entry: str) -> Broken:
    T, H, D = args["q"].shape
    R = args["qo_indptr"].numel() - 1
    choices = ["q_dtype", "q_rank", "k_dtype", "v_shape", "head_dim", "gqa", "zero_heads", "zero_dim",
               "indptr_dtype", "indptr_rank", "indptr_short", "indptr_start", "indptr_total", "indptr_order",
               "seqlens_dtype", "seqlens_shape", "seqlens_negative", "seqlens_overflow", "device", "backend"]
    if args["parents"] is not None:
        choices += ["parents_shape", "parents_root", "parents_forward", "parents_self", "parents_dtype"]
    if args["block_table"] is not None:
        choices += ["table_dtype", "table_rows", "table_id", "table_short"]
    else:
        choices += ["cache_rows"]
    if entry == "wrapper":
        choices += ["list_arg", "sm_scale_type"]
    kind = rng.choice(choices)
    q = args["q"]
    if kind == "q_dtype":
        args["q"] = q.to(rng.choice([torch.float64, torch.int32]))
        return Broken(kind, ("q",), False)
    if kind == "q_rank":
        args["q"] = q.reshape(T, H * D)
        return Broken(kind, ("q",), False)
    if kind == "k_dtype":
        other = [d for d in FLOATS if d != q.dtype]
        args["k_cache"] = args["k_cache"].to(rng.choice(other))
        return Broken(kind, ("k_cache",), False)
    if kind == "v_shape":
        v = args["v_cache"]
        args["v_cache"] = torch.zeros((v.shape[0], v.shape[1] + 1, *v.shape[2:]), dtype=v.dtype)
        return Broken(kind, ("v_cache",), False)
    if kind == "head_dim":
        args["q"] = torch.randn(T, H, D + rng.randint(1, 3)).to(q.dtype)
        return Broken(kind, ("k_cache", "q"), False)
    if kind == "gqa":
        kv = args["k_cache"].shape[2]
        bad = rng.choice([h for h in range(1, 9) if h % kv])  if kv > 1 else None
        if bad is None:  # one KV head divides everything: break the cache's head count instead
            args["k_cache"] = args["v_cache"] = args["k_cache"].expand(-1, -1, 0, -1)
            return Broken(kind, ("q", "k_cache"), False)
        args["q"] = torch.randn(T, bad, D).to(q.dtype)
        return Broken(kind, ("q",), False)
    if kind == "zero_heads":
        args["q"] = q[:, :0]
        return Broken(kind, ("q",), False)
    if kind == "zero_dim":
        args["q"] = q[..., :0]
        args["k_cache"], args["v_cache"] = args["k_cache"][..., :0], args["v_cache"][..., :0]
        return Broken(kind, ("q",), False)
    if kind.startswith("indptr"):
        indptr = args["qo_indptr"]
        if kind == "indptr_dtype":
            args["qo_indptr"] = indptr.to(rng.choice([I64, torch.float32]))
            return Broken(kind, ("qo_indptr",), False)
        if kind == "indptr_rank":
            args["qo_indptr"] = indptr.reshape(1, -1)
            return Broken(kind, ("qo_indptr",), False)
        if kind == "indptr_short":
            args["qo_indptr"] = indptr[:1]
            return Broken(kind, ("qo_indptr",), False)
        bad = indptr.clone()
        if kind == "indptr_start":
            bad[0] = rng.choice([1, -1, 2**30])
        elif kind == "indptr_total":
            bad[-1] += rng.choice([1, -1, 2**30]) if R > 1 or T > 0 else 1
            if R == 1 and int(bad[-1]) < 0:
                bad[-1] = T + 1
        else:
            if R == 1:
                bad = torch.tensor([0, T + 1, T], dtype=I32)
                args["cache_seqlens"] = torch.cat([args["cache_seqlens"], torch.zeros(1, dtype=I32)])
                if args["block_table"] is not None:
                    args["block_table"] = torch.cat([args["block_table"], args["block_table"][:1]])
                elif "k_cache" in args:
                    args["k_cache"] = torch.cat([args["k_cache"], args["k_cache"][:1]])
                    args["v_cache"] = torch.cat([args["v_cache"], args["v_cache"][:1]])
            else:
                bad[1] = T + 2**20
        args["qo_indptr"] = bad
        return Broken(kind, ("qo_indptr", "parents"), True)
    if kind == "seqlens_dtype":
        args["cache_seqlens"] = args["cache_seqlens"].to(I64)
        return Broken(kind, ("cache_seqlens",), False)
    if kind == "seqlens_shape":
        args["cache_seqlens"] = torch.cat([args["cache_seqlens"], torch.zeros(1, dtype=I32)])
        return Broken(kind, ("cache_seqlens",), False)
    if kind == "seqlens_negative":
        bad = args["cache_seqlens"].clone()
        bad[rng.randrange(R)] = rng.choice([-1, -(2**31)])
        args["cache_seqlens"] = bad
        return Broken(kind, ("cache_seqlens",), True)
    if kind == "seqlens_overflow":
        bad = args["cache_seqlens"].clone()
        bad[rng.randrange(R)] = rng.choice([10**5, 2**31 - 1 - T])
        args["cache_seqlens"] = bad
        return Broken(kind, ("k_cache", "block_table"), True)
    if kind == "device":
        name = rng.choice([n for n in ("k_cache", "v_cache", "qo_indptr", "cache_seqlens", "parents", "block_table")
                           if args.get(n) is not None])
        args[name] = args[name].to("meta")
        if entry == "plan" and name == "k_cache":  # a plan takes its device from k_cache: the others differ
            return Broken(kind, ("k_cache", "qo_indptr", "cache_seqlens", "q"), False)
        return Broken(kind, (name,), False)
    if kind == "backend":
        args["backend"] = rng.choice(["tpu", "CPU", ""]) or "x"
        return Broken(kind, ("backend",), False)
    if kind.startswith("parents"):
        return break_parents(rng, args, kind) or _give_up(args)
    if kind.startswith("table"):
        table = args["block_table"]
        if kind == "table_dtype":
            args["block_table"] = table.to(I64)
            return Broken(kind, ("block_table",), False)
        if kind == "table_rows":
            args["block_table"] = torch.cat([table, table[:1]])
            return Broken(kind, ("block_table",), False)
        needed = [int(c) + int(b - a) for c, a, b in zip(args["cache_seqlens"], args["qo_indptr"][:-1],
                                                          args["qo_indptr"][1:])]
        owners = [r for r, n in enumerate(needed) if n > 0]
        if kind == "table_id" and owners:
            r = rng.choice(owners)
            bad = table.clone()
            bad[r, rng.randrange((needed[r] - 1) // args["k_cache"].shape[-3] + 1)] = rng.choice(
                [-1, args["k_cache"].shape[-4], 10**6])
            args["block_table"] = bad
            return Broken(kind, ("block_table",), True)
        args["block_table"] = table[:, :0] if rng.random() < 0.5 or not owners else table[:, :max(
            (max(needed) - 1) // args["k_cache"].shape[-3], 0)]
        if max(needed) == 0:
            return _give_up(args)
        return Broken("table_short", ("block_table", "k_cache"), True)
    if kind == "cache_rows":
        args["k_cache"], args["v_cache"] = args["k_cache"][:-1], args["v_cache"][:-1]
        return Broken(kind, ("k_cache", "v_cache"), False)
    if kind == "list_arg":
        name = rng.choice(["q", "k_cache", "qo_indptr", "cache_seqlens"])
        args[name] = args[name].tolist()
        return Broken(kind, (name,), False)
    args["sm_scale"] = rng.choice(["0.5", [0.5], True])
    return Broken("sm_scale_type", ("sm_scale",), False)


def _give_up(args) -> Broken:
    """A break that the drawn round cannot express: break q's dtype instead."""
    args["q"] = args["q"].double()
    return Broken("q_dtype", ("q",), False)
