"""The draft gates (dspark/draft_gates.py): DraftGate (per request, from its drafts' confidences) and
ThroughputGate (per round and source, from measured throughput), alone and inside the prefix scheduler and
the engine."""

from __future__ import annotations

import pytest
import torch

from dspark.drafters.base import DEFAULT_SOURCE, Proposal
from dspark.profiling import SPSCurve
from dspark.scheduler import AsyncScheduler, PrefixScheduler
from test_scheduler import Req


def test_draft_gate_skips_drafting_that_cannot_pay_and_probes():
    from dspark.draft_gates import DraftGate

    steep = SPSCurve([1, 2, 3], [17.5, 10.5, 7.0])  # one verified draft pays at batch 1 only if a_1 > 0.67
    gate = DraftGate(steep, probe_every=4, max_wait=8)
    assert gate.should_draft([Req(0)]) == [True]  # nothing known yet
    gate.observe([Req(0)], [[0.9, 0.45]])
    assert [gate.should_draft([Req(0)])[0] for _ in range(8)] == [True] * 8  # a confident request keeps drafting
    gate.observe([Req(0)], [[0.2, 0.1]])
    # a hopeless one probes after 4 rounds, then waits twice as long, up to max_wait
    rounds = [gate.should_draft([Req(0)])[0] for _ in range(4 + 8 + 8)]
    assert rounds == [False] * 3 + [True] + [False] * 7 + [True] + [False] * 7 + [True]
    gate.observe([Req(0)], [[0.95]])  # a probe that pays: back to drafting every round, waits reset
    assert gate.should_draft([Req(0)]) == [True] and gate.wait[0] == 4
    gate.observe([Req(0)], [[0.1]])
    assert [gate.should_draft([Req(0)])[0] for _ in range(4)] == [False] * 3 + [True]
    # new requests take their predecessors' running mean a_1: here, not worth a first drafting round
    fresh = DraftGate(steep, probe_every=4)
    fresh.observe([Req(0)], [[0.3]])
    assert fresh.should_draft([Req(0), Req(1)]) == [False, False] and fresh.prior == pytest.approx(0.3)
    fresh.observe([Req(0)], [[0.9]])  # the same request again: the prior counts each request once
    assert fresh.prior == pytest.approx(0.3)
    fresh.observe([Req(5)], [[0.9]])
    assert fresh.prior == pytest.approx(0.36)
    assert set(fresh.first) == {0, 5} and fresh.should_draft([Req(2)]) == [False] and set(fresh.first) == set()
    assert PrefixScheduler(steep, gate=False).should_draft([Req(0), Req(1)]) == [True, True]


def test_draft_gate_spreads_probes_over_rounds():
    from dspark.draft_gates import DraftGate

    flat = SPSCurve([1, 8], [10.0, 9.0])  # one more verified token pays from a_1 > ~0.11 at every batch here
    batch = [Req(i) for i in range(5)]
    gate = DraftGate(flat, probe_every=4, max_probes=2)
    assert gate.should_draft(batch) == [True, True, False, False, False]  # nothing known: two probe first
    gate.observe(batch[:2], [[0.05], [0.05]])  # hopeless: the prior says so for the other three too
    rounds = [gate.should_draft(batch) for _ in range(6)]
    assert rounds[:2] == [[False] * 5] * 2
    # after probe_every rounds all five are due: the idlest first, two per round, the others a round later
    assert rounds[2] == [False, False, True, True, False] and rounds[3] == [True, False, False, False, True]
    assert rounds[4] == [False, True, False, False, False]
    assert sum(map(sum, rounds)) <= 2 * len(rounds)
    paying = DraftGate(flat, max_probes=1)
    paying.observe(batch, [[0.9]] * 5)
    assert paying.should_draft(batch) == [True] * 5  # requests that pay are never limited


