"""rejection_sample: exact cases, structural invariants, seeded determinism and the edge cases of DESIGN.md.
The distribution tier lives in test_rejection_sample_distribution.py.

Inputs live on device_of(backend) (CUDA for Triton on a GPU machine, else CPU, where Triton runs under its
interpreter); results are compared on the CPU. The Triton kernel's main proof is exact agreement with the
C++ backend (and the reference) on many random rounds given identical uniforms or seeds: the statistical
tier can afford only a few hundred interpreted trials."""

from __future__ import annotations

import pytest
import torch

from builders import random_round
from conftest import BACKENDS, INTERPRETED, device_of
from dspark import ops
from dspark.reference.rejection_sample import sample_index, target_distribution

NEG_INF = float("-inf")


def on(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


def cpu(results):
    return [t.cpu() for t in results]


def one_hot_logits(tokens: list[int], vocab: int) -> torch.Tensor:
    logits = torch.full((len(tokens), vocab), NEG_INF)
    logits[torch.arange(len(tokens)), torch.tensor(tokens)] = 0.0
    return logits


@pytest.mark.parametrize("stochastic", [False, True])
def test_one_hot_targets_accept_the_whole_chain(backend, stochastic):
    vocab, tokens = 11, [3, 7, 1, 9, 4]
    # Row i puts all mass on node i+1's token; the last row on the bonus token 2.
    logits = one_hot_logits(tokens[1:] + [2], vocab)
    probs = torch.softmax(torch.randn(len(tokens), vocab), -1) if stochastic else None
    qo_indptr = torch.tensor([0, 5], dtype=torch.int32)
    logits, tokens_t, qo_indptr, probs = on(device_of(backend), logits, torch.tensor(tokens), qo_indptr, probs)
    nodes, count, out = cpu(ops.rejection_sample(logits, tokens_t, qo_indptr, draft_probs=probs, seed=3,
                                                 backend=backend))
    assert count.tolist() == [5]
    assert nodes.tolist() == [[0, 1, 2, 3, 4]]
    assert out.tolist() == [[7, 1, 9, 4, 2]]


def test_greedy_tables_with_early_mismatch_in_a_ragged_batch(backend):
    vocab = 13
    gen = torch.Generator().manual_seed(0)
    # Request 0: chain of 4, target agrees with node 1 only. Request 1: a lone anchor.
    # Request 2: tree [-1, 0, 0, 1]; the target's argmax at node 0 is node 2's token.
    tokens = torch.tensor([5, 6, 8, 1, 4, 2, 9, 3, 0])
    parents = torch.tensor([-1, 0, 1, 2, -1, -1, 0, 0, 1], dtype=torch.int32)
    qo_indptr = torch.tensor([0, 4, 5, 9], dtype=torch.int32)
    logits = torch.randn(9, vocab, generator=gen)
    best = {0: 6, 1: 7, 2: 1, 3: 10, 4: 12, 5: 3, 6: 5, 7: 11, 8: 4}
    for row, token in best.items():
        logits[row, token] = 10.0
    args = on(device_of(backend), logits, tokens, qo_indptr, parents)
    nodes, count, out = cpu(ops.rejection_sample(*args, temperature=0.0, backend=backend))
    assert count.tolist() == [2, 1, 2]
    assert nodes.tolist() == [[0, 1, -1, -1], [0, -1, -1, -1], [0, 2, -1, -1]]
    assert out.tolist() == [[6, 7, -1, -1], [12, -1, -1, -1], [3, 11, -1, -1]]


def test_greedy_ties_pick_the_lowest_id(backend):
    logits = torch.tensor([[0.0, 2.0, 5.0, 5.0, 1.0], [5.0, 5.0, 0.0, 0.0, 0.0]])
    args = on(device_of(backend), logits, torch.tensor([0, 3]), torch.tensor([0, 2], dtype=torch.int32))
    nodes, count, out = cpu(ops.rejection_sample(*args, temperature=0.0, backend=backend))
    assert out.tolist() == [[2, -1]] and count.tolist() == [1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [1, 15, 16, 17, 333, 4099])
def test_greedy_bonus_is_torch_argmax(backend, dtype, vocab):
    """A lone anchor per request emits torch.argmax of its row (the first maximum). Rows: random, ties
    spread over the row, signed zeros, the maximum in the tail past the last full vector. The C++ kernel, which a
    trusted caller may hand +inf, NaN and rows of -inf, also follows torch there (the first NaN wins)."""
    gen = torch.Generator().manual_seed(vocab)
    rows = [torch.randn(vocab, generator=gen) for _ in range(3)]
    rows.append((torch.randn(vocab, generator=gen) * 2).round())
    tail = torch.randn(vocab, generator=gen)
    tail[-1] = 9.0
    rows.append(tail)
    zeros = -torch.rand(vocab, generator=gen) - 1.0  # the maximum is 0, held by -0.0 and +0.0: the first wins
    zeros[vocab // 2] = 0.0
    zeros[vocab // 3] = -0.0
    rows.append(zeros)
    trusted = backend == "cpu"
    if trusted:
        inf, nan_body, nan_tail, nan_first = (torch.randn(vocab, generator=gen) for _ in range(4))
        inf[vocab // 2] = float("inf")
        nan_first[0] = nan_first[-1] = float("nan")
        rows += [inf, torch.full((vocab,), float("-inf")), nan_first, torch.full((vocab,), float("nan"))]
        nan_body[vocab // 3] = float("nan")
        nan_body[-1] = float("nan")
        nan_tail[-1] = float("nan")
        rows += [nan_body, nan_tail]
    logits = torch.stack(rows).to(dtype)
    count = logits.shape[0]
    expected = [int(torch.argmax(row.float())) for row in logits]
    device = device_of(backend)
    args = on(device, logits, torch.zeros(count, dtype=torch.int64), torch.arange(count + 1, dtype=torch.int32))
    _, _, out = cpu(ops.rejection_sample(*args, temperature=0.0, backend=backend, trusted=trusted))
    assert out[:, 0].tolist() == expected


def _random_batch(seed: int, vocab: int, num_requests: int, chain: bool, stochastic: bool, tied: bool = False):
    gen = torch.Generator().manual_seed(seed)
    rnd = random_round(gen, num_requests, max_nodes=16, max_committed=0, chain=chain, min_nodes=1)
    total = int(rnd.qo_indptr[-1])
    logits = torch.randn(total, vocab, generator=gen) * 2
    if tied:  # a few distinct values: ties everywhere, also at the top-k and top-p boundaries
        logits = logits.round()
    probs = torch.softmax(logits + torch.randn(total, vocab, generator=gen), -1)
    # Half the drafts follow the target's argmax so that long paths get accepted too.
    tokens = torch.where(torch.rand(total, generator=gen) < 0.5, torch.randint(0, vocab, (total,), generator=gen),
                         logits.argmax(-1).roll(1))
    temperature = torch.where(torch.arange(num_requests) % 3 == 0, 0.0, 0.5 + torch.rand(num_requests, generator=gen))
    top_k = torch.tensor([0, 1, 3, vocab, 0, 5][: num_requests] * (num_requests // 6 + 1))[:num_requests].int()
    top_p = torch.tensor([1.0, 0.9, 0.3, 1.0, 0.6][: num_requests] * (num_requests // 5 + 1))[:num_requests].float()
    return dict(target_logits=logits, draft_tokens=tokens, qo_indptr=rnd.qo_indptr, parents=rnd.parents,
                draft_probs=probs if stochastic else None, temperature=temperature.float(), top_k=top_k,
                top_p=top_p), rnd


def _to(device, batch: dict) -> dict:
    return {name: t.to(device) if isinstance(t, torch.Tensor) else t for name, t in batch.items()}


def _first_requests(batch: dict, n: int) -> dict:
    """The batch cut to its first n requests (the interpreter cannot afford all of them)."""
    end = int(batch["qo_indptr"][n])
    cut = {name: batch[name][:n] for name in ("temperature", "top_k", "top_p")}
    cut.update({name: None if batch[name] is None else batch[name][:end]
                for name in ("target_logits", "draft_tokens", "parents", "draft_probs")})
    return dict(batch, **cut, qo_indptr=batch["qo_indptr"][: n + 1])


@pytest.mark.parametrize("chain", [True, False])
@pytest.mark.parametrize("stochastic", [False, True])
def test_structural_invariants(backend, chain, stochastic):
    vocab = 17
    batch, rnd = _random_batch(1, vocab, 24, chain, stochastic)
    device = device_of(backend)
    nodes, count, out = cpu(ops.rejection_sample(**_to(device, batch), seed=torch.arange(24, device=device),
                                                 offset=5, backend=backend))
    tokens = batch["draft_tokens"]
    for r, parents in enumerate(rnd.parent_lists):
        m = int(count[r])
        assert 1 <= m <= len(parents)
        path, emitted = nodes[r, :m].tolist(), out[r, :m].tolist()
        assert path[0] == 0
        assert all(parents[b] == a for a, b in zip(path, path[1:]))
        start = int(rnd.qo_indptr[r])
        assert emitted[:-1] == [int(tokens[start + node]) for node in path[1:]]
        assert all(0 <= t < vocab for t in emitted)
        assert (nodes[r, m:] == -1).all() and (out[r, m:] == -1).all()


TRITON_REQUESTS = 12 if INTERPRETED else 40  # of the 40 below: the interpreter runs ~10 requests a second


@pytest.mark.parametrize("chain", [False, True])
@pytest.mark.parametrize("stochastic", [False, True])
def test_seeded_determinism_and_agreement_across_backends(chain, stochastic):
    # Greedy and sampled requests mixed, with temperatures, top-k (incl. 1 and off) and top-p.
    batch, _ = _random_batch(2, 1000, 40, chain=chain, stochastic=stochastic)
    seed = torch.arange(40) * 7919
    results = {b: ops.rejection_sample(**batch, seed=seed, offset=3, max_nodes=16, backend=b)
               for b in ("reference", "cpu")}
    again = ops.rejection_sample(**batch, seed=seed, offset=3, max_nodes=16, backend="cpu")
    other_round = ops.rejection_sample(**batch, seed=seed, offset=4, max_nodes=16, backend="cpu")
    for a, b, c in zip(results["reference"], results["cpu"], again):
        assert torch.equal(a, b) and torch.equal(b, c)
    assert not torch.equal(other_round[2], again[2])
    uniforms = torch.rand(batch["target_logits"].shape[0], 2, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(9))
    by_uniforms = [ops.rejection_sample(**batch, uniforms=uniforms, max_nodes=16, backend=b)
                   for b in ("reference", "cpu")]
    for a, b in zip(*by_uniforms):
        assert torch.equal(a, b)
    # Triton: the same outputs from the same seeds (Philox in the kernel) and from the same uniforms.
    n, device = TRITON_REQUESTS, device_of("triton")
    small = _to(device, _first_requests(batch, n))
    randomness = (dict(seed=seed[:n].to(device), offset=3),
                  dict(uniforms=uniforms[: int(batch["qo_indptr"][n])].to(device)))
    for extra, expected in zip(randomness, (results["cpu"], by_uniforms[1])):
        got = cpu(ops.rejection_sample(**small, **extra, max_nodes=16, backend="triton"))
        for a, b in zip(expected, got):
            assert torch.equal(a[:n], b)


@pytest.mark.skipif("cuda" not in BACKENDS, reason="needs a GPU and dspark._C built with CUDA (setup.py)")
@pytest.mark.parametrize("case", ["tied_tree", "tied_stochastic_chain", "tree", "stochastic_tree", "bf16_tree",
                                  "fp16_stochastic_chain"])
@pytest.mark.parametrize("randomness", ["seed", "uniforms"])
def test_cuda_matches_cpu_on_random_rounds(case, randomness):
    """The CUDA kernel against the C++ backend: identical outputs given identical uniforms, and given
    the same seeds (Philox in the kernel, keyed as on every backend). V = 1000 spans four 256-thread
    tiles, the last one partial; tied logits put ties at the top-k and top-p boundaries."""
    chain, stochastic = "chain" in case, "stochastic" in case
    batch, _ = _random_batch(30 + len(case), 1000, 40, chain, stochastic, tied=case.startswith("tied"))
    for prefix, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if case.startswith(prefix):
            batch["target_logits"] = batch["target_logits"].to(dtype)
            if batch["draft_probs"] is not None:
                batch["draft_probs"] = batch["draft_probs"].to(dtype)
    uniforms = torch.rand(batch["target_logits"].shape[0], 2, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(len(case)))
    extra = dict(seed=torch.arange(40) * 7919 + 1, offset=5) if randomness == "seed" else dict(uniforms=uniforms)
    expected = ops.rejection_sample(**batch, **extra, max_nodes=16, backend="cpu")
    got = cpu(ops.rejection_sample(**_to(device_of("cuda"), batch), **_to(device_of("cuda"), extra), max_nodes=16,
                                   backend="cuda"))
    for a, b in zip(expected, got):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", ["tied_tree", "tied_stochastic_chain", "multi_tile_tree", "multi_tile_stochastic",
                                  "bf16_tree", "short_list_tied_tree", "short_list_tied_stochastic_chain"])
def test_triton_matches_cpu_on_random_rounds(monkeypatch, case):
    """The main proof for the Triton kernel: identical outputs to the C++ backend given identical
    uniforms. Tied logits put ties at the top-k and top-p boundaries; small tiles (as on the GPU) put
    the vocabulary across many tiles, with V not a multiple of the tile; a short support list (4 ids)
    makes some top-k rows fall back to whole-row passes while others read their list."""
    import dspark.triton_kernels.rejection_sampling as kernel

    chain, stochastic = "chain" in case, "stochastic" in case
    vocab = 1000 if case.startswith("multi_tile") else 333
    num_requests = TRITON_REQUESTS
    if case.startswith("multi_tile"):  # the compiled kernel's radix width, over 4 tiles (the last one partial)
        monkeypatch.setattr(kernel, "MAX_BLOCK", 256)
        monkeypatch.setattr(kernel, "RADIX_BITS", 4)
        num_requests = min(num_requests, 8)
    if case.startswith("short_list"):
        monkeypatch.setattr(kernel, "SUPPORT_CAP", 4)
    tied = case.startswith("tied") or case.startswith("short_list")
    batch, _ = _random_batch(10 + len(case), vocab, num_requests, chain, stochastic, tied=tied)
    if case.startswith("bf16"):
        batch["target_logits"] = batch["target_logits"].bfloat16()
    uniforms = torch.rand(batch["target_logits"].shape[0], 2, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(len(case)))
    expected = ops.rejection_sample(**batch, uniforms=uniforms, max_nodes=16, backend="cpu")
    device = device_of("triton")
    got = cpu(ops.rejection_sample(**_to(device, batch), uniforms=uniforms.to(device), max_nodes=16,
                                   backend="triton"))
    for a, b in zip(expected, got):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cap", [1024, 4])
def test_triton_lists_the_top_k_support(monkeypatch, cap):
    """The pre-pass lists, in id order, every id whose logit reaches the row's k-th largest (top-k's
    kept ids and the rest of their tie group) when there are at most SUPPORT_CAP of them, else none
    (-1); rows without top-k list the ids whose p reaches (1 - top_p) / (2V) (top-p keeps none below),
    and none under top_p 1. Tied logits make tie groups of every size at the boundary."""
    import dspark.triton_kernels.rejection_sampling as kernel

    monkeypatch.setattr(kernel, "SUPPORT_CAP", cap)
    gen = torch.Generator().manual_seed(cap)
    rows, vocab = 12, 333
    logits = (torch.randn(rows, vocab, generator=gen) * 2).round()
    logits[1::3] = torch.randn(rows // 3, vocab, generator=gen)  # untied rows too
    top_k = torch.tensor([0, 1, 3, 5, 17, vocab, 2, 40, 1, 0, 7, 100], dtype=torch.int32)
    top_p = torch.tensor([0.9, 0.9, 0.9, 0.9, 0.9, 0.5, 0.9, 0.9, 0.9, 1.0, 0.9, 0.9])
    device = device_of("triton")
    stats, support = kernel.row_stats(logits.to(device), torch.arange(rows + 1, dtype=torch.int32, device=device),
                                      torch.full((rows,), 0.7, device=device), top_k.to(device), top_p.to(device))
    stats, support = stats.cpu(), support.cpu()
    listed = 0
    for row, (k, top) in enumerate(zip(top_k.tolist(), top_p.tolist())):
        n, reach = int(stats[row, 8]), None
        if 0 < k < vocab:
            reach = torch.nonzero(logits[row] >= logits[row].topk(k).values[-1]).flatten()
        if (reach is None or reach.numel() > cap) and top < 1.0:  # top-p lists over the top-k-filtered p
            probs = target_distribution(logits[row], 0.7, k, 1.0)
            reach = torch.nonzero(probs >= (1.0 - top) / (2 * vocab)).flatten()
        if reach is None:
            assert n == -1
            continue
        assert n == (reach.numel() if reach.numel() <= cap else -1), row
        if n >= 0:
            assert support[row, :n].tolist() == reach.tolist(), row
            listed += 1
    assert listed >= (3 if cap == 4 else 10)


@pytest.mark.parametrize("stochastic", [False, True])
def test_plan_runs_the_op(backend, stochastic):
    """plan_rejection_sample(...).run, the engine's path, returns what the op returns (seeded trees with
    greedy and sampled requests, top-k and top-p), and still refuses shapes the kernel would misread."""
    n = TRITON_REQUESTS if backend == "triton" else 12
    batch, _ = _random_batch(21, 200, n, chain=False, stochastic=stochastic)
    device = device_of(backend)
    batch = _to(device, batch)
    seed, offset = torch.arange(n, device=device) * 31 + 7, torch.full((n,), 2, device=device)
    expected = cpu(ops.rejection_sample(**batch, seed=seed, offset=offset, max_nodes=16, backend=backend))
    plan = ops.plan_rejection_sample(device, backend=backend)
    args = [batch[k] for k in ("target_logits", "draft_tokens", "qo_indptr", "parents", "draft_probs", "temperature",
                               "top_k", "top_p")]
    got = cpu(plan.run(*args, seed, offset, 16))
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    with pytest.raises(ValueError, match="temperature"):
        plan.run(*args[:5], batch["temperature"][:-1], *args[6:], seed, offset, 16)
    with pytest.raises(ValueError, match="seed"):
        plan.run(*args, seed.int(), offset, 16)


def test_plan_refuses_another_device():
    plan = ops.plan_rejection_sample("meta")
    with pytest.raises(ValueError, match="plan's device"):
        plan.run(torch.zeros(1, 4), torch.zeros(1, dtype=torch.int64), torch.tensor([0, 1], dtype=torch.int32), None,
                 None, torch.zeros(1), torch.zeros(1, dtype=torch.int32), torch.ones(1),
                 torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64), 1)


def test_generator_draws_reproducible_uniforms(backend):
    batch, _ = _random_batch(3, 50, 6, chain=True, stochastic=False)
    batch = _to(device_of(backend), batch)
    first = ops.rejection_sample(**batch, generator=torch.Generator().manual_seed(1), backend=backend)
    second = ops.rejection_sample(**batch, generator=torch.Generator().manual_seed(1), backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_seed_results_do_not_depend_on_batch_neighbours(backend):
    batch, rnd = _random_batch(4, 40, 5, chain=False, stochastic=True)
    device = device_of(backend)
    full = cpu(ops.rejection_sample(**_to(device, batch), seed=torch.arange(5, device=device) + 100, offset=1,
                                    backend=backend))
    start, end = int(rnd.qo_indptr[2]), int(rnd.qo_indptr[3])
    alone = ops.rejection_sample(
        *on(device, batch["target_logits"][start:end], batch["draft_tokens"][start:end],
            torch.tensor([0, end - start], dtype=torch.int32), batch["parents"][start:end],
            batch["draft_probs"][start:end], batch["temperature"][2:3], batch["top_k"][2:3], batch["top_p"][2:3]),
        seed=102, offset=1, max_nodes=full[0].shape[1], backend=backend,
    )
    for a, b in zip(full, cpu(alone)):
        assert torch.equal(a[2:3], b)


def test_rows_over_a_draft_vocabulary_equal_their_widened_rows(backend):
    """draft_probs [T, V_d] over draft_vocab give exactly the results of the same rows widened to [T, V]
    with zeros (seeded, trees, greedy and sampled requests; drafts inside and outside the subset)."""
    batch, _ = _random_batch(6, 40, 5, chain=False, stochastic=True)
    device = device_of(backend)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randperm(40, generator=gen)[:17].sort().values
    sparse = torch.softmax(torch.randn(batch["draft_probs"].shape[0], 17, generator=gen) * 2, -1)
    dense = torch.zeros(sparse.shape[0], 40).index_copy_(1, ids, sparse)
    seed = torch.arange(5) + 11
    widened = cpu(ops.rejection_sample(**_to(device, dict(batch, draft_probs=dense)), seed=seed.to(device), offset=4,
                                       backend=backend))
    subset = cpu(ops.rejection_sample(**_to(device, dict(batch, draft_probs=sparse)), draft_vocab=ids.to(device),
                                      seed=seed.to(device), offset=4, backend=backend))
    assert all(torch.equal(a, b) for a, b in zip(widened, subset))


@pytest.mark.parametrize("edit, match", [
    (lambda ids, probs: (ids.flip(0), probs), "strictly increasing"),
    (lambda ids, probs: (torch.cat([ids[:1], ids[:-1]]), probs), "strictly increasing"),
    (lambda ids, probs: (ids + 40, probs), "strictly increasing token ids in"),
    (lambda ids, probs: (ids[:-1], probs), "draft_probs"),
    (lambda ids, probs: (ids.float(), probs), "draft_vocab"),
    (lambda ids, probs: (ids, None), "draft_probs"),
])
def test_bad_draft_vocabularies_are_refused(edit, match):
    batch, _ = _random_batch(6, 40, 3, chain=True, stochastic=True)
    ids = torch.arange(0, 40, 3)
    probs = torch.softmax(torch.randn(batch["draft_probs"].shape[0], ids.numel()), -1)
    ids, probs = edit(ids, probs)
    with pytest.raises(ValueError, match=match):
        ops.rejection_sample(**dict(batch, draft_probs=probs), draft_vocab=ids, seed=1, offset=0)


def test_trusted_calls_skip_value_checks_only(backend):
    """trusted=True (the engine's calls) gives the same results on valid inputs, still checks shapes, and
    on the C++ kernel stays in bounds with values the checks would refuse."""
    batch, _ = _random_batch(7, 40, 4, chain=False, stochastic=True)
    device = device_of(backend)
    seed = torch.arange(4) + 3
    checked = cpu(ops.rejection_sample(**_to(device, batch), seed=seed.to(device), offset=1, backend=backend))
    trusted = cpu(ops.rejection_sample(**_to(device, batch), seed=seed.to(device), offset=1, backend=backend,
                                       trusted=True))
    assert all(torch.equal(a, b) for a, b in zip(checked, trusted))
    with pytest.raises(ValueError, match="draft_tokens"):
        ops.rejection_sample(**_to(device, dict(batch, draft_tokens=batch["draft_tokens"][:-1])), seed=seed.to(device),
                             offset=1, backend=backend, trusted=True)
    if backend == "cpu":
        bad = batch["draft_tokens"].clone()
        bad[1] = 10**9
        nodes, counts, tokens = ops.rejection_sample(**dict(batch, draft_tokens=bad), seed=seed, offset=1,
                                                     backend="cpu", trusted=True)
        assert ((tokens == -1) | ((tokens >= 0) & (tokens < 40))).all() and (counts >= 1).all()


def test_greedy_requests_rows_of_draft_probs_are_never_read(backend):
    """Rows of greedy requests may hold anything (NaN, garbage): the results are those with zeros there."""
    batch, rnd = _random_batch(5, 40, 5, chain=False, stochastic=True)
    device = device_of(backend)
    seed = torch.arange(5) + 7
    clean = cpu(ops.rejection_sample(**_to(device, batch), seed=seed.to(device), offset=2, backend=backend))
    greedy = torch.repeat_interleave(batch["temperature"] == 0, (rnd.qo_indptr[1:] - rnd.qo_indptr[:-1]).long())
    assert greedy.any() and not greedy.all()
    probs = batch["draft_probs"].clone()
    probs[greedy] = float("nan")
    probs[greedy.nonzero()[0]] = -5.0
    dirty = cpu(ops.rejection_sample(**_to(device, dict(batch, draft_probs=probs)), seed=seed.to(device), offset=2,
                                     backend=backend))
    assert all(torch.equal(a, b) for a, b in zip(clean, dirty))
    probs = batch["draft_probs"].clone()
    probs[(~greedy).nonzero()[0]] = float("nan")  # a sampled request's row is still checked
    with pytest.raises(ValueError, match="draft_probs"):
        ops.rejection_sample(**_to(device, dict(batch, draft_probs=probs)), seed=seed.to(device), offset=2,
                             backend=backend)


def test_idle_requests_accept_nothing_and_change_nothing(backend):
    """Requests with n_r = 0 (cache rows idle this round) get num_accepted 0 and rows of -1, and the other
    requests' results are those of the round without them (seeded per request)."""
    batch, rnd = _random_batch(4, 40, 5, chain=False, stochastic=True)
    device = device_of(backend)
    seed = torch.arange(5) + 100
    full = cpu(ops.rejection_sample(**_to(device, batch), seed=seed.to(device), offset=3, backend=backend))
    offsets = rnd.qo_indptr.tolist()
    live = list(range(len(offsets) - 1))
    order = [None, live[0], live[1], None, None] + live[2:] + [None]  # None: an idle row
    indptr, picks = [0], []
    for r in order:
        indptr.append(indptr[-1] + (0 if r is None else offsets[r + 1] - offsets[r]))
        picks.append(0 if r is None else r)
    picks = torch.tensor(picks)
    idle = torch.tensor([r is None for r in order])
    temperature = torch.where(idle, torch.tensor(0.0), batch["temperature"][picks])
    with_idle = dict(batch, qo_indptr=torch.tensor(indptr, dtype=torch.int32), temperature=temperature,
                     top_k=batch["top_k"][picks], top_p=batch["top_p"][picks])
    out = cpu(ops.rejection_sample(**_to(device, with_idle), seed=seed[picks].to(device), offset=3,
                                   max_nodes=full[0].shape[1], backend=backend))
    for i, r in enumerate(order):
        if r is None:
            assert int(out[1][i]) == 0 and (out[0][i] == -1).all() and (out[2][i] == -1).all()
        else:
            assert all(torch.equal(a[i], b[r]) for a, b in zip(out, full))


@pytest.mark.parametrize("stochastic", [False, True])
def test_uniform_zero_never_accepts_a_zero_probability_token(backend, stochastic):
    vocab = 6
    logits = torch.tensor([[1.0, 0.5, NEG_INF, 0.2, NEG_INF, 0.0]] * 2)
    probs = torch.full((2, vocab), 1.0 / vocab) if stochastic else None
    uniforms = torch.zeros(2, 2, dtype=torch.float64)
    args = on(device_of(backend), logits, torch.tensor([0, 2]), torch.tensor([0, 2], dtype=torch.int32), probs,
              uniforms)
    nodes, count, out = cpu(ops.rejection_sample(*args[:3], draft_probs=args[3], uniforms=args[4], backend=backend))
    assert count.tolist() == [1]
    assert out[0, 0] == 0  # uniform 0 samples the first id that has mass, never id 2 or 4


def test_sampled_ids_stay_in_range_with_a_padded_last_tile(backend):
    vocab = 8193  # one id past a power-of-two tile
    logits = torch.full((1, vocab), NEG_INF)
    logits[0, vocab - 1] = 0.0
    logits[0, 17] = 0.0
    device = device_of(backend)
    for u in (0.0, 0.4999, 0.5, 1.0 - 2.0**-53):
        uniforms = torch.tensor([[0.0, u]], dtype=torch.float64)
        args = on(device, logits, torch.tensor([3]), torch.tensor([0, 1], dtype=torch.int32), uniforms)
        _, _, out = cpu(ops.rejection_sample(*args[:3], uniforms=args[3], backend=backend))
        assert int(out[0, 0]) == (17 if u < 0.5 else vocab - 1)


def test_all_zero_residual_falls_back_to_the_target(backend):
    # p is uniform on four ids (exact in float32 and float64), q equals it; the drafted child has
    # p = q = 0 and is rejected, leaving max(p - q, 0) = 0 everywhere: the correction comes from p.
    vocab = 10
    logits = torch.full((2, vocab), NEG_INF)
    logits[:, [1, 4, 6, 8]] = 0.0
    probs = torch.softmax(logits, -1)
    device = device_of(backend)
    for u, expected in ((0.1, 1), (0.3, 4), (0.6, 6), (0.9, 8)):
        uniforms = torch.tensor([[0.0, u], [0.5, 0.0]], dtype=torch.float64)
        args = on(device, logits, torch.tensor([0, 3]), torch.tensor([0, 2], dtype=torch.int32), probs, uniforms)
        nodes, count, out = cpu(ops.rejection_sample(*args[:3], draft_probs=args[3], uniforms=args[4],
                                                     backend=backend))
        assert count.tolist() == [1] and out.tolist() == [[expected, -1]]


def test_reference_sampler_helpers():
    weights = torch.tensor([0.0, 0.25, 0.0, 0.75], dtype=torch.float64)
    assert [sample_index(weights, u) for u in (0.0, 0.2499, 0.25, 0.99)] == [1, 1, 3, 3]
    p = target_distribution(torch.tensor([3.0, 1.0, 2.0, 2.0, 0.0]), 1.0, 3, 1.0)
    assert (p > 0).tolist() == [True, False, True, True, False]  # tie at the boundary: lower id kept
    p = target_distribution(torch.tensor([3.0, 1.0, 2.0, 2.0, 0.0]), 1.0, 0, 0.5)
    assert (p > 0).tolist() == [True, False, False, False, False]
