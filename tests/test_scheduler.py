"""Verification-length policies: the paper's Appendix A case (the prefix scheduler keeps the target's
law, a global search that looks past a non-improving candidate biases it), hand-checked admissions,
the asynchronous variant's two-round lag, errors, and the SPS curve. The draft gates' tests are in
test_draft_gates.py."""

from __future__ import annotations

import json

import pytest
import torch

from dspark import ops
from dspark.drafters.base import Proposal
from dspark.profiling import SPSCurve, load_or_measure_sps, measure_sps, token_grid
from dspark.scheduler import (AsyncScheduler, ConfidenceThreshold, FixedLength, GlobalSearch, PrefixScheduler,
                              best_capacity, ranked_candidates, survival)
from test_rejection_sample_distribution import chi_square_p_value

# Appendix A: vocabulary {A, B}; target (0.7, 0.3); drafter (0.5, 0.5); c_1 = 0.8; c_2 = 0.9 after A,
# 0 after B; SPS(1..3) = (1.0, 0.5, 0.45).
A, B = 0, 1
P_TARGET = torch.tensor([0.7, 0.3])
P_DRAFT = torch.tensor([0.5, 0.5])
APPENDIX_SPS = SPSCurve([1, 2, 3], [1.0, 0.5, 0.45])


class Req:
    def __init__(self, rid: int):
        self.id = rid


def chain(confidences, tokens=None) -> Proposal:
    n = len(confidences)
    return Proposal(list(tokens or range(n)), confidences=torch.tensor(confidences, dtype=torch.float32))


def appendix_first_tokens(policy, trials: int, seed: int = 0) -> torch.Tensor:
    """The first emitted token of `trials` independent rounds: x_1, x_2 drawn from the drafter, the
    policy picks how many to verify from the confidences, and the engine's rejection_sample decides."""
    gen = torch.Generator().manual_seed(seed)
    drafts = torch.multinomial(P_DRAFT, 2 * trials, replacement=True, generator=gen).view(trials, 2)
    lengths = []
    for t in range(trials):
        c2 = 0.9 if int(drafts[t, 0]) == A else 0.0
        [n] = policy.choose([Req(t)], [chain([0.8, c2], drafts[t].tolist())])
        lengths.append(n)
    lengths = torch.tensor(lengths)
    first = torch.empty(trials, dtype=torch.long)
    for n in lengths.unique().tolist():
        idx = (lengths == n).nonzero().squeeze(1)
        R, nodes = idx.numel(), n + 1
        tokens = torch.cat([torch.full((R, 1), A), drafts[idx, :n]], 1).reshape(-1)  # node 0: the anchor
        logits = P_TARGET.log().repeat(R * nodes, 1)  # the same target law at every position
        draft_probs = torch.cat([P_DRAFT.repeat(R, n, 1), torch.zeros(R, 1, 2)], 1).reshape(-1, 2)
        _, _, emitted = ops.rejection_sample(
            logits, tokens, torch.arange(R + 1, dtype=torch.int32) * nodes, None, draft_probs,
            temperature=torch.ones(R), top_k=torch.zeros(R, dtype=torch.int32), top_p=torch.ones(R),
            seed=idx + 1000 * seed, offset=torch.zeros(R, dtype=torch.long), max_nodes=nodes)
        first[idx] = emitted[:, 0]
    return first


def test_appendix_a_prefix_scheduler_keeps_the_target_law():
    first = appendix_first_tokens(PrefixScheduler(APPENDIX_SPS), 100_000)
    assert chi_square_p_value(first, P_TARGET.double()) >= 1e-3


def test_appendix_a_global_search_is_biased():
    """The mutation: looking past x_1 (which does not pay alone) to x_2, whose confidence reads x_1,
    verifies x_1 only when it is A: P(A) = 0.5 + 0.5 * 0.7 = 0.85."""
    first = appendix_first_tokens(GlobalSearch(APPENDIX_SPS), 100_000, seed=1)
    assert chi_square_p_value(first, P_TARGET.double()) < 1e-6
    assert abs(float((first == A).double().mean()) - 0.85) < 0.005


def test_appendix_a_admissions():
    assert PrefixScheduler(APPENDIX_SPS).choose([Req(0)], [chain([0.8, 0.9])]) == [0]  # 1.8 * 0.5 < 1
    assert GlobalSearch(APPENDIX_SPS).choose([Req(0)], [chain([0.8, 0.9])]) == [2]  # 2.52 * 0.45 > 1
    assert GlobalSearch(APPENDIX_SPS).choose([Req(0)], [chain([0.8, 0.0])]) == [0]


