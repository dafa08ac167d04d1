"""Verification-length policies: how many draft nodes each request verifies this round.

A policy sees the running requests and their proposals (with the drafter's confidences, if any) and
returns, per request, a number of draft nodes to keep (a prefix in node order, always a valid tree).

Losslessness (DSPARK.md section 4, Appendix A of the paper): rejection sampling stays exact as long as
whether x_{r,k} is verified never depends on the value of x_{r,k} itself. The survival a_{r,k} =
c_1 ... c_k depends on x_{r,<k} only (c_k reads x_{k-1}), and a_{r,k+1} <= a_{r,k}, so any rule that
decides on (r, k) after looking only at candidates ranked at or above it in the order (survival
descending, ties by lower k) is safe. The prefix scheduler stops at the first candidate that does not
pay; the asynchronous one takes a top-K whose K comes from confidences two rounds old. A global search
that looks past a non-improving candidate is not safe: `GlobalSearch` exists only to show that.

Whether a request drafts at all is the draft gates' part (dspark.draft_gates, re-exported here).
"""

from __future__ import annotations

import abc
from collections import deque

from dspark.draft_gates import DraftGate, ThroughputGate
from dspark.drafters.base import DEFAULT_SOURCE, Proposal


class VerificationPolicy(abc.ABC):
    """How many draft nodes each request verifies this round; which requests draft at all."""

    def may_draft(self, batch: int) -> bool:
        """False when no request of this round (of `batch` requests) will draft whatever source would speak
        for it: the engine then asks neither the drafter nor should_draft (default: True). Reads earlier
        rounds only."""
        return True

    def should_draft(self, requests: list, sources: list[str] | None = None) -> list[bool]:
        """Per request, whether to ask the drafter for a proposal this round (default: all); sources:
        per request, which of the drafter's sources would speak (Drafter.source_for). Must read earlier
        rounds and the committed context only, never this round's tokens (losslessness)."""
        return [True] * len(requests)

    @abc.abstractmethod
    def choose(self, requests: list, proposals: list[Proposal]) -> list[int]:
        """Per request, how many of its proposal's nodes (a prefix in node order) to verify."""

    def most_nodes(self) -> int | None:
        """The most draft nodes this policy verifies per request, or None for no cap of its own: the engine
        asks drafters for no more (default: None)."""
        return None

    def survival_floor(self, batch: int, most_nodes: int) -> float:
        """A survival below which choose() never verifies a node, in a round of `batch` requests whose
        proposals hold at most `most_nodes` nodes each: drafters may stop drafting there
        (Drafter.propose_pruned). Must not depend on this round's tokens. Default: 0.0 (none)."""
        return 0.0

    def observe_round(self, batch: int, drafted: bool, tokens: int, seconds: float,
                      sources: tuple[str, ...] = ()) -> None:
        """After each decoding round: its batch size, whether anything was drafted (and by which
        sources), the tokens it emitted and its wall time (drafting included). Default: ignored."""


class FixedLength(VerificationPolicy):
    """Verify up to `num_draft` nodes of every proposal (the classic fixed gamma)."""

    def __init__(self, num_draft: int):
        if num_draft < 0:
            raise ValueError(f"num_draft must be >= 0, got {num_draft}")
        self.num_draft = num_draft

    def choose(self, requests: list, proposals: list[Proposal]) -> list[int]:
        return [min(len(p), self.num_draft) for p in proposals]

    def most_nodes(self) -> int | None:
        return self.num_draft


def survival(proposal: Proposal) -> list[float]:
    """a_k = c_1 ... c_k of a chain proposal (the probability that x_1..x_k are all accepted)."""
    if len(proposal) == 0:
        return []
    if proposal.parents is not None:
        raise ValueError("confidence-scheduled policies take chain proposals (parents=None), not trees")
    if proposal.confidences is None or len(proposal.confidences) != len(proposal):
        raise ValueError("confidence-scheduled policies need the drafter's per-token confidences "
                         "(Proposal.confidences); this drafter gives none: use FixedLength")
    out, a = [], 1.0
    for c in proposal.confidences.tolist():
        if not 0.0 <= c <= 1.0:  # NaN fails too
            raise ValueError(f"Proposal.confidences must be probabilities in [0, 1], got {c}")
        a *= c
        out.append(a)
    return out