def test_throughput_gate_takes_the_faster_arm_and_explores():
    from dspark.draft_gates import ThroughputGate

    gate = ThroughputGate(warm_rounds=0, explore_every=4, explore_cost=1.0, plain_samples=1)
    assert gate.should_draft(1)  # nothing measured: draft first
    gate.observe(1, True, 3, 0.06)  # 50 tokens/s while drafting
    assert not gate.should_draft(1)  # plain not measured yet
    gate.observe(1, False, 1, 0.01)  # 100 tokens/s plain
    assert [gate.should_draft(1) for _ in range(8)] == [False, False, False, True] * 2
    assert not gate.should_draft(4)  # an unmeasured batch size takes the nearest one's estimates...
    gate.observe(4, True, 12, 0.02)  # ... until it measures its own: drafting pays at 4
    gate.observe(4, False, 4, 0.02)
    assert gate.should_draft(4)  # while bucket 1 keeps its own (plain) estimates
    for _ in range(30):  # drafting becomes the faster arm: plain is now the explored one
        gate.observe(1, True, 5, 0.02)
    # The first of those rounds settled the last exploration: drafting's estimate, the mean of its two rounds
    # (50 and 250 tokens/s), is past plain's by the margin, a win, so the wait is back to explore_every.
    assert [gate.should_draft(1) for _ in range(16)] == ([True] * 3 + [False]) * 4
    gate.observe(1, False, 0, 0.01)  # empty rounds and zero times are ignored
    gate.observe(1, False, 1, 0.0)
    assert gate.rates[(1, ThroughputGate.PLAIN)] == pytest.approx(100.0)


def test_throughput_gate_prices_each_drafting_source_apart():
    """A hybrid drafter's sources (cheap n-gram lookup, a costly learned drafter) get arms of their
    own: the paying one keeps drafting while the other falls back to plain rounds, explored rarely."""
    from dspark.draft_gates import ThroughputGate

    gate = ThroughputGate(warm_rounds=0, explore_every=4, explore_cost=10.0, plain_samples=1)
    assert gate.should_draft(1, "ngram") and gate.should_draft(1, "dspark")  # nothing measured: try each
    gate.observe(1, True, 3, 0.01, ("ngram",))   # 300 tokens/s
    gate.observe(1, True, 2, 0.04, ("dspark",))  # 50 tokens/s
    gate.observe(1, False, 1, 0.01)              # plain: 100 tokens/s
    assert [gate.should_draft(1, "ngram") for _ in range(4)] == [True, True, True, False]
    assert [gate.should_draft(1, "dspark") for _ in range(4)] == [False, False, False, True]
    assert gate.rates[(1, "ngram")] == pytest.approx(300.0) and gate.rates[(1, "dspark")] == pytest.approx(50.0)
    assert [ThroughputGate.bucket(b) for b in (1, 2, 3, 4, 5, 8, 9, 64)] == [1, 2, 4, 4, 8, 8, 16, 64]
    sps = SPSCurve([1, 8], [100.0, 100.0])
    measured_at_once = ThroughputGate(warm_rounds=0, expected=lambda b: b * sps(b))  # no unmeasured first rounds
    policy = PrefixScheduler(sps, gate=False, throughput_gate=measured_at_once)
    policy.observe_round(2, True, 6, 0.01, ("ngram",))
    policy.observe_round(2, True, 4, 0.04, ("dspark",))
    for _ in range(3):
        policy.observe_round(2, False, 2, 0.01)
    assert policy.should_draft([Req(0), Req(1)], ["ngram", "dspark"]) == [True, False]  # in one round