def test_prefix_scheduler_admits_best_first_and_stops_at_the_first_loss():
    flat = SPSCurve([1, 64], [10.0, 10.0])  # verification is free: every candidate with a > 0 pays
    props = [chain([0.9, 0.5, 0.1]), chain([0.99, 0.0]), chain([])]
    assert PrefixScheduler(flat).choose([Req(i) for i in range(3)], props) == [3, 1, 0]
    # SPS falls 10% per extra token from B = 3: candidates with a below ~0.3 no longer pay.
    steep = SPSCurve([1, 2, 3, 4, 5, 6, 7], [1.0, 1.0, 1.0, 0.9, 0.81, 0.729, 0.656])
    lengths = PrefixScheduler(steep).choose([Req(0), Req(1)], [chain([0.9, 0.8, 0.2]), chain([0.95, 0.3])])
    assert lengths == [2, 1]  # admitted 0.95 (B 3), 0.9 (B 4), 0.72 (B 5); 0.285 at B 6 loses
    assert PrefixScheduler(flat, max_draft=1).choose([Req(0)], [chain([0.9, 0.9])]) == [1]


CPU_SPS = SPSCurve([1, 2, 4, 8, 16], [314.0, 271.0, 220.0, 125.0, 62.0])  # SmolLM2 steps on the 2-vCPU Xeon


@pytest.mark.parametrize("sps", [CPU_SPS, SPSCurve([1, 4, 8, 16, 32], [20.0, 19.0, 15.0, 9.0, 5.0])])
def test_nodes_below_the_survival_floor_are_never_verified(sps):
    """Random chains over batches of 1-6: dropping every node whose survival is below survival_floor (after the
    first, as a drafter that stops there keeps) leaves the prefix scheduler's choice as it was; the floor is not
    trivially zero, and the pruning often bites. Doubling the floor changes some choice (it is at most a factor
    tau / batch from tight)."""
    gen = torch.Generator().manual_seed(0)
    pruned_any, raised_differs = 0, 0
    for trial in range(3000):
        batch, gamma = 1 + trial % 6, 1 + trial % 7
        policy = PrefixScheduler(sps, gate=False)
        floor = policy.survival_floor(batch, gamma)
        assert floor > 0
        confidences = torch.rand(batch, gamma, generator=gen) ** 0.5
        full = [chain(c.tolist()) for c in confidences]
        requests = [Req(i) for i in range(batch)]
        chosen = policy.choose(requests, full)

        def pruned(limit):
            out = []
            for p in full:
                a = torch.cumprod(p.confidences, 0)
                keep = next((k for k in range(1, gamma) if a[k] < limit), gamma)
                out.append(p.truncated(keep))
            return out
        cut = pruned(floor)
        pruned_any += sum(len(p) < gamma for p in cut)
        assert policy.choose(requests, cut) == chosen
        raised_differs += policy.choose(requests, pruned(floor * 2)) != chosen
    assert pruned_any > 1000 and raised_differs > 0


def test_policies_cap_and_floor_what_drafters_are_asked_for():
    assert FixedLength(3).most_nodes() == 3 and FixedLength(3).survival_floor(1, 3) == 0.0
    assert PrefixScheduler(CPU_SPS).most_nodes() is None and PrefixScheduler(CPU_SPS, max_draft=2).most_nodes() == 2
    assert AsyncScheduler(CPU_SPS).survival_floor(1, 7) == 0.0  # its top-K may take nodes the prefix rule would not
    flat = SPSCurve([1, 64], [10.0, 10.0])  # free verification: every node may pay
    assert PrefixScheduler(flat).survival_floor(4, 7) == 0.0


def test_ranking_ties_go_to_the_lower_position():
    assert [(k, r) for _, k, r in ranked_candidates([[1.0, 1.0], [1.0]])] == [(1, 0), (1, 1), (2, 0)]


def test_threshold_and_fixed():
    props = [chain([0.9, 0.5, 0.9]), chain([0.4])]
    assert ConfidenceThreshold(0.4).choose([Req(0), Req(1)], props) == [3, 1]  # survival 0.9, 0.45, 0.405
    assert ConfidenceThreshold(0.41).choose([Req(0), Req(1)], props) == [2, 0]
    assert ConfidenceThreshold(0.0, max_draft=2).choose([Req(0)], props[:1]) == [2]
    assert FixedLength(2).choose([Req(0), Req(1)], props) == [2, 1]


def test_async_capacity_comes_from_two_rounds_ago():
    flat = SPSCurve([1, 2, 3, 4, 5, 6, 7], [1.0, 1.0, 1.0, 0.9, 0.81, 0.729, 0.656])
    policy = AsyncScheduler(flat)
    reqs = [Req(0), Req(1)]
    rich, poor = [chain([0.95, 0.9, 0.8]), chain([0.95, 0.9])], [chain([0.0, 0.5, 0.5]), chain([0.0, 0.9])]
    prefix = PrefixScheduler(flat)
    assert policy.choose(reqs, rich) == prefix.choose(reqs, rich)  # no history yet: the prefix rule
    assert policy.choose(reqs, poor) == prefix.choose(reqs, poor)
    # Round 3 is rich again, but its capacity comes from round 1's (rich) survivals...
    k = best_capacity(flat, [a for p in rich for a in survival(p)], 2)
    assert k >= 3 and sum(policy.choose(reqs, rich)) == k
    # ...and round 4's from round 2's poor ones: K = 0 though the current drafts look good.
    assert policy.choose(reqs, rich) == [0, 0]
    # Top-K admission keeps each request's admitted set a prefix.
    lengths = policy.choose(reqs, [chain([0.5, 0.45, 0.4]), chain([0.99, 0.98])])
    assert sum(lengths) == best_capacity(flat, [a for p in rich for a in survival(p)], 2)