def ranked_candidates(survivals: list[list[float]]) -> list[tuple[float, int, int]]:
    """All (a, k, r) with k 1-based, best first: survival descending, ties by lower k (then r)."""
    out = [(a, k + 1, r) for r, column in enumerate(survivals) for k, a in enumerate(column)]
    out.sort(key=lambda item: (-item[0], item[1], item[2]))
    return out


class ConfidenceThreshold(VerificationPolicy):
    """Verify each request's prefix whose survival is at least `threshold` (at most `max_draft`)."""

    def __init__(self, threshold: float, max_draft: int | None = None):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
        self.threshold, self.max_draft = threshold, max_draft

    def choose(self, requests: list, proposals: list[Proposal]) -> list[int]:
        lengths = []
        for p in proposals:
            a = survival(p)[: self.max_draft]
            lengths.append(next((k for k, value in enumerate(a) if value < self.threshold), len(a)))
        return lengths


class SPSPolicy(VerificationPolicy):
    """What the hardware-aware policies share: the SPS curve, a cap on drafts, the draft gates: `gate`,
    per request from confidences; `throughput_gate`, per round from measured times (what `dspark
    generate` and `dspark serve` use; off by default because its choices depend on timing). A
    ThroughputGate instance may be passed instead of True, so that its estimates outlive this policy
    (a new engine for each batch of requests, as bench/load.py builds, need not measure them afresh)."""

    def __init__(self, sps, max_draft: int | None = None, gate: bool = True,
                 throughput_gate: "bool | ThroughputGate" = False):
        self.sps, self.max_draft = sps, max_draft
        self._one_token_pays: dict[int, bool] = {}  # batch -> whether a certain draft token pays (PrefixScheduler)
        self._floors: dict[tuple[int, int], float] = {}  # (batch, most nodes) -> survival_floor (PrefixScheduler)
        self.gate = DraftGate(sps) if gate else None
        if isinstance(throughput_gate, ThroughputGate):
            self.throughput = throughput_gate
        else:
            self.throughput = ThroughputGate(expected=lambda b: b * sps(b)) if throughput_gate else None

    def may_draft(self, batch: int) -> bool:
        return self.throughput is None or not self.throughput.quiet(batch)

    def most_nodes(self) -> int | None:
        return self.max_draft

    def should_draft(self, requests: list, sources: list[str] | None = None) -> list[bool]:
        allowed = [True] * len(requests)
        if self.throughput is not None:
            sources = sources or [DEFAULT_SOURCE] * len(requests)
            by_source = {s: self.throughput.should_draft(len(requests), s) for s in dict.fromkeys(sources)}
            allowed = [by_source[s] for s in sources]
        if self.gate is None or not any(allowed):
            return allowed
        return self.gate.should_draft(requests, allowed)

    def observe_round(self, batch: int, drafted: bool, tokens: int, seconds: float,
                      sources: tuple[str, ...] = ()) -> None:
        if self.throughput is not None:
            self.throughput.observe(batch, drafted, tokens, seconds, sources)

    def survivals(self, requests: list, proposals: list[Proposal]) -> list[list[float]]:
        out = [survival(p)[: self.max_draft] for p in proposals]
        if self.gate:
            self.gate.observe(requests, out)
        return out


