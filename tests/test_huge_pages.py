"""Weights copied onto huge pages at load (dspark.huge_pages): the same values in one 2 MiB-aligned mapping,
tied matrices still one object, the same logits as a model left on pytorch's pages, nothing moved twice, and
DSPARK_HUGE_PAGES=0 leaves every tensor where it was."""

from __future__ import annotations

import gc

import pytest
import torch

from builders import write_tiny_llama
from dspark.batch import build_round
from dspark.cache import KVCache, SideCache
from dspark import huge_pages
from dspark.models import load_model
from dspark.models.llama import LlamaModel
from dspark.models.quantized import QuantizedWeight

pytestmark = pytest.mark.skipif(not huge_pages.enabled(), reason="no MADV_HUGEPAGE on this platform")


def test_copies_keep_values_and_lie_in_one_aligned_mapping():
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(3, 5, generator=gen), torch.randint(0, 255, (1000,), dtype=torch.uint8, generator=gen),
               torch.randn(7, generator=gen).bfloat16(), torch.randn(4, 4, generator=gen).t()]  # the last: strided
    moved = huge_pages.onto_huge_pages(tensors)
    for before, after in zip(tensors[:3], moved[:3]):
        assert after.dtype == before.dtype and after.shape == before.shape and torch.equal(after, before)
        assert after.data_ptr() != before.data_ptr() and after.data_ptr() % 64 == 0 and huge_pages.in_arena(after)
    assert moved[0].data_ptr() % huge_pages.HUGE_PAGE == 0  # the mapping starts on a huge page
    assert moved[3] is tensors[3]  # not contiguous: left alone
    assert huge_pages.onto_huge_pages(moved[:1])[0] is moved[0]  # nothing moves twice
    moved[1].fill_(7)  # each copy has its own bytes
    assert int(moved[2].float().abs().sum()) == int(tensors[2].float().abs().sum())


def test_model_weights_move_once_with_ties_kept_and_logits_unchanged(tmp_path, monkeypatch):
    write_tiny_llama(tmp_path, 97, 64, 2, seed=5)
    monkeypatch.setenv("DSPARK_HUGE_PAGES", "0")  # the reference never goes through the copy
    dense = load_model(str(tmp_path), torch.float32)
    blocks = {name: QuantizedWeight.from_dense(t) if t.dim() == 2 else t for name, t in dense.weights.items()}
    blocks["lm_head.weight"] = blocks["embed_tokens.weight"]  # tied
    plain = LlamaModel(dense.config, blocks)
    monkeypatch.delenv("DSPARK_HUGE_PAGES")
    model = LlamaModel(dense.config, blocks)
    data = {n: (t.data if isinstance(t, QuantizedWeight) else t) for n, t in model.weights.items()}
    assert all(huge_pages.in_arena(t) for t in data.values())
    assert not any(huge_pages.in_arena(t.data if isinstance(t, QuantizedWeight) else t) for t in plain.weights.values())
    assert model.weights["lm_head.weight"] is model.weights["embed_tokens.weight"]  # tied: one object
    shorter = model.truncated(1)  # shares the weights: nothing copied again
    assert shorter.weights["layers.0.mlp.down_proj.weight"] is model.weights["layers.0.mlp.down_proj.weight"]

    def logits(m):
        c = m.config
        cache = KVCache(c.num_layers, 1, 64, c.num_kv_heads, c.head_dim, m.dtype)
        tokens = torch.randint(3, 97, (12,), generator=torch.Generator().manual_seed(2)).tolist()
        out = [m.logits(m.forward(cache, build_round(1, [(0, tokens, None)], [0], prefill=True))[0])]
        cache.seqlens.fill_(12)
        out.append(m.logits(m.forward(cache, build_round(1, [(0, [4, 5, 6], [-1, 0, 0])], [12]))[0]))
        return out

    for a, b in zip(logits(model), logits(plain)):
        assert torch.equal(a, b)


def test_caches_start_as_zeros_on_huge_pages_and_mappings_are_freed(monkeypatch):
    cache = KVCache(2, 3, 40, 2, 8, torch.bfloat16)
    side = SideCache(3, 40, 16, torch.float32, seqlens=cache.seqlens)
    for t in (cache.k, cache.v, side.data):
        assert huge_pages.in_arena(t) and t.is_contiguous() and not t.any()
    assert cache.k.shape == (2, 3, 40, 2, 8) and cache.k.dtype == torch.bfloat16 and side.data.shape == (3, 40, 1, 16)
    cache.k.fill_(1.0)
    assert not cache.v.any()  # separate mappings
    address = cache.k.data_ptr()
    del cache, side
    gc.collect()
    assert not any(lo <= address < hi for lo, hi, alive in huge_pages._arenas if alive() is not None)
    monkeypatch.setenv("DSPARK_HUGE_PAGES", "0")
    assert not huge_pages.in_arena(KVCache(1, 1, 8, 1, 8, torch.float32).k)


def test_weights_that_would_crowd_memory_stay_where_they_are(monkeypatch):
    """Copies beyond half of the available memory are not made (the originals live on until the caller drops
    them); below it they are."""
    t = torch.randn(1000)
    monkeypatch.setattr(huge_pages, "_available_bytes", lambda: 7000)
    assert huge_pages.onto_huge_pages([t])[0] is t
    monkeypatch.setattr(huge_pages, "_available_bytes", lambda: 9000)
    assert huge_pages.in_arena(huge_pages.onto_huge_pages([t])[0])


def test_a_refused_mapping_keeps_pytorchs_pages(monkeypatch):
    """A system that refuses the mapping (memory limits, no THP in the kernel): the same tensors, nothing fails."""
    def refuse(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(huge_pages.mmap, "mmap", refuse)
    t = torch.randn(5)
    assert huge_pages.onto_huge_pages([t])[0] is t
    z = huge_pages.zeros((3, 4), torch.float16)
    assert z.shape == (3, 4) and z.dtype == torch.float16 and not z.any() and not huge_pages.in_arena(z)
