"""rejection_sample: R requests judge 8-node sampled chains (with draft probabilities) or greedy trees."""

import pytest
import torch

from dspark import ops
from shapes import BACKENDS, NODES, REQUESTS, TREE, VOCABS, indptr

GPU = torch.cuda.is_available()
# Triton is timed on the GPU only: on CPU its interpreter would measure Python, not the kernel.
TRITON = pytest.param("triton", marks=pytest.mark.skipif(not GPU, reason="Triton is timed on a CUDA GPU"))


@pytest.mark.parametrize("backend", BACKENDS + [TRITON])
@pytest.mark.parametrize("mode", ["sampled_chain", "sampled_topk_topp", "greedy_tree"])
@pytest.mark.parametrize("num_requests", REQUESTS)
@pytest.mark.parametrize("vocab", VOCABS)
def test_rejection_sample(benchmark, backend, mode, num_requests, vocab):
    device = "cuda" if backend == "triton" else "cpu"
    gen = torch.Generator().manual_seed(0)
    tokens_total = num_requests * NODES
    logits = torch.randn(tokens_total, vocab, generator=gen) * 3
    draft_probs = torch.softmax(logits + torch.randn(tokens_total, vocab, generator=gen), -1)
    # Drafts follow the target's argmax for most nodes, so that walks go deep.
    tokens = logits.argmax(-1).roll(1)
    logits, draft_probs, tokens = logits.to(device), draft_probs.to(device), tokens.to(device)
    kwargs = dict(seed=torch.arange(num_requests, device=device), offset=0, backend=backend, max_nodes=NODES)
    if mode == "greedy_tree":
        args = (logits, tokens, indptr(num_requests).to(device),
                torch.tensor(TREE * num_requests, dtype=torch.int32, device=device))
        kwargs.update(temperature=0.0)
    else:
        args = (logits, tokens, indptr(num_requests).to(device), None, draft_probs)
        if mode == "sampled_topk_topp":
            kwargs.update(top_k=50, top_p=0.9)

    def run():
        result = ops.rejection_sample(*args, **kwargs)
        if device == "cuda":  # the host clock must wait for the kernel
            torch.cuda.synchronize()
        return result

    benchmark.extra_info.update(op="rejection_sample", backend=backend, R=num_requests, V=vocab, mode=mode)
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
