"""Verification-length policies: how many draft nodes each request verifies this round.

A policy sees the running requests and their proposals (with the drafter's confidences, if any) and
returns, per request, a number of draft nodes to keep (a prefix in node order, always a valid tree).
"""

from __future__ import annotations

from typing import Protocol

from dspark.drafters.base import Proposal


class VerificationPolicy(Protocol):
    def choose(self, requests: list, proposals: list[Proposal]) -> list[int]: ...


class FixedLength:
    """Verify up to `num_draft` nodes of every proposal (the classic fixed gamma)."""

    def __init__(self, num_draft: int):
        if num_draft < 0:
            raise ValueError(f"num_draft must be >= 0, got {num_draft}")
        self.num_draft = num_draft

    def choose(self, requests: list, proposals: list[Proposal]) -> list[int]:
        return [min(len(p), self.num_draft) for p in proposals]
