"""rejection_sample in Triton: two launches per round (DESIGN.md, op 2).

The executable spec is dspark/reference/rejection_sample.py; csrc/cpu/rejection_sample.cpp is the same
algorithm in C++. First one program per node row reduces that row to what the walk needs: its argmax
for a greedy request, else the scalars of its target distribution p (sampling_distribution.py:
softmax, top-k and top-p without a sort) and, under top-k or top-p, the list of the ids where p
can be nonzero (when it is short enough). Rows are independent, so this runs at T-way parallelism instead of inside the walk; it also
reduces rows the walk will not reach, which costs idle SMs rather than time. Then one program per
request walks its chain or tree from the anchor with those scalars, streaming a row (or only its
listed ids) again only to judge against or sample from a residual.

Decisions are made in float64 with the reference's comparisons (a * sum < r(x), a * q(x) < r(x),
cumulative > u * total), so they agree with the reference and the C++ backend except when a uniform
lies within ~1e-16 of a boundary (sums are added in another order; see rejection_sample.cpp).
Uniforms come from the `uniforms` table or from Philox4x32-10 computed in the kernel, bit-for-bit as
dspark/reference/philox.py. Stochastic residuals norm(max(r - q, 0)) are not stored: r at any id is
replayed from p and q with the normalisers of the earlier rejections, kept in a [T] scratch vector.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dspark.triton_kernels.sampling_distribution import _argmax, _load_support, _prob_at, _probs, _target_distribution

# Tuning knobs, None = by mode. Compiled: 512-wide tiles and 4 key bits per pass of top-p's mass
# search (8 passes, a [512, 16] comparison each). Interpreted (TRITON_INTERPRET=1), where every operation costs about the
# same whatever its width: whole rows up to 8192 wide and 8 bits per pass (4 passes).
MAX_BLOCK = None
RADIX_BITS = None
# Longest support list (sampling_distribution.py) per node row: top-k up to about this many keeps the
# later passes over its row at O(k).
SUPPORT_CAP = 1024
_STATS = tl.constexpr(9)  # float64 scalars per node row (see _row_stats_kernel)


@triton.jit
def _philox_uniforms(seed, offset, node):
    """Philox4x32-10 with key = seed, counter = (offset lo, offset hi, node, 0): two 53-bit uniforms."""
    c0 = offset.to(tl.uint32)  # int64 -> uint32 keeps the low word
    c1 = (offset >> 32).to(tl.uint32)
    c2 = node.to(tl.uint32)
    c3 = c2 * 0
    k0 = seed.to(tl.uint32)
    k1 = (seed >> 32).to(tl.uint32)
    m0 = tl.full([], 0xD2511F53, tl.uint32)
    m1 = tl.full([], 0xCD9E8D57, tl.uint32)
    for i in tl.static_range(10):
        if i > 0:
            k0 = k0 + tl.full([], 0x9E3779B9, tl.uint32)  # uint32 wrap-around
            k1 = k1 + tl.full([], 0xBB67AE85, tl.uint32)
        hi0, lo0 = tl.umulhi(m0, c0), m0 * c0
        hi1, lo1 = tl.umulhi(m1, c2), m1 * c2
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    scale = 1.0 / 9007199254740992.0  # 2^-53, exact in any float format
    u0 = (((c0 >> 5).to(tl.int64) << 26) + (c1 >> 6).to(tl.int64)).to(tl.float64) * scale
    u1 = (((c2 >> 5).to(tl.int64) << 26) + (c3 >> 6).to(tl.int64)).to(tl.float64) * scale
    return u0, u1


@triton.jit
def _uniform(uniforms_ptr, start, node, seed, offset, COL: tl.constexpr, HAS_UNIFORMS: tl.constexpr):
    """uniforms[node, COL] of the request: column 0 judges the node, column 1 samples at it."""
    if HAS_UNIFORMS:
        u = tl.load(uniforms_ptr + (start + node) * 2 + COL)
    else:
        u0, u1 = _philox_uniforms(seed, offset, node)
        u = u0 if COL == 0 else u1
    return u


@triton.jit
def _residual(p, q, ids, tokens_ptr, parents_ptr, zbuf_ptr, start, node, upto,
              HAS_PARENTS: tl.constexpr, HAS_Q: tl.constexpr):
    """The residual at ids (scalar or tile) after rejecting node's children below `upto`:
    deterministic proposals zero their tokens; stochastic ones replay r <- max(r - q, 0) / z with the
    normaliser z stored per rejected child (z = 0: the residual fell back to p)."""
    r = p
    for c in range(node + 1, upto):
        kid = c == node + 1  # (inline, not a helper: each call costs the interpreter a millisecond)
        if HAS_PARENTS:
            kid = tl.load(parents_ptr + start + c).to(tl.int64) == node
        if kid:
            if HAS_Q:
                z = tl.load(zbuf_ptr + start + c)
                if z > 0.0:
                    r = tl.maximum(r - q, 0.0) / z
                else:
                    r = p
            else:
                r = tl.where(ids == tl.load(tokens_ptr + start + c), 0.0, r)
    return r


@triton.jit
def _weights(row, q_row, support, listed, n, t, temperature, mx, inv, t1, tie1, k1, t2, tie2, k2, tokens_ptr,
             parents_ptr, zbuf_ptr, start, node, upto, BLOCK: tl.constexpr, HAS_PARENTS: tl.constexpr,
             HAS_Q: tl.constexpr):
    """One tile of the residual over the row's support after node's children below `upto` were
    rejected (0 past its end). Outside the support p is 0, and so is every residual."""
    x, key, ids, mask = _load_support(row, support, listed, n, t, BLOCK)
    p = _probs(x, ids, temperature, mx, inv, t1, tie1, k1, t2, tie2, k2)
    q = p
    if HAS_Q:
        q = tl.load(q_row + ids, mask=mask, other=0.0).to(tl.float32).to(tl.float64)
    w = _residual(p, q, ids, tokens_ptr, parents_ptr, zbuf_ptr, start, node, upto, HAS_PARENTS, HAS_Q)
    return tl.where(mask, w, 0.0), ids, q


@triton.jit
def _sample(row, q_row, support, listed, n, V, temperature, mx, inv, t1, tie1, k1, t2, tie2, k2, tokens_ptr,
            parents_ptr, zbuf_ptr, start, node, upto, u, BLOCK: tl.constexpr, HAS_PARENTS: tl.constexpr,
            HAS_Q: tl.constexpr):
    """Inverse CDF in id order over the residual, or over p when the residual has no mass: the first
    id whose cumulative weight exceeds u * total and whose weight is > 0 (on rounding at the top
    end, the last id with weight)."""
    total = tl.full([], 0.0, tl.float64)
    for t in range(0, n, BLOCK):
        w, ids, q = _weights(row, q_row, support, listed, n, t, temperature, mx, inv, t1, tie1, k1, t2, tie2, k2,
                             tokens_ptr, parents_ptr, zbuf_ptr, start, node, upto, BLOCK, HAS_PARENTS, HAS_Q)
        total += tl.sum(w, 0)
    if not (total > 0.0):
        upto = node + 1  # replay no rejection: the weights are p
        for t in range(0, n, BLOCK):
            w, ids, q = _weights(row, q_row, support, listed, n, t, temperature, mx, inv, t1, tie1, k1, t2, tie2,
                                 k2, tokens_ptr, parents_ptr, zbuf_ptr, start, node, upto, BLOCK, HAS_PARENTS, HAS_Q)
            total += tl.sum(w, 0)
    threshold = u * total
    carry = tl.full([], 0.0, tl.float64)
    found = tl.full([], -1, tl.int64)
    last = tl.full([], -1, tl.int64)
    for t in range(0, n, BLOCK):
        if found < 0:
            w, ids, q = _weights(row, q_row, support, listed, n, t, temperature, mx, inv, t1, tie1, k1, t2, tie2,
                                 k2, tokens_ptr, parents_ptr, zbuf_ptr, start, node, upto, BLOCK, HAS_PARENTS, HAS_Q)
            cumulative = tl.cumsum(w, 0) + carry
            hit = tl.min(tl.where((cumulative > threshold) & (w > 0.0), ids, V), 0).to(tl.int64)
            found = tl.where(hit < V, hit, -1)
            last = tl.maximum(last, tl.max(tl.where(w > 0.0, ids, -1), 0).to(tl.int64))
            carry = tl.max(cumulative, 0)  # weights are >= 0: the last cumulative value
    return tl.maximum(tl.where(found >= 0, found, last), 0)


@triton.jit
def _rejected_mass(row, q_row, support, listed, n, temperature, mx, inv, t1, tie1, k1, t2, tie2, k2, tokens_ptr,
                   parents_ptr, zbuf_ptr, start, node, upto, BLOCK: tl.constexpr, HAS_PARENTS: tl.constexpr):
    """sum(max(r - q, 0)) for the stochastic residual r before child `upto`: its next normaliser
    (outside the support r = 0, so max(r - q, 0) = 0 there)."""
    total = tl.full([], 0.0, tl.float64)
    for t in range(0, n, BLOCK):
        w, ids, q = _weights(row, q_row, support, listed, n, t, temperature, mx, inv, t1, tie1, k1, t2, tie2, k2,
                             tokens_ptr, parents_ptr, zbuf_ptr, start, node, upto, BLOCK, HAS_PARENTS, True)
        total += tl.sum(tl.maximum(w - q, 0.0), 0)  # lanes past the end: w = q = 0
    return total


@triton.jit
def _judge(row, q_row, support, listed, n, temperature, mx, inv, t1, tie1, k1, t2, tie2, k2, tokens_ptr,
           parents_ptr, zbuf_ptr, uniforms_ptr, start, node, c_hi, seed, offset, BLOCK: tl.constexpr,
           HAS_PARENTS: tl.constexpr, HAS_Q: tl.constexpr, HAS_UNIFORMS: tl.constexpr):
    """Judges node's children in index order with a = uniforms[c, 0]; returns the accepted one or -1.
    Deterministic: accept iff a * sum(r) < r(x), else r(x) = 0. Stochastic (q = draft_probs row):
    accept iff a * q(x) < r(x), else r = norm(max(r - q, 0)) (its normaliser goes to zbuf)."""
    residual_mass = tl.full([], -1.0, tl.float64)  # sum(p), computed at the first child
    accepted = tl.full([], -1, tl.int64)
    c = node + 1
    while (c < c_hi) & (accepted < 0):
        kid = c == node + 1
        if HAS_PARENTS:
            kid = tl.load(parents_ptr + start + c).to(tl.int64) == node
        if kid:
            x = tl.load(tokens_ptr + start + c)
            p_x = _prob_at(row, x, temperature, mx, inv, t1, tie1, k1, t2, tie2, k2)
            q_x = p_x
            if HAS_Q:
                q_x = tl.load(q_row + x).to(tl.float32).to(tl.float64)
            r_x = _residual(p_x, q_x, x, tokens_ptr, parents_ptr, zbuf_ptr, start, node, c, HAS_PARENTS, HAS_Q)
            a = _uniform(uniforms_ptr, start, c, seed, offset, 0, HAS_UNIFORMS)
            if HAS_Q:
                bound = a * q_x
            else:
                if residual_mass < 0.0:
                    residual_mass = tl.full([], 0.0, tl.float64)
                    for t in range(0, n, BLOCK):
                        x_t, key, ids, mask = _load_support(row, support, listed, n, t, BLOCK)
                        p = _probs(x_t, ids, temperature, mx, inv, t1, tie1, k1, t2, tie2, k2)
                        residual_mass += tl.sum(tl.where(mask, p, 0.0), 0)
                bound = a * residual_mass
            if bound < r_x:
                accepted = c
            else:
                if HAS_Q:
                    z = _rejected_mass(row, q_row, support, listed, n, temperature, mx, inv, t1, tie1, k1, t2, tie2,
                                       k2, tokens_ptr, parents_ptr, zbuf_ptr, start, node, c, BLOCK, HAS_PARENTS)
                    tl.store(zbuf_ptr + start + c, z)
                    tl.debug_barrier()  # the whole program reads it back in later passes
                else:
                    residual_mass -= r_x
        c += 1
    return accepted


@triton.jit
def _children_end(n, node, HAS_PARENTS: tl.constexpr):
    """Node's children lie in (node, end): any later node in a tree, node + 1 in a chain."""
    if HAS_PARENTS:
        end = n
    else:
        end = tl.minimum(node + 2, n)
    return end


