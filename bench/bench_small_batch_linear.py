"""The CPU linear layer of the model code: dspark._C.small_batch_linear against F.linear (MKL / oneDNN)
on SmolLM2's shapes, at the row counts of decoding (1) and verification (2-16), fp32 and bf16 weights.
Weights are cycled through a set larger than the last-level cache, as a model's are in a forward pass.
"""

import pytest
import torch
import torch.nn.functional as F

from dspark.models.linear import _kernel, small_batch_linear

SHAPES = {"mlp_up 1536x576": (1536, 576), "lm_head 49152x576": (49152, 576)}
ROWS = [1, 2, 4, 8, 16]
CACHE_BYTES = 96 << 20


@pytest.mark.skipif(_kernel is None, reason="dspark._C is not built")
@pytest.mark.parametrize("impl", ["small_batch_linear", "F.linear"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_small_batch_linear(benchmark, impl, dtype, rows, shape):
    out_features, in_features = SHAPES[shape]
    weight_bytes = out_features * in_features * torch.finfo(dtype).bits // 8
    copies = max(1, -(-CACHE_BYTES // weight_bytes))
    weights = [torch.randn(out_features, in_features).to(dtype) for _ in range(copies)]
    x = torch.randn(rows, in_features).to(dtype)
    fn = small_batch_linear if impl == "small_batch_linear" else F.linear
    state = {"i": 0}

    def step():
        state["i"] = (state["i"] + 1) % copies
        return fn(x, weights[state["i"]])

    benchmark.extra_info.update(op="linear", impl=impl, rows=rows, shape=shape, dtype=str(dtype))
    benchmark.pedantic(step, rounds=max(10, 2 * copies), warmup_rounds=copies)
