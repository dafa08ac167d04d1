"""The vectorised n-gram matcher against the plain scan it replaced (the specification), on random
contexts with many repeats: the same continuations, in the same order."""

from __future__ import annotations

import random

import pytest

from dspark.drafters import NgramDrafter
from dspark.drafters.ngram import NgramIndex


def scan(tokens, limit, max_ngram, min_ngram, branches):
    for n in range(min(max_ngram, len(tokens) - 1), min_ngram - 1, -1):
        suffix, found = tokens[-n:], []
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start: start + n] == suffix:
                follow = tokens[start + n: start + n + limit]
                if follow and follow not in found:
                    found.append(follow)
                    if len(found) == branches:
                        break
        if found:
            return found
    return []


@pytest.mark.parametrize("branches", [1, 3])
@pytest.mark.parametrize("max_ngram,min_ngram", [(3, 1), (4, 2), (1, 1)])
def test_matches_the_plain_scan(branches, max_ngram, min_ngram):
    rng = random.Random(branches * 10 + max_ngram)
    drafter = NgramDrafter(5, max_ngram=max_ngram, min_ngram=min_ngram, branches=branches)
    for _ in range(300):
        vocab = rng.choice([2, 4, 16, 1000])
        tokens = [rng.randrange(vocab) for _ in range(rng.randint(0, 60))]
        limit = rng.randint(1, 8)
        assert drafter.continuations(tokens, limit) == scan(tokens, limit, max_ngram, min_ngram, branches), tokens


@pytest.mark.parametrize("max_ngram,min_ngram", [(3, 1), (4, 2), (1, 1)])
def test_the_incremental_index_matches_the_scan_as_the_context_grows(max_ngram, min_ngram):
    """NgramIndex follows one context through rounds that add 0..8 tokens (a round's accepted tokens, or
    none), and after each finds the match the full scan finds."""
    rng = random.Random(7 * max_ngram + min_ngram)
    for _ in range(60):
        vocab = rng.choice([2, 4, 16])
        tokens = [rng.randrange(vocab) for _ in range(rng.randint(1, 6))]
        index = NgramIndex(max_ngram, min_ngram)
        for _ in range(25):
            expected = scan(tokens, 4, max_ngram, min_ngram, 1)
            at = index.latest_match(tokens)
            assert (at is None) == (not expected), tokens
            if at is not None:
                assert tokens[at: at + 4] == expected[0], tokens
            tokens = tokens + [rng.randrange(vocab) for _ in range(rng.randint(0, 8))]
    with pytest.raises(ValueError, match="shrank"):
        index.latest_match(tokens[:-20])