def test_a_source_the_throughput_gate_blocks_keeps_its_draft_gate_state():
    """The draft gate still sees the whole batch: a request blocked by the throughput gate keeps its a_1
    and is priced at the batch's size, not dropped as if it had left."""
    from dspark.draft_gates import ThroughputGate

    sps = SPSCurve([1, 8], [100.0, 100.0])
    policy = PrefixScheduler(sps, throughput_gate=ThroughputGate(warm_rounds=0, expected=lambda b: b * sps(b)))
    policy.gate.observe([Req(0), Req(1)], [[0.9], [0.9]])
    policy.observe_round(2, True, 6, 0.01, ("ngram",))
    policy.observe_round(2, True, 4, 0.04, ("dspark",))
    for _ in range(3):  # the plain rounds the gate wants before it prefers drafting
        policy.observe_round(2, False, 2, 0.01)
    assert policy.should_draft([Req(0), Req(1)], ["ngram", "dspark"]) == [True, False]
    assert set(policy.gate.first) == {0, 1} and policy.gate.idle == {0: 0, 1: 1}


def test_engine_stops_paying_for_a_drafter_that_does_not_pay(tmp_path):
    """A slow drafter whose drafts are always rejected: after the first measurements most rounds skip
    drafting (plain), probing it again every 16th round; the output is plain decoding's."""
    import time

    from dspark.drafters.base import Drafter
    from dspark.engine import Engine
    from dspark.models import load_model
    from dspark.sampling_params import SamplingParams
    from builders import write_tiny_llama

    class SlowWrongDrafter(Drafter):
        num_draft, gives_confidences = 3, True

        def __init__(self):
            self.calls = self.asked = 0

        def source_for(self, request):
            self.asked += 1
            return super().source_for(request)

        def propose(self, requests, max_draft):
            self.calls += 1
            time.sleep(0.02)
            n = min(3, max_draft)
            return [Proposal([(r.tokens[-1] + 1 + i) % 97 for i in range(n)],
                             confidences=torch.full((n,), 0.99)) for r in requests]

    write_tiny_llama(tmp_path, 97, 32, 2, seed=1)
    model = load_model(str(tmp_path), torch.float32)
    params = SamplingParams(max_tokens=60, ignore_eos=True)
    plain = Engine(model, max_batch=1).generate([[5, 6, 7]], params)[0].generated
    drafter = SlowWrongDrafter()
    engine = Engine(model, drafter=drafter, policy=PrefixScheduler(SPSCurve([1, 64], [100.0, 100.0]), throughput_gate=True),
                    max_batch=1)
    assert engine.generate([[5, 6, 7]], params)[0].generated == plain
    assert drafter.calls <= 2 + 60 // 16 + 1
    # Once both arms are measured, a round in which no source would draft (a quiet one) does not even ask
    # the drafter which source would speak: only the first rounds and those before the probes do.
    assert drafter.asked <= drafter.calls + 1 + 60 // 16 + 1


def test_quiet_rounds_count_towards_every_known_sources_exploration():
    from dspark.draft_gates import ThroughputGate

    gate = ThroughputGate(warm_rounds=0, explore_every=4, explore_cost=10.0)
    assert not gate.quiet(1)  # nothing known: ask
    gate.observe(1, True, 3, 0.01, ("ngram",))   # 300 tokens/s
    gate.observe(1, True, 2, 0.04, ("dspark",))  # 50 tokens/s
    gate.observe(1, False, 1, 0.01)              # plain: 100 tokens/s
    assert not gate.quiet(1)  # n-gram drafting is the faster arm: its requests draft
    for _ in range(20):
        gate.observe(1, True, 1, 0.04, ("ngram",))  # ... until it is 25 tokens/s
    assert [gate.quiet(1) for _ in range(4)] == [True, True, True, False]  # the 4th round is due for both
    assert gate.should_draft(1, "ngram") and gate.should_draft(1, "dspark")  # both explore, their waits reset
    assert gate.since_other == {(1, "ngram"): 0, (1, "dspark"): 0}
    assert gate.quiet(1) and gate.since_other == {(1, "ngram"): 1, (1, "dspark"): 1}
    assert gate.quiet(2)  # a new bucket takes the nearest one's estimates and waits
    assert gate.quiet_left[1][0] == 2  # a stretch is judged once: 2 more quiet rounds in bucket 1 ...
    gate.observe(1, False, 1, 0.001)  # ... which a plain round does not end, however fast
    assert gate.quiet_left[1][0] == 2
    gate.observe(1, True, 1, 0.04, ("dspark",))  # a drafted round does: the next is judged afresh
    assert 1 not in gate.quiet_left
    policy = PrefixScheduler(SPSCurve([1, 8], [100.0, 100.0]), gate=False, throughput_gate=gate)
    assert not policy.may_draft(1)  # a quiet round: no request would draft
    assert PrefixScheduler(SPSCurve([1, 8], [100.0, 100.0])).may_draft(1)  # without the throughput gate: always


