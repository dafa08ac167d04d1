"""rejection_sample is lossless: the emitted tokens are distributed exactly as sampling the target alone.

The target is a bigram table (the next-token logits depend on the last token only) and the drafter a
deliberately different one, so drafts are often wrong. Each trial is one request of a round; its
first two emitted tokens (t1, t2) are compared by chi-square with the exact law
p(t1 | anchor) * p(t2 | t1). When a round emits only t1, t2 comes from the next round, which for a
bigram target is one plain sample of p(. | t1). Seeds are fixed, so every test is deterministic.

Triton runs the full TRIALS on a GPU. Its interpreter (CPU) affords only TRITON_TRIALS, a smoke test
of the law; there the proof is that its tokens equal the C++ backend's, trial for trial, from the
same seeds (here and in test_rejection_sample.py).
"""

from __future__ import annotations

import pytest
import torch

import dspark.reference.rejection_sample as reference_sampler
from conftest import CUDA_KERNELS, INTERPRETED, device_of
from dspark import ops

VOCAB = 12
ANCHOR = 0
TRIALS = 120_000
REFERENCE_TRIALS = 10_000  # the Python reference is slow; its mutants fail at p < 1e-20 already
MODES = ["stochastic_chain", "deterministic_chain", "deterministic_tree", "stochastic_tree"]
TRITON_TRIALS = 60 if INTERPRETED else TRIALS  # the interpreter runs ~5 sampled top-k/top-p trials a second
# Interpreted: the two modes that between them cover chain and tree, stochastic and deterministic.
TRITON_MODES = ["stochastic_tree", "deterministic_chain"] if INTERPRETED else MODES
P_VALUE = 1e-3
CHAIN = [-1, 0, 1, 2]
TREE = [-1, 0, 0, 1, 1, 2, 3]  # two children at the anchor and at node 1, depth 3
SETTINGS = {  # temperature, top_k, top_p
    "plain": (1.0, 0, 1.0),
    "temperature": (0.6, 0, 1.0),
    "top_k": (1.0, 3, 1.0),
    "top_p": (1.0, 0, 0.7),
    "all": (1.3, 5, 0.8),
}


def bigram_logits(seed: int) -> torch.Tensor:
    return torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 1.5


TARGET = bigram_logits(0)
DRAFTER = bigram_logits(1)


def target_law(setting: str) -> torch.Tensor:
    """[V, V]: row x is the processed target distribution after token x."""
    temperature, top_k, top_p = SETTINGS[setting]
    return torch.stack([reference_sampler.target_distribution(TARGET[x], temperature, top_k, top_p)
                        for x in range(VOCAB)])


def build_round(mode: str, trials: int, seed: int, device: torch.device = torch.device("cpu")) -> dict:
    gen = torch.Generator().manual_seed(seed)
    template = CHAIN if mode.endswith("chain") else TREE
    n = len(template)
    drafter_probs = torch.softmax(DRAFTER, -1)
    tokens = torch.full((trials, n), ANCHOR, dtype=torch.int64)
    for node in range(1, n):
        parent = template[node]
        siblings = [c for c in range(1, n) if template[c] == parent]
        if mode.startswith("stochastic"):  # children i.i.d. from the drafter's distribution
            tokens[:, node] = torch.multinomial(drafter_probs[tokens[:, parent]], 1, generator=gen).squeeze(1)
        else:  # deterministic: the drafter's top-|siblings| tokens, best first
            ranked = torch.topk(DRAFTER[tokens[:, parent]], len(siblings), dim=-1).indices
            tokens[:, node] = ranked[:, siblings.index(node)]
    batch = dict(
        target_logits=TARGET[tokens].reshape(trials * n, VOCAB).float(),
        draft_tokens=tokens.reshape(-1),
        qo_indptr=(torch.arange(trials + 1) * n).to(torch.int32),
        parents=None if template is CHAIN else torch.tensor(template * trials, dtype=torch.int32),
        draft_probs=drafter_probs[tokens].reshape(trials * n, VOCAB).float() if mode.startswith("stochastic") else None,
    )
    return {name: None if t is None else t.to(device) for name, t in batch.items()}