@triton.jit
def _emit(nodes_out, tokens_out, r, W, step, node, token):
    if step < W:
        tl.store(nodes_out + r * W + step, node.to(tl.int32))
        tl.store(tokens_out + r * W + step, token.to(tl.int64))


@triton.jit
def _walk_greedy(stats_ptr, tokens_ptr, parents_ptr, nodes_out, tokens_out, r, start, n, W,
                 HAS_PARENTS: tl.constexpr):
    """Follow the first child carrying the argmax; emit the argmax where none does."""
    node = tl.full([], 0, tl.int64)
    steps = tl.full([], 0, tl.int64)
    going = n > 0
    while going:
        best = tl.load(stats_ptr + (start + node) * _STATS).to(tl.int64)
        end = _children_end(n, node, HAS_PARENTS)
        accepted = tl.full([], -1, tl.int64)
        c = node + 1
        while (c < end) & (accepted < 0):
            kid = c == node + 1
            if HAS_PARENTS:
                kid = tl.load(parents_ptr + start + c).to(tl.int64) == node
            if kid & (tl.load(tokens_ptr + start + c) == best):
                accepted = c
            c += 1
        _emit(nodes_out, tokens_out, r, W, steps, node, best)
        steps += 1
        going = accepted >= 0
        node = tl.where(going, accepted, node)
    return steps


