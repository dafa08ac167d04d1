"""N-gram lookup where the context repeats itself, then corpus lookup, the DSpark drafter everywhere else.

Prompt lookup is nearly free and, when the context has a long enough match (code that reuses names,
math that restates numbers), often right for several tokens; a learned drafter pays a block forward
per round and shines where nothing repeats. Per request and round this drafter proposes the n-gram
continuation when the last `min_match` or more tokens occurred before; else, given a CorpusIndex (the
target's own replies elsewhere: dspark.drafters.corpus), its continuation when the first token's
confidence is at least `corpus_min_confidence`; else the DSpark block. Each is a source of its own for
the policies ("ngram", "corpus", "dspark"), priced apart by the throughput gate.

Lossless: which drafter speaks is a function of the committed context only, and each proposal
reports the distribution its tokens came from. An n-gram draft is deterministic, so for a sampled
request its rows of draft_probs are point masses (rejection sampling then accepts x with probability
p(x) and resamples from p without x, the exact residual). The DSpark drafter still commits every
accepted token's target features (from the engine's captured side cache), whoever drafted it, so its
caches stay aligned.

Confidences: the schedulers need c_k for every draft token. For n-gram tokens they are the running
conditional acceptance rates per position of earlier n-gram drafts (what was verified and how much of
it was accepted, counted from the engine's `request.verified`), never the current tokens, so they keep
the scheduler's decisions independent of the tokens it admits. A corpus token's confidence is the fraction
of its n-gram's occurrences in the corpus that it followed: a function of the tokens before it.
"""

from __future__ import annotations

import os

import torch

from dspark.cache import SideCache
from dspark.drafters.base import Drafter, Proposal
from dspark.drafters.corpus import CORPUS_FILE, CorpusIndex
from dspark.drafters.dspark import DSparkDrafter
from dspark.drafters.ngram import NgramDrafter, NgramIndex


