"""N-gram prompt lookup: propose what followed earlier occurrences of the context's last n tokens
(n from max_ngram down to min_ngram). With branches > 1 the continuations of several occurrences are
merged into a token tree (a trie), so that verification can follow whichever one the target takes.
Deterministic either way, so draft_probs is None."""

from __future__ import annotations

import numpy as np

from dspark.drafters.base import Drafter, Proposal


class NgramIndex:
    """The latest earlier occurrence of every n-gram (min_ngram <= n <= max_ngram) of one growing context,
    kept as hash tables updated with each round's new tokens: `latest_match` costs a few lookups per round
    instead of a pass over the context. The context only grows (a request's committed tokens). An n-gram's
    key is one int (its ids in 32-bit fields), not a tuple: ints are not tracked by Python's cyclic
    garbage collector, whose full passes over a loaded model's objects take ~0.1 s each on this CPU."""

    def __init__(self, max_ngram: int, min_ngram: int):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.sizes = range(max_ngram, min_ngram - 1, -1)
        self.latest: dict[int, dict[int, int]] = {n: {} for n in self.sizes}  # n-gram key -> start
        self.indexed = 0  # the context length the tables cover

    def latest_match(self, tokens: list[int]) -> int | None:
        """Where the continuation of the longest matching suffix's latest earlier occurrence begins (a
        token follows it: the suffix itself is no candidate), or None without a match; tokens extends the
        context this index has followed."""
        length = len(tokens)
        if length < self.indexed:
            raise ValueError(f"the context shrank from {self.indexed} to {length} tokens: an NgramIndex follows "
                             "one growing context")
        low, high = self.sizes[-1], self.sizes[0]
        # New candidates: the n-grams a token follows that end at indexed - 1 .. length - 2, each key built
        # from its last token backwards (the first token in the highest field), later starts overwriting.
        for end in range(max(self.indexed - 1, 0), length - 1):
            key = 0
            for n in range(1, min(high, end + 1) + 1):
                key |= tokens[end - n + 1] << (32 * (n - 1))
                if n >= low:
                    self.latest[n][key] = end - n + 1
        self.indexed = length
        suffix, key = {}, 0
        for n in range(1, min(high, length - 1) + 1):
            key |= tokens[length - n] << (32 * (n - 1))
            suffix[n] = key
        for n in self.sizes:
            if n in suffix:
                start = self.latest[n].get(suffix[n])
                if start is not None:
                    return start + n
        return None


class NgramDrafter(Drafter):
    def __init__(self, num_draft: int = 5, max_ngram: int = 3, min_ngram: int = 1, branches: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        if branches < 1:
            raise ValueError(f"branches must be >= 1, got {branches}")
        self.num_draft, self.max_ngram, self.min_ngram, self.branches = num_draft, max_ngram, min_ngram, branches

    def continuations(self, tokens: list[int], limit: int) -> list[list[int]]:
        """Up to `branches` distinct continuations of the longest matching suffix, latest first. The
        occurrences of each suffix length are found by one vectorised comparison over the context
        (numpy), not a Python scan: a round with many long requests stays cheap."""
        if limit < 1:
            return []
        for n, starts in self._occurrences(tokens):
            found: list[list[int]] = []
            for start in starts[::-1].tolist():
                follow = tokens[start + n: start + n + limit]
                if follow not in found:
                    found.append(follow)
                    if len(found) == self.branches:
                        break
            return found
        return []

    def _occurrences(self, tokens: list[int]):
        """(n, start positions) of the earlier occurrences of the last n tokens, for the longest n first
        that has any."""
        length = len(tokens)
        if length < 2:
            return
        context = np.asarray(tokens, dtype=np.int64)
        for n in range(min(self.max_ngram, length - 1), self.min_ngram - 1, -1):
            starts = length - n  # candidate starts 0 .. length - n - 1 (the suffix itself excluded)
            match = context[0:starts] == context[length - n]
            for j in range(1, n):
                match &= context[j: starts + j] == context[length - n + j]
            found = np.flatnonzero(match)
            if found.size:
                yield n, found

    def propose(self, requests, max_draft: int) -> list[Proposal]:
        limit = min(self.num_draft, max_draft)
        return [self._trie(self.continuations(r.tokens, limit), limit) for r in requests]

    def _trie(self, branches: list[list[int]], limit: int) -> Proposal:
        if len(branches) <= 1:
            return Proposal(branches[0] if branches else [])
        tokens: list[int] = []
        parents: list[int] = []
        children: dict[tuple[int, int], int] = {}  # (parent node, token) -> node; node 0 is the anchor
        for branch in branches:
            node = 0
            for token in branch:
                if (node, token) not in children:
                    if len(tokens) == limit:
                        break
                    tokens.append(token)
                    parents.append(node)
                    children[(node, token)] = len(tokens)
                node = children[(node, token)]
        return Proposal(tokens, parents)
