"""Builders of random rounds for the tests: trees, ragged batches, contiguous and paged caches; tiny
random Llama checkpoints; a scoped torch thread count."""

from __future__ import annotations

import contextlib
import dataclasses

import torch


@contextlib.contextmanager
def threads(count: int):
    """torch's (and the C++ kernels') OpenMP thread count set to `count` inside the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def random_parents(n: int, gen: torch.Generator, chain: bool) -> list[int]:
    if chain or n == 0:
        return list(range(-1, n - 1))
    return [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, n)]


@dataclasses.dataclass
class Round:
    qo_indptr: torch.Tensor
    parents: torch.Tensor | None
    cache_seqlens: torch.Tensor
    counts: list[int]
    parent_lists: list[list[int]]


def random_round(gen: torch.Generator, num_requests: int, max_nodes: int, max_committed: int, chain: bool,
                 min_nodes: int = 1) -> Round:
    counts = [int(torch.randint(min_nodes, max_nodes + 1, (1,), generator=gen)) for _ in range(num_requests)]
    counts[0] = max_nodes  # the largest tree always appears
    committed = [int(torch.randint(0, max_committed + 1, (1,), generator=gen)) for _ in range(num_requests)]
    committed[-1] = 0 if num_requests > 1 else committed[-1]  # an empty prefix always appears
    if num_requests > 2:
        committed[1] = max_committed
    parent_lists = [random_parents(n, gen, chain) for n in counts]
    indptr = torch.tensor([0] + list(torch.tensor(counts).cumsum(0)), dtype=torch.int32)
    parents = None if chain else torch.tensor([p for ps in parent_lists for p in ps], dtype=torch.int32)
    return Round(indptr, parents, torch.tensor(committed, dtype=torch.int32), counts, parent_lists)


@dataclasses.dataclass
class Cache:
    k: torch.Tensor
    v: torch.Tensor
    block_table: torch.Tensor | None


def random_cache(gen: torch.Generator, needed: list[int], num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 block_size: int | None, lead: tuple[int, ...] = ()) -> Cache:
    """Random K/V everywhere (also past what is needed, so stray reads show). Paged caches get
    shuffled block ids, spare blocks, and -1 in the unused tail of each block-table row."""
    if block_size is None:
        shape = (*lead, len(needed), max(needed) + 3, num_kv_heads, head_dim)
        block_table = None
    else:
        per_request = [(n + block_size - 1) // block_size for n in needed]
        num_blocks = sum(per_request) + 3
        ids = torch.randperm(num_blocks, generator=gen)
        block_table = torch.full((len(needed), max(per_request) + 1), -1, dtype=torch.int32)
        used = 0
        for r, count in enumerate(per_request):
            block_table[r, :count] = ids[used: used + count].to(torch.int32)
            used += count
        shape = (*lead, num_blocks, block_size, num_kv_heads, head_dim)
    k = torch.randn(shape, generator=gen).to(dtype)
    v = torch.randn(shape, generator=gen).to(dtype)
    return Cache(k, v, block_table)


def write_tiny_llama(path, vocab: int, hidden: int = 64, layers: int = 3, heads: int = 4, kv_heads: int = 2,
                     max_positions: int = 512, sharpen: float = 1.0, seed: int = 0):
    """A random transformers Llama (intermediate size 2 * hidden, untied lm_head, bos 1, eos 2) made
    after torch.manual_seed(seed), its lm_head scaled by `sharpen` (a sharper, less uniform model),
    saved to path. Returns it in eval mode."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                      max_position_embeddings=max_positions, tie_word_embeddings=False,
                                      bos_token_id=1, eos_token_id=2)
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        hf.lm_head.weight.mul_(sharpen)
    hf.save_pretrained(path)
    return hf


def delegating_target(model):
    """A TargetModel of one's own (a serving stack's), forwarding to `model`: the abstract interface only,
    no planned forward."""
    from dspark.models import TargetModel

    class Delegating(TargetModel):
        config = model.config

        @property
        def dtype(self):
            return model.dtype

        @property
        def device(self):
            return model.device

        def forward(self, cache, rnd, capture_layers=()):
            return model.forward(cache, rnd, capture_layers)

        def logits(self, out):
            return model.logits(out)

        def shared_weights(self):
            return model.shared_weights()

    return Delegating()