def test_drafting_must_beat_plain_by_the_margin():
    """A drafting arm within `margin` of plain decoding loses the tie: a round that drafts and verifies
    nothing costs a little more, and noise alone would otherwise keep choosing it."""
    from dspark.draft_gates import ThroughputGate

    for margin, drafts in ((0.02, False), (0.0, True)):
        gate = ThroughputGate(warm_rounds=0, margin=margin, explore_cost=1.0, plain_samples=1)
        gate.observe(1, True, 101, 1.0)  # 1% faster than plain
        gate.observe(1, False, 100, 1.0)
        assert gate.should_draft(1) == drafts
    for tokens, drafts in ((104, False), (106, True)):  # 4% faster: within the default margin; 6%: past it
        gate = ThroughputGate(warm_rounds=0, explore_cost=1.0, plain_samples=1)
        gate.observe(1, True, tokens, 1.0)
        gate.observe(1, False, 100, 1.0)
        assert gate.should_draft(1) == drafts
    with pytest.raises(ValueError, match="margin"):
        ThroughputGate(warm_rounds=0, margin=-0.1)


def test_throughput_gate_compares_rounds_against_what_plain_decoding_reaches_at_their_size():
    """Within a bucket (5-8), a drafting round of 8 requests beats a plain round of 5 in raw tokens/s only
    because it is larger: measured against `expected` (tokens/s of plain decoding at that size) it loses."""
    from dspark.draft_gates import ThroughputGate

    gate = ThroughputGate(warm_rounds=0, expected=lambda batch: 100.0 * batch)
    gate.observe(5, False, 5, 0.01)     # 500 tokens/s, as expected at 5
    gate.observe(8, True, 8, 0.0125)    # 640 tokens/s, 80% of what plain reaches at 8
    assert gate.rates[(8, ThroughputGate.PLAIN)] == pytest.approx(1.0)
    assert gate.rates[(8, DEFAULT_SOURCE)] == pytest.approx(0.8)
    assert not gate.should_draft(8)
    per_request = ThroughputGate(warm_rounds=0)  # the default: tokens/s per request
    per_request.observe(5, False, 5, 0.01)
    per_request.observe(8, True, 8, 0.0125)
    assert not per_request.should_draft(8)
    raw = ThroughputGate(warm_rounds=0, expected=lambda batch: 1.0, plain_samples=1)
    raw.observe(5, False, 5, 0.01)
    raw.observe(8, True, 8, 0.0125)
    assert raw.should_draft(8)  # the bias the normalisation removes


def test_a_new_bucket_inherits_a_losing_sources_backoff():
    """A batch shrinking through the buckets does not retry a drafter that kept losing in the last one:
    the new bucket starts plain, and waits as long as the old one before its first trial."""
    from dspark.draft_gates import ThroughputGate

    gate = ThroughputGate(warm_rounds=0, explore_every=4, max_wait=64, explore_cost=100.0, expected=lambda batch: 100.0 * batch)
    gate.observe(64, True, 64, 1.0)   # drafting: 1% of plain decoding's rate
    gate.observe(64, False, 64, 0.01)
    for _ in range(200):
        draft = gate.should_draft(64)
        gate.observe(64, draft, 64, 1.0 if draft else 0.01)
    assert gate.wait[(64, "draft")] == 64
    first_trial = next(i for i in range(100) if gate.should_draft(20))
    assert first_trial == 63 and gate.wait[(32, "draft")] == 64