class PrefixScheduler(SPSPolicy):
    """The hardware-aware prefix scheduler: admit candidates best first while the expected
    throughput tau * SPS(B) improves, and stop at the first one that does not. With `gate`, requests
    whose recent confidences would not pay skip drafting (DraftGate). A batch size at which even a
    certain token (a = 1) does not pay, (B + 1) * SPS(B + 1) <= B * SPS(B), admits nothing whatever
    the confidences, so its rounds do not draft at all (nor try drafting)."""

    def may_draft(self, batch: int) -> bool:
        pays = self._one_token_pays.get(batch)
        if pays is None:
            pays = self._one_token_pays[batch] = (batch + 1) * self.sps(batch + 1) > batch * self.sps(batch)
        return pays and super().may_draft(batch)

    def survival_floor(self, batch: int, most_nodes: int) -> float:
        """choose() admits a candidate of survival a when (tau + a) * SPS(t + 1) > tau * SPS(t), with t the
        tokens admitted so far (batch <= t <= batch * (1 + most_nodes)) and tau >= batch: never when
        a <= batch * min over those t of (SPS(t) / SPS(t + 1) - 1)."""
        key = (batch, most_nodes)
        floor = self._floors.get(key)
        if floor is None:
            gains = [self.sps(t) / self.sps(t + 1) - 1.0 for t in range(batch, batch * (1 + most_nodes) + 1)]
            # shaved by a relative 1e-9: choose() compares rounded products, and a node it might admit stays
            floor = self._floors[key] = max(0.0, batch * min(gains) * (1.0 - 1e-9))
        return floor

    def choose(self, requests: list, proposals: list[Proposal]) -> list[int]:
        lengths = [0] * len(proposals)
        if not any(p.tokens for p in proposals):  # nothing drafted (a plain round): nothing to rank or observe
            return lengths
        survivals = self.survivals(requests, proposals)
        tokens = tau = float(len(proposals))
        best = tau * self.sps(tokens)
        for a, k, r in ranked_candidates(survivals):
            theta = (tau + a) * self.sps(tokens + 1)
            if theta <= best:
                break
            lengths[r], tokens, tau, best = k, tokens + 1, tau + a, theta
        return lengths


def best_capacity(sps, values: list[float], requests: int) -> int:
    """The number of draft tokens K that maximises (R + sum of the K best survivals) * SPS(R + K)
    over every K (a global search: used only on confidences that cannot depend on this round)."""
    best_k, best, tau = 0, requests * sps(requests), float(requests)
    for k, a in enumerate(sorted(values, reverse=True), start=1):
        tau += a
        theta = tau * sps(requests + k)
        if theta > best:
            best_k, best = k, theta
    return best_k


class AsyncScheduler(SPSPolicy):
    """The production variant: the capacity K comes from the survivals of two rounds ago (so it cannot
    depend on this round's tokens), then this round's candidates are admitted as a top-K by their
    current survival, with no early stop. Until two rounds of history exist it acts as the prefix
    scheduler."""

    def __init__(self, sps, max_draft: int | None = None, lag: int = 2, gate: bool = True,
                 throughput_gate: "bool | ThroughputGate" = False):
        if throughput_gate:
            # Undrafted rounds leave empty histories, so an exploring drafting round would get capacity 0
            # and the gate would never see drafting pay.
            raise ValueError("AsyncScheduler takes no throughput_gate (use PrefixScheduler for that)")
        super().__init__(sps, max_draft, gate, throughput_gate)
        self.lag = lag
        self.history: deque[dict[int, list[float]]] = deque(maxlen=lag)
        self.fallback = PrefixScheduler(sps, max_draft, gate=False)

    def choose(self, requests: list, proposals: list[Proposal]) -> list[int]:
        survivals = self.survivals(requests, proposals)
        old = self.history[0] if len(self.history) == self.lag else None
        self.history.append({r.id: a for r, a in zip(requests, survivals)})
        if old is None:
            return self.fallback.choose(requests, proposals)
        stale = [a for r in requests for a in old.get(r.id, [])]
        capacity = best_capacity(self.sps, stale, len(requests))
        lengths = [0] * len(proposals)
        for _, k, r in ranked_candidates(survivals)[:capacity]:
            lengths[r] = max(lengths[r], k)
        return lengths


class GlobalSearch(VerificationPolicy):
    """NOT lossless, kept to demonstrate why: per request, the length maximising expected throughput
    over all prefixes, looking past candidates that do not pay. Its choice to verify x_k can depend on
    c_{k+1}, which reads x_k itself (the paper's Appendix A counterexample)."""

    def __init__(self, sps):
        self.sps = sps

    def choose(self, requests: list, proposals: list[Proposal]) -> list[int]:
        lengths = []
        for p in proposals:
            a = survival(p)
            gains = [(1 + sum(a[:k])) * self.sps(1 + k) for k in range(len(a) + 1)]
            lengths.append(max(range(len(gains)), key=lambda k: (gains[k], -k)))
        return lengths
