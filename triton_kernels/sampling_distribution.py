"""The target distribution of one logits row in Triton, streamed in tiles (for rejection_sampling.py).

p is computed as dspark/reference/rejection_sample.py's target_distribution does, but never stored:

- softmax / temperature: online max and sum in float64 (one pass), p_i = exp(x_i / T - m) * (1 / S);
- top-k without a sort: p is a monotone function of the logit, so the k-th largest p is p(k-th
  largest logit), found by a radix search over the float32 bit patterns (8 bits per pass, a
  histogram of the next digit among the keys that share the digits found so far); ties at that value
  are kept in id order until k ids are kept (ties: lower id);
- top-p the same way on the renormalised top-k distribution: a radix search for the largest logit
  key y whose strictly-greater mass still reaches top_p; the first id of the next value starts the
  tie group, of which the ids whose mass_before (G + i * v) is < top_p are kept;
- so p at any id is a closed form of a few scalars (m, 1/S, and threshold, last tie id, mass per
  filter), which lets the walk read p(x) of one token, stream weights for the sampling pass, etc.

The support list: top-k's boundary pass also writes, in id order, the ids whose p reaches the k-th
largest value (every id top-k keeps, and the rest of its tie group). Without top-k (or when its list
overflowed), top-p lists the ids whose p (top-k-filtered) reaches floor = (1 - top_p) / (2V) in one
pass: ids below it hold less than V * floor = (1 - top_p) / 2 of the mass, so every id ranked below
them has more than top_p before it and top-p drops them all. When there are at most `SUPPORT_CAP`
listed ids, every later pass over the row (top-p's searches, the walk's residual and sampling passes)
reads only those: p is 0 elsewhere, so sums and inverse CDFs are unchanged and a pass costs O(list)
instead of O(V). Functions that stream a row take its support as (support, listed, n): the ids
support[:n] when listed, else the whole row (n = V).

Greedy rounds only need the row's argmax (_argmax), read the same way.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Top-p lists its support (below) when 1 - top_p is at least this: far above float64's rounding of
# the masses it compares.
TOP_P_LIST_MARGIN = tl.constexpr(1e-6)
COUNT_BITS = tl.constexpr(8)  # key bits per pass of the top-k search: a histogram of COUNT_BINS each
COUNT_BINS = tl.constexpr(256)


@triton.jit
def _unkey(k):
    """The float32 of a radix key (see _keys)."""
    b = tl.where(k >= 2147483648, k - 2147483648, -1 - k)
    return b.to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _keys(x, mask):
    """Radix keys of float32 logits: the bit pattern mapped to an int64 in [0, 2^32) that is
    non-decreasing in x (-1 where masked), so that radix searches run on integers."""
    b = x.to(tl.int32, bitcast=True).to(tl.int64)
    return tl.where(mask, tl.where(b < 0, -1 - b, b + 2147483648), -1)


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
    """Tile t of a logits row as float32 (-inf past V), its radix keys, ids and mask. (Unused results
    cost nothing once compiled.)"""
    ids = t + tl.arange(0, BLOCK)
    mask = ids < V
    x = tl.load(row + ids, mask=mask, other=float("-inf")).to(tl.float32)
    return x, _keys(x, mask), ids, mask


@triton.jit
def _load_support(row, support, listed, n, t, BLOCK: tl.constexpr):
    """Tile t of a row's support (see the module's docstring), as _load_row: the ids support[t:t+BLOCK]
    (ascending) when listed, else ids t..t+BLOCK of the row; past n, x = -inf, key = -1."""
    lanes = t + tl.arange(0, BLOCK)
    mask = lanes < n
    ids = lanes.to(tl.int64)
    if listed:
        ids = tl.load(support + lanes, mask=mask, other=0).to(tl.int64)
    x = tl.load(row + ids, mask=mask, other=float("-inf")).to(tl.float32)
    return x, _keys(x, mask), ids, mask


@triton.jit
def _softmax_stats(row, V, temperature, with_counts, BLOCK: tl.constexpr):
    """Online max and sum over the row: m = max x / T, returns (m, 1 / sum exp(x / T - m)) and, when
    with_counts, the histogram of the keys' top COUNT_BITS (the top-k search's first pass, for free)."""
    mx = tl.full([], float("-inf"), tl.float64)
    total = tl.full([], 0.0, tl.float64)
    counts = tl.zeros([COUNT_BINS], tl.int32)
    for t in range(0, V, BLOCK):
        x, key, ids, mask = _load_row(row, t, V, BLOCK)
        y = x.to(tl.float64) / temperature
        new = tl.maximum(mx, tl.max(y, 0))
        scale = tl.where(new == mx, 1.0, tl.exp(mx - new))  # no -inf - -inf before a finite logit
        e = tl.where(y == float("-inf"), 0.0, tl.exp(y - new))
        total = total * scale + tl.sum(e, 0)
        mx = new
        if with_counts:
            counts += tl.histogram((key >> (32 - COUNT_BITS)).to(tl.int32), COUNT_BINS, mask=mask)
    return mx, 1.0 / total, counts


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
def _kth_largest_key(row, V, k, top_counts, BLOCK: tl.constexpr):
    """The largest key y with count(key >= y) >= k, i.e. the k-th largest logit's key, COUNT_BITS per
    pass from the top: a pass histograms the next digit of the keys whose higher digits equal the
    prefix found so far (top_counts: the first digit's, counted in the softmax pass); `above` counts
    the keys already known to be larger than the prefix."""
    digits = tl.arange(0, COUNT_BINS)
    prefix = tl.full([], 0, tl.int64)
    above = tl.full([], 0, tl.int64)
    for level in tl.static_range(32 // COUNT_BITS):
        shift = 32 - COUNT_BITS * (level + 1)
        counts = top_counts
        if level > 0:
            counts = tl.zeros([COUNT_BINS], tl.int32)
            for t in range(0, V, BLOCK):
                x, key, ids, mask = _load_row(row, t, V, BLOCK)
                same = mask & ((key >> (shift + COUNT_BITS)) == (prefix >> (shift + COUNT_BITS)))
                counts += tl.histogram(((key >> shift) & (COUNT_BINS - 1)).to(tl.int32), COUNT_BINS, mask=same)
        counts64 = counts.to(tl.int64)
        at_or_above = above + tl.sum(counts64, 0) - tl.cumsum(counts64, 0) + counts64  # keys >= digit d
        digit = tl.sum((at_or_above >= k).to(tl.int64), 0) - 1  # digit 0 always holds (the prefix did)
        above += tl.sum(tl.where(digits > digit, counts64, 0), 0)
        prefix += digit << shift
    return prefix


@triton.jit
def _boundary(row, support, listed, n, V, temperature, mx, inv, t1, tie1, k1, v, BLOCK: tl.constexpr,
              COMPACT: tl.constexpr, CAP: tl.constexpr):
    """Over the top-k-filtered p (p itself when t1 = -1) of the support: count and mass of values > v,
    count == v. COMPACT (over a whole row, listed False): also writes the ids with p >= v, in id order,
    to support[:CAP] (the caller lists them when there are at most CAP)."""
    greater = tl.full([], 0, tl.int64)
    ties = tl.full([], 0, tl.int64)
    mass = tl.full([], 0.0, tl.float64)
    for t in range(0, n, BLOCK):
        x, key, ids, mask = _load_support(row, support, listed, n, t, BLOCK)
        p = _probs(x, ids, temperature, mx, inv, t1, tie1, k1, -1.0, V, 1.0)
        above = mask & (p > v)
        tie = mask & (p == v)
        if COMPACT:
            reach = (above | tie).to(tl.int64)
            at = greater + ties + tl.cumsum(reach, 0) - 1
            tl.store(support + at, ids.to(tl.int32), mask=(reach > 0) & (at < CAP))
        greater += tl.sum(above.to(tl.int64), 0)
        ties += tl.sum(tie.to(tl.int64), 0)
        mass += tl.sum(tl.where(above, p, 0.0), 0)
    if COMPACT:
        tl.debug_barrier()  # the whole program reads the list back
    return greater, mass, ties


@triton.jit
def _nth_tie(row, support, listed, n, V, temperature, mx, inv, t1, tie1, k1, v, nth, BLOCK: tl.constexpr):
    """The id of the nth (1-based) id of the support, in id order, whose filtered p equals v."""
    seen = tl.full([], 0, tl.int64)
    found = tl.full([], -1, tl.int64)
    for t in range(0, n, BLOCK):
        if found < 0:
            x, key, ids, mask = _load_support(row, support, listed, n, t, BLOCK)
            p = _probs(x, ids, temperature, mx, inv, t1, tie1, k1, -1.0, V, 1.0)
            tie = mask & (p == v)
            rank = tl.cumsum(tie.to(tl.int64), 0) + seen
            hit = tl.min(tl.where(tie & (rank == nth), ids, V), 0).to(tl.int64)
            found = tl.where(hit < V, hit, -1)
            seen += tl.sum(tie.to(tl.int64), 0)
    return found


@triton.jit
def _top_k(row, support, V, temperature, mx, inv, k, top_counts, BLOCK: tl.constexpr, CAP: tl.constexpr):
    """Top-k cut (t1, last tie id, kept mass, support length or -1): p of the k-th largest logit, ties
    to the lower ids; the ids with p >= t1 are listed in support when at most CAP."""
    x_k = _unkey(_kth_largest_key(row, V, k, top_counts, BLOCK))
    t1 = tl.exp(x_k.to(tl.float64) / temperature - mx) * inv
    off = tl.full([], -1.0, tl.float64)
    greater, mass, ties = _boundary(row, support, False, V, V, temperature, mx, inv, off, V, 1.0, t1, BLOCK,
                                    True, CAP)
    listed = greater + ties <= CAP
    n = tl.where(listed, greater + ties, V)
    need = k - greater  # in [1, ties]: fewer than k logits exceed the k-th, at least k reach it
    tie1 = tl.full([], 0, tl.int64) + V
    if need < ties:
        tie1 = _nth_tie(row, support, listed, n, V, temperature, mx, inv, off, V, 1.0, t1, need, BLOCK)
    return t1, tie1, mass + need.to(tl.float64) * t1, tl.where(listed, n, -1)


@triton.jit
def _mass_search(row, support, listed, n, V, temperature, mx, inv, t1, tie1, k1, top_p, BLOCK: tl.constexpr,
                 RADIX_BITS: tl.constexpr):
    """The largest key z whose strictly-greater (top-k-filtered) mass is >= top_p, and the smallest
    positive p above it: the value v of the last kept tie group of top-p."""
    digits = tl.arange(0, 1 << RADIX_BITS).to(tl.int64)
    prefix = tl.full([], 0, tl.int64)
    for level in tl.static_range(32 // RADIX_BITS):
        candidates = prefix + (digits << (32 - RADIX_BITS * (level + 1)))
        masses = tl.zeros([1 << RADIX_BITS], tl.float64)
        for t in range(0, n, BLOCK):
            x, key, ids, mask = _load_support(row, support, listed, n, t, BLOCK)
            p = _probs(x, ids, temperature, mx, inv, t1, tie1, k1, -1.0, V, 1.0)
            masses += tl.sum(tl.where(key[:, None] > candidates[None, :], p[:, None], 0.0), 0)
        digit = tl.maximum(tl.sum((masses >= top_p).to(tl.int64), 0) - 1, 0)
        prefix += digit << (32 - RADIX_BITS * (level + 1))
    v = tl.full([], float("inf"), tl.float64)
    for t in range(0, n, BLOCK):
        x, key, ids, mask = _load_support(row, support, listed, n, t, BLOCK)
        p = _probs(x, ids, temperature, mx, inv, t1, tie1, k1, -1.0, V, 1.0)
        v = tl.minimum(v, tl.min(tl.where((key > prefix) & (p > 0.0), p, float("inf")), 0))
    return v


@triton.jit
def _top_p(row, support, listed, n, V, temperature, mx, inv, t1, tie1, k1, top_p, BLOCK: tl.constexpr,
           RADIX_BITS: tl.constexpr):
    """Top-p cut (t2, last tie id, kept mass) on the top-k-filtered p. Sorted descending, the tie
    group of value v starts after mass G; its i-th member has mass_before G + i * v."""
    v = _mass_search(row, support, listed, n, V, temperature, mx, inv, t1, tie1, k1, top_p, BLOCK, RADIX_BITS)
    greater, mass, ties = _boundary(row, support, listed, n, V, temperature, mx, inv, t1, tie1, k1, v, BLOCK,
                                    False, 1)
    # The largest i < ties with mass + i * v < top_p (i = 0 always kept): estimate, then step.
    i = tl.minimum(tl.maximum((top_p - mass) / v, 0.0), (ties - 1).to(tl.float64)).to(tl.int64)
    while (i + 1 < ties) & (mass + (i + 1).to(tl.float64) * v < top_p):
        i += 1
    while (i > 0) & (mass + i.to(tl.float64) * v >= top_p):
        i -= 1
    kept = i + 1
    tie2 = tl.full([], 0, tl.int64) + V
    if kept < ties:
        tie2 = _nth_tie(row, support, listed, n, V, temperature, mx, inv, t1, tie1, k1, v, kept, BLOCK)
    return v, tie2, mass + kept.to(tl.float64) * v


@triton.jit
def _target_distribution(row, support, V, temperature, top_k, top_p, BLOCK: tl.constexpr,
                         RADIX_BITS: tl.constexpr, CAP: tl.constexpr):
    """The scalars of p = target_distribution(row) (see _probs), and the length of its support list
    (-1: not listed, the support is the whole row)."""
    filtered = (top_k > 0) & (top_k < V)
    mx, inv, top_counts = _softmax_stats(row, V, temperature, filtered, BLOCK)
    t1 = tl.full([], -1.0, tl.float64)
    tie1 = tl.full([], 0, tl.int64) + V
    k1 = tl.full([], 1.0, tl.float64)
    n_listed = tl.full([], -1, tl.int64)
    if filtered:
        t1, tie1, k1, n_listed = _top_k(row, support, V, temperature, mx, inv, top_k, top_counts, BLOCK, CAP)
    t2 = tl.full([], -1.0, tl.float64)
    tie2 = tl.full([], 0, tl.int64) + V
    k2 = tl.full([], 1.0, tl.float64)
    if top_p < 1.0:
        if (n_listed < 0) & (top_p <= 1.0 - TOP_P_LIST_MARGIN):
            floor = (1.0 - top_p) / (2.0 * V)  # top-p keeps no id below it (see the module's docstring)
            greater, mass, ties = _boundary(row, support, False, V, V, temperature, mx, inv, t1, tie1, k1, floor,
                                            BLOCK, True, CAP)
            n_listed = tl.where(greater + ties <= CAP, greater + ties, -1)
        listed = n_listed >= 0
        t2, tie2, k2 = _top_p(row, support, listed, tl.where(listed, n_listed, V), V, temperature, mx, inv, t1,
                              tie1, k1, top_p, BLOCK, RADIX_BITS)
    return mx, inv, t1, tie1, k1, t2, tie2, k2, n_listed