def test_exploring_a_far_slower_arm_waits_long_enough_to_cost_little():
    """Drafting measured at a quarter of plain decoding's rate: each trial costs three plain rounds, so with
    explore_cost 5% trials come 60 rounds apart, and the measured overhead stays within 5%."""
    from dspark.draft_gates import ThroughputGate

    gate = ThroughputGate(warm_rounds=0, explore_every=4, max_wait=1000, explore_cost=0.05, draft_samples=1)
    gate.observe(1, True, 1, 0.04)   # drafting: 25 tokens/s
    gate.observe(1, False, 1, 0.01)  # plain: 100 tokens/s
    decisions = [gate.should_draft(1) for _ in range(600)]
    drafted_at = [i for i, d in enumerate(decisions) if d]
    assert drafted_at[:3] == [59, 119, 179]  # unsettled trials (no observe): the wait stays at its floor
    assert sum(0.04 if d else 0.01 for d in decisions) <= 1.05 * 600 * 0.01 + 1e-9  # 10 trials x 30 ms extra
    capped = ThroughputGate(warm_rounds=0, explore_every=4, max_wait=16, explore_cost=0.05, draft_samples=1)
    capped.observe(1, True, 1, 0.04)
    capped.observe(1, False, 1, 0.01)
    assert [capped.should_draft(1) for _ in range(16)][-1]  # max_wait bounds the floor too
    with pytest.raises(ValueError, match="explore_cost"):
        ThroughputGate(warm_rounds=0, explore_cost=0.0)


def test_a_trial_is_priced_by_the_tokens_its_round_emits():
    """Drafting at half plain decoding's rate per token, but emitting three tokens per request per round
    where plain emits one: a trial round takes three plain rounds' worth of time for those tokens at half
    speed, i.e. costs three plain rounds, so with explore_cost 5% trials come 60 rounds apart (not 20)."""
    from dspark.draft_gates import ThroughputGate

    gate = ThroughputGate(warm_rounds=0, explore_every=4, max_wait=1000, explore_cost=0.05, draft_samples=1)
    gate.observe(1, True, 3, 0.06)   # 3 tokens in 60 ms: 50 tokens/s
    gate.observe(1, False, 1, 0.01)  # 1 token in 10 ms: 100 tokens/s
    drafted_at = [i for i in range(200) if gate.should_draft(1)]
    assert drafted_at[:2] == [59, 119]  # priced per round alone (cost 1), it would be 19, 39


def test_a_vetoed_trial_is_not_counted_as_a_loss():
    """The throughput gate explores drafting, but another gate (the per-request DraftGate) lets no request
    draft: the plain round that follows measured nothing about drafting, so the wait stays as it was."""
    from dspark.draft_gates import ThroughputGate

    gate = ThroughputGate(warm_rounds=0, explore_every=4, explore_cost=1.0, draft_samples=1)
    gate.observe(1, True, 1, 0.02)   # drafting: 50 tokens/s
    gate.observe(1, False, 1, 0.01)  # plain: 100 tokens/s
    assert [gate.should_draft(1) for _ in range(4)] == [False, False, False, True]
    gate.observe(1, False, 1, 0.01)  # vetoed: the round ran plain
    assert gate.wait[(1, DEFAULT_SOURCE)] == 4 and not gate.exploring
    assert [gate.should_draft(1) for _ in range(4)] == [False, False, False, True]
    gate.observe(1, True, 1, 0.02)   # a real trial, lost: the wait doubles
    assert gate.wait[(1, DEFAULT_SOURCE)] == 8


