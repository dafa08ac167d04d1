"""The target distribution of one logits row in Triton, streamed in tiles (for rejection_sampling.py).

p is computed as dspark/reference/rejection_sample.py's target_distribution does, but never stored:

- softmax / temperature: online max and sum in float64 (one pass), p_i = exp(x_i / T - m) * (1 / S);
- top-k without a sort: p is a monotone function of the logit, so the k-th largest p is p(k-th
  largest logit), found by a radix search over the float32 bit patterns (4 bits per pass, counts
  only); ties at that value are kept in id order until k ids are kept (ties: lower id);
- top-p the same way on the renormalised top-k distribution: a radix search for the largest logit
  key y whose strictly-greater mass still reaches top_p; the first id of the next value starts the
  tie group, of which the ids whose mass_before (G + i * v) is < top_p are kept;
- so p at any id is a closed form of a few scalars (m, 1/S, and threshold, last tie id, mass per
  filter), which lets the walk read p(x) of one token, stream weights for the sampling pass, etc.

Greedy rounds only need the row's argmax (_argmax), read the same way.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _unkey(k):
    """The float32 of a radix key (see _load_row)."""
    b = tl.where(k >= 2147483648, k - 2147483648, -1 - k)
    return b.to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _probs(x, ids, temperature, mx, inv, t1, tie1, k1, t2, tie2, k2):
    """p after softmax, top-k and top-p at logits x (float32) of ids, as the reference computes it:
    each filter keeps values > t, and ties == t up to id `tie`, then divides by the kept mass k.
    A filter that is off has t = -1, k = 1 (x / 1 is exact)."""
    p = tl.exp(x.to(tl.float64) / temperature - mx) * inv
    p = tl.where((p > t1) | ((p == t1) & (ids <= tie1)), p / k1, 0.0)
    return tl.where((p > t2) | ((p == t2) & (ids <= tie2)), p / k2, 0.0)


@triton.jit
def _prob_at(row, x_id, temperature, mx, inv, t1, tie1, k1, t2, tie2, k2):
    """p at the one id x_id (a scalar)."""
    x = tl.load(row + x_id).to(tl.float32)
    return _probs(x, x_id, temperature, mx, inv, t1, tie1, k1, t2, tie2, k2)


@triton.jit
def _load_row(row, t, V, BLOCK: tl.constexpr):
    """Tile t of a logits row as float32 (-inf past V), its radix keys, ids and mask. A key is the
    float's bit pattern mapped to an int64 in [0, 2^32) that is non-decreasing in x (-1 past V), so
    that radix searches run on integers. (Unused results cost nothing once compiled.)"""
    ids = t + tl.arange(0, BLOCK)
    mask = ids < V
    x = tl.load(row + ids, mask=mask, other=float("-inf")).to(tl.float32)
    b = x.to(tl.int32, bitcast=True).to(tl.int64)
    return x, tl.where(mask, tl.where(b < 0, -1 - b, b + 2147483648), -1), ids, mask


@triton.jit
def _softmax_stats(row, V, temperature, BLOCK: tl.constexpr):
    """Online max and sum over the row: m = max x / T, returns (m, 1 / sum exp(x / T - m))."""
    mx = tl.full([], float("-inf"), tl.float64)
    total = tl.full([], 0.0, tl.float64)
    for t in range(0, V, BLOCK):
        x, key, ids, mask = _load_row(row, t, V, BLOCK)
        y = x.to(tl.float64) / temperature
        new = tl.maximum(mx, tl.max(y, 0))
        scale = tl.where(new == mx, 1.0, tl.exp(mx - new))  # no -inf - -inf before a finite logit
        e = tl.where(y == float("-inf"), 0.0, tl.exp(y - new))
        total = total * scale + tl.sum(e, 0)
        mx = new
    return mx, 1.0 / total


@triton.jit
def _argmax(row, V, BLOCK: tl.constexpr):
    """torch.argmax of the raw logits: the lowest id among the maxima. Each lane keeps its own best
    (strictly greater: its earlier id wins ties), so the loop carries no scalar dependence."""
    lanes = tl.arange(0, BLOCK)
    best_value = tl.full([BLOCK], float("-inf"), tl.float32)
    best = lanes.to(tl.int64)  # a row of -inf returns id 0, as torch.argmax does
    for t in range(0, V, BLOCK):
        x, key, ids, mask = _load_row(row, t, V, BLOCK)
        better = x > best_value
        best_value = tl.where(better, x, best_value)
        best = tl.where(better, ids.to(tl.int64), best)
    top = tl.max(best_value, 0)
    return tl.min(tl.where(best_value == top, best, V), 0).to(tl.int64)


@triton.jit
def _kth_largest_key(row, V, k, BLOCK: tl.constexpr, RADIX_BITS: tl.constexpr):
    """The largest key y with count(key >= y) >= k, i.e. the k-th largest logit's key: one digit of
    RADIX_BITS per pass, counting against all candidate digits at once."""
    digits = tl.arange(0, 1 << RADIX_BITS).to(tl.int64)
    prefix = tl.full([], 0, tl.int64)
    for level in tl.static_range(32 // RADIX_BITS):
        candidates = prefix + (digits << (32 - RADIX_BITS * (level + 1)))
        counts = tl.zeros([1 << RADIX_BITS], tl.int32)
        for t in range(0, V, BLOCK):
            x, key, ids, mask = _load_row(row, t, V, BLOCK)
            counts += tl.sum((key[:, None] >= candidates[None, :]).to(tl.int32), 0)
        digit = tl.sum((counts >= k).to(tl.int64), 0) - 1  # digit 0 always holds (the prefix did)
        prefix += digit << (32 - RADIX_BITS * (level + 1))
    return prefix


@triton.jit
def _boundary(row, V, temperature, mx, inv, t1, tie1, k1, v, BLOCK: tl.constexpr):
    """Over the top-k-filtered p (p itself when t1 = -1): count and mass of values > v, count == v."""
    greater = tl.full([], 0, tl.int64)
    ties = tl.full([], 0, tl.int64)
    mass = tl.full([], 0.0, tl.float64)
    for t in range(0, V, BLOCK):
        x, key, ids, mask = _load_row(row, t, V, BLOCK)
        p = _probs(x, ids, temperature, mx, inv, t1, tie1, k1, -1.0, V, 1.0)
        above = mask & (p > v)
        greater += tl.sum(above.to(tl.int64), 0)
        ties += tl.sum((mask & (p == v)).to(tl.int64), 0)
        mass += tl.sum(tl.where(above, p, 0.0), 0)
    return greater, mass, ties


@triton.jit
def _nth_tie(row, V, temperature, mx, inv, t1, tie1, k1, v, nth, BLOCK: tl.constexpr):
    """The id of the nth (1-based) id, in id order, whose filtered p equals v."""
    seen = tl.full([], 0, tl.int64)
    found = tl.full([], -1, tl.int64)
    for t in range(0, V, BLOCK):
        if found < 0:
            x, key, ids, mask = _load_row(row, t, V, BLOCK)
            p = _probs(x, ids, temperature, mx, inv, t1, tie1, k1, -1.0, V, 1.0)
            tie = mask & (p == v)
            rank = tl.cumsum(tie.to(tl.int64), 0) + seen
            hit = tl.min(tl.where(tie & (rank == nth), ids, V), 0).to(tl.int64)
            found = tl.where(hit < V, hit, -1)
            seen += tl.sum(tie.to(tl.int64), 0)
    return found


@triton.jit
def _top_k(row, V, temperature, mx, inv, k, BLOCK: tl.constexpr, RADIX_BITS: tl.constexpr):
    """Top-k cut (t1, last tie id, kept mass): p of the k-th largest logit, ties to the lower ids."""
    x_k = _unkey(_kth_largest_key(row, V, k, BLOCK, RADIX_BITS))
    t1 = tl.exp(x_k.to(tl.float64) / temperature - mx) * inv
    off = tl.full([], -1.0, tl.float64)
    greater, mass, ties = _boundary(row, V, temperature, mx, inv, off, V, 1.0, t1, BLOCK)
    need = k - greater  # in [1, ties]: fewer than k logits exceed the k-th, at least k reach it
    tie1 = tl.full([], 0, tl.int64) + V
    if need < ties:
        tie1 = _nth_tie(row, V, temperature, mx, inv, off, V, 1.0, t1, need, BLOCK)
    return t1, tie1, mass + need.to(tl.float64) * t1


@triton.jit
def _mass_search(row, V, temperature, mx, inv, t1, tie1, k1, top_p, BLOCK: tl.constexpr,
                 RADIX_BITS: tl.constexpr):
    """The largest key z whose strictly-greater (top-k-filtered) mass is >= top_p, and the smallest
    positive p above it: the value v of the last kept tie group of top-p."""
    digits = tl.arange(0, 1 << RADIX_BITS).to(tl.int64)
    prefix = tl.full([], 0, tl.int64)
    for level in tl.static_range(32 // RADIX_BITS):
        candidates = prefix + (digits << (32 - RADIX_BITS * (level + 1)))
        masses = tl.zeros([1 << RADIX_BITS], tl.float64)
        for t in range(0, V, BLOCK):
            x, key, ids, mask = _load_row(row, t, V, BLOCK)
            p = _probs(x, ids, temperature, mx, inv, t1, tie1, k1, -1.0, V, 1.0)
            masses += tl.sum(tl.where(key[:, None] > candidates[None, :], p[:, None], 0.0), 0)
        digit = tl.maximum(tl.sum((masses >= top_p).to(tl.int64), 0) - 1, 0)
        prefix += digit << (32 - RADIX_BITS * (level + 1))
    v = tl.full([], float("inf"), tl.float64)
    for t in range(0, V, BLOCK):
        x, key, ids, mask = _load_row(row, t, V, BLOCK)
        p = _probs(x, ids, temperature, mx, inv, t1, tie1, k1, -1.0, V, 1.0)
        v = tl.minimum(v, tl.min(tl.where((key > prefix) & (p > 0.0), p, float("inf")), 0))
    return v


@triton.jit
def _top_p(row, V, temperature, mx, inv, t1, tie1, k1, top_p, BLOCK: tl.constexpr, RADIX_BITS: tl.constexpr):
    """Top-p cut (t2, last tie id, kept mass) on the top-k-filtered p. Sorted descending, the tie
    group of value v starts after mass G; its i-th member has mass_before G + i * v."""
    v = _mass_search(row, V, temperature, mx, inv, t1, tie1, k1, top_p, BLOCK, RADIX_BITS)
    greater, mass, ties = _boundary(row, V, temperature, mx, inv, t1, tie1, k1, v, BLOCK)
    # The largest i < ties with mass + i * v < top_p (i = 0 always kept): estimate, then step.
    i = tl.minimum(tl.maximum((top_p - mass) / v, 0.0), (ties - 1).to(tl.float64)).to(tl.int64)
    while (i + 1 < ties) & (mass + (i + 1).to(tl.float64) * v < top_p):
        i += 1
    while (i > 0) & (mass + i.to(tl.float64) * v >= top_p):
        i -= 1
    kept = i + 1
    tie2 = tl.full([], 0, tl.int64) + V
    if kept < ties:
        tie2 = _nth_tie(row, V, temperature, mx, inv, t1, tie1, k1, v, kept, BLOCK)
    return v, tie2, mass + kept.to(tl.float64) * v


@triton.jit
def _target_distribution(row, V, temperature, top_k, top_p, BLOCK: tl.constexpr, RADIX_BITS: tl.constexpr):
    """The scalars of p = target_distribution(row) (see _probs)."""
    mx, inv = _softmax_stats(row, V, temperature, BLOCK)
    t1 = tl.full([], -1.0, tl.float64)
    tie1 = tl.full([], 0, tl.int64) + V
    k1 = tl.full([], 1.0, tl.float64)
    if (top_k > 0) & (top_k < V):
        t1, tie1, k1 = _top_k(row, V, temperature, mx, inv, top_k, BLOCK, RADIX_BITS)
    t2 = tl.full([], -1.0, tl.float64)
    tie2 = tl.full([], 0, tl.int64) + V
    k2 = tl.full([], 1.0, tl.float64)
    if top_p < 1.0:
        t2, tie2, k2 = _top_p(row, V, temperature, mx, inv, t1, tie1, k1, top_p, BLOCK, RADIX_BITS)
    return mx, inv, t1, tie1, k1, t2, tie2, k2
