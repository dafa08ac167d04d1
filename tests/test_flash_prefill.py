"""When a library's fused attention may take a prefill (flash-attn on CUDA for fresh prompts, torch SDPA on CPU
for prompts fresh or over their cached prefix): never for decoding, short, tree, paged or batch-invariant
rounds on CPU; and the CPU path against the float64 reference of tree_attention."""

import pytest
import torch

from dspark.batch import build_round
from dspark.cache import KVCache
from dspark.models import flash_prefill
from dspark.reference.tree_attention import tree_attention as reference_tree_attention


def test_fresh_prefill_length_marks_only_chains_into_empty_rows():
    fresh = build_round(3, [(0, [5] * 7, None), (2, [1, 2], None)], [0, 4, 0])
    assert fresh.fresh_prefill_len == 7
    assert build_round(3, [(0, [5] * 7, None), (1, [1, 2], None)], [0, 4, 0]).fresh_prefill_len == 0  # a prefix
    assert build_round(2, [(0, [5, 6, 7], [-1, 0, 0])], [0, 0]).fresh_prefill_len == 0  # a tree


def test_cuda_path_never_takes_cpu_tensors(monkeypatch):
    monkeypatch.setattr(flash_prefill, "MIN_TOKENS", 1)
    rnd = build_round(1, [(0, list(range(40)), None)], [0])
    assert not flash_prefill.applies(torch.randn(40, 4, 64, dtype=torch.bfloat16), rnd)


def test_cpu_plan_only_for_long_enough_prefills_it_may_change(monkeypatch):
    n = flash_prefill.CPU_MIN_TOKENS
    cache = KVCache(1, 2, 2 * n + 8, 2, 64, torch.bfloat16)

    def plan(entries, seqlens, dtype=torch.bfloat16, batch_invariant=False, prefill=True, on=cache):
        on.seqlens.copy_(torch.tensor(seqlens, dtype=torch.int32))
        rnd = build_round(2, entries, seqlens, prefill=prefill)
        return flash_prefill.plan_cpu(rnd, on, dtype, 0.125, batch_invariant)

    fresh, over_prefix = [(0, list(range(n)), None), (1, [1, 2], None)], [(0, list(range(n)), None)]
    assert plan(fresh, [0, 0]) is not None and plan(over_prefix, [n, 0]) is not None
    assert plan([(0, list(range(n - 1)), None)], [0, 0]) is None  # short
    assert plan(fresh, [0, 0], batch_invariant=True) is None
    assert plan(over_prefix, [n, 0], prefill=False) is None  # a decoding or verification round
    assert plan(fresh, [0, 0], dtype=torch.float32) is None  # a cache of another dtype
    assert plan([(0, list(range(n)), list(range(-1, n - 1)))], [0, 0]) is None  # parents given: a tree round
    paged = KVCache(1, 2, 2 * n + 8, 2, 64, torch.bfloat16, block_size=16)
    assert plan(fresh, [0, 0], on=paged) is None
    monkeypatch.setenv("DSPARK_FLASH_PREFILL", "0")
    assert plan(fresh, [0, 0]) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 3])
def test_cpu_sdpa_matches_the_reference_request_by_request(dtype, group):
    """Four prompts in six cache rows (two idle), two of them over a committed prefix, GQA or not: each request
    attends causally to its prefix and its own tokens only, as the float64 reference of tree_attention."""
    g = torch.Generator().manual_seed(31)
    kv_heads, dim = 2, 64
    lengths, prefixes = {0: 37, 2: 5, 3: 70, 5: 66}, [0, 11, 0, 50, 0, 130]
    rnd = build_round(6, [(row, list(range(n)), None) for row, n in lengths.items()], prefixes, prefill=True)
    cache = KVCache(1, 6, 200, kv_heads, dim, dtype)
    cache.k.normal_(generator=g)  # committed prefixes (and stale slots past them, which must stay unseen)
    cache.v.normal_(generator=g)
    cache.seqlens.copy_(torch.tensor(prefixes, dtype=torch.int32))
    total = sum(lengths.values())
    q = torch.randn(total, kv_heads * group, dim, generator=g).to(dtype)
    k, v = (torch.randn(total, kv_heads, dim, generator=g).to(dtype) for _ in range(2))
    cache.write(0, rnd.write_rows, rnd.write_slots, k, v)
    sdpa = flash_prefill.plan_cpu(rnd, cache, dtype, 0.11, batch_invariant=False)
    assert sdpa is not None
    out = sdpa.run(q, cache.k[0], cache.v[0])
    expected = reference_tree_attention(q.double(), cache.k[0].double(), cache.v[0].double(), rnd.qo_indptr,
                                        cache.seqlens, None, sm_scale=0.11)
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    assert out.dtype == dtype and (out.double() - expected).abs().max() < tolerance


def test_a_prompt_prefilled_in_chunks_matches_tree_attention(tmp_path, monkeypatch):
    """A tiny Llama in fp32 prefills a 150-token prompt in two chunks (70 fresh, 80 over the prefix): SDPA's
    hidden states and cache equal tree_attention's (DSPARK_FLASH_PREFILL=0) within fp32 rounding."""
    from builders import write_tiny_llama
    from dspark.models import load_model

    write_tiny_llama(tmp_path, 97, 64, 2, seed=5)
    model = load_model(str(tmp_path), torch.float32)
    c = model.config
    prompt = torch.randint(3, 97, (150,), generator=torch.Generator().manual_seed(6)).tolist()
    planned = []
    plan_cpu = flash_prefill.plan_cpu
    monkeypatch.setattr(flash_prefill, "plan_cpu", lambda *a: planned.append(plan_cpu(*a)) or planned[-1])

    def prefill():
        cache = KVCache(c.num_layers, 1, 160, c.num_kv_heads, c.head_dim, torch.float32)
        hidden = []
        for start, end in ((0, 70), (70, 150)):
            rnd = build_round(1, [(0, prompt[start:end], None)], [start], prefill=True)
            hidden.append(model.forward(cache, rnd)[0])
            cache.seqlens.fill_(end)
        return torch.cat(hidden), cache

    sdpa, sdpa_cache = prefill()
    assert len(planned) == 2 and all(p is not None for p in planned)
    monkeypatch.setenv("DSPARK_FLASH_PREFILL", "0")
    tree, tree_cache = prefill()
    torch.testing.assert_close(sdpa, tree, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sdpa_cache.k, tree_cache.k, rtol=1e-4, atol=1e-4)