def test_bad_proposals_are_refused():
    policy = PrefixScheduler(APPENDIX_SPS)
    with pytest.raises(ValueError, match="confidences"):
        policy.choose([Req(0)], [Proposal([1, 2])])
    with pytest.raises(ValueError, match="chain"):
        policy.choose([Req(0)], [Proposal([1, 2], parents=[0, 0], confidences=torch.ones(2))])
    with pytest.raises(ValueError, match="probabilities"):
        policy.choose([Req(0)], [chain([0.5, float("nan")])])
    with pytest.raises(ValueError, match="probabilities"):
        ConfidenceThreshold(0.5).choose([Req(0)], [chain([1.5])])
    with pytest.raises(ValueError, match="threshold"):
        ConfidenceThreshold(1.5)
    assert policy.choose([Req(0)], [Proposal([])]) == [0]


def test_sps_curve():
    curve = SPSCurve([1, 2, 4], [10.0, 11.0, 5.0])  # a noisy rise is flattened: never faster with more tokens
    assert curve(1) == 10.0 and curve(2) == 10.0 and curve(3) == pytest.approx(7.5) and curve(0.5) == 10.0
    assert curve(8) == pytest.approx(2.5)  # past the last point, tokens/s stays constant
    assert SPSCurve.from_dict(json.loads(json.dumps(curve.to_dict()))).sps == curve.sps
    for bad in (([1, 1], [1.0, 1.0]), ([1], [0.0]), ([1, 2], [1.0]), ([], [])):
        with pytest.raises(ValueError):
            SPSCurve(*bad)
    assert token_grid(20) == [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 15, 19, 20] and token_grid(1) == [1]


def test_sps_profile_is_measured_once_and_cached(tmp_path, monkeypatch):
    from builders import write_tiny_llama
    from dspark.models import load_model

    monkeypatch.setenv("DSPARK_CACHE_DIR", str(tmp_path / "cache"))
    write_tiny_llama(tmp_path / "m", 61, hidden=32, layers=2)
    model = load_model(str(tmp_path / "m"), torch.float32)
    seen = []
    curve = load_or_measure_sps(model, 12, context=16, progress=lambda b, s: seen.append(b))
    assert seen == token_grid(12) and all(s > 0 for s in curve.raw)
    again = load_or_measure_sps(model, 12, context=16, progress=lambda b, s: seen.append(b))
    assert again.raw == curve.raw and len(seen) == len(token_grid(12))  # read back, not re-measured
    assert len(list((tmp_path / "cache" / "sps").glob("*.json"))) == 1
    assert measure_sps(model, 3, context=4, repeats=1).tokens == [1, 2, 3]
    with pytest.raises(ValueError, match="max_tokens"):
        measure_sps(model, 0)


def test_profile_cli_prints_and_plots(tmp_path, monkeypatch, capsys):
    from builders import write_tiny_llama
    from dspark.cli import main

    monkeypatch.setenv("DSPARK_CACHE_DIR", str(tmp_path / "cache"))
    write_tiny_llama(tmp_path / "m", 61, hidden=32, layers=2)
    assert main(["profile", "--model", str(tmp_path / "m"), "--dtype", "fp32", "--max-tokens", "6", "--context", "8",
                 "--json", str(tmp_path / "sps.json"), "--png", str(tmp_path / "sps.png")]) == 0
    assert "steps/s" in capsys.readouterr().out
    assert json.load(open(tmp_path / "sps.json"))["tokens"] == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "sps.png").stat().st_size > 1000


def test_no_drafting_where_a_certain_token_would_not_pay():
    """At a batch size where (B + 1) * SPS(B + 1) <= B * SPS(B), the prefix scheduler would admit nothing
    whatever the confidences: such rounds skip drafting (and the throughput gate's trials) altogether."""
    sps = SPSCurve([1, 2, 4, 5, 8], [100.0, 90.0, 60.0, 40.0, 30.0])  # 4 -> 5 tokens: 240 -> 200 tokens/s
    policy = PrefixScheduler(sps, throughput_gate=True)
    assert [policy.may_draft(b) for b in (1, 2, 3, 4, 5)] == [True, True, True, False, True]
    certain = [Proposal([7], confidences=torch.ones(1)) for _ in range(4)]
    assert policy.choose([Req(i) for i in range(4)], certain) == [0, 0, 0, 0]  # what may_draft foresaw
    assert policy.choose([Req(i) for i in range(3)], certain[:3]) != [0, 0, 0]
    assert not policy.throughput.since_other  # nor did the throughput gate count a round


def test_async_scheduler_refuses_the_throughput_gate():
    with pytest.raises(ValueError, match="throughput_gate"):
        AsyncScheduler(SPSCurve([1, 8], [10.0, 9.0]), throughput_gate=True)
