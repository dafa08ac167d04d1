"""A token's logits do not depend on what shares its round (other draft nodes, other requests), in
every CPU dtype: the property behind "greedy speculative decoding is token-identical to plain
decoding". Checked on a tiny random Llama, bit for bit, across rounds far larger than one decode step."""

from __future__ import annotations

import pytest
import torch

from dspark.batch import build_round
from dspark.cache import KVCache
from dspark.models import load_model
from builders import write_tiny_llama


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_invariance")
    write_tiny_llama(path, 97, hidden=64, layers=2, heads=4, kv_heads=2, max_positions=1024, seed=3)
    return path


def first_node_logits(model, prompts, nodes: list[list[int]]):
    """Prefill each prompt in its own round, then verify nodes[r] (a chain) for every request in one
    round; the logits of every request's first node."""
    c = model.config
    cache = KVCache(c.num_layers, len(prompts), 1024, c.num_kv_heads, c.head_dim, model.dtype)
    for row, prompt in enumerate(prompts):
        model.forward(cache, build_round(len(prompts), [(row, prompt, None)], cache.seqlens.tolist()))
        cache.seqlens[row] = len(prompt)
    rnd = build_round(len(prompts), [(r, n, None) for r, n in enumerate(nodes)], cache.seqlens.tolist())
    hidden, _ = model.forward(cache, rnd)
    return model.logits(hidden[rnd.qo_indptr[:-1].long()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_first_node_logits_do_not_depend_on_the_round(tiny_path, dtype):
    model = load_model(str(tiny_path), dtype)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 97, (n,), generator=gen).tolist() for n in (7, 40, 530, 33)]
    chains = [torch.randint(0, 97, (40,), generator=gen).tolist() for _ in prompts]
    alone = torch.cat([first_node_logits(model, [p], [c[:1]]) for p, c in zip(prompts, chains)])
    for lengths in ([1, 1, 1, 1], [8, 1, 8, 3], [40, 40, 40, 40]):  # up to 160 rows in one round
        round_logits = first_node_logits(model, prompts, [c[:n] for c, n in zip(chains, lengths)])
        assert torch.equal(round_logits, alone), lengths
