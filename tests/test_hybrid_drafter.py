"""HybridDrafter (n-gram lookup where the context repeats, corpus lookup where the corpus knows the
context, DSpark elsewhere): greedy output is token-identical to plain decoding under every policy with
every source in play; sampled output follows the target's exact law, and fails to when the n-gram or
corpus rows are not point masses (the test can fail); n-gram confidences are the running acceptance
rates of what was verified, corpus confidences the corpus's counts."""

from __future__ import annotations

import pytest
import torch

from dspark.cache import SideCache
from dspark.drafters.corpus import CorpusIndex
from dspark.drafters.dspark import DSparkDrafter
from dspark.drafters.hybrid import HybridDrafter
from dspark.engine import Engine
from dspark.sampling_params import SamplingParams
from dspark.scheduler import FixedLength
from test_dspark_drafter import (GREEDY, POLICIES, PROMPTS, SPS, VOCAB, Req, bigram_oracle, make_model,  # noqa: F401
                                 one_thread, plain, tiny, tiny_target_and_law)
from test_rejection_sample_distribution import chi_square_p_value


def noisy_corpus(plain_outputs, vocab: int, seed: int = 0) -> CorpusIndex:
    """Half of plain decoding's continuations, half random walks: corpus drafts both right and wrong."""
    g = torch.Generator().manual_seed(seed)
    walks = [torch.randint(0, vocab, (30,), generator=g).tolist() for _ in range(40)]
    return CorpusIndex.build(plain_outputs[::2] + walks, 1, 3, min_count=1)


@pytest.mark.parametrize("policy", ["fixed", "prefix", "async"])
@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_is_token_identical_to_plain(tiny, plain, policy, batch):
    drafter = HybridDrafter(DSparkDrafter(make_model(tiny, "dspark", "markov")), min_match=2,
                            corpus=noisy_corpus(plain, VOCAB), corpus_min_confidence=0.6)
    chosen = FixedLength(4) if policy == "fixed" else POLICIES[policy]()
    engine = Engine(tiny, drafter=drafter, policy=chosen, max_batch=batch, max_seq_len=128)
    assert [r.generated for r in engine.generate(PROMPTS, GREEDY)] == plain
    assert drafter.rounds["ngram"] > 0 and drafter.rounds["corpus"] > 0 and drafter.rounds["dspark"] > 0


def sampled_law_p_value(tmp_path, mutate=None, corpus: bool = False) -> tuple[float, dict]:
    """With corpus, n-gram lookup needs a 3-token match (rare here) and a corpus of random 8-token walks
    speaks for most other contexts."""
    vocab, trials, temperature, prompt = 8, 3000, 0.8, [3, 5, 4, 3, 5]
    target, law = tiny_target_and_law(tmp_path, vocab, prompt, 3, temperature)
    kwargs = dict(min_match=1)
    if corpus:
        g = torch.Generator().manual_seed(3)
        walks = [torch.randint(0, vocab, (40,), generator=g).tolist() for _ in range(20)]
        kwargs = dict(min_match=3, corpus=CorpusIndex.build(walks, 1, 2, min_count=2), corpus_min_confidence=0.0)
    drafter = HybridDrafter(DSparkDrafter(make_model(target, "dspark", "markov", gamma=3, rank=8)), **kwargs)
    if mutate is not None:
        mutate(drafter)
    engine = Engine(target, drafter=drafter, policy=FixedLength(3), max_batch=64, max_seq_len=16)
    params = [SamplingParams(max_tokens=5, temperature=temperature, seed=s, ignore_eos=True) for s in range(trials)]
    out = torch.tensor([r.generated[:3] for r in engine.generate([prompt] * trials, params)])
    return chi_square_p_value(out[:, 0] * vocab * vocab + out[:, 1] * vocab + out[:, 2], law), drafter.rounds


def test_sampled_output_follows_the_target_distribution(tmp_path):
    p, rounds = sampled_law_p_value(tmp_path)
    assert rounds["ngram"] > 1000 and rounds["dspark"] > 100  # both sources drafted the first tokens
    assert p >= 1e-3


def test_sampled_output_follows_the_target_distribution_with_corpus_drafts(tmp_path):
    p, rounds = sampled_law_p_value(tmp_path, corpus=True)
    assert rounds["corpus"] > 1000  # the corpus drafted most first tokens
    assert p >= 1e-3


def uniform_rows(source: str):
    """Mutation: report the drafts of one source ("ngram" or "corpus") as drawn from the uniform law."""
    def mutate(drafter):
        make = drafter._fixed_proposal

        def wrong(request, tokens, confidences):
            proposal = make(request, tokens, confidences)
            if proposal.draft_probs is not None and drafter.source_for(request) == source:
                proposal.draft_probs[:-1] = 1.0 / drafter.vocab_size
            return proposal
        drafter._fixed_proposal = wrong
    return mutate


@pytest.mark.parametrize("source", ["ngram", "corpus"])
def test_sampled_law_test_catches_non_point_mass_rows(tmp_path, source):
    """Rejection sampling then accepts the drafts too often, and the same test must see it."""
    p, _ = sampled_law_p_value(tmp_path, uniform_rows(source), corpus=source == "corpus")
    assert p < 1e-6