@triton.jit
def _walk_sampled(logits_ptr, q_ptr, stats_ptr, support_ptr, tokens_ptr, parents_ptr, zbuf_ptr, uniforms_ptr,
                  nodes_out, tokens_out, r, start, n, V, W, temperature, seed, offset, BLOCK: tl.constexpr,
                  CAP: tl.constexpr, HAS_PARENTS: tl.constexpr, HAS_Q: tl.constexpr, HAS_UNIFORMS: tl.constexpr):
    """Judge the children of each visited node; sample the correction (or bonus) where none is accepted."""
    node = tl.full([], 0, tl.int64)
    steps = tl.full([], 0, tl.int64)
    going = n > 0
    while going:
        row = logits_ptr + (start + node) * V
        q_row = q_ptr + (start + node) * V  # only read when HAS_Q
        stats = stats_ptr + (start + node) * _STATS
        mx, inv = tl.load(stats), tl.load(stats + 1)
        t1, tie1, k1 = tl.load(stats + 2), tl.load(stats + 3).to(tl.int64), tl.load(stats + 4)
        t2, tie2, k2 = tl.load(stats + 5), tl.load(stats + 6).to(tl.int64), tl.load(stats + 7)
        n_listed = tl.load(stats + 8).to(tl.int64)
        support = support_ptr + (start + node) * CAP
        listed = n_listed >= 0
        n_support = tl.where(listed, n_listed, V)
        end = _children_end(n, node, HAS_PARENTS)
        accepted = _judge(row, q_row, support, listed, n_support, temperature, mx, inv, t1, tie1, k1, t2, tie2, k2,
                          tokens_ptr, parents_ptr, zbuf_ptr, uniforms_ptr, start, node, end, seed, offset, BLOCK,
                          HAS_PARENTS, HAS_Q, HAS_UNIFORMS)
        if accepted >= 0:
            token = tl.load(tokens_ptr + start + accepted)
        else:
            u = _uniform(uniforms_ptr, start, node, seed, offset, 1, HAS_UNIFORMS)
            token = _sample(row, q_row, support, listed, n_support, V, temperature, mx, inv, t1, tie1, k1, t2, tie2,
                            k2, tokens_ptr, parents_ptr, zbuf_ptr, start, node, end, u, BLOCK, HAS_PARENTS, HAS_Q)
        _emit(nodes_out, tokens_out, r, W, steps, node, token)
        steps += 1
        going = accepted >= 0
        node = tl.where(going, accepted, node)
    return steps


