"""Corpus lookup: what the target itself wrote after the same few tokens elsewhere.

A `CorpusIndex` holds, for every n-gram (min_order <= n <= max_order) seen at least `min_count` times in a
corpus of token sequences (the target's own replies to instructions unlike the requests it will serve,
e.g. the drafter's self-generated training data), its most frequent next token and how often that token
followed it. Drafting from it continues a request's context with the longest n-gram the corpus knows,
one token at a time, and the confidence of each token is the fraction of the n-gram's occurrences it
followed: a function of the tokens before it only (never of itself), as the schedulers require. Where the
request's own context repeats itself, n-gram prompt lookup is the better source; the corpus covers the
phrasing a model repeats across requests ("To find the total, we ...", "```python\\ndef ").

Keys are 64-bit polynomial hashes of (n, the n tokens) in one sorted array, so one vectorised search finds
every order at once; a colliding hash can only cost a rejected draft, never change an output.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import torch

CORPUS_FILE = "corpus.safetensors"  # in a drafter's folder: the token sequences of its CorpusIndex
_MULTIPLIER = 1_000_003
_INDEX_FORMAT = 1  # part of the cache key: bump when the hash, the tie rule or the saved arrays change
_MASK = (1 << 64) - 1


def _hash_column(order: int, columns: list[np.ndarray]) -> np.ndarray:
    """The hashes of n-grams whose j-th tokens are columns[j] (numpy uint64 arithmetic wraps, as _hash's)."""
    key = np.full(len(columns[0]), order, dtype=np.uint64)
    for column in columns:
        key = key * np.uint64(_MULTIPLIER) + column.astype(np.uint64) + np.uint64(1)
    return key


def _hash(tokens) -> int:
    key = len(tokens)
    for token in tokens:
        key = (key * _MULTIPLIER + int(token) + 1) & _MASK  # int(): numpy ids would overflow a C long
    return key


def _check_orders(min_order: int, max_order: int) -> None:
    if not 1 <= min_order <= max_order:
        raise ValueError(f"need 1 <= min_order <= max_order, got {min_order}, {max_order}")


class CorpusIndex:
    """Most frequent next token of every n-gram of a corpus seen at least min_count times (see the module)."""

    def __init__(self, keys: np.ndarray, next_tokens: np.ndarray, counts: np.ndarray, totals: np.ndarray,
                 min_order: int, max_order: int):
        _check_orders(min_order, max_order)
        if not len(keys) == len(next_tokens) == len(counts) == len(totals):
            raise ValueError("keys, next_tokens, counts and totals must have one entry per n-gram")
        keys = np.asarray(keys, dtype=np.uint64)
        if len(keys) > 1 and not bool(np.all(keys[1:] > keys[:-1])):
            raise ValueError("keys must be strictly increasing")
        self.keys, self.next_tokens = keys, np.asarray(next_tokens, dtype=np.int64)
        self.confidences = counts.astype(np.float64) / totals.astype(np.float64)
        self.min_order, self.max_order = min_order, max_order

    @classmethod
    def build(cls, sequences, min_order: int = 3, max_order: int = 8, min_count: int = 2) -> "CorpusIndex":
        """From token sequences (lists or arrays of ids); n-grams never span two sequences."""
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        _check_orders(min_order, max_order)
        arrays = [np.asarray(s, dtype=np.int64) for s in sequences]
        if any(a.size and a.min() < 0 for a in arrays):
            raise ValueError("sequences must hold token ids >= 0")
        parts = []
        for order in range(min_order, max_order + 1):
            keys, follows = [], []
            for a in arrays:
                if len(a) > order:
                    keys.append(_hash_column(order, [a[j: len(a) - order + j] for j in range(order)]))
                    follows.append(a[order:])
            if keys:
                parts.append(_most_frequent(np.concatenate(keys), np.concatenate(follows), min_count))
        keys, tokens, counts, totals = (np.concatenate(column) for column in zip(*parts)) if parts else \
            (np.zeros(0, dtype=np.uint64), *(np.zeros(0, dtype=np.int64) for _ in range(3)))
        order = np.argsort(keys, kind="stable")
        keys, tokens, counts, totals = keys[order], tokens[order], counts[order], totals[order]
        unique = np.ones(len(keys), dtype=bool)  # a hash shared by two orders: keep the first
        unique[1:] = keys[1:] != keys[:-1]
        return cls(keys[unique], tokens[unique], counts[unique], totals[unique], min_order, max_order)

    def __len__(self) -> int:
        return len(self.keys)

    def next_token(self, context: list[int]) -> tuple[int, float] | None:
        """(the next token after the longest n-gram ending the context that the index holds, its confidence),
        or None when it holds none."""
        orders = range(min(self.max_order, len(context)), self.min_order - 1, -1)
        queries = np.array([_hash(context[len(context) - n:]) for n in orders], dtype=np.uint64)
        if not len(queries) or not len(self.keys):
            return None
        at = np.minimum(np.searchsorted(self.keys, queries), len(self.keys) - 1)
        hits = np.flatnonzero(self.keys[at] == queries)
        if not hits.size:
            return None
        i = at[hits[0]]
        return int(self.next_tokens[i]), float(self.confidences[i])

    def continuation(self, context: list[int], limit: int,
                     min_confidence: float = 0.0) -> tuple[list[int], list[float]]:
        """Up to `limit` tokens continuing the context, each the index's next token after the context extended
        by the ones before it, stopping at the first whose confidence is below min_confidence."""
        tokens, confidences = [], []
        window = [int(t) for t in context[-self.max_order:]]
        while len(tokens) < limit:
            found = self.next_token(window)
            if found is None or found[1] < min_confidence:
                break
            tokens.append(found[0])
            confidences.append(found[1])
            window = window[1:] + [found[0]] if len(window) == self.max_order else window + [found[0]]
        return tokens, confidences

    # -- files ----------------------------------------------------------------------------------------
    def save(self, path: str) -> None:
        """To `path` (an .npz file; numpy appends the suffix when it is missing)."""
        np.savez(path, keys=self.keys, next_tokens=self.next_tokens, confidences=self.confidences,
                 orders=np.array([self.min_order, self.max_order]))

    @classmethod
    def load(cls, path: str) -> "CorpusIndex":
        with np.load(path) as f:
            index = cls.__new__(cls)
            index.keys, index.next_tokens, index.confidences = f["keys"], f["next_tokens"], f["confidences"]
            index.min_order, index.max_order = (int(x) for x in f["orders"])
        return index

    @classmethod
    def from_corpus_file(cls, path: str, cache_dir: str | None = None, **build_kwargs) -> "CorpusIndex":
        """The index of a corpus file (safetensors: `tokens` [N] and `offsets` [S + 1], sequence s being
        tokens[offsets[s]:offsets[s + 1]]), built once and cached under cache_dir by the file's content and
        the build arguments."""
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            digest.update(hashlib.sha256(f.read()).digest())
        digest.update(repr((_INDEX_FORMAT, sorted(build_kwargs.items()))).encode())
        cached = os.path.join(cache_dir, f"{digest.hexdigest()[:16]}.npz") if cache_dir else None
        if cached and os.path.exists(cached):
            return cls.load(cached)
        index = cls.build(read_corpus(path), **build_kwargs)
        if cached:
            tmp = f"{cached[:-4]}.{os.getpid()}.tmp.npz"
            try:
                os.makedirs(cache_dir, exist_ok=True)
                index.save(tmp)
                os.replace(tmp, cached)
            except OSError:  # an unwritable cache costs the next load a rebuild, nothing else
                if os.path.exists(tmp):
                    os.remove(tmp)
        return index


def _most_frequent(keys: np.ndarray, follows: np.ndarray, min_count: int):
    """Per distinct key seen at least min_count times: (key, its most frequent follower (the smallest id on
    ties), that follower's count, the key's count)."""
    order = np.lexsort((follows, keys))
    keys, follows = keys[order], follows[order]
    pair_start = np.flatnonzero(np.r_[True, (keys[1:] != keys[:-1]) | (follows[1:] != follows[:-1])])
    pair_count = np.diff(np.r_[pair_start, len(keys)])
    pair_key, pair_follow = keys[pair_start], follows[pair_start]
    key_start = np.flatnonzero(np.r_[True, pair_key[1:] != pair_key[:-1]])
    totals = np.add.reduceat(pair_count, key_start)
    # The most frequent pair within each key: sort pairs by (key, count descending, follower).
    ranked = np.lexsort((pair_follow, -pair_count, pair_key))
    best = ranked[key_start]
    keep = totals >= min_count
    return pair_key[best][keep], pair_follow[best][keep], pair_count[best][keep], totals[keep]


def write_corpus(path: str, sequences) -> None:
    """Token sequences into a corpus file (see CorpusIndex.from_corpus_file); ids kept as uint16 when they fit."""
    from safetensors.torch import save_file

    arrays = [np.asarray(s, dtype=np.int64) for s in sequences]
    flat = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
    if flat.size and not (0 <= flat.min() and flat.max() < 1 << 31):
        raise ValueError(f"token ids must lie in [0, 2^31), got {flat.min()} .. {flat.max()}")
    offsets = np.cumsum([0] + [len(a) for a in arrays]).astype(np.int64)
    dtype = torch.uint16 if flat.size == 0 or flat.max() < 1 << 16 else torch.int32
    save_file({"tokens": torch.from_numpy(flat).to(dtype), "offsets": torch.from_numpy(offsets)}, path)


def read_corpus(path: str) -> list[np.ndarray]:
    from safetensors.torch import load_file

    tensors = load_file(path)
    tokens, offsets = tensors["tokens"].to(torch.int64).numpy(), tensors["offsets"].numpy()
    if offsets.ndim != 1 or offsets[0] != 0 or offsets[-1] != len(tokens) or np.any(np.diff(offsets) < 0):
        raise ValueError(f"{path}: offsets must rise from 0 to the token count")
    return [tokens[offsets[s]: offsets[s + 1]] for s in range(len(offsets) - 1)]
