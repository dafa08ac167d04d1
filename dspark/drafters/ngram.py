"""N-gram prompt lookup: propose the tokens that followed the latest earlier occurrence of the
context's last n tokens (n from max_ngram down to min_ngram). Deterministic, so draft_probs is None."""

from __future__ import annotations

from dspark.drafters.base import Proposal


class NgramDrafter:
    def __init__(self, num_draft: int = 5, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.num_draft, self.max_ngram, self.min_ngram = num_draft, max_ngram, min_ngram

    def start(self, request) -> None:
        pass

    def finish(self, request) -> None:
        pass

    def accept(self, requests, paths, target_hidden) -> None:
        pass

    def lookup(self, tokens: list[int], limit: int) -> list[int]:
        for n in range(min(self.max_ngram, len(tokens) - 1), self.min_ngram - 1, -1):
            suffix = tokens[-n:]
            for start in range(len(tokens) - n - 1, -1, -1):  # latest occurrence first
                if tokens[start: start + n] == suffix:
                    return tokens[start + n: start + n + limit]
        return []

    def propose(self, requests, max_draft: int) -> list[Proposal]:
        limit = min(self.num_draft, max_draft)
        return [Proposal(self.lookup(r.tokens, limit)) for r in requests]
