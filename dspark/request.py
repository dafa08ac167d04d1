"""A request as the engine tracks it, and the events a step emits."""

from __future__ import annotations

import dataclasses

from dspark.sampling_params import SamplingParams
from dspark.stats import RequestStats


@dataclasses.dataclass
class Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    row: int = -1
    tokens: list[int] = dataclasses.field(default_factory=list)  # prompt + emitted; the last is the anchor
    prefilled: int = 0  # prompt tokens already in the cache (a long prompt is prefilled in chunks)
    generated: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    text: str = ""
    rounds: int = 0
    verified: int = 0  # draft nodes verified in the last round (what the policy admitted, within max_tokens)
    stats: RequestStats = dataclasses.field(default_factory=RequestStats)


@dataclasses.dataclass
class Event:
    request_id: int
    new_tokens: list[int]
    finished: bool