def test_throughput_gate_backs_off_while_the_explored_arm_keeps_losing():
    from dspark.draft_gates import ThroughputGate

    gate = ThroughputGate(warm_rounds=0, explore_every=4, max_wait=16, explore_cost=1.0, draft_samples=1)
    gate.observe(1, True, 1, 0.02)   # drafting: 50 tokens/s
    gate.observe(1, False, 1, 0.01)  # plain: 100 tokens/s
    drafted_at = []
    for i in range(60):
        draft = gate.should_draft(1)
        if draft:
            drafted_at.append(i)
        gate.observe(1, draft, 1, 0.02 if draft else 0.01)  # drafting keeps losing
    gaps = [b - a for a, b in zip(drafted_at, drafted_at[1:])]
    assert gaps[:3] == [8, 16, 16]  # 4, then doubled waits, capped at max_wait
    assert drafted_at[0] == 3
    gate.observe(1, True, 10, 0.01)  # drafting suddenly pays: after the next exploration the wait resets


def test_a_drafting_source_is_not_backed_off_on_its_first_rounds():
    """The first drafting round is cold and any one round's yield is chance: until a source has draft_samples
    rounds measured its wait does not double (trials come as often as explore_cost allows), and it wins if
    those rounds show it pays. Backed off after its one round (draft_samples=1), a source whose cold first
    round was slow waits ever longer for the rounds that would show it pays."""
    from dspark.draft_gates import ThroughputGate

    def run(gate, first_seconds, rounds=200, tokens=2, seconds=0.012):
        gate.observe(1, True, 1, first_seconds, ("ngram",))  # the cold first drafting round
        for _ in range(3):
            gate.observe(1, False, 1, 0.01)  # plain: 100 tokens/s
        drafted = []
        for i in range(rounds):
            draft = gate.should_draft(1, "ngram")
            if draft:
                drafted.append(i)
            gate.observe(1, draft, tokens if draft else 1, seconds if draft else 0.01, ("ngram",) if draft else ())
        return drafted

    def gate(**kwargs):
        return ThroughputGate(warm_rounds=0, explore_every=4, explore_cost=0.005, max_wait=1024, **kwargs)

    # 80 tokens/s first: a trial costs a quarter of a plain round, which 0.5% of the time allows every 50.
    paying = gate()
    drafted = run(paying, 0.0125)  # then 167 tokens/s
    assert drafted[0] == 49 and len(drafted) > 140  # drafting from its second round on
    assert paying.rates[(1, "ngram")] > paying.rates[(1, ThroughputGate.PLAIN)]
    losing = run(gate(), 0.0125, rounds=600, tokens=1, seconds=0.0125)  # 80 tokens/s throughout
    gaps = [b - a for a, b in zip(losing, losing[1:])]
    assert gaps[:4] == [50, 50, 100, 200]  # no doubling before its fourth round, doubling after
    # 25 tokens/s first: a trial costs 3 plain rounds, one in 600; the trials' 167 tokens/s raise the ratio of
    # sums until drafting wins.
    slow = run(gate(), 0.04, rounds=1200)
    assert slow[:3] == [599, 810, 891] and len(slow) > 100
    with pytest.raises(ValueError, match="draft_samples"):
        ThroughputGate(warm_rounds=0, draft_samples=0)


