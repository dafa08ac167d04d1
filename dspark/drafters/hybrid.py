"""N-gram lookup where the context repeats itself, the DSpark drafter everywhere else.

Prompt lookup is nearly free and, when the context has a long enough match (code that reuses names,
math that restates numbers), often right for several tokens; a learned drafter pays a block forward
per round and shines where nothing repeats. Per request and round this drafter proposes the n-gram
continuation when the last `min_match` or more tokens occurred before, else the DSpark block.

Lossless: which drafter speaks is a function of the committed context only, and each proposal
reports the distribution its tokens came from. An n-gram draft is deterministic, so for a sampled
request its rows of draft_probs are point masses (rejection sampling then accepts x with probability
p(x) and resamples from p without x, the exact residual). The DSpark drafter still commits every
accepted token's target features (from the engine's captured side cache), whoever drafted it, so its
caches stay aligned.

Confidences: the schedulers need c_k for every draft token. For n-gram tokens they are the running
conditional acceptance rates per position of earlier n-gram drafts (what was verified and how much of
it was accepted, counted from the engine's `request.verified`), never the current tokens, so they keep
the scheduler's decisions independent of the tokens it admits.
"""

from __future__ import annotations

import torch

from dspark.cache import SideCache
from dspark.drafters.base import Drafter, Proposal
from dspark.drafters.dspark import DSparkDrafter
from dspark.drafters.ngram import NgramDrafter, NgramIndex


class HybridDrafter(Drafter):
    gives_confidences = True

    def __init__(self, dspark: DSparkDrafter, min_match: int = 2, max_match: int = 4, prior: tuple[float, float] = (1.0, 2.0)):
        """min_match / max_match: the shortest and longest context suffix looked up; prior: pseudo-counts
        (accepted, verified) per position before any n-gram draft was verified."""
        if min_match < 1 or max_match < min_match:
            raise ValueError(f"need 1 <= min_match <= max_match, got {min_match}, {max_match}")
        if not 0 < prior[0] <= prior[1]:
            raise ValueError(f"prior must be (accepted, verified) with 0 < accepted <= verified, got {prior}")
        self.dspark = dspark
        self.num_draft = dspark.num_draft
        self.capture_layers = dspark.capture_layers
        self.ngram = NgramDrafter(self.num_draft, max_ngram=max_match, min_ngram=min_match)
        self.accepted = torch.full((self.num_draft,), float(prior[0]), dtype=torch.float64)
        self.verified = torch.full((self.num_draft,), float(prior[1]), dtype=torch.float64)
        self.source: dict[int, str] = {}  # request id -> who drafted its last proposal
        self.indexes: dict[int, NgramIndex] = {}  # request id -> its context's n-gram tables
        self.rounds = {"ngram": 0, "dspark": 0}

    @classmethod
    def from_pretrained(cls, path: str, target, num_draft: int | None = None, dtype: torch.dtype = torch.float32,
                        weights: str | None = None, **kwargs) -> "HybridDrafter":
        """weights: as DSparkDrafter.from_pretrained's."""
        return cls(DSparkDrafter.from_pretrained(path, target, num_draft, dtype=dtype, weights=weights), **kwargs)

    def bind(self, rows: int, max_seq_len: int, vocab_size: int, captured: SideCache | None = None) -> None:
        self.vocab_size = vocab_size
        self.dspark.bind(rows, max_seq_len, vocab_size, captured)

    def start(self, request) -> None:
        self.indexes.pop(request.id, None)  # ids restart with every engine sharing this drafter
        self.dspark.start(request)

    def finish(self, request) -> None:
        self.source.pop(request.id, None)
        self.indexes.pop(request.id, None)
        self.dspark.finish(request)

    def source_for(self, request) -> str:
        return "dspark" if self._match(request) is None else "ngram"

    def _match(self, request) -> int | None:
        index = self.indexes.get(request.id)
        if index is None:
            index = self.indexes[request.id] = NgramIndex(self.ngram.max_ngram, self.ngram.min_ngram)
        return index.latest_match(request.tokens)

    def ngram_confidences(self) -> torch.Tensor:
        return (self.accepted / self.verified).float()

    def propose(self, requests, max_draft: int) -> list[Proposal]:
        return self.propose_pruned(requests, max_draft, 0.0)

    def propose_pruned(self, requests, max_draft: int, survival_floor: float) -> list[Proposal]:
        limit = min(self.num_draft, max_draft)
        starts = [self._match(r) if limit > 0 else None for r in requests]
        learned = [r for r, at in zip(requests, starts) if at is None]
        drafted = iter(self.dspark.propose_pruned(learned, max_draft, survival_floor) if learned else [])
        out = []
        for r, at in zip(requests, starts):
            if at is not None:
                self.source[r.id] = "ngram"
                out.append(self._ngram_proposal(r, r.tokens[at: at + limit]))
            else:
                self.source[r.id] = "dspark"
                out.append(next(drafted))
            self.rounds[self.source[r.id]] += 1
        return out

    def _ngram_proposal(self, request, tokens: list[int]) -> Proposal:
        draft_probs = None
        if request.params.temperature > 0:  # point masses; the last node has no children: a zero row
            draft_probs = torch.zeros(len(tokens) + 1, self.vocab_size, device=self.dspark.device)
            draft_probs[torch.arange(len(tokens)), torch.tensor(tokens)] = 1.0
        return Proposal(list(tokens), draft_probs=draft_probs,
                        confidences=self.ngram_confidences()[: len(tokens)].to(self.dspark.device))

    def accept(self, requests, paths) -> None:
        if self.source:  # else nothing was drafted: nothing to count
            for r, path in zip(requests, paths):
                if self.source.pop(r.id, None) == "ngram":
                    verified, accepted = int(getattr(r, "verified", 0)), len(path) - 1
                    tried = min(verified, accepted + 1)  # positions 1..tried were verified with their prefix accepted
                    self.verified[:tried] += 1
                    self.accepted[:min(accepted, tried)] += 1
        self.dspark.accept(requests, paths)
