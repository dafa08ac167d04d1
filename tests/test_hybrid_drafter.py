"""HybridDrafter (n-gram lookup where the context repeats, DSpark elsewhere): greedy output is
token-identical to plain decoding under every policy with both sources in play; sampled output follows
the target's exact law, and fails to when the n-gram rows are not point masses (the test can fail);
n-gram confidences are the running acceptance rates of what was verified."""

from __future__ import annotations

import pytest
import torch

from dspark.cache import SideCache
from dspark.drafters.dspark import DSparkDrafter
from dspark.drafters.hybrid import HybridDrafter
from dspark.engine import Engine
from dspark.sampling_params import SamplingParams
from dspark.scheduler import FixedLength
from test_dspark_drafter import (GREEDY, POLICIES, PROMPTS, SPS, VOCAB, Req, bigram_oracle, make_model,  # noqa: F401
                                 one_thread, plain, tiny, tiny_target_and_law)
from test_rejection_sample_distribution import chi_square_p_value


@pytest.mark.parametrize("policy", ["fixed", "prefix", "async"])
@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_is_token_identical_to_plain(tiny, plain, policy, batch):
    drafter = HybridDrafter(DSparkDrafter(make_model(tiny, "dspark", "markov")), min_match=2)
    chosen = FixedLength(4) if policy == "fixed" else POLICIES[policy]()
    engine = Engine(tiny, drafter=drafter, policy=chosen, max_batch=batch, max_seq_len=128)
    assert [r.generated for r in engine.generate(PROMPTS, GREEDY)] == plain
    assert drafter.rounds["ngram"] > 0 and drafter.rounds["dspark"] > 0


def sampled_law_p_value(tmp_path, mutate=None) -> tuple[float, dict]:
    vocab, trials, temperature, prompt = 8, 3000, 0.8, [3, 5, 4, 3, 5]
    target, law = tiny_target_and_law(tmp_path, vocab, prompt, 3, temperature)
    drafter = HybridDrafter(DSparkDrafter(make_model(target, "dspark", "markov", gamma=3, rank=8)), min_match=1)
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


def test_sampled_law_test_catches_non_point_mass_ngram_rows(tmp_path):
    """Mutation: report the n-gram draft as drawn from the uniform law. Rejection sampling then
    accepts it too often, and the same test must see it."""
    def uniform_rows(drafter):
        make = drafter._ngram_proposal

        def wrong(request, tokens):
            proposal = make(request, tokens)
            if proposal.draft_probs is not None:
                proposal.draft_probs[:-1] = 1.0 / drafter.vocab_size
            return proposal
        drafter._ngram_proposal = wrong

    p, _ = sampled_law_p_value(tmp_path, uniform_rows)
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


def test_bad_arguments_are_refused(tiny):
    dspark = DSparkDrafter(make_model(tiny, "dspark", "markov"))
    with pytest.raises(ValueError, match="min_match"):
        HybridDrafter(dspark, min_match=0)
    with pytest.raises(ValueError, match="prior"):
        HybridDrafter(dspark, prior=(3.0, 2.0))