def emitted_pairs(mode: str, setting: str, trials: int, backend: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    temperature, top_k, top_p = SETTINGS[setting]
    device = device_of(backend)
    batch = build_round(mode, trials, seed, device)
    _, count, out = ops.rejection_sample(**batch, temperature=temperature, top_k=top_k, top_p=top_p,
                                         seed=torch.arange(trials, device=device) + 1000 * seed, offset=17,
                                         backend=backend)
    count, out = count.cpu(), out.cpu()
    first = out[:, 0]
    next_round = torch.multinomial(target_law(setting)[first], 1,
                                   generator=torch.Generator().manual_seed(seed + 1)).squeeze(1)
    second = torch.where(count >= 2, out[:, 1], next_round)
    return first, second


def chi_square_p_value(samples: torch.Tensor, probs: torch.Tensor) -> float:
    """Goodness of fit of integer samples to probs; outcomes with expected count < 5 share one bin.
    An outcome of probability 0 that occurs fails at once."""
    counts = torch.bincount(samples, minlength=probs.numel()).double()
    impossible = counts[probs == 0].sum()
    assert impossible == 0, f"{int(impossible)} samples of probability-0 outcomes"
    expected = probs * samples.numel()
    big = expected >= 5
    observed_bins = torch.cat([counts[big], counts[~big].sum().reshape(1)])
    expected_bins = torch.cat([expected[big], expected[~big].sum().reshape(1)])
    keep = expected_bins > 0
    statistic = ((observed_bins[keep] - expected_bins[keep]) ** 2 / expected_bins[keep]).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), statistic / 2))


def assert_lossless(first: torch.Tensor, second: torch.Tensor, setting: str) -> None:
    law = target_law(setting)
    p_first = chi_square_p_value(first, law[ANCHOR])
    p_joint = chi_square_p_value(first * VOCAB + second, (law[ANCHOR][:, None] * law).reshape(-1))
    assert p_first >= P_VALUE and p_joint >= P_VALUE, f"p(first) = {p_first:.2e}, p(first, second) = {p_joint:.2e}"


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("mode", MODES)
def test_emitted_tokens_follow_the_target(mode, setting):
    first, second = emitted_pairs(mode, setting, TRIALS, backend="cpu")
    assert_lossless(first, second, setting)


@pytest.mark.parametrize("mode", TRITON_MODES)
def test_triton_is_lossless_and_matches_cpu(mode):
    # Every rule at once (temperature, top-k, top-p); the interpreter cannot afford more settings.
    first, second = emitted_pairs(mode, "all", TRITON_TRIALS, backend="triton", seed=7)
    cpu_first, cpu_second = emitted_pairs(mode, "all", TRITON_TRIALS, backend="cpu", seed=7)
    assert torch.equal(first, cpu_first) and torch.equal(second, cpu_second)
    assert_lossless(first, second, "all")


@pytest.mark.skipif(not CUDA_KERNELS, reason="needs a GPU and dspark._C built with the CUDA kernels")
@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("mode", MODES)
def test_cuda_is_lossless_and_matches_cpu(mode, setting):
    # Philox is keyed as in the other backends, so the tokens must also agree trial for trial.
    first, second = emitted_pairs(mode, setting, TRIALS, backend="cuda", seed=11)
    cpu_first, cpu_second = emitted_pairs(mode, setting, TRIALS, backend="cpu", seed=11)
    assert_lossless(first, second, setting)
    assert torch.equal(first, cpu_first) and torch.equal(second, cpu_second)


@pytest.mark.parametrize("mode", ["stochastic_chain", "deterministic_tree"])
def test_reference_is_lossless(mode):
    first, second = emitted_pairs(mode, "plain", REFERENCE_TRIALS, backend="reference", seed=5)
    assert_lossless(first, second, "plain")


# The tests have teeth: break a rule of the reference on purpose and the same check must fail.
MUTANTS = {
    # After a rejection, draw the correction from p instead of norm(max(p - q, 0)).
    "residual_is_p": ("stochastic_chain", "residual_after_rejection", lambda residual, q, p: p),
    # Forget to remove a rejected sibling's token from the residual.
    "rejected_sibling_kept": ("deterministic_tree", "remove_rejected", lambda residual, token: residual),
}


@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_a_broken_rule_is_detected(monkeypatch, mutant):
    mode, name, broken = MUTANTS[mutant]
    monkeypatch.setattr(reference_sampler, name, broken)
    first, second = emitted_pairs(mode, "plain", REFERENCE_TRIALS, backend="reference", seed=5)
    with pytest.raises(AssertionError):
        assert_lossless(first, second, "plain")