def test_ngram_confidences_count_only_what_was_verified(tiny):
    drafter = HybridDrafter(DSparkDrafter(make_model(tiny, "dspark", "markov", gamma=4)), prior=(1.0, 2.0))
    c = drafter.dspark.model.config
    width = len(c.target_layers) * c.hidden_size
    side = SideCache(2, 128, width, torch.float32)
    drafter.bind(2, 128, VOCAB, side)
    torch.testing.assert_close(drafter.ngram_confidences(), torch.full((4,), 0.5))
    request = Req([5, 6, 7, 5, 6], SamplingParams())
    side.append(request.row, torch.randn(4, width))
    drafter.start(request)
    [proposal] = drafter.propose([request], 4)
    assert proposal.tokens == [7, 5, 6] and drafter.source[request.id] == "ngram"
    torch.testing.assert_close(proposal.confidences, torch.full((3,), 0.5))
    request.verified = 2  # the policy let 2 of the 3 through; the target accepted the first only
    request.tokens += [7, 9]
    side.append(request.row, torch.randn(2, width))
    drafter.accept([request], [[0, 1]])
    torch.testing.assert_close(drafter.ngram_confidences(), torch.tensor([2 / 3, 1 / 3, 0.5, 0.5]))
    assert request.id not in drafter.source


def test_the_context_is_matched_through_its_own_index(tiny):
    """source_for and propose read one n-gram index per request, fed only the tokens each round adds;
    finish drops it."""
    drafter = HybridDrafter(DSparkDrafter(make_model(tiny, "dspark", "markov", gamma=4)))
    c = drafter.dspark.model.config
    side = SideCache(2, 128, len(c.target_layers) * c.hidden_size, torch.float32)
    drafter.bind(2, 128, VOCAB, side)
    request = Req([5, 6, 7, 5, 6], SamplingParams())
    side.append(request.row, torch.randn(4, side.data.shape[-1]))
    drafter.start(request)
    assert drafter.source_for(request) == "ngram"
    [proposal] = drafter.propose([request], 4)
    assert proposal.tokens == [7, 5, 6] and drafter.indexes[request.id].indexed == 5
    request.tokens += [7, 1]
    assert drafter.source_for(request) == "dspark" and drafter.indexes[request.id].indexed == 7
    drafter.finish(request)
    assert request.id not in drafter.indexes


def test_the_corpus_speaks_where_the_context_has_no_match_and_it_is_confident(tiny):
    corpus = CorpusIndex.build([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 8], [5, 2, 9]], 1, 2, min_count=1)
    drafter = HybridDrafter(DSparkDrafter(make_model(tiny, "dspark", "markov", gamma=4)), corpus=corpus,
                            corpus_min_confidence=0.5)
    c = drafter.dspark.model.config
    side = SideCache(2, 128, len(c.target_layers) * c.hidden_size, torch.float32)
    drafter.bind(2, 128, VOCAB, side)
    request = Req([40, 1, 2], SamplingParams(temperature=1.0))
    drafter.start(request)
    assert drafter.source_for(request) == "corpus"
    [proposal] = drafter.propose([request], 4)
    # "1 2" -> 3 (3 of 3), "2 3" -> 4 (2 of 3), "3 4" is no key: the draft stops
    assert proposal.tokens == [3, 4] and drafter.source[request.id] == "corpus"
    torch.testing.assert_close(proposal.confidences, torch.tensor([1.0, 2 / 3]))
    torch.testing.assert_close(proposal.draft_probs[[0, 1], [3, 4]], torch.ones(2))  # point masses
    assert proposal.draft_probs.sum().item() == 2.0

    def source(tokens):  # a fresh request (start() resets its n-gram index) with this context
        other = Req(tokens, SamplingParams(), row=1)
        drafter.start(other)
        return drafter.source_for(other)

    assert source([40, 1, 9]) == "dspark"  # neither "1 9" nor "9" is a key
    assert source([40, 5, 2]) == "corpus"  # "5 2" -> 9, once of once
    drafter.corpus_min_confidence = 0.8
    assert source([40, 7, 2]) == "dspark"  # "2" -> 3, three times of four: 0.75
    assert source([1, 2, 7, 1, 2]) == "ngram"  # "1 2" occurred before: n-gram lookup comes first
    drafter.corpus = None
    assert source([40, 5, 2]) == "dspark"


def test_bad_arguments_are_refused(tiny):
    dspark = DSparkDrafter(make_model(tiny, "dspark", "markov"))
    with pytest.raises(ValueError, match="min_match"):
        HybridDrafter(dspark, min_match=0)
    with pytest.raises(ValueError, match="prior"):
        HybridDrafter(dspark, prior=(3.0, 2.0))
    with pytest.raises(ValueError, match="corpus_min_confidence"):
        HybridDrafter(dspark, corpus_min_confidence=1.5)
    foreign = HybridDrafter(dspark, corpus=CorpusIndex.build([[VOCAB + 5, 1, VOCAB + 5, 1]], 1, 1, min_count=1))
    with pytest.raises(ValueError, match="vocabulary"):
        foreign.bind(1, 64, VOCAB)