def test_a_trial_round_that_pays_keeps_the_next_trial_near():
    """A settled source whose estimate lost by chance (ten rounds at 90 tokens/s against plain's 100): its trials
    come explore_every rounds apart while each trial round pays (150 tokens/s), until the ratio of sums wins back;
    trials that do not pay double the wait as before."""
    from dspark.draft_gates import ThroughputGate

    def trials(seconds_per_token):
        gate = ThroughputGate(explore_every=4, explore_cost=1.0, max_wait=1024, warm_rounds=0)
        for _ in range(3):
            gate.observe(1, False, 1, 0.01)  # plain: 100 tokens/s
        for _ in range(10):
            gate.observe(1, True, 1, 1 / 90, ("ngram",))
        drafted = []
        for i in range(120):
            draft = gate.should_draft(1, "ngram")
            if draft:
                drafted.append(i)
            gate.observe(1, draft, 1, seconds_per_token if draft else 0.01, ("ngram",) if draft else ())
        return drafted

    paying = trials(1 / 150)
    assert [b - a for a, b in zip(paying, paying[1:])][:4] == [4, 4, 4, 1] and len(paying) > 60  # wins back
    losing = trials(1 / 90)
    assert [b - a for a, b in zip(losing, losing[1:])][:3] == [8, 16, 32]


def test_a_sources_first_drafting_round_is_not_measured():
    """It pays one-time costs: left out, the source is tried again at once and judged on later rounds."""
    from dspark.draft_gates import ThroughputGate

    gate = ThroughputGate()
    for _ in range(3):
        gate.observe(1, False, 1, 0.01)  # plain: 100 tokens/s
    assert gate.should_draft(1, "ngram")
    gate.observe(1, True, 1, 0.05, ("ngram",))  # cold: 20 tokens/s
    assert (1, "ngram") not in gate.rates and gate.should_draft(1, "ngram")
    gate.observe(1, True, 3, 0.015, ("ngram",))  # 200 tokens/s
    assert gate.rates[(1, "ngram")] == pytest.approx(200.0 / gate.expected(1)) and gate.should_draft(1, "ngram")
    measured = ThroughputGate(warm_rounds=0)
    for _ in range(3):
        measured.observe(1, False, 1, 0.01)
    measured.observe(1, True, 1, 0.05, ("ngram",))
    assert measured.rates[(1, "ngram")] == pytest.approx(20.0) and not measured.should_draft(1, "ngram")


def test_a_source_owed_its_first_measured_round_breaks_a_quiet_stretch():
    """After its unmeasured first round a source is tried again at its next chance: rounds are not quiet (the
    engine asks which source speaks) until it has a measured round, however long other sources' waits are."""
    from dspark.draft_gates import ThroughputGate

    gate = ThroughputGate(explore_every=4, max_wait=1024)
    for _ in range(3):
        gate.observe(2, False, 2, 0.01)  # plain: 200 tokens/s
    gate.observe(2, True, 2, 0.1, ("dspark",))  # warm round of the learned drafter: not measured
    gate.observe(2, True, 2, 0.1, ("dspark",))  # 20 tokens/s: far slower, a long wait
    gate.observe(2, True, 2, 0.05, ("corpus",))  # warm round of corpus lookup: not measured
    assert (2, "corpus") not in gate.rates
    assert not any(gate.quiet(2) for _ in range(50))
    assert gate.should_draft(2, "corpus")
    gate.observe(2, True, 3, 0.01, ("corpus",))
    assert (2, "corpus") in gate.rates


def test_a_paying_source_survives_a_run_of_rejected_drafts():
    """Drafting rounds take 1.5 plain rounds and emit 3 tokens five times, then 1 token five times (a
    stretch where the drafts are wrong): 1.33x plain decoding's rate on average. Averaged over ~20 rounds
    (draft_smoothing 0.05) the source keeps drafting through the bad stretches; averaged over 4 (0.25, as
    plain decoding's), each stretch drops it below plain and the doubling waits keep it off."""
    from dspark.draft_gates import ThroughputGate

    def drafted_rounds(gate, rounds=600):
        for _ in range(3):
            gate.observe(1, False, 1, 0.01)  # plain: 100 tokens/s
        yields, drafted = ([3] * 5 + [1] * 5) * rounds, 0
        for _ in range(rounds):
            if gate.should_draft(1, "ngram"):
                gate.observe(1, True, yields[drafted], 0.015, ("ngram",))
                drafted += 1
            else:
                gate.observe(1, False, 1, 0.01)
        return drafted

    assert drafted_rounds(ThroughputGate(warm_rounds=0)) > 500
    assert drafted_rounds(ThroughputGate(warm_rounds=0, draft_smoothing=0.25)) < 400
    with pytest.raises(ValueError, match="draft_smoothing"):
        ThroughputGate(warm_rounds=0, draft_smoothing=1.5)


