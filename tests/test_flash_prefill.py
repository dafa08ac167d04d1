"""When a library's fused attention may take a prefill (flash-attn on CUDA, torch SDPA on CPU): only fresh
causal prefills, never batch-invariant ones on CPU; and the CPU path against the float64 reference."""

import pytest
import torch

from dspark.batch import build_round
from dspark.models import flash_prefill
from dspark.reference.tree_attention import tree_attention as reference_tree_attention


def test_fresh_prefill_length_marks_only_chains_into_empty_rows():
    fresh = build_round(3, [(0, [5] * 7, None), (2, [1, 2], None)], [0, 4, 0])
    assert fresh.fresh_prefill_len == 7
    assert build_round(3, [(0, [5] * 7, None), (1, [1, 2], None)], [0, 4, 0]).fresh_prefill_len == 0  # a prefix
    assert build_round(2, [(0, [5, 6, 7], [-1, 0, 0])], [0, 0]).fresh_prefill_len == 0  # a tree


def test_cpu_takes_sdpa_for_fresh_prefills_unless_batch_invariant(monkeypatch):
    n = flash_prefill.CPU_MIN_TOKENS
    q = torch.randn(n, 4, 64, dtype=torch.bfloat16)
    rnd = build_round(1, [(0, list(range(n)), None)], [0])
    assert rnd.fresh_prefill_len == n and flash_prefill.applies(q, rnd)
    assert not flash_prefill.applies(q, rnd, batch_invariant=True)
    short = build_round(1, [(0, list(range(n - 1)), None)], [0])
    assert not flash_prefill.applies(q[: n - 1], short)
    over_prefix = build_round(2, [(0, list(range(n)), None), (1, [1, 2], None)], [0, 4])
    assert not flash_prefill.applies(q, over_prefix)
    monkeypatch.setenv("DSPARK_FLASH_PREFILL", "0")
    assert not flash_prefill.applies(q, rnd)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 3])
def test_cpu_sdpa_matches_the_reference_request_by_request(dtype, group):
    """Four fresh prompts in six cache rows (two idle), GQA or not: each request attends causally to its own
    tokens only, as the float64 reference of tree_attention over empty cache rows."""
    g = torch.Generator().manual_seed(31)
    lengths = {0: 37, 2: 5, 3: 70, 5: 66}
    rnd = build_round(6, [(row, list(range(n)), None) for row, n in lengths.items()], [0] * 6)
    kv_heads, dim, total = 2, 64, sum(lengths.values())
    q = torch.randn(total, kv_heads * group, dim, generator=g).to(dtype)
    k = torch.randn(total, kv_heads, dim, generator=g).to(dtype)
    v = torch.randn(total, kv_heads, dim, generator=g).to(dtype)
    out = flash_prefill.attention(q, k, v, rnd, sm_scale=0.11)
    # The round's K/V written into each row's cache slots 0..n-1, as the model does before attending.
    k_cache = torch.zeros(6, 80, kv_heads, dim, dtype=torch.float64)
    v_cache = torch.zeros_like(k_cache)
    k_cache[rnd.write_rows, rnd.write_slots], v_cache[rnd.write_rows, rnd.write_slots] = k.double(), v.double()
    expected = reference_tree_attention(q.double(), k_cache, v_cache, rnd.qo_indptr, torch.zeros(6, dtype=torch.int32),
                                        None, sm_scale=0.11)
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    assert out.dtype == dtype and (out.double() - expected).abs().max() < tolerance
