"""dspark/drafters/draft_sampling.py: per-row processed distributions equal the one-row ones, and a batch of
draws follows each row's distribution (the rows the proposal reports), greedy rows taking the argmax."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dspark.drafters.draft_sampling import DraftSampler, processed_probs
from dspark.sampling_params import SamplingParams

W = 12


def one_row(logits, temperature, top_k, top_p):
    """The definition, one row at a time: softmax / T, top-k (ties with the k-th kept), top-p on what remains."""
    probs = torch.softmax(logits.double() / temperature, -1)
    if 0 < top_k < probs.numel():
        probs = torch.where(probs >= torch.topk(probs, top_k).values[-1], probs, 0.0)
    if top_p < 1.0:
        ordered, order = torch.sort(probs, descending=True)
        before = torch.cumsum(ordered, 0) - ordered
        keep = torch.zeros_like(probs, dtype=torch.bool).scatter(0, order, before < top_p * probs.sum())
        probs = torch.where(keep, probs, 0.0)
    return (probs / probs.sum()).float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_row_parameters_give_each_row_its_own_distribution(dtype):
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(5, W, generator=gen)).to(dtype)
    params = ([0.7, 1.0, 1.3, 0.5, 2.0], [0, 3, 0, 5, W], [1.0, 1.0, 0.8, 0.6, 0.95])
    rows = processed_probs(logits, *params)
    for i in range(5):
        expected = one_row(logits[i].float(), params[0][i], params[1][i], params[2][i])
        torch.testing.assert_close(rows[i], expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(processed_probs(logits[i], params[0][i], params[1][i], params[2][i]), rows[i])
    assert int((rows[1] > 0).sum()) == 3 and int((rows[3] > 0).sum()) <= 5


def request(row: int, **params):
    return SimpleNamespace(row=row, params=SamplingParams(**params))


def test_a_batch_of_draws_follows_each_rows_distribution():
    """4,000 sampled requests share two logit rows (alternating parameters) in one batch, with greedy ones
    among them: each sampled group's draws pass a chi-square test against its reported row."""
    gen = torch.Generator().manual_seed(1)
    base = 2 * torch.randn(2, W, generator=gen)
    count = 4000
    requests = [request(i, temperature=0.9, top_p=0.9, seed=i) if i % 2 == 0 else request(i, temperature=1.5, top_k=6, seed=i)
                for i in range(count)] + [request(count + j) for j in range(3)]  # three greedy ones
    logits = torch.cat([base.repeat(count // 2, 1), base[:1].repeat(3, 1) + 0.01 * torch.arange(W)])
    generators = {r.row: torch.Generator().manual_seed(r.params.seed + 99) for r in requests}
    sampler = DraftSampler(requests, 1, generators, "cpu")
    picked = sampler.choose(logits, 0)
    probs = sampler.draft_probs()
    assert all(q is None for q in probs[count:]) and picked[count:].tolist() == [int(base[0].argmax())] * 3
    for parity, own in ((0, (0.9, 0, 0.9)), (1, (1.5, 6, 1.0))):
        q = probs[parity][0]
        torch.testing.assert_close(q, processed_probs(base[parity], *own))  # the request's own parameters
        assert all(torch.equal(probs[i][0], q) for i in range(parity, count, 2))
        assert all(float(probs[i][1].abs().sum()) == 0 for i in range(parity, count, 2))  # the childless last node
        draws = picked[parity:count:2]
        assert bool((q[draws] > 0).all())  # never a token of weight 0
        seen = torch.bincount(draws, minlength=W).double()
        expected = q.double() * draws.numel()
        support = expected > 0
        statistic = float(((seen[support] - expected[support]) ** 2 / expected[support]).sum())
        dof = int(support.sum()) - 1
        p_value = float(torch.special.gammaincc(torch.tensor(dof / 2.0), torch.tensor(statistic / 2.0)))
        assert p_value > 1e-4, (parity, statistic, dof)


def test_draws_are_reproducible_per_request_whatever_shares_the_batch():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(3, W, generator=gen)
    alone = [request(7, temperature=1.0, seed=5)]
    crowd = [request(1, temperature=1.0, seed=9), request(7, temperature=1.0, seed=5), request(3)]

    def draw(requests, rows):
        generators = {r.row: torch.Generator().manual_seed(r.params.seed) for r in requests}
        sampler = DraftSampler(requests, 2, generators, "cpu")
        return [sampler.choose(rows, k) for k in range(2)]

    first = draw(alone, logits[1:2])
    second = draw(crowd, logits)
    assert [int(t[0]) for t in first] == [int(t[1]) for t in second]


def test_draft_vocabulary_columns_map_to_their_ids():
    vocab_ids = torch.tensor([3, 8, 20, 41])
    logits = torch.tensor([[0.0, 5.0, 1.0, 0.0], [9.0, 0.0, 0.0, 0.0]])
    sampler = DraftSampler([request(0), request(1)], 1, {}, "cpu", vocab_ids)
    assert sampler.choose(logits, 0).tolist() == [8, 3]