def test_a_throughput_gate_can_outlive_its_policy():
    """One ThroughputGate passed to successive policies (a new engine per batch of requests) keeps what
    earlier ones measured: the second policy does not pay a drafting trial first."""
    from dspark.draft_gates import ThroughputGate

    sps = SPSCurve([1, 8], [100.0, 100.0])
    shared = ThroughputGate(warm_rounds=0, expected=lambda b: b * sps(b))
    first = PrefixScheduler(sps, gate=False, throughput_gate=shared)
    assert first.should_draft([Req(0)]) == [True]  # nothing measured: a trial
    first.observe_round(1, True, 1, 0.05)
    first.observe_round(1, False, 1, 0.01)
    second = PrefixScheduler(sps, gate=False, throughput_gate=shared)
    assert second.throughput is shared and second.should_draft([Req(0)]) == [False]
    fresh = PrefixScheduler(sps, gate=False, throughput_gate=True)
    assert fresh.should_draft([Req(0)]) == [True]
    with pytest.raises(ValueError, match="throughput_gate"):
        AsyncScheduler(sps, throughput_gate=shared)


def test_estimates_start_as_medians_and_drafting_waits_for_a_settled_plain_rate():
    """One cold plain round measured slow must not hand a losing drafter a long run of rounds (a cold plain
    estimate also makes exploring plain look costly, so it would be retried only after many rounds): the
    plain estimate is the median of its first rounds (a moving average from 1 / smoothing rounds on), and drafting
    is chosen only against plain_samples plain rounds of the bucket. Drafting's lucky first round counts as one
    round of its ratio of sums: it is outweighed after ~8 more."""
    from dspark.draft_gates import ThroughputGate

    def run(gate):
        gate.observe(1, True, 2, 0.01)   # drafting: 200 tokens/s (a lucky first round)
        gate.observe(1, False, 1, 0.02)  # plain: 50 tokens/s (a cold first round)
        decisions = []
        for _ in range(60):  # then the true rates: drafting 90, plain 100 tokens/s
            draft = gate.should_draft(1)
            decisions.append(draft)
            gate.observe(1, draft, 1, 1 / 90 if draft else 1 / 100)
        return decisions

    gate = ThroughputGate(warm_rounds=0)
    decisions = run(gate)
    assert decisions[:2] == [False, False]  # plain first: one round of it is not an estimate
    assert sum(decisions) <= 10  # drafting loses within a few rounds and is only explored after that
    assert gate.rates[(1, ThroughputGate.PLAIN)] == pytest.approx(100.0)  # the cold round is gone from it
    assert sum(run(ThroughputGate(warm_rounds=0, plain_samples=1))) == 60  # trusting the one cold round: drafting throughout
    with pytest.raises(ValueError, match="smoothing"):
        ThroughputGate(warm_rounds=0, smoothing=0.0)


def test_the_first_rounds_median_then_a_moving_average():
    from dspark.draft_gates import ThroughputGate

    gate = ThroughputGate(warm_rounds=0, smoothing=0.25, plain_samples=1)
    for seconds, median in ((0.02, 50.0), (0.01, 75.0), (0.01, 100.0), (0.005, 100.0)):
        gate.observe(1, False, 1, seconds)
        assert gate.rates[(1, ThroughputGate.PLAIN)] == pytest.approx(median)
    gate.observe(1, False, 1, 1 / 300)  # the fifth round: moving average from the median
    assert gate.rates[(1, ThroughputGate.PLAIN)] == pytest.approx(100 + 0.25 * 200)