class HybridDrafter(Drafter):
    gives_confidences = True

    def __init__(self, dspark: DSparkDrafter, min_match: int = 2, max_match: int = 4,
                 prior: tuple[float, float] = (1.0, 2.0),
                 corpus: CorpusIndex | None = None, corpus_min_confidence: float = 0.3):
        """min_match / max_match: the shortest and longest context suffix looked up; prior: pseudo-counts
        (accepted, verified) per position before any n-gram draft was verified; corpus: an index of the
        target's own text, consulted where the context has no match; corpus_min_confidence: the least
        confidence of a corpus token drafted (the continuation stops before the first one below it)."""
        if min_match < 1 or max_match < min_match:
            raise ValueError(f"need 1 <= min_match <= max_match, got {min_match}, {max_match}")
        if not 0 < prior[0] <= prior[1]:
            raise ValueError(f"prior must be (accepted, verified) with 0 < accepted <= verified, got {prior}")
        if not 0.0 <= corpus_min_confidence <= 1.0:
            raise ValueError(f"corpus_min_confidence must lie in [0, 1], got {corpus_min_confidence}")
        self.dspark, self.corpus, self.corpus_min_confidence = dspark, corpus, corpus_min_confidence
        self.num_draft = dspark.num_draft
        self.capture_layers = dspark.capture_layers
        self.ngram = NgramDrafter(self.num_draft, max_ngram=max_match, min_ngram=min_match)
        self.accepted = torch.full((self.num_draft,), float(prior[0]), dtype=torch.float64)
        self.verified = torch.full((self.num_draft,), float(prior[1]), dtype=torch.float64)
        self.source: dict[int, str] = {}  # request id -> who drafted its last proposal
        self.indexes: dict[int, NgramIndex] = {}  # request id -> its context's n-gram tables
        self.looked_up: dict[int, tuple[int, str, int | None]] = {}  # request id -> (context length, _lookup)
        self.rounds = {"ngram": 0, "corpus": 0, "dspark": 0}

    @classmethod
    def from_pretrained(cls, path: str, target, num_draft: int | None = None, dtype: torch.dtype = torch.float32,
                        weights: str | None = None, corpus: "bool | CorpusIndex" = True,
                        **kwargs) -> "HybridDrafter":
        """weights: as DSparkDrafter.from_pretrained's; corpus: an index, or True for the folder's
        corpus.safetensors when it has one (indexed once, cached under dspark's cache directory), or False."""
        drafter = DSparkDrafter.from_pretrained(path, target, num_draft, dtype=dtype, weights=weights)
        if corpus is True:
            corpus_file = os.path.join(path, CORPUS_FILE)
            corpus = None
            if os.path.exists(corpus_file):
                from dspark.profiling import cache_dir

                corpus = CorpusIndex.from_corpus_file(corpus_file, os.path.join(cache_dir(), "corpus"))
        return cls(drafter, corpus=None if corpus is False else corpus, **kwargs)

    def bind(self, rows: int, max_seq_len: int, vocab_size: int, captured: SideCache | None = None) -> None:
        if self.corpus is not None and len(self.corpus) and int(self.corpus.next_tokens.max()) >= vocab_size:
            raise ValueError(f"the corpus holds token ids up to {int(self.corpus.next_tokens.max())}, past the "
                             f"target's vocabulary of {vocab_size}: it was written for another tokenizer")
        self.vocab_size = vocab_size
        self.dspark.bind(rows, max_seq_len, vocab_size, captured)

    def start(self, request) -> None:
        self.indexes.pop(request.id, None)  # ids restart with every engine sharing this drafter
        self.looked_up.pop(request.id, None)
        self.dspark.start(request)

    def finish(self, request) -> None:
        self.source.pop(request.id, None)
        self.indexes.pop(request.id, None)
        self.looked_up.pop(request.id, None)
        self.dspark.finish(request)

    def source_for(self, request) -> str:
        return self._lookup(request)[0]

    def _lookup(self, request) -> tuple[str, int | None]:
        """(the source that speaks for the request's committed context, where its n-gram continuation starts),
        kept until the context grows: the engine asks before proposing, and propose asks again."""
        length = len(request.tokens)
        kept = self.looked_up.get(request.id)
        if kept is not None and kept[0] == length:
            return kept[1], kept[2]
        at = self._match(request)
        source = "ngram" if at is not None else "corpus" if self._corpus_speaks(request) else "dspark"
        self.looked_up[request.id] = (length, source, at)
        return source, at

    def _corpus_speaks(self, request) -> bool:
        """Whether the corpus drafts at least one token for the request's context (the proposal's own rule)."""
        return self.corpus is not None and bool(
            self.corpus.continuation(request.tokens, 1, self.corpus_min_confidence)[0])

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
        found = [self._lookup(r) if limit > 0 else ("dspark", None) for r in requests]
        learned = [r for r, (source, _) in zip(requests, found) if source == "dspark"]
        drafted = iter(self.dspark.propose_pruned(learned, max_draft, survival_floor) if learned else [])
        out = []
        for r, (source, at) in zip(requests, found):
            if source == "ngram":
                tokens = r.tokens[at: at + limit]
                out.append(self._fixed_proposal(r, tokens, self.ngram_confidences()[: len(tokens)]))
            elif source == "corpus":
                tokens, confidences = self.corpus.continuation(r.tokens, limit, self.corpus_min_confidence)
                out.append(self._fixed_proposal(r, tokens, torch.tensor(confidences, dtype=torch.float32)))
            else:
                out.append(next(drafted))
            self.source[r.id] = source
            self.rounds[source] += 1
        return out

    def _fixed_proposal(self, request, tokens: list[int], confidences: torch.Tensor) -> Proposal:
        """A deterministic draft (n-gram or corpus lookup)."""
        draft_probs = None
        if request.params.temperature > 0:  # point masses; the last node has no children: a zero row
            draft_probs = torch.zeros(len(tokens) + 1, self.vocab_size, device=self.dspark.device)
            draft_probs[torch.arange(len(tokens)), torch.tensor(tokens, dtype=torch.long)] = 1.0
        return Proposal(list(tokens), draft_probs=draft_probs, confidences=confidences.to(self.dspark.device))

    def accept(self, requests, paths) -> None:
        if self.source:  # else nothing was drafted: nothing to count
            for r, path in zip(requests, paths):
                if self.source.pop(r.id, None) == "ngram":
                    verified, accepted = int(getattr(r, "verified", 0)), len(path) - 1
                    tried = min(verified, accepted + 1)  # positions 1..tried were verified with their prefix accepted
                    self.verified[:tried] += 1
                    self.accepted[:min(accepted, tried)] += 1
        self.dspark.accept(requests, paths)