@triton.jit
def _row_stats_kernel(logits_ptr, indptr_ptr, temperature_ptr, top_k_ptr, top_p_ptr, stats_ptr, support_ptr, R, V,
                      BLOCK: tl.constexpr, RADIX_BITS: tl.constexpr, CAP: tl.constexpr):
    """One program per node row: stats[t] = (argmax, 0, ...) for a greedy request, else the eight
    scalars of p (mx, 1 / sum, t1, tie1, k1, t2, tie2, k2; the tie ids are exact in float64) and, in
    stats[t, 8], the length of the support list whose ids it wrote to support[t] (-1: none, the whole row)."""
    t = tl.program_id(0).to(tl.int64)
    lo = tl.full([], 0, tl.int64)  # the request r with indptr[r] <= t < indptr[r + 1]
    hi = tl.full([], 0, tl.int64) + R
    while hi - lo > 1:
        mid = (lo + hi) // 2
        below = tl.load(indptr_ptr + mid).to(tl.int64) <= t
        lo = tl.where(below, mid, lo)
        hi = tl.where(below, hi, mid)
    row = logits_ptr + t * V
    stats = stats_ptr + t * _STATS
    temperature = tl.load(temperature_ptr + lo).to(tl.float64)
    if temperature == 0.0:
        tl.store(stats, _argmax(row, V, BLOCK).to(tl.float64))
    else:
        top_k = tl.load(top_k_ptr + lo)
        top_p = tl.load(top_p_ptr + lo).to(tl.float64)
        mx, inv, t1, tie1, k1, t2, tie2, k2, n_listed = _target_distribution(
            row, support_ptr + t * CAP, V, temperature, top_k, top_p, BLOCK, RADIX_BITS, CAP)
        tl.store(stats, mx)
        tl.store(stats + 1, inv)
        tl.store(stats + 2, t1)
        tl.store(stats + 3, tie1.to(tl.float64))
        tl.store(stats + 4, k1)
        tl.store(stats + 5, t2)
        tl.store(stats + 6, tie2.to(tl.float64))
        tl.store(stats + 7, k2)
        tl.store(stats + 8, n_listed.to(tl.float64))


