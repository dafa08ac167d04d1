"""Cases of bench/gpu_suite.py: inputs, the fewest bytes each op must move, and dspark's runners.

Byte counts (what a perfect kernel reads and writes once): tree_attention reads K and V of every
committed and round slot once, plus q, and writes out; rejection_sample reads the logits (and draft
probabilities when given) once; kv_rollback reads and writes each moved K/V row once.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import gpu_env  # noqa: F401  (makes dspark importable from a bare checkout)
import torch

from dspark import ops
from dspark.tree import children
from shapes import HEAD_DIM, HEADS, KV_HEADS, NODES, TREE


class Unavailable(Exception):
    """An optional peer that is not installed, or that does not support the case."""


@dataclasses.dataclass
class Runner:
    name: str
    make: Callable[[Any], Callable[[], Any]]  # input set -> a no-argument call (set-up such as planning done)
    capturable: bool = True  # no host sync inside: its batch can be captured in a CUDA graph
    checked: bool = True  # its output is comparable with dspark's reference backend


@dataclasses.dataclass
class Case:
    op: str
    params: dict
    bytes_moved: int
    build: Callable[[torch.device, int], list]  # (device, copies) -> input sets
    runners: list[Runner]
    compare: Callable[[Any, Any], dict] | None = None  # (output, reference output) -> check fields
    overhead: Callable[[Any], Callable[[], Any]] | None = None  # a call whose time each runner's includes


def dspark_runners(op: Callable[..., Callable[[], Any]], backends: list[str]) -> list[Runner]:
    """One runner per dspark backend; `op(inputs, backend)` returns the call."""
    return [Runner(f"dspark/{b}", lambda x, b=b: op(x, b), capturable=b != "reference") for b in backends]


# ---------------------------------------------------------------- tree_attention

@dataclasses.dataclass
class AttnInputs:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    qo_indptr: torch.Tensor
    cache_seqlens: torch.Tensor
    parents: torch.Tensor | None
    block_table: torch.Tensor | None
    parent_list: list[int]  # one request's tree (every request has the same shape here)
    committed: int
    block_size: int | None


def _attn_inputs(device, R, L, tree, dtype, block_size, heads=HEADS, kv_heads=KV_HEADS, dim=HEAD_DIM) -> AttnInputs:
    n = len(tree)
    slots = L + n
    if block_size is None:
        cache_shape, table = (R, slots, kv_heads, dim), None
    else:
        per_request = math.ceil(slots / block_size)
        ids = torch.randperm(R * per_request, device=device).to(torch.int32)  # scattered blocks, as in serving
        table = ids.view(R, per_request)
        cache_shape = (R * per_request, block_size, kv_heads, dim)
    k = torch.randn(cache_shape, device=device, dtype=dtype)
    v = torch.randn(cache_shape, device=device, dtype=dtype)
    q = torch.randn(R * n, heads, dim, device=device, dtype=dtype)
    parents = torch.tensor(tree * R, dtype=torch.int32, device=device)
    indptr = (torch.arange(R + 1, device=device) * n).to(torch.int32)
    seqlens = torch.full((R,), L, dtype=torch.int32, device=device)
    return AttnInputs(q, k, v, indptr, seqlens, parents, table, tree, L, block_size)


def _rel_err(out, ref) -> dict:
    out, ref = out.float().cpu(), ref.float().cpu()
    if out.shape != ref.shape:
        return {"check": f"shape {tuple(out.shape)} != {tuple(ref.shape)}"}
    return {"rel_err": float((out - ref).norm() / ref.norm().clamp_min(1e-30))}


def attention_case(R, L, tree, dtype, block_size, backends, peers, dims=(HEADS, KV_HEADS, HEAD_DIM)) -> Case:
    heads, kv_heads, dim = dims
    n, es = len(tree), torch.finfo(dtype).bits // 8
    kv_bytes = 2 * R * (L + n) * kv_heads * dim * es
    qo_bytes = 2 * R * n * heads * dim * es
    chain = tree == list(range(-1, n - 1))
    params = dict(R=R, n=n, L=L, heads=f"{heads}/{kv_heads}", D=dim, dtype=str(dtype).removeprefix("torch."),
                  layout="contiguous" if block_size is None else f"paged{block_size}",
                  tree="chain" if chain else "tree")

    def build(device, copies):
        return [_attn_inputs(device, R, L, tree, dtype, block_size, heads, kv_heads, dim) for _ in range(copies)]

    def op(x, backend):
        return lambda: ops.tree_attention(x.q, x.k_cache, x.v_cache, x.qo_indptr, x.cache_seqlens, x.parents,
                                          x.block_table, backend=backend)

    return Case("tree_attention", params, kv_bytes + qo_bytes, build, dspark_runners(op, backends) + peers,
                compare=_rel_err)


# ---------------------------------------------------------------- rejection_sample

@dataclasses.dataclass
class SampleInputs:
    logits: torch.Tensor
    tokens: torch.Tensor
    qo_indptr: torch.Tensor
    parents: torch.Tensor | None
    draft_probs: torch.Tensor | None
    seed: torch.Tensor
    offset: torch.Tensor
    kwargs: dict
    nodes: int
    parent_list: list[int]


def _sample_inputs(device, R, V, mode, nodes) -> SampleInputs:
    tree = TREE[:nodes] if mode == "greedy_tree" else list(range(-1, nodes - 1))
    T = R * nodes
    logits = torch.randn(T, V, device=device) * 3
    noisy = logits + torch.randn(T, V, device=device)
    draft_probs = torch.softmax(noisy, -1) if mode.startswith("sampled") else None
    # Node i's token is what its parent's row (mostly) argmaxes to, so walks go deep.
    local = torch.tensor(tree, device=device).clamp_min(0)
    rows = (torch.arange(R, device=device)[:, None] * nodes + local[None, :]).flatten()
    tokens = noisy.argmax(-1)[rows] if mode.startswith("sampled") else logits.argmax(-1)[rows]
    # Siblings carry distinct tokens (as a tree drafter's would): the first child keeps the parent's pick.
    later = [i for kids in children(tree) for i in kids[1:]]
    shift = torch.zeros(nodes, dtype=torch.long, device=device)
    if later:
        shift[later] = torch.tensor(later, device=device)
    tokens = (tokens + shift.repeat(R)) % V
    parents = torch.tensor(tree * R, dtype=torch.int32, device=device) if mode == "greedy_tree" else None
    kwargs = {"temperature": 0.0} if mode.startswith("greedy") else {}
    if mode == "sampled_topk_topp":
        kwargs.update(top_k=50, top_p=0.9)
    indptr = (torch.arange(R + 1, device=device) * nodes).to(torch.int32)
    seed = torch.arange(R, dtype=torch.int64, device=device)
    offset = torch.zeros(R, dtype=torch.int64, device=device)
    return SampleInputs(logits, tokens, indptr, parents, draft_probs, seed, offset, kwargs, nodes, tree)


def _same_paths(out, ref) -> dict:
    count, ref_count = out[1].cpu(), ref[1].cpu()
    result = {"match": float((count == ref_count).float().mean())}  # share of requests with the same length
    if len(out) > 2 and len(ref) > 2:
        result["tokens_match"] = bool(torch.equal(out[2].cpu(), ref[2].cpu()))
    return result


def sampling_case(R, V, mode, backends, peers, nodes=NODES) -> Case:
    T = R * nodes
    bytes_moved = T * V * 4 * (2 if mode.startswith("sampled") else 1)  # logits, and draft_probs when sampled
    params = dict(R=R, n=nodes, V=V, mode=mode, dtype="float32")

    def build(device, copies):
        return [_sample_inputs(device, R, V, mode, nodes) for _ in range(copies)]

    def op(x, backend):
        return lambda: ops.rejection_sample(x.logits, x.tokens, x.qo_indptr, x.parents, x.draft_probs,
                                            seed=x.seed, offset=x.offset, max_nodes=x.nodes, backend=backend,
                                            **x.kwargs)

    return Case("rejection_sample", params, bytes_moved, build, dspark_runners(op, backends) + peers,
                compare=_same_paths)


# ---------------------------------------------------------------- kv_rollback

ROLLBACK_PATH = [0, 2, 3, 6]  # 4 of 8 nodes kept: three rows move, node 0 stays


@dataclasses.dataclass
class RollbackInputs:
    k_cache: torch.Tensor  # shared by every input set: the sets differ in committed length
    v_cache: torch.Tensor
    cache_seqlens: torch.Tensor
    base: torch.Tensor  # the committed lengths each call starts from
    accepted: torch.Tensor
    counts: torch.Tensor
    block_table: torch.Tensor | None
    block_size: int | None


def _rollback_inputs(device, copies, layers, R, L, dtype, block_size, kv_heads, dim, nodes) -> list[RollbackInputs]:
    """One cache; input set i rolls back at committed length L - 8 i, so rotating sets touch different slots
    (a stacked 32-layer cache is far too large to copy for rotation, and the bytes it moves fit in L2)."""
    slots = L + nodes
    if block_size is None:
        shape, table = (layers, R, slots, kv_heads, dim), None
    else:
        per_request = math.ceil(slots / block_size)
        table = torch.randperm(R * per_request, device=device).to(torch.int32).view(R, per_request)
        shape = (layers, R * per_request, block_size, kv_heads, dim)
    k = torch.randn(shape, device=device, dtype=dtype)
    v = torch.randn(shape, device=device, dtype=dtype)
    path = ROLLBACK_PATH + [-1] * (nodes - len(ROLLBACK_PATH))
    accepted = torch.tensor([path] * R, dtype=torch.int32, device=device)
    counts = torch.full((R,), len(ROLLBACK_PATH), dtype=torch.int32, device=device)
    sets = []
    for i in range(min(copies, L // 8 + 1)):
        base = torch.full((R,), L - 8 * i, dtype=torch.int32, device=device)
        sets.append(RollbackInputs(k, v, base.clone(), base, accepted, counts, table, block_size))
    return sets


def rollback_case(layers, R, L, dtype, block_size, backends, peers, dims=(KV_HEADS, HEAD_DIM), nodes=NODES) -> Case:
    kv_heads, dim = dims
    moved_rows = sum(1 for j, node in enumerate(ROLLBACK_PATH) if node != j)
    bytes_moved = layers * R * moved_rows * kv_heads * dim * (torch.finfo(dtype).bits // 8) * 2 * 2  # K,V; r+w
    params = dict(layers=layers, R=R, L=L, kept=len(ROLLBACK_PATH), kv_heads=kv_heads, D=dim,
                  dtype=str(dtype).removeprefix("torch."),
                  layout="contiguous" if block_size is None else f"paged{block_size}")

    def build(device, copies):
        return _rollback_inputs(device, copies, layers, R, L, dtype, block_size, kv_heads, dim, nodes)

    def op(x, backend):
        def call():
            x.cache_seqlens.copy_(x.base)  # every round starts from the same committed length
            ops.kv_rollback(x.k_cache, x.v_cache, x.cache_seqlens, x.accepted, x.counts, x.block_table,
                            backend=backend)
        return call

    def reset(x):
        return lambda: x.cache_seqlens.copy_(x.base)

    return Case("kv_rollback", params, bytes_moved, build, dspark_runners(op, backends) + peers, overhead=reset)
