"""When flash-attn may take a prefill: only fresh causal prefills of CUDA half tensors."""

import torch

from dspark.batch import build_round
from dspark.models import flash_prefill


def test_fresh_prefill_length_marks_only_chains_into_empty_rows():
    fresh = build_round(3, [(0, [5] * 7, None), (2, [1, 2], None)], [0, 4, 0])
    assert fresh.fresh_prefill_len == 7
    assert build_round(3, [(0, [5] * 7, None), (1, [1, 2], None)], [0, 4, 0]).fresh_prefill_len == 0  # a prefix
    assert build_round(2, [(0, [5, 6, 7], [-1, 0, 0])], [0, 0]).fresh_prefill_len == 0  # a tree


def test_cpu_tensors_always_use_tree_attention(monkeypatch):
    monkeypatch.setattr(flash_prefill, "MIN_TOKENS", 1)
    rnd = build_round(1, [(0, list(range(40)), None)], [0])
    assert rnd.fresh_prefill_len == 40
    assert not flash_prefill.applies(torch.randn(40, 4, 64, dtype=torch.bfloat16), rnd)
