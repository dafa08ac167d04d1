"""CorpusIndex (dspark.drafters.corpus): every lookup equals a brute-force count over the corpus, on fresh
random corpora across orders and count thresholds; continuations, files and the cache; bad input refused."""

from __future__ import annotations

import collections
import os
import random

import numpy as np
import pytest

from dspark.drafters.corpus import CorpusIndex, read_corpus, write_corpus


def reference_next(sequences, context, min_order, max_order, min_count):
    """The most frequent follower (smallest id on ties) of the longest n-gram ending the context seen at
    least min_count times, with its share of the n-gram's occurrences."""
    for n in range(min(max_order, len(context)), min_order - 1, -1):
        gram = tuple(context[len(context) - n:])
        followers = collections.Counter(s[i + n] for s in sequences for i in range(len(s) - n)
                                        if tuple(s[i: i + n]) == gram)
        total = sum(followers.values())
        if total >= min_count:
            token, count = min(followers.items(), key=lambda kv: (-kv[1], kv[0]))
            return token, count / total
    return None


def random_corpus(rng: random.Random, vocab: int, sequences: int, first_id: int = 0):
    """Small vocabularies repeat n-grams; a sticky walk makes some followers dominate. Ids from first_id on."""
    out = []
    for _ in range(sequences):
        s = [rng.randrange(vocab)]
        for _ in range(rng.randrange(0, 40)):
            s.append(s[-1] + 1 if rng.random() < 0.5 else rng.randrange(vocab))
        out.append([first_id + t % vocab for t in s])
    return out


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("vocab,first_id", [(5, 0), (11, 0), (7, 70000)])  # ids past 16 bits too
@pytest.mark.parametrize("orders,min_count", [((1, 3), 1), ((2, 5), 2), ((3, 8), 3)])
def test_lookups_match_a_brute_force_count(seed, vocab, first_id, orders, min_count):
    rng = random.Random(seed)
    sequences = random_corpus(rng, vocab, 30, first_id)
    index = CorpusIndex.build(sequences, *orders, min_count=min_count)
    hits = 0
    for _ in range(300):
        source = rng.choice(sequences)
        context = source[: rng.randrange(0, len(source) + 1)] if rng.random() < 0.8 else \
            [first_id + rng.randrange(vocab) for _ in range(rng.randrange(0, 10))]
        want = reference_next(sequences, context, *orders, min_count)
        got = index.next_token(context)
        assert (got is None) == (want is None), context
        assert index.next_token(np.asarray(context, dtype=np.int64)) == got  # numpy ids hash alike
        if want is not None:
            hits += 1
            assert got[0] == want[0] and got[1] == pytest.approx(want[1], abs=1e-12)
            # a continuation's first token is the lookup's, whatever the context's length
            assert index.continuation(context, 1) == ([got[0]], [got[1]])
    assert hits > 30  # the comparison saw many lookups that found something


def test_continuation_extends_its_own_context_and_stops_at_low_confidence():
    sequences = [[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 9, 9], [7, 2, 3, 4, 5, 8]]
    index = CorpusIndex.build(sequences, 2, 3, min_count=1)
    tokens, confidences = index.continuation([0, 1, 2], 5)
    assert tokens == [3, 4, 5, 6]  # "1 2" -> 3, "1 2 3" -> 4, "2 3 4" -> 5 (3 of 4), "3 4 5" -> 6 (2 of 3)
    assert confidences == pytest.approx([1.0, 1.0, 0.75, 2 / 3])
    assert index.continuation([0, 1, 2], 2) == ([3, 4], [1.0, 1.0])
    assert index.continuation([0, 1, 2], 5, min_confidence=0.7)[0] == [3, 4, 5]
    assert index.continuation([42, 43], 5) == ([], [])
    assert index.continuation([], 5) == ([], [])


def test_n_grams_never_span_two_sequences_and_an_empty_index_finds_nothing():
    index = CorpusIndex.build([[1, 2], [3, 4]], 2, 2, min_count=1)
    assert index.next_token([1, 2]) is None and len(index) == 0
    assert CorpusIndex.build([], 1, 3).next_token([1, 2, 3]) is None
    nothing_twice = CorpusIndex.build([[1, 2, 3, 4]])  # every n-gram once: below min_count 2
    assert len(nothing_twice) == 0 and nothing_twice.continuation([1, 2, 3], 4) == ([], [])


