"""Reference rejection sampling over draft chains and trees (DESIGN.md, op 2).

Per request, starting at the anchor u = 0: judge u's children in index order; the first accepted
child becomes u and the walk goes on; when none is accepted, one token is sampled from what is left
of the target distribution (the correction), or from p_u itself when u has no children (the bonus).
Uniform a = uniforms[c, 0] judges child c; uniforms[u, 1] samples the final token at node u.
"""

from __future__ import annotations

import torch

from dspark import tree
from dspark.reference.philox import philox_uniforms


def target_distribution(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """float64 probabilities: softmax(logits / temperature), then the top-k largest (ties: lower id
    first), then the smallest prefix of those, by descending probability, whose mass reaches top_p."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    vocab = probs.numel()
    if 0 < top_k < vocab:
        order = torch.sort(probs, descending=True, stable=True).indices
        probs = torch.zeros_like(probs).index_copy(0, order[:top_k], probs[order[:top_k]])
        probs = probs / probs.sum()
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True, stable=True)
        mass_before = torch.cumsum(sorted_probs, 0) - sorted_probs
        keep = order[mass_before < top_p]
        probs = torch.zeros_like(probs).index_copy(0, keep, probs[keep])
        probs = probs / probs.sum()
    return probs


def sample_index(weights: torch.Tensor, uniform: float) -> int:
    """Inverse CDF over unnormalised weights: the first id whose cumulative weight exceeds
    uniform * total. Ids of weight 0 are never returned, also for uniform == 0."""
    cumulative = torch.cumsum(weights, 0)
    hits = torch.nonzero((cumulative > uniform * cumulative[-1]) & (weights > 0))
    if hits.numel() == 0:  # rounding at the top end: take the last id that has weight
        hits = torch.nonzero(weights > 0)[-1:]
    return int(hits[0])


def remove_rejected(residual: torch.Tensor, token: int) -> torch.Tensor:
    """Deterministic proposals: a rejected child's token gets no more mass."""
    residual = residual.clone()
    residual[token] = 0.0
    return residual


def residual_after_rejection(residual: torch.Tensor, q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Stochastic proposals: norm(max(residual - q, 0)); p again when nothing is left (p == q)."""
    left = torch.clamp(residual - q, min=0.0)
    return left / left.sum() if left.sum() > 0 else p.clone()


def _walk_greedy(logits: torch.Tensor, tokens: list[int], kids: list[list[int]]) -> tuple[list[int], list[int]]:
    node, path, emitted = 0, [0], []
    while True:
        best = int(torch.argmax(logits[node]))  # ties: the lowest id
        emitted.append(best)
        match = next((c for c in kids[node] if tokens[c] == best), None)
        if match is None:
            return path, emitted
        path.append(match)
        node = match


def _walk_sampled(
    logits: torch.Tensor,
    tokens: list[int],
    kids: list[list[int]],
    draft_probs: torch.Tensor | None,
    uniforms: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
) -> tuple[list[int], list[int]]:
    node, path, emitted = 0, [0], []
    while True:
        p = target_distribution(logits[node], temperature, top_k, top_p)
        residual = p.clone()
        accepted = None
        for child in kids[node]:
            x, a = tokens[child], float(uniforms[child, 0])
            if draft_probs is None:
                # Deterministic proposal: accept with residual(x) / sum(residual), else remove x.
                if a * float(residual.sum()) < float(residual[x]):
                    accepted = child
                    break
                residual = remove_rejected(residual, x)
            else:
                # Child drawn from q: accept with min(1, residual(x) / q(x)), else norm(max(residual - q, 0)).
                q = draft_probs[node].double()
                if a * float(q[x]) < float(residual[x]):
                    accepted = child
                    break
                residual = residual_after_rejection(residual, q, p)
        if accepted is None:
            if not residual.sum() > 0:
                residual = p
            emitted.append(sample_index(residual, float(uniforms[node, 1])))
            return path, emitted
        emitted.append(tokens[accepted])
        path.append(accepted)
        node = accepted


def rejection_sample(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    qo_indptr: torch.Tensor,
    parents: torch.Tensor | None,
    draft_probs: torch.Tensor | None,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    uniforms: torch.Tensor | None = None,
    seed: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    max_nodes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (accepted_nodes [R, W] int32, num_accepted [R] int32, output_tokens [R, W] int64),
    padded with -1, W = max_nodes (default: the largest n_r). Per-request sampling parameters are
    [R] tensors; temperature 0 is greedy."""
    num_requests = qo_indptr.numel() - 1
    counts = [int(qo_indptr[r + 1] - qo_indptr[r]) for r in range(num_requests)]
    width = max(counts, default=1) if max_nodes is None else max_nodes
    if uniforms is None and seed is not None:
        uniforms = philox_uniforms(seed, offset, qo_indptr)
    accepted_nodes = torch.full((num_requests, width), -1, dtype=torch.int32)
    output_tokens = torch.full((num_requests, width), -1, dtype=torch.int64)
    num_accepted = torch.zeros(num_requests, dtype=torch.int32)
    for r in range(num_requests):
        start, end = int(qo_indptr[r]), int(qo_indptr[r + 1])
        if end == start:  # an idle request: nothing accepted, nothing emitted
            continue
        kids = tree.children(tree.request_parents(parents, qo_indptr, r))
        tokens = draft_tokens[start:end].tolist()
        if float(temperature[r]) == 0.0:
            path, emitted = _walk_greedy(target_logits[start:end], tokens, kids)
        else:
            path, emitted = _walk_sampled(
                target_logits[start:end],
                tokens,
                kids,
                None if draft_probs is None else draft_probs[start:end],
                uniforms[start:end],
                float(temperature[r]),
                int(top_k[r]),
                float(top_p[r]),
            )
        accepted_nodes[r, : len(path)] = torch.tensor(path, dtype=torch.int32)
        output_tokens[r, : len(emitted)] = torch.tensor(emitted, dtype=torch.int64)
        num_accepted[r] = len(path)
    device = target_logits.device
    return accepted_nodes.to(device), num_accepted.to(device), output_tokens.to(device)