@triton.jit
def _rejection_sample_kernel(logits_ptr, stats_ptr, support_ptr, tokens_ptr, indptr_ptr, parents_ptr, q_ptr,
                             temperature_ptr, uniforms_ptr, seed_ptr, offset_ptr, zbuf_ptr, nodes_out, count_out,
                             tokens_out, V, W, BLOCK: tl.constexpr, W_BLOCK: tl.constexpr, CAP: tl.constexpr,
                             HAS_PARENTS: tl.constexpr, HAS_Q: tl.constexpr,
                             HAS_UNIFORMS: tl.constexpr, HAS_SEED: tl.constexpr):
    """One program per request: its walk, then the -1 padding of its output rows."""
    r = tl.program_id(0).to(tl.int64)
    start = tl.load(indptr_ptr + r).to(tl.int64)
    n = tl.load(indptr_ptr + r + 1).to(tl.int64) - start
    temperature = tl.load(temperature_ptr + r).to(tl.float64)
    if n == 0:  # an idle request: nothing to walk, every output row is padding
        steps = tl.full([], 0, tl.int64)
    elif temperature == 0.0:
        steps = _walk_greedy(stats_ptr, tokens_ptr, parents_ptr, nodes_out, tokens_out, r, start, n, W,
                             HAS_PARENTS)
    else:
        seed = tl.full([], 0, tl.int64)
        offset = tl.full([], 0, tl.int64)
        if HAS_SEED:
            seed = tl.load(seed_ptr + r)
            offset = tl.load(offset_ptr + r)
        steps = _walk_sampled(logits_ptr, q_ptr, stats_ptr, support_ptr, tokens_ptr, parents_ptr, zbuf_ptr,
                              uniforms_ptr, nodes_out, tokens_out, r, start, n, V, W, temperature, seed, offset,
                              BLOCK, CAP, HAS_PARENTS, HAS_Q, HAS_UNIFORMS)
    steps = tl.minimum(steps, W)
    cols = tl.arange(0, W_BLOCK)
    pad = (cols >= steps) & (cols < W)
    tl.store(nodes_out + r * W + cols, tl.full([W_BLOCK], -1, tl.int32), mask=pad)
    tl.store(tokens_out + r * W + cols, tl.full([W_BLOCK], -1, tl.int64), mask=pad)
    tl.store(count_out + r, steps.to(tl.int32))