def test_files_and_the_cache_give_the_same_index(tmp_path):
    rng = random.Random(7)
    sequences = random_corpus(rng, 9, 40, first_id=65530)  # ids on both sides of 2^16
    path = str(tmp_path / "corpus.safetensors")
    write_corpus(path, sequences)
    assert [s.tolist() for s in read_corpus(path)] == sequences
    small = str(tmp_path / "small.safetensors")
    write_corpus(small, [[65535, 0, 7]])  # fits 16 bits: stored as uint16, read back exactly
    assert [s.tolist() for s in read_corpus(small)] == [[65535, 0, 7]]
    cache = str(tmp_path / "cache")
    built = CorpusIndex.from_corpus_file(path, cache, min_order=1, max_order=4)
    assert len(os.listdir(cache)) == 1
    cached = CorpusIndex.from_corpus_file(path, cache, min_order=1, max_order=4)
    other = CorpusIndex.from_corpus_file(path, cache, min_order=2, max_order=4)  # other arguments: another entry
    assert len(os.listdir(cache)) == 2 and len(other) != len(built)
    for name in ("keys", "next_tokens", "confidences"):
        np.testing.assert_array_equal(getattr(built, name), getattr(cached, name))
    found = 0
    for s in sequences:
        assert cached.next_token(s) == built.next_token(s) == CorpusIndex.build(sequences, 1, 4).next_token(s)
        found += built.next_token(s) is not None
    assert found > 10


def test_bad_input_is_refused(tmp_path):
    with pytest.raises(ValueError, match="min_order"):
        CorpusIndex.build([[1, 2, 3]], 0, 3)
    with pytest.raises(ValueError, match="min_order"):
        CorpusIndex.build([[1, 2, 3]], 4, 3)
    with pytest.raises(ValueError, match="min_count"):
        CorpusIndex.build([[1, 2, 3]], 1, 3, min_count=0)
    with pytest.raises(ValueError, match="token ids"):
        CorpusIndex.build([[1, -2, 3]], 1, 3)
    for bad in ([[1, -1]], [[1, 1 << 31]]):
        with pytest.raises(ValueError, match="token ids"):
            write_corpus(str(tmp_path / "bad-ids.safetensors"), bad)
    keys = np.array([3, 2], dtype=np.uint64)
    with pytest.raises(ValueError, match="increasing"):
        CorpusIndex(keys, np.array([1, 1]), np.array([1, 1]), np.array([1, 1]), 1, 2)
    with pytest.raises(ValueError, match="one entry"):
        CorpusIndex(keys[:1], np.array([1, 1]), np.array([1]), np.array([1]), 1, 2)
    from safetensors.torch import save_file
    import torch

    path = str(tmp_path / "bad.safetensors")
    save_file({"tokens": torch.arange(5), "offsets": torch.tensor([0, 3, 9])}, path)
    with pytest.raises(ValueError, match="offsets"):
        read_corpus(path)


def test_the_corpus_command_writes_a_drafters_corpus_and_names_a_bad_line(tmp_path):
    import json

    from dspark.cli import main
    from dspark.drafters.corpus import CORPUS_FILE

    data = tmp_path / "replies.jsonl"
    replies = [[5, 6, 7, 5, 6, 8], [5, 6, 7, 9], [1, 2, 3]]
    data.write_text("".join(json.dumps({"response_ids": r}) + "\n" for r in replies) + "\n")
    drafter = tmp_path / "drafter"
    drafter.mkdir()
    assert main(["corpus", "--drafter", str(drafter), "--data", str(data)]) == 0
    assert [s.tolist() for s in read_corpus(str(drafter / CORPUS_FILE))] == replies
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"response_ids": [1, 2]}) + "\n" + json.dumps({"prompt_ids": [1]}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        main(["corpus", "--drafter", str(drafter), "--data", str(bad)])
    negative = tmp_path / "negative.jsonl"
    negative.write_text(json.dumps({"response_ids": [1, -2, 3]}) + "\n")
    with pytest.raises(ValueError, match="token ids"):
        main(["corpus", "--drafter", str(drafter), "--data", str(negative)])
    assert [s.tolist() for s in read_corpus(str(drafter / CORPUS_FILE))] == replies  # the old file kept
    assert sorted(p.name for p in drafter.iterdir()) == [CORPUS_FILE]  # no temporary file left
