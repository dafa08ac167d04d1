"""Decoding statistics: per request and per run (DESIGN.md, engine cycle)."""

from __future__ import annotations

import dataclasses

from dspark import tree


@dataclasses.dataclass
class RequestStats:
    rounds: int = 0
    emitted: int = 0
    # attempts[j] / accepted[j]: rounds whose draft reached depth j + 1 with depths <= j all accepted,
    # and those of them that accepted depth j + 1 too (acceptance conditioned on the earlier ones).
    attempts: list[int] = dataclasses.field(default_factory=list)
    accepted: list[int] = dataclasses.field(default_factory=list)

    verified: int = 0  # draft nodes the target verified, over all rounds (the verification budget spent)

    def record_round(self, num_drafted: int, num_accepted_drafts: int, parents: list[int] | None) -> None:
        self.rounds += 1
        self.verified += num_drafted
        self.emitted += num_accepted_drafts + 1
        depth = num_drafted if parents is None else max(tree.depths(parents), default=0)
        while len(self.attempts) < depth:
            self.attempts.append(0)
            self.accepted.append(0)
        for j in range(min(depth, num_accepted_drafts + 1)):
            self.attempts[j] += 1
            self.accepted[j] += j < num_accepted_drafts


@dataclasses.dataclass
class RunStats:
    rounds: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_time: float = 0.0
    draft_time: float = 0.0
    verify_time: float = 0.0
    wall_time: float = 0.0

    def summary(self, requests: list) -> dict:
        """tau, conditional acceptance per depth and throughput over the given finished requests."""
        rounds = sum(r.stats.rounds for r in requests)
        emitted = sum(r.stats.emitted for r in requests)
        depth = max((len(r.stats.attempts) for r in requests), default=0)
        attempts = [sum(r.stats.attempts[j] for r in requests if j < len(r.stats.attempts)) for j in range(depth)]
        accepted = [sum(r.stats.accepted[j] for r in requests if j < len(r.stats.accepted)) for j in range(depth)]
        decode_time = self.draft_time + self.verify_time
        return {
            "rounds": self.rounds,
            "tau": emitted / rounds if rounds else 0.0,
            "acceptance_by_depth": [a / t if t else 0.0 for a, t in zip(accepted, attempts)],
            "generated_tokens": self.generated_tokens,
            "tokens_per_s": self.generated_tokens / self.wall_time if self.wall_time else 0.0,
            "decode_tokens_per_s": emitted / decode_time if decode_time else 0.0,
            "prefill_s": self.prefill_time,
            "draft_s": self.draft_time,
            "verify_s": self.verify_time,
            "wall_s": self.wall_time,
        }