def _tiles(device: torch.device, vocab: int) -> tuple[int, int]:
    """(tile width, key bits per pass of top-p's mass search) for this device (see the knobs above)."""
    interpreted = device.type == "cpu"
    return (min(triton.next_power_of_2(vocab), MAX_BLOCK or (8192 if interpreted else 512)),
            RADIX_BITS or (8 if interpreted else 4))


def row_stats(target_logits, qo_indptr, temperature, top_k, top_p):
    """The first launch alone, on validated inputs: (stats [T, 9] float64, support [T, cap] int32). Row t
    holds its argmax (greedy requests), else mx, 1 / sum, t1, tie1, k1, t2, tie2, k2 and the length n of
    its support list (-1: none), whose ids are support[t, :n]."""
    device = target_logits.device
    num_tokens, vocab = target_logits.shape
    block, radix_bits = _tiles(device, vocab)
    stats = torch.empty(max(num_tokens, 1), _STATS.value, dtype=torch.float64, device=device)
    support = torch.empty(max(num_tokens, 1), max(1, min(SUPPORT_CAP, vocab)), dtype=torch.int32, device=device)
    if num_tokens:
        _row_stats_kernel[(num_tokens,)](
            target_logits.contiguous(), qo_indptr.contiguous(), temperature.contiguous(), top_k.contiguous(),
            top_p.contiguous(), stats, support, qo_indptr.numel() - 1, vocab, BLOCK=block, RADIX_BITS=radix_bits,
            CAP=support.shape[1], num_warps=8, enable_fp_fusion=False)
    return stats, support


def rejection_sample(target_logits, draft_tokens, qo_indptr, parents, draft_probs, temperature, top_k, top_p,
                     uniforms, seed, offset, max_nodes):
    """Launcher for inputs that dspark.ops validated: draft_tokens int64, uniforms float64 or None,
    parents None for chains, draft_probs None for deterministic proposals. Returns (accepted_nodes
    [R, max_nodes] int32, num_accepted [R] int32, output_tokens [R, max_nodes] int64), padded with -1."""
    device = target_logits.device
    num_requests = qo_indptr.numel() - 1
    num_tokens, vocab = target_logits.shape
    nodes = torch.empty(num_requests, max_nodes, dtype=torch.int32, device=device)
    count = torch.empty(num_requests, dtype=torch.int32, device=device)
    tokens = torch.empty(num_requests, max_nodes, dtype=torch.int64, device=device)
    if num_requests == 0:
        return nodes, count, tokens

    def given(t, dtype):  # absent inputs get a 1-element stand-in, never read
        return torch.empty(1, dtype=dtype, device=device) if t is None else t.contiguous()

    # Normalisers of stochastic rejections, one per judged child (written before they are read).
    zbuf = torch.empty(num_tokens if draft_probs is not None else 1, dtype=torch.float64, device=device)
    logits, indptr, temperature = target_logits.contiguous(), qo_indptr.contiguous(), temperature.contiguous()
    stats, support = row_stats(logits, indptr, temperature, top_k, top_p)
    block, _ = _tiles(device, vocab)
    _rejection_sample_kernel[(num_requests,)](
        logits, stats, support, draft_tokens.contiguous(), indptr, given(parents, torch.int32),
        given(draft_probs, torch.float32), temperature,
        given(uniforms, torch.float64), given(seed, torch.int64), given(offset, torch.int64), zbuf,
        nodes, count, tokens, vocab, max_nodes,
        BLOCK=block, W_BLOCK=triton.next_power_of_2(max_nodes), CAP=support.shape[1],
        HAS_PARENTS=parents is not None, HAS_Q=draft_probs is not None, HAS_UNIFORMS=uniforms is not None,
        HAS_SEED=seed is not None, num_warps=8, enable_fp_fusion=False,  # no FMA: the reference rounds a * b + c twice
    )
    return nodes, count, tokens
